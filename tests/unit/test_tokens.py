"""Tokens from clients are hostile input: bounded parsing, bounded warn-once memory."""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from areplica.consistency import MAX_TOKEN_LENGTH, WarnOnce, format_lsn, parse_lsn

LOTS = settings(max_examples=3000, deadline=None)

hexdigits = st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=9)
near_tokens = st.builds(
    lambda a, sep, b, pad: pad + a + sep + b + pad,
    hexdigits,
    st.sampled_from(["/", "//", "\\", ":", "/ ", ""]),
    hexdigits,
    st.sampled_from(["", " ", "\t", "\n", "\x00", "\u00a0"]),
)


@LOTS
@given(st.one_of(st.text(max_size=200), near_tokens, st.binary(max_size=80).map(repr)))
@example("FFFFFFFF/FFFFFFFF")
@example("0/0")
@example(" 16/B374D848 ")
@example("\uff11/\uff12")  # full-width digits: not hex for PostgreSQL
@example("x" * 1_000_000)
@example("0/" + "0" * 1_000_000)
def test_parse_lsn_raises_only_value_error_or_returns_a_position(text: str) -> None:
    try:
        lsn = parse_lsn(text)
    except ValueError as exc:
        assert len(str(exc)) < 120  # never the whole token back
        return
    assert 0 <= lsn < 1 << 64
    assert parse_lsn(format_lsn(lsn)) == lsn


@LOTS
@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_format_then_parse_is_identity(lsn: int) -> None:
    assert parse_lsn(format_lsn(lsn)) == lsn


def test_a_megabyte_token_is_refused_fast_and_not_copied_into_the_message() -> None:
    huge = "A" * (1 << 20)
    started = time.perf_counter()
    for _ in range(100):
        with pytest.raises(ValueError) as info:
            parse_lsn(huge)
    assert time.perf_counter() - started < 0.5  # no strip(), no regex over 1 MB, no repr
    assert len(str(info.value)) < 80 and str(len(huge)) in str(info.value)
    assert MAX_TOKEN_LENGTH >= len("FFFFFFFF/FFFFFFFF")
    with pytest.raises(ValueError):
        parse_lsn(None)  # type: ignore[arg-type]


def test_warn_once_per_client_and_kind() -> None:
    warned = WarnOnce(maxsize=8)
    assert warned.should_warn("10.0.0.1", "malformed")
    assert not warned.should_warn("10.0.0.1", "malformed")
    assert warned.should_warn("10.0.0.1", "clamped")
    assert warned.should_warn("10.0.0.2", "malformed")
    assert warned.should_warn(None, "malformed")
    assert warned.should_warn("", "malformed")  # None and "" are different clients
    assert not warned.should_warn(None, "malformed")
    assert len(warned) == 5
    warned.clear()
    assert warned.should_warn("10.0.0.1", "malformed")
    with pytest.raises(ValueError):
        WarnOnce(maxsize=0)


def test_warn_once_evicts_the_least_recently_seen() -> None:
    warned = WarnOnce(maxsize=2)
    assert warned.should_warn("a", "k") and warned.should_warn("b", "k")
    assert not warned.should_warn("a", "k")  # "a" is now the most recent
    assert warned.should_warn("c", "k")  # evicts "b"
    assert not warned.should_warn("a", "k")
    assert warned.should_warn("b", "k")  # forgotten: warned again


def test_warn_once_memory_is_bounded_and_keeps_no_client_text() -> None:
    warned = WarnOnce(maxsize=1024)
    secret = "Sup3r-S3cret-session-id"
    for i in range(100_000):
        warned.should_warn(f"{secret}-{i}", "malformed")
        assert len(warned) <= 1024
    assert len(warned) == 1024
    keys = list(warned._seen)
    assert all(isinstance(k, bytes) and len(k) == 8 for k in keys)
    assert not any(secret.encode() in k for k in keys)
    assert secret not in repr(warned)
    # A megabyte client string costs one hash, and keeps nothing of itself.
    assert warned.should_warn("x" * (1 << 20), "malformed")
    assert all(len(k) == 8 for k in warned._seen)


@LOTS
@given(
    st.lists(
        st.tuples(st.one_of(st.none(), st.text(max_size=30)), st.text(max_size=10)), max_size=20
    )
)
def test_warn_once_agrees_with_a_plain_set_while_under_maxsize(
    pairs: list[tuple[str | None, str]],
) -> None:
    warned = WarnOnce(maxsize=10_000)
    seen: set[tuple[str | None, str]] = set()
    for client, kind in pairs:
        assert warned.should_warn(client, kind) == ((client, kind) not in seen)
        seen.add((client, kind))
