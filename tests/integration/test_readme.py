"""Every ```python sample of README.md, run as printed, against a real topology.

How a reader uses a sample, and so how this test runs it:

- a sample is a file: saved under the name its first line gives (``# app.py``) or any
  name, next to the other files of its section (a ``# pyproject.toml`` block);
- a section with a ```console block says how to run or serve its sample: each line is run
  as printed (``python`` is this interpreter, ``uvicorn`` its ``-m uvicorn``); a server
  command (uvicorn, ``python -m aiohttp.web``) keeps running while the ``curl`` lines after
  it are sent, with httpx, as curl would send them (``-X``, ``-H``, ``-d``, cookies saved
  with ``-c`` and sent with ``-b``); a trailing ``# {...}`` comment is the JSON the
  response must hold;
- any other sample is run with ``python FILE.py``.

Each sample gets a fresh, empty database (created on the primary, replayed by every replica)
and the environment the README tells the reader to set: ``AREPLICA_PRIMARY`` and
``AREPLICA_REPLICAS`` pointing at it. Nothing else is prepared: a sample that needs a table
creates it. The one liberty taken: a server's port (8000, 8080) is replaced by a free one,
in its command and in the curl lines, since other work shares this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from areplica.testing.topology import LocalTopology
from tests.integration.fresh import FreshDatabase, fresh_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SRC = ROOT / "src"
RUN_TIMEOUT = 240.0


@dataclass
class Block:
    """One fenced block of the README."""

    lang: str
    body: str
    line: int
    section: str

    @property
    def filename(self) -> str | None:
        """The name its first line gives (``# app.py``), if any."""
        first = self.body.split("\n", 1)[0]
        match = re.fullmatch(r"# ([\w.-]+\.(?:py|toml))", first.strip())
        return match.group(1) if match else None


@dataclass
class Sample:
    """A python block and the files and commands of its section."""

    block: Block
    files: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.block.filename or f"readme_line_{self.block.line}.py"

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.block.section.lower()).strip("-")
        return f"line{self.block.line}-{slug}"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block, with the heading of the section it is in."""
    blocks: list[Block] = []
    section = ""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.fullmatch(r"```(\w*)", line)
        if fence:
            start = i + 1
            i += 1
            while lines[i] != "```":
                i += 1
            blocks.append(Block(fence.group(1), "\n".join(lines[start:i]) + "\n", start, section))
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
        i += 1
    return blocks


def parse_samples(blocks: list[Block]) -> list[Sample]:
    """A sample per python block; the console and file blocks of its section go with it."""
    samples: list[Sample] = []
    sections: dict[str, list[Block]] = {}
    for block in blocks:
        sections.setdefault(block.section, []).append(block)
    for section, members in sections.items():
        pythons = [b for b in members if b.lang == "python"]
        consoles = [b for b in members if b.lang == "console"]
        if not pythons:
            continue  # the Quickstart, the examples' commands (tests/integration/test_examples.py)
        assert len(pythons) == 1 or not consoles, f"{section}: which sample do its commands run?"
        for block in pythons:
            sample = Sample(block)
            sample.files[sample.name] = block.body
            for other in members:
                if other.lang == "toml":
                    assert other.filename, f"README line {other.line}: name the file (# NAME)"
                    sample.files[other.filename] = other.body
            for console in consoles:
                sample.commands += [
                    c for c in console.body.splitlines() if c.strip() and not c.startswith("#")
                ]
            samples.append(sample)
    return samples


BLOCKS = parse_blocks(README.read_text())
SAMPLES = parse_samples(BLOCKS)


def test_every_python_block_is_a_sample() -> None:
    pythons = [b for b in BLOCKS if b.lang == "python"]
    assert len(pythons) >= 8
    assert [s.block for s in SAMPLES] == pythons
    served = [s for s in SAMPLES if any(_is_server(shlex.split(c)) for c in s.commands)]
    assert {s.block.section for s in served} == {"FastAPI", "aiohttp"}


# ---------------------------------------------------------------------- running commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _is_server(argv: list[str]) -> bool:
    return argv[0] == "uvicorn" or argv[:3] == ["python", "-m", "aiohttp.web"]


def _argv(argv: list[str]) -> list[str]:
    """The printed command with this interpreter for ``python`` and ``uvicorn``."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "uvicorn":
        return [sys.executable, "-m", "uvicorn", *argv[1:]]
    raise AssertionError(f"the README test does not know how to run {argv[0]!r}")


def _port_option(argv: list[str]) -> int:
    for flag in ("--port", "-P"):
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    raise AssertionError(f"no port in {shlex.join(argv)}")


@dataclass
class Curl:
    """A curl command line, as curl would send it."""

    method: str
    url: str
    headers: dict[str, str]
    data: str | None
    save_cookies: str | None
    send_cookies: str | None
    expected: object | None

    @classmethod
    def parse(cls, line: str, ports: dict[int, int]) -> Curl:
        comment = re.search(r"\s#\s(.*)$", line)
        expected = json.loads(comment.group(1)) if comment else None
        args = shlex.split(line, comments=True)[1:]
        method, url, data, save, send = None, None, None, None, None
        headers: dict[str, str] = {}
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "-s":
                pass
            elif arg in ("-X", "-H", "-d", "-c", "-b"):
                value = args[i + 1]
                i += 1
                if arg == "-X":
                    method = value
                elif arg == "-H":
                    key, _, val = value.partition(":")
                    headers[key.strip()] = val.strip()
                elif arg == "-d":
                    data = value
                elif arg == "-c":
                    save = value
                else:
                    send = value
            elif arg.startswith("-"):
                raise AssertionError(f"curl option {arg} is not understood by the README test")
            else:
                url = arg
            i += 1
        assert url is not None, line
        for printed, free in ports.items():
            url = url.replace(f":{printed}/", f":{free}/")
        if data is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/x-www-form-urlencoded"  # curl's default
        method = method or ("POST" if data is not None else "GET")
        url = url if "://" in url else f"http://{url}"
        return cls(method, url, headers, data, save, send, expected)

    def send(self, jars: dict[str, httpx.Cookies]) -> httpx.Response:
        cookies = jars.get(self.send_cookies, httpx.Cookies()) if self.send_cookies else None
        with httpx.Client(cookies=cookies, timeout=30) as client:
            response = client.request(
                self.method, self.url, headers=self.headers, content=self.data
            )
        if self.save_cookies:
            jar = jars.setdefault(self.save_cookies, httpx.Cookies())
            jar.update(response.cookies)
        return response


def _wait_listening(port: int, server: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until the server accepts connections (after its startup hook: tables created)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            if server.poll() is not None:
                output = server.communicate()[0][-3000:]
                raise AssertionError(f"the server exited: {output}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"no server on {port} after {timeout:.0f} s") from None
            time.sleep(0.1)


@dataclass
class Outcome:
    """What running a sample did."""

    outputs: list[str] = field(default_factory=list)
    responses: list[httpx.Response] = field(default_factory=list)


def run_sample(sample: Sample, directory: Path, env: dict[str, str]) -> Outcome:
    """Save the sample's files in ``directory`` and run its commands as the README prints them."""
    for name, body in sample.files.items():
        (directory / name).write_text(body)
    outcome = Outcome()
    commands = sample.commands or [f"python {sample.name}"]
    server: subprocess.Popen[str] | None = None
    ports: dict[int, int] = {}
    jars: dict[str, httpx.Cookies] = {}
    try:
        for line in commands:
            argv = shlex.split(line, comments=True)
            if argv[0] == "curl":
                assert server is not None, f"{line!r} needs the server started before it"
                curl = Curl.parse(line, ports)
                response = curl.send(jars)
                outcome.responses.append(response)
                assert response.is_success, f"{line}\n-> {response.status_code} {response.text}"
                if curl.expected is not None:
                    assert response.json() == curl.expected, f"{line}\n-> {response.text}"
                if curl.send_cookies:  # the cookie curl would send did travel
                    assert "areplica_token=" in response.request.headers.get("cookie", ""), line
            elif _is_server(argv):
                printed = _port_option(argv)
                ports[printed] = _free_port()
                argv = [str(ports[printed]) if a == str(printed) else a for a in argv]
                server = subprocess.Popen(
                    _argv(argv),
                    cwd=directory,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                _wait_listening(ports[printed], server)
            else:
                done = subprocess.run(
                    _argv(argv),
                    cwd=directory,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=RUN_TIMEOUT,
                )
                output = done.stdout + done.stderr
                outcome.outputs.append(output)
                assert done.returncode == 0, f"{line} failed:\n{output[-4000:]}"
                assert "Traceback" not in output, output[-4000:]
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)  # the reader's Ctrl-C: a clean shutdown
            output = server.communicate(timeout=60)[0]
            outcome.outputs.append(output)
    if server is not None:  # uvicorn re-raises the signal once shut down: -SIGINT is clean
        assert server.returncode in (0, -signal.SIGINT), outcome.outputs[-1][-4000:]
        assert "Traceback" not in outcome.outputs[-1], outcome.outputs[-1][-4000:]
    return outcome


@pytest.fixture
def fresh_db(topology: LocalTopology) -> Iterator[FreshDatabase]:
    with fresh_database(topology, "areplica_readme") as db:
        yield db


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_readme_sample(sample: Sample, fresh_db: FreshDatabase, tmp_path: Path) -> None:
    env = fresh_db.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    outcome = run_sample(sample, tmp_path, env)
    if outcome.responses:  # a server sample: its write is on the primary, asked directly
        assert fresh_db.on_primary("SELECT title FROM readme_item") == [("first",)]
    else:  # a script or a test run leaves no table behind
        tables = fresh_db.on_primary(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'readme%'"
        )
        assert tables == [], tables
