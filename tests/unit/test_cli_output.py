"""The command line's pure parts: shell quoting, the status table, one-line usage errors."""

from __future__ import annotations

import subprocess

import pytest

from areplica import cli
from areplica.demo import _shell_quote


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://a@h:1/x;postgresql://b@h:2/x",
        "host=h password='it''s' dbname=a b",
        'it\'s $HOME `id` "quoted" \\ back; and * glob\nnewline',
        "",
    ],
)
def test_shell_quote_survives_a_posix_shell(text: str) -> None:
    quoted = _shell_quote(text)
    assert quoted.startswith("'") and quoted.endswith("'")
    done = subprocess.run(
        ["sh", "-c", f'export V={quoted}; printf "%s" "$V"'],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert done.stdout == text


def test_table_aligns_columns_and_adds_error_only_when_needed() -> None:
    up = {
        "name": "member-1",
        "role": "primary",
        "state": "up",
        "lag_bytes": None,
        "lag_seconds": None,
        "latency_ms": 1.5,
        "dsn": "host=a",
        "error": None,
    }
    standby = {**up, "name": "member-22", "role": "replica", "lag_bytes": 0, "lag_seconds": 0.0}
    lines = cli._table([up, standby]).splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "STATE", "LAG", "LATENCY", "DSN"]
    assert lines[1].split() == ["member-1", "primary", "up", "-", "1.50ms", "host=a"]
    assert lines[2].split() == ["member-22", "replica", "up", "0B", "0.00s", "1.50ms", "host=a"]
    assert lines[1].index("up") == lines[2].index("up") == lines[0].index("STATE")
    down = {**up, "name": "m", "role": None, "state": "down", "latency_ms": None}
    down["error"] = "OperationalError: refused\n\tIs the server running?"
    lines = cli._table([up, down]).splitlines()
    assert lines[0].split()[-1] == "ERROR"
    assert lines[1].endswith("  -")
    assert lines[2].split()[:5] == ["m", "-", "down", "-", "-"]
    assert lines[2].endswith("OperationalError: refused Is the server running?")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status", "--timeout", "soon"], "areplica status: argument --timeout: expected seconds"),
        (
            ["status", "--max-lag", "-1"],
            "areplica status: argument --max-lag: expected seconds > 0",
        ),
        (["demo", "--replicas", "two"], "areplica demo: argument --replicas: expected a number"),
        (["demo", "--driver", "asyncpg"], "areplica demo: argument --driver: invalid choice"),
        ([], "areplica: the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line_with_exit_status_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err
