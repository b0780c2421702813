"""DSN parsing and masking, with the driver's own conninfo functions (never f-strings).

:func:`mask_dsn` is the one function that turns a DSN into text fit for a message, a repr, a
log line or a status: every other place goes through it (``NodeDSN.masked`` included). It
parses nothing and trusts nothing, so it works on DSNs that libpq would reject, and where the
text is ambiguous it masks more, never less:

- a URL's user-info is everything between ``://`` and the *last* ``@`` (a raw ``/``, ``@``,
  ``:``, ``#``, ``?`` or space in a password does not end it); a user name before the first
  ``:`` stays visible when it is made of plain characters, the rest becomes ``***``;
- a ``password=`` value (also ``sslpassword=``, anything named ``*password*`` or ``*secret*``,
  in any case, and percent-encoded keys in a URL query) is masked up to the next keyword that
  libpq knows followed by ``=`` (after a space or ``&``), or to the end: an unquoted password
  with spaces (``password=correct horse battery``) is masked whole;
- a URL without ``@`` whose port is not a number (``postgresql://app:Tr0ub4dor/horse``: a
  password whose host was forgotten) is masked from that colon to the end.

:func:`parse` refuses URLs whose ``@`` placement is ambiguous (more than one raw ``@``, or a
``/`` before it): libpq would read part of the password as the host, port or database name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

from psycopg2.extensions import make_dsn, parse_dsn

from .errors import ConfigurationError

__all__ = ["MASK", "MAX_DSN_LENGTH", "NodeDSN", "expand_hosts", "mask_dsn", "parse", "split_dsns"]

MASK = "***"

#: Longer DSNs are refused by :func:`parse` and never shown by :func:`mask_dsn`.
MAX_DSN_LENGTH = 8192

#: Parameters whose values are secrets (``NodeDSN.masked`` replaces them before rendering).
SECRET_KEYS = frozenset(
    {"password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"}
)

# Every connection keyword of libpq 12 to 18. A masked value ends only before one of these:
# an unknown word after a password is taken as more of the password.
_KEYWORDS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_issuer",
        "oauth_scope",
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",
        "requirepeer",
        "requiressl",
        "scram_client_key",
        "scram_server_key",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslkeylogfile",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
_KEYWORD_ALTERNATIVES = "|".join(sorted(_KEYWORDS, key=len, reverse=True))

# A keyword, "=" and blanks; a secret one (any case, percent-encoded or not, even glued to
# digits: mask more) starts a value to mask. One match per word, no nested repetition:
# linear on any input.
_KEYWORD_START = re.compile(r"(?<![A-Za-z0-9_%])([A-Za-z0-9_%]+)\s*=\s*")
# Where a secret value ends: a known keyword (exact case, as libpq wants it) and "=", after a
# separator that a backslash does not escape (libpq reads ``a\ b`` as one value). Matching
# only at the start of a run of separators keeps the search linear.
_NEXT_KEYWORD = re.compile(rf"(?<![\\\s&])[\s&]+(?:{_KEYWORD_ALTERNATIVES})\s*=")
_PLAIN_USER = re.compile(r"[A-Za-z0-9._~%+-]+")
_HOST_SPEC = r"(?:\[[^\]]*\]|[^:,\[\]]*)(?::[0-9]+)?"
_AUTHORITY = re.compile(rf"{_HOST_SPEC}(?:,{_HOST_SPEC})*")
_URL_PREFIXES = ("postgresql://", "postgres://")
# A ";" or newline between DSNs: followed by the start of a DSN (a URL, a "keyword=") or the
# end. One inside a password is followed by neither, and does not split.
_DSN_SEPARATOR = re.compile(r"[;\n]+(?=\s*(?:[A-Za-z][A-Za-z0-9+.-]*://|[A-Za-z_]+\s*=|\Z))")


@dataclass(frozen=True)
class NodeDSN:
    """A parsed libpq connection string: every option passes through to the driver."""

    params: Mapping[str, str]

    @property
    def conninfo(self) -> str:
        """The libpq keyword string, password included: for drivers only, never for logs."""
        return str(make_dsn(**self.params))

    @functools.cached_property
    def masked(self) -> str:
        """The keyword string with every secret replaced by ``***`` (through :func:`mask_dsn`)."""
        shown = {k: (MASK if _is_secret_key(k) else v) for k, v in self.params.items()}
        try:
            text = mask_dsn(str(make_dsn(**shown)))
        except Exception:  # an option this libpq does not know: a repr must not raise
            text = mask_dsn(" ".join(f"{k}={v!r}" for k, v in shown.items()))
        # A last net: a secret that libpq found somewhere our rules did not look.
        for key, value in self.params.items():
            if _is_secret_key(key) and len(value) >= 4:
                text = text.replace(value, MASK)
        return text

    @property
    def password(self) -> str | None:
        return self.params.get("password")

    @property
    def host(self) -> str:
        return self.params.get("host", "localhost")

    def with_address(self, host: str, port: int | str) -> NodeDSN:
        """This DSN (user, password, dbname, options) pointed at another server."""
        params = {k: v for k, v in self.params.items() if k not in ("host", "hostaddr", "port")}
        params.update(host=str(host), port=str(port))
        return NodeDSN(params)

    @property
    def address(self) -> tuple[str, str, str]:
        """(host, port, dbname): two entries with one address are one server."""
        params = self.params
        return (
            params.get("host", params.get("hostaddr", "")),
            params.get("port", "5432"),
            params.get("dbname", params.get("user", "")),
        )

    @property
    def port(self) -> int:
        try:
            return int(self.params.get("port", "5432").split(",")[0])
        except ValueError:
            return 5432

    def __repr__(self) -> str:
        return f"NodeDSN({self.masked!r})"


def parse(dsn: str, *, option: str = "dsn") -> NodeDSN:
    """Parse a libpq URL or keyword string; a malformed one raises ``ConfigurationError``.

    Every message shows the DSN only through :func:`mask_dsn`, and never chains the driver's
    error (its text can quote the DSN, password included).
    """
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigurationError(
            f"{option}: expected a libpq DSN string, got {type(dsn).__name__}", option=option
        )
    if len(dsn) > MAX_DSN_LENGTH:
        raise ConfigurationError(
            f"{option}: a DSN of {len(dsn)} characters is too long (at most {MAX_DSN_LENGTH})",
            option=option,
        )
    if dsn.startswith(_URL_PREFIXES):
        rest = dsn.split("://", 1)[1]
        ats = rest.count("@")
        if ats == 0 and _suspicious_port(dsn, len(dsn) - len(rest)) is not None:
            raise ConfigurationError(
                f"{option}: the port must be a number from 1 to 65535 in URL {mask_dsn(dsn)!r}",
                option=option,
            )
        if ats > 1 or (ats == 1 and "/" in rest[: rest.index("@")]):
            raise ConfigurationError(
                f"{option}: ambiguous URL {mask_dsn(dsn)!r}: a URL holds one raw '@', right "
                "after the password; percent-encode '@' as %40 and '/' as %2F elsewhere",
                option=option,
            )
    try:
        params = {str(k): str(v) for k, v in parse_dsn(dsn).items()}
    except Exception:  # psycopg2.ProgrammingError: its text may echo the password
        # ``from None``: the driver's message can quote the DSN, password included.
        raise ConfigurationError(
            f"{option}: malformed DSN {mask_dsn(dsn)!r}", option=option
        ) from None
    if "@" in params.get("host", ""):
        raise ConfigurationError(
            f"{option}: a host name cannot hold '@' in DSN {mask_dsn(dsn)!r}", option=option
        )
    for port in params.get("port", "5432").split(","):
        if not port.strip().isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"{option}: the port must be a number from 1 to 65535 in DSN {mask_dsn(dsn)!r}",
                option=option,
            )
    return NodeDSN(params)


def mask_dsn(dsn: str) -> str:
    """``dsn`` with every secret masked: for messages, reprs, logs and statuses.

    Works on any text, well-formed DSN or not (see the module docstring for the rules); never
    raises. A DSN longer than :data:`MAX_DSN_LENGTH` is not shown at all.
    """
    if not isinstance(dsn, str):
        return f"<{type(dsn).__name__}>"
    if len(dsn) > MAX_DSN_LENGTH:
        return f"<a DSN of {len(dsn)} characters, not shown>"
    merged: list[list[int]] = []
    for start, end in sorted(_secret_spans(dsn)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out: list[str] = []
    shown = 0
    for start, end in merged:
        out += (dsn[shown:start], MASK)
        shown = end
    out.append(dsn[shown:])
    text = "".join(out)
    # A last net: a password that libpq reads from this text, wherever it sat.
    for secret in _parsed_secrets(dsn):
        text = text.replace(secret, MASK)
    return text


def split_dsns(text: str) -> list[str]:
    """DSNs separated by ``;`` or newlines (``AREPLICA_REPLICAS``), stripped.

    A piece that does not start like a DSN (a URL or ``keyword=``) is glued back to the one
    before it: a ``;`` inside a password does not cut it in two (which would show its tail in
    an error message as if it were a DSN of its own).
    """
    pieces = _DSN_SEPARATOR.split(text)
    return [piece.strip() for piece in pieces if piece.strip()]


# ---------------------------------------------------------------------- helpers


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in SECRET_KEYS or "password" in lowered or "secret" in lowered


def _secret_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of every part of ``text`` to mask; they may overlap."""
    yield from _keyword_spans(text)
    scheme = text.find("://")
    if scheme != -1:
        yield from _url_spans(text, scheme + 3)


def _keyword_spans(text: str) -> Iterator[tuple[int, int]]:
    """Each secret keyword's value, up to the next known ``keyword=`` or the end."""
    for match in _KEYWORD_START.finditer(text):
        if _is_secret_key(unquote(match.group(1))):
            yield match.end(), _value_end(text, match.end())


def _value_end(text: str, start: int) -> int:
    search_from = start
    if text.startswith("'", start):
        i = start + 1
        while i < len(text) and text[i] != "'":
            i += 2 if text[i] == "\\" else 1
        if i >= len(text):
            return len(text)  # unterminated quote: the rest is the value
        search_from = i + 1
    following = _NEXT_KEYWORD.search(text, search_from)
    return len(text) if following is None else following.start()


def _url_spans(text: str, begin: int) -> Iterator[tuple[int, int]]:
    """The user-info of a URL starting at ``begin``; a suspicious port; secret query values."""
    at = text.rfind("@", begin)
    if at != -1:
        userinfo = text[begin:at]
        user, separator, _password = userinfo.partition(":")
        if user and _PLAIN_USER.fullmatch(user):
            if separator:
                yield begin + len(user) + 1, at
        elif userinfo:
            yield begin, at
        host_start = at + 1
    else:
        host_start = begin
        suspicious = _suspicious_port(text, begin)
        if suspicious is not None:
            # "user:password" with the "@host" forgotten: from the colon on, all of it.
            yield suspicious + 1, len(text)
    query = text.find("?", host_start)
    if query == -1:
        return
    position = query + 1
    masking_from: int | None = None
    for piece in text[query + 1 :].split("&"):
        key, equals, _value = piece.partition("=")
        name = unquote(key).strip()
        if masking_from is not None and equals and name in _KEYWORDS:
            yield masking_from, position - 1
            masking_from = None
        if masking_from is None and _is_secret_key(name):
            masking_from = position + len(key) + len(equals)
        position += len(piece) + 1
    if masking_from is not None:
        yield masking_from, len(text)


def _suspicious_port(text: str, begin: int) -> int | None:
    """In a URL without ``@`` whose host part starts at ``begin``: the index of a colon
    followed by something other than a port number (maybe a password), else None."""
    end = len(text)
    for stop in "/?":
        found = text.find(stop, begin)
        if found != -1:
            end = min(end, found)
    authority = text[begin:end]
    if ":" in authority and not _AUTHORITY.fullmatch(authority):
        return begin + authority.index(":")
    return None


def _parsed_secrets(text: str) -> Iterator[str]:
    """Secrets libpq reads from ``text`` (4+ characters), raw and percent-encoded."""
    try:
        params = parse_dsn(text)
    except Exception:
        return
    for key, value in params.items():
        if _is_secret_key(str(key)) and len(str(value)) >= 4:
            yield str(value)
            yield quote(str(value), safe="")


def expand_hosts(name: str, dsn: NodeDSN) -> list[tuple[str, NodeDSN]]:
    """A libpq multi-host DSN (``host=h1,h2 port=p1,p2``) as one member per server.

    libpq itself would pick one host at connect time; areplica probes each, so every
    server is a member named ``host:port``. A single-host DSN is returned as it is.
    """
    hosts = dsn.params.get("host", "").split(",")
    if len(hosts) < 2:
        return [(name, dsn)]
    ports = dsn.params.get("port", "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        raise ConfigurationError(
            f"{name}: {len(hosts)} hosts but {len(ports)} ports in DSN {dsn.masked!r}",
            option=name,
        )
    return [
        (f"{host}:{port}", dsn.with_address(host, port))
        for host, port in zip(hosts, ports, strict=True)
    ]
