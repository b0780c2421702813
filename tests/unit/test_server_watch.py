"""ServerWatch: which server a member's address leads to (pure logic, no server)."""

from __future__ import annotations

import pytest

from areplica.servers import ACCEPT_AFTER, ServerWatch

A = (7, 1000.0, 5433)
B = (7, 1001.5, 5434)
A2 = (7, 2000.0, 5433)  # A after a restart: same port, another start time


def test_the_first_server_is_the_members_and_others_are_not_used() -> None:
    watch = ServerWatch("member 'r'")
    assert watch.opened(A)
    assert watch.opened(A)
    assert not watch.unsettled
    assert not watch.opened(B)  # not used: the probes must tell what happened
    assert watch.unsettled and watch.questioned == B and watch.current == A


def test_several_servers_at_once_refuse_the_member_with_what_to_list() -> None:
    watch = ServerWatch("member 'r'")
    watch.opened(A)
    assert watch.judge({A, B}) == "several"
    assert watch.refusal is not None
    assert "several servers" in watch.refusal
    assert "replicas=[...]" in watch.refusal and "patroni=" in watch.refusal
    assert "port 5433" in watch.refusal and "port 5434" in watch.refusal
    assert not watch.opened(A)  # refused: nothing is used, not even the first server
    assert "refused" in watch.mismatch(A)


def test_a_server_that_changed_over_time_is_no_refusal() -> None:
    watch = ServerWatch("member 'r'")
    watch.opened(A)
    assert not watch.opened(A2)  # a restart: new connections reach A2
    assert watch.judge({A2}) == "changed"
    assert watch.current == A2 and watch.refusal is None and not watch.unsettled
    assert watch.opened(A2) and not watch.opened(A)


@pytest.mark.parametrize("same_as_before", [True, False])
def test_a_refusal_is_lifted_after_many_fresh_connections_on_one_server(
    same_as_before: bool,
) -> None:
    watch = ServerWatch("member 'r'")
    watch.opened(A)
    watch.judge({A, B})
    target = A if same_as_before else B
    verdicts = [watch.judge({target}) for _ in range(ACCEPT_AFTER)]
    assert verdicts[:-1] == ["several"] * (ACCEPT_AFTER - 1)
    assert verdicts[-1] == ("same" if same_as_before else "changed")
    assert watch.refusal is None and watch.current == target
    # One more mix starts the count again.
    assert watch.judge({A, B}) == "several"
    assert watch.judge({A}) == "several"


def test_reset_forgets_everything() -> None:
    watch = ServerWatch("member 'r'")
    watch.opened(A)
    watch.judge({A, B})
    watch.reset()
    assert watch.current is None and watch.refusal is None and not watch.unsettled
    assert watch.opened(B) and watch.current == B
