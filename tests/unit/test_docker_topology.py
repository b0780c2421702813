"""DockerTopology without a Docker engine: import, interface, generated scripts, wiring.

No engine runs on the development machines, so the containers are fakes here and the shell
scripts run against stub programs (gosu, pg_isready, pg_basebackup, docker-entrypoint.sh).
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from areplica import ConfigurationError
from areplica.testing import docker as docker_mod
from areplica.testing.docker import DockerTopology, primary_script, replica_script, server_command
from areplica.testing.topology import LocalTopology

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="needs bash")

# LocalTopology's public interface that DockerTopology mirrors (same parameters). Not
# mirrored: bin_dir, directory, data_dir, log_file, pids, proxy_port and the proxy faults
# (delay, blackhole, cut, heal): containers have no local files, pids or proxies.
MIRRORED = (
    "__enter__",
    "__exit__",
    "__aenter__",
    "__aexit__",
    "start",
    "close",
    "astart",
    "aclose",
    "nodes",
    "pg_version",
    "dsn",
    "direct_dsn",
    "port",
    "running",
    "kill",
    "hang",
    "resume",
    "stop",
    "start_node",
    "promote",
    "set_apply_delay",
    "wait_replicated",
)

TESTCONTAINERS = ("testcontainers", "testcontainers.core", "testcontainers.core.container")


def block_testcontainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import testcontainers...`` fail, installed or not."""
    for name in (*TESTCONTAINERS, "testcontainers.core.network"):
        monkeypatch.setitem(sys.modules, name, None)


# ------------------------------------------------------------------ import and interface


def test_module_imports_without_testcontainers(monkeypatch: pytest.MonkeyPatch) -> None:
    block_testcontainers(monkeypatch)
    # Import it afresh; the package attribute and sys.modules entry are restored afterwards.
    monkeypatch.setattr(importlib.import_module("areplica.testing"), "docker", docker_mod)
    monkeypatch.delitem(sys.modules, "areplica.testing.docker")
    module = importlib.import_module("areplica.testing.docker")
    assert module.DockerTopology.__doc__
    assert "untested" in (module.__doc__ or "").lower()


def test_constructing_without_testcontainers_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block_testcontainers(monkeypatch)
    with pytest.raises(ConfigurationError, match=r"pip install 'areplica\[docker\]'") as info:
        DockerTopology()
    assert info.value.option == "testcontainers"
    with pytest.raises(ValueError, match="replicas"):
        DockerTopology(replicas=-1)


@pytest.mark.parametrize("name", MIRRORED)
def test_mirrors_local_topology(name: str) -> None:
    local = inspect.getattr_static(LocalTopology, name)
    mirror = inspect.getattr_static(DockerTopology, name)
    assert isinstance(mirror, property) == isinstance(local, property)
    if isinstance(local, property):
        return
    assert inspect.iscoroutinefunction(mirror) == inspect.iscoroutinefunction(local)
    local_params = list(inspect.signature(local).parameters)
    assert list(inspect.signature(mirror).parameters) == local_params


# ------------------------------------------------------------------ generated scripts


def test_server_command_runs_the_image_entrypoint_with_replication_settings() -> None:
    command = server_command("replica-2")
    assert command.startswith("docker-entrypoint.sh postgres ")
    for setting in ("wal_level=replica", "hot_standby=on", "max_replication_slots=10"):
        assert f"-c {setting}" in command
    assert command.endswith("-c cluster_name=replica-2")


@needs_bash
@pytest.mark.parametrize(
    "script",
    [primary_script(), replica_script("replica-1", "areplica_replica_1", "o'brien")],
    ids=["primary", "replica"],
)
def test_scripts_parse(script: str) -> None:
    subprocess.run([str(BASH), "-n", "-c", script], check=True)


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$CALLS"\n{body}\n')
    path.chmod(0o755)


def run(script: str, env: dict[str, str]) -> None:
    subprocess.run([str(BASH), "-c", script], env={**os.environ, **env}, check=True, timeout=30)


@needs_bash
def test_replica_script_clones_on_first_start_only(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub(stubs, "gosu", 'shift; exec "$@"')
    stub(stubs, "chown", "")
    # The primary answers on the third try.
    stub(stubs, "pg_isready", 'n=$(grep -c "^pg_isready" "$CALLS"); [ "$n" -ge 3 ]')
    stub(stubs, "pg_basebackup", 'mkdir -p "$PGDATA" && echo 16 > "$PGDATA/PG_VERSION"')
    stub(stubs, "docker-entrypoint.sh", "")
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "PGDATA": str(tmp_path / "data" / "pgdata"),
        "CALLS": str(calls),
    }
    script = replica_script("replica-1", "areplica_replica_1", "o'brien")
    assert "password" not in script.lower()  # PGPASSWORD comes from the container's env

    run(script, env)
    # (chown is called when the script runs as root, as in the container.)
    lines = [line for line in calls.read_text().splitlines() if not line.startswith("chown")]
    assert lines[:3] == ["pg_isready -q -h primary -p 5432"] * 3
    clone = (
        f"pg_basebackup -h primary -p 5432 -U o'brien -D {env['PGDATA']}"
        " -X stream -R -S areplica_replica_1 -c fast -w"
    )
    assert clone in lines
    assert lines[-1] == server_command("replica-1")
    assert (Path(env["PGDATA"]).stat().st_mode & 0o777) == 0o700

    calls.write_text("")  # a restart: PGDATA holds a cluster, no clone
    run(script, env)
    assert calls.read_text().splitlines() == [server_command("replica-1")]


@needs_bash
@pytest.mark.parametrize("method", [None, "md5"])
def test_primary_script_lets_replication_in(tmp_path: Path, method: str | None) -> None:
    initdb_d = tmp_path / "initdb.d"
    initdb_d.mkdir()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub(stubs, "docker-entrypoint.sh", "")
    calls = tmp_path / "calls"
    script = primary_script().replace("/docker-entrypoint-initdb.d", str(initdb_d))
    run(script, {"PATH": f"{stubs}:{os.environ['PATH']}", "CALLS": str(calls)})
    assert calls.read_text().splitlines() == [server_command("primary")]

    # What the image's entrypoint then sources on the first start.
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    env = {"PGDATA": str(pgdata)}
    if method:
        env["POSTGRES_HOST_AUTH_METHOD"] = method
    run(f". {initdb_d / '10-areplica.sh'}", env)
    expected = f"host replication all all {method or 'scram-sha-256'}"
    assert (pgdata / "pg_hba.conf").read_text().splitlines() == [expected]


# ------------------------------------------------------------------ wiring, with fakes


class FakeWrapped:
    """docker-py's Container: the calls DockerTopology makes on it."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.status = log, name, "running"

    def reload(self) -> None:
        pass

    def pause(self) -> None:
        self.log.append(f"pause {self.name}")
        self.status = "paused"

    def unpause(self) -> None:
        self.log.append(f"unpause {self.name}")
        self.status = "running"

    def kill(self) -> None:
        self.log.append(f"kill {self.name}")
        self.status = "exited"

    def stop(self, timeout: int) -> None:
        self.log.append(f"stop {self.name}")
        self.status = "exited"

    def start(self) -> None:
        self.log.append(f"start {self.name}")
        self.status = "running"


class FakeContainer:
    """testcontainers' DockerContainer: the builder calls DockerTopology makes."""

    log: ClassVar[list[str]] = []

    def __init__(self, image: str) -> None:
        self.image = image
        self.env: dict[str, str] = {}
        self.aliases: list[str] = []
        self.network: Any = None
        self.command: list[str] = []
        self.bound: int | None = None
        self.wrapped: FakeWrapped | None = None

    def with_env(self, key: str, value: str) -> FakeContainer:
        self.env[key] = value
        return self

    def with_network(self, network: Any) -> FakeContainer:
        self.network = network
        return self

    def with_network_aliases(self, *aliases: str) -> FakeContainer:
        self.aliases = list(aliases)
        return self

    def with_command(self, command: list[str]) -> FakeContainer:
        self.command = command
        return self

    def with_bind_ports(self, container: int, host: int) -> FakeContainer:
        self.bound = host
        return self

    def with_exposed_ports(self, *ports: int) -> FakeContainer:
        return self

    def start(self) -> FakeContainer:
        self.log.append(f"run {self.aliases[0]}")
        self.wrapped = FakeWrapped(self.log, self.aliases[0])
        return self

    def stop(self) -> None:
        self.log.append(f"remove {self.aliases[0]}")

    def get_container_host_ip(self) -> str:
        return "localhost"

    def get_exposed_port(self, port: int) -> int:
        assert port == 5432
        return self.bound or 49153

    def get_wrapped_container(self) -> FakeWrapped:
        assert self.wrapped is not None
        return self.wrapped


class FakeNetwork:
    def create(self) -> FakeNetwork:
        FakeContainer.log.append("network create")
        return self

    def remove(self) -> None:
        FakeContainer.log.append("network remove")


@pytest.fixture
def fake_topology(monkeypatch: pytest.MonkeyPatch) -> tuple[DockerTopology, list[str]]:
    """A DockerTopology on fake containers, whose SQL goes to a fake ``_query``."""
    log: ClassVar[list[str]] = []
    monkeypatch.setattr(FakeContainer, "log", log)
    monkeypatch.setattr(docker_mod, "_testcontainers", lambda: (FakeContainer, FakeNetwork))
    topo = DockerTopology(replicas=2, image="postgres:17", password="pw/with:odd@chars")

    promoted: set[str] = set()

    def query(node: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        log.append(f"sql {node}: {sql}" + (f" {list(params)}" if params else ""))
        if "pg_promote" in sql:
            promoted.add(node)
        if "pg_current_wal_lsn" in sql:
            return [(8192 * 10 + 100, 8192, "16MB")]
        if "pg_last_wal_replay_lsn" in sql:
            return [(8192 * 10 + 100,)]
        if "pg_is_in_recovery" in sql:
            return [(node != "primary" and node not in promoted,)]
        if "server_version_num" in sql:
            return [("170002",)]
        if "recovery_min_apply_delay'" in sql:
            return [("250",)]
        return [(True,)]

    monkeypatch.setattr(topo, "_query", query)
    return topo, log


def test_start_wires_network_containers_and_slots(
    fake_topology: tuple[DockerTopology, list[str]],
) -> None:
    topo, log = fake_topology
    assert topo.nodes == ["primary", "replica-1", "replica-2"]
    topo.start()
    slot = (
        "sql primary: SELECT pg_create_physical_replication_slot(%s, true) ['areplica_replica_{}']"
    )
    assert log[:7] == [
        "network create",
        "run primary",
        "sql primary: SELECT 1",
        slot.format(1),
        "run replica-1",
        slot.format(2),
        "run replica-2",
    ]
    containers = {name: topo.container(name) for name in topo.nodes}
    for name, container in containers.items():
        assert container.image == "postgres:17"
        assert container.aliases == [name]
        assert container.network is topo._network
        assert container.env["POSTGRES_PASSWORD"] == "pw/with:odd@chars"
        assert container.command[:2] == ["bash", "-c"]
        assert topo.port(name) == container.bound
        dsn = topo.dsn(name)
        assert (
            dsn
            == f"postgresql://postgres:pw%2Fwith%3Aodd%40chars@localhost:{container.bound}/postgres"
        )
        assert topo.direct_dsn(name) == dsn
    assert containers["primary"].command[2] == primary_script("primary")
    assert "PGPASSWORD" not in containers["primary"].env
    for i in (1, 2):
        replica = containers[f"replica-{i}"]
        assert replica.command[2] == replica_script(
            f"replica-{i}", f"areplica_replica_{i}", "postgres"
        )
        assert replica.env["PGPASSWORD"] == "pw/with:odd@chars"
    assert len({c.bound for c in containers.values()}) == 3
    assert topo.pg_version == 17
    assert "started" in repr(topo)

    with pytest.raises(RuntimeError, match="started"):
        topo.start()
    with pytest.raises(KeyError, match="replica-9"):
        topo.dsn("replica-9")


def test_faults_map_to_docker_calls(fake_topology: tuple[DockerTopology, list[str]]) -> None:
    topo, log = fake_topology
    topo.start()
    del log[:]
    topo.hang("replica-1")
    assert topo.running("replica-1")  # hung counts as running
    topo.resume("replica-1")
    topo.kill("replica-2")
    assert not topo.running("replica-2")
    topo.start_node("replica-2")
    topo.hang("primary")
    topo.stop("primary")  # unpaused first: docker cannot stop a paused container
    topo.start_node("primary")
    topo.start_node("primary")  # running already: nothing
    assert [line for line in log if not line.startswith("sql")] == [
        "pause replica-1",
        "unpause replica-1",
        "kill replica-2",
        "start replica-2",
        "pause primary",
        "unpause primary",
        "stop primary",
        "start primary",
    ]

    del log[:]
    topo.set_apply_delay("replica-1", 250)
    assert "sql replica-1: ALTER SYSTEM SET recovery_min_apply_delay = %s ['250ms']" in log
    topo.promote("replica-1")
    assert "sql replica-1: SELECT pg_promote(true, 60)" in log
    with pytest.raises(RuntimeError, match="not a replica"):
        topo.promote("replica-1")
    with pytest.raises(RuntimeError, match="not a replica"):
        topo.set_apply_delay("primary", 10)
    del log[:]
    topo.wait_replicated()  # measured against the promoted node; replica-2 follows primary
    assert [line.split(":")[0] for line in log] == ["sql replica-1"]  # no replica follows it

    topo.close()
    topo.close()  # idempotent
    assert log[-4:] == ["remove primary", "remove replica-1", "remove replica-2", "network remove"]
    assert log.count("network remove") == 1
    with pytest.raises(RuntimeError, match="closed"):
        topo.dsn("primary")


def test_a_failed_start_removes_what_it_started(
    fake_topology: tuple[DockerTopology, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    topo, log = fake_topology

    def no_clone(*args: Any) -> None:
        raise RuntimeError("replica-2 did not start")

    real_run = topo._run
    monkeypatch.setattr(
        topo, "_run", lambda name, *a: no_clone() if name == "replica-2" else real_run(name, *a)
    )
    with pytest.raises(RuntimeError, match="replica-2 did not start"):
        topo.start()
    assert log[-3:] == ["remove primary", "remove replica-1", "network remove"]
    assert "closed" in repr(topo)


def test_fakes_match_the_testcontainers_api() -> None:
    """Every call made on the fakes exists in testcontainers 4.x (when it is installed)."""
    container = pytest.importorskip("testcontainers.core.container")
    network = pytest.importorskip("testcontainers.core.network")
    for fake, real in ((FakeContainer, container.DockerContainer), (FakeNetwork, network.Network)):
        for name, method in vars(fake).items():
            if name.startswith("_") or not callable(method):
                continue
            assert hasattr(real, name), f"{real.__name__}.{name}"
            fake_params = list(inspect.signature(method).parameters)
            real_params = list(inspect.signature(getattr(real, name)).parameters)
            assert real_params[: len(fake_params)] == fake_params, name
    containers = pytest.importorskip("docker.models.containers")
    for name in ("reload", "pause", "unpause", "kill", "stop", "start"):
        assert hasattr(containers.Container, name) and hasattr(FakeWrapped, name), name
