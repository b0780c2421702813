"""Which user LocalTopology runs PostgreSQL as, when root (no real user is touched here)."""

from __future__ import annotations

import pwd

import pytest

from areplica.testing import postgres as postgres_module
from areplica.testing.postgres import service_user
from areplica.testing.processes import SetupError


def entry(name: str, uid: int = 990) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, uid, "", "/nonexistent", "/usr/sbin/nologin"))


class FakeUsers:
    """A fake user database; "useradd" adds to it and records the names it was asked for."""

    def __init__(self) -> None:
        self.known: dict[str, pwd.struct_passwd] = {}
        self.created: list[str] = []

    def getpwnam(self, name: str) -> pwd.struct_passwd:
        return self.known[name]

    def create(self, name: str, missing: str) -> None:
        self.known[name] = entry(name)
        self.created.append(name)


@pytest.fixture
def users(monkeypatch: pytest.MonkeyPatch) -> FakeUsers:
    fake = FakeUsers()
    monkeypatch.setattr(postgres_module.pwd, "getpwnam", fake.getpwnam)
    monkeypatch.setattr(postgres_module, "_create_user", fake.create)
    monkeypatch.delenv("AREPLICA_PG_USER", raising=False)
    return fake


def test_postgres_is_used_when_it_exists(users: FakeUsers) -> None:
    users.known["postgres"] = entry("postgres", 101)
    assert service_user().pw_name == "postgres"
    assert users.created == []


def test_without_postgres_a_dedicated_user_is_created_never_postgres(
    users: FakeUsers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="areplica.testing.postgres")
    assert service_user().pw_name == "areplica"
    assert users.created == ["areplica"]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "userdel areplica" in caplog.records[0].getMessage()
    assert service_user().pw_name == "areplica"  # found the second time, not created again
    assert users.created == ["areplica"]


def test_an_explicit_missing_user_is_created_under_its_own_name(
    users: FakeUsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AREPLICA_PG_USER", "svc-pg")
    assert service_user().pw_name == "svc-pg"
    assert users.created == ["svc-pg"]


def test_root_as_the_service_user_is_refused(
    users: FakeUsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    users.known["toor"] = entry("toor", 0)
    monkeypatch.setenv("AREPLICA_PG_USER", "toor")
    with pytest.raises(SetupError, match="AREPLICA_PG_USER"):
        service_user()


def test_no_useradd_is_one_line_saying_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_module.pwd, "getpwnam", lambda name: {}[name])
    monkeypatch.setattr(postgres_module, "_useradd", lambda: None)
    monkeypatch.delenv("AREPLICA_PG_USER", raising=False)
    with pytest.raises(SetupError) as info:
        service_user()
    message = str(info.value)
    assert "\n" not in message and "no useradd program" in message
    assert "'postgres'" in message and "AREPLICA_PG_USER=areplica" in message
    monkeypatch.setenv("AREPLICA_PG_USER", "-rf")  # never handed to useradd as an option
    with pytest.raises(SetupError, match="not a valid user name"):
        service_user()
