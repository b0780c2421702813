"""Member sources: where a cluster's members come from besides the static list.

``PatroniSource`` reads Patroni's REST API (``GET /cluster``). Patroni knows the members,
their roles and states before probes can see them: a member it reports as stopping,
stopped, demoting or starting takes no new queries at once (``serving`` is false), one
tagged ``noloadbalance`` takes no reads, and members appear and leave at run time. Probes
stay authoritative for server facts (recovery, timeline, WAL positions, identity):
Patroni's view never makes a node a primary, and it never removes one on its own word
(that is :mod:`areplica.membership`'s job, with hysteresis).

The HTTP client is aiohttp (extra ``patroni``: ``pip install 'areplica[patroni]'``),
imported when a source is created. Why aiohttp and not a few lines on asyncio streams:
an HTTP answer arrives in as many reads as the network and the server make of it
(Patroni writes its headers and its body separately, with no ``Content-Length``, and ends
the body by closing), chunked encoding and keep-alive exist, and TLS and basic auth
belong to the client: a maintained parser gets all of that right. Why aiohttp and not
httpx: it is asyncio-native, so the health round's plain asyncio deadlines and
cancellations (a round cut at ``health_timeout``, ``close()`` cancelling the health task)
act on it directly, with no anyio layer in between, and it is already areplica's
optional dependency for ``contrib.aiohttp``.

One fetch asks the endpoint that answered last first. When it fails, the next one is
asked at once; when it is merely slow, the next one is asked too after a share of the
timeout (``timeout / len(urls)``), and the first valid answer wins. The whole fetch,
however many endpoints it tries, ends within ``timeout``: a hung endpoint never holds a
health round past it. A failed fetch logs one line and returns ``None``; the caller keeps
the view it had (``last`` still holds it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._compat import timeout as _timeout
from .dsn import MASK
from .errors import ConfigurationError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "DEFAULT_MAX_BODY",
    "PatroniMember",
    "PatroniSource",
    "PatroniView",
    "parse_cluster",
]

logger = logging.getLogger("areplica")

_SERVING = frozenset({"running", "streaming", "in archive recovery"})
_LEADER_ROLES = frozenset({"leader", "master", "primary", "standby_leader"})
_TRUE = frozenset({"true", "yes", "on", "1"})

#: The largest ``/cluster`` body read (bytes); a larger answer is a failed fetch.
DEFAULT_MAX_BODY = 1 << 20

# A failed fetch logs one line: at WARNING for the first of an episode and at most this
# often after it (seconds), at DEBUG otherwise, so that an outage does not flood the log.
_REPEAT_WARNING = 30.0


@dataclass(frozen=True)
class PatroniMember:
    """One member as Patroni reports it."""

    name: str
    host: str
    port: int
    role: str
    state: str
    noloadbalance: bool = False
    nofailover: bool = False

    @property
    def serving(self) -> bool:
        """Patroni says it is up (not stopping, stopped, demoting or starting)."""
        return self.state in _SERVING

    @property
    def is_leader(self) -> bool:
        """Patroni lists it as the leader (of a standby cluster too)."""
        return self.role in _LEADER_ROLES


@dataclass(frozen=True)
class PatroniView:
    """What ``GET /cluster`` said.

    ``paused``: the cluster is in maintenance mode (Patroni neither fails over nor
    restarts anything; a missing leader is then no sign of trouble). ``scope``: the
    cluster's name, when the answer gave it.
    """

    members: tuple[PatroniMember, ...]
    paused: bool = False
    scope: str | None = None

    @property
    def leader(self) -> PatroniMember | None:
        """The member listed as leader, if any."""
        return next((m for m in self.members if m.is_leader), None)

    @property
    def switching(self) -> bool:
        """No running leader right now: a switchover or failover is under way."""
        leader = self.leader
        return leader is None or not leader.serving


def _flag(value: Any) -> bool:
    """A Patroni tag as a bool: Patroni itself accepts ``"true"``, ``"on"``, ``1``..."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return value is True or (isinstance(value, int) and value == 1)


def parse_cluster(data: Any) -> PatroniView:
    """Parse a ``GET /cluster`` body (pure; raises ``ValueError`` when malformed).

    A member entry without a name or a PostgreSQL address (Patroni omits ``host`` until a
    member has published one) is left out: it cannot be connected to.
    """
    if not isinstance(data, dict) or not isinstance(data.get("members"), list):
        raise ValueError("not a Patroni /cluster document")
    members: list[PatroniMember] = []
    seen: set[str] = set()
    for item in data["members"]:
        if not isinstance(item, dict) or not item.get("name") or not item.get("host"):
            continue
        name = str(item["name"])
        port = item.get("port", 5432)
        if isinstance(port, bool) or not isinstance(port, (int, str)):
            continue
        try:
            port = int(port)
        except ValueError:
            continue
        if not 0 < port < 65536 or name in seen:
            continue
        seen.add(name)
        tags = item.get("tags")
        if not isinstance(tags, dict):
            tags = {}
        members.append(
            PatroniMember(
                name=name,
                host=str(item["host"]),
                port=port,
                role=str(item.get("role", "")),
                state=str(item.get("state", "")),
                noloadbalance=_flag(tags.get("noloadbalance", False)),
                nofailover=_flag(tags.get("nofailover", False)),
            )
        )
    scope = data.get("scope")
    return PatroniView(
        tuple(members),
        paused=_flag(data.get("pause", False)),
        scope=str(scope) if isinstance(scope, str) else None,
    )


def _import_aiohttp() -> Any:
    """aiohttp, or a ``ConfigurationError`` that names the extra to install."""
    try:
        import aiohttp
    except ImportError:
        raise ConfigurationError(
            "patroni: reading Patroni's REST API needs aiohttp: pip install 'areplica[patroni]'",
            option="patroni",
        ) from None
    return aiohttp


@dataclass(frozen=True)
class _Endpoint:
    """One REST endpoint: the URL asked (no user-info), how it shows, its credentials."""

    url: str
    shown: str
    password: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


class _FetchError(Exception):
    """A fetch from one endpoint failed; the message is fit for a log line."""


class PatroniSource:
    """Reads the member list from one of several Patroni REST endpoints.

    ``urls``: ``http(s)://[user[:password]@]host:port`` of the members' REST APIs.
    ``timeout``: the most one :meth:`fetch` takes, whatever the endpoints do.
    ``connect_timeout``: the most a TCP (and TLS) connect takes (default ``timeout``).
    ``max_body``: the largest answer read, in bytes. ``keepalive``: seconds an idle
    connection is kept; after that long without a fetch the client is released too.

    TLS (``https://`` URLs): ``cafile`` (the CA that signed Patroni's certificate; the
    system's CAs by default), ``certfile`` and ``keyfile`` (a client certificate, for
    ``restapi.verify_client``), ``verify=False`` (no certificate or host name check),
    or a ready ``ssl_context``. Basic auth (``restapi.authentication``): ``username`` and
    ``password``, or the URL's user-info; an explicit option wins. A password never shows
    in a repr, a log line or an error message.

    Needs aiohttp (``pip install 'areplica[patroni]'``); without it the constructor raises
    ``ConfigurationError``. The constructor does no I/O. The HTTP client is made on the
    first :meth:`fetch` and reused by every later one (keep-alive where the server allows
    it); a task named ``f"{name}-patroni"`` owns it while it is open. :meth:`close`
    releases it, is idempotent, and a later fetch makes a new one. ``fetches`` and
    ``failures`` count the fetches made and those that got no answer.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        name: str,
        timeout: float,
        connect_timeout: float | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        keepalive: float = 30.0,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        verify: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._aiohttp = _import_aiohttp()
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ConfigurationError("patroni: expected at least one REST URL", option="patroni")
        if password is not None and username is None:
            raise ConfigurationError(
                "patroni: a password needs a username (basic auth)", option="patroni"
            )
        if username is not None and ":" in username:
            raise ConfigurationError(
                "patroni: a basic auth username cannot hold ':'", option="patroni"
            )
        for option, value in (("timeout", timeout), ("keepalive", keepalive)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigurationError(
                    f"patroni: {option} must be a positive number of seconds, got {value!r}",
                    option="patroni",
                )
        if connect_timeout is not None and (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or connect_timeout <= 0
        ):
            raise ConfigurationError(
                "patroni: connect_timeout must be a positive number of seconds, "
                f"got {connect_timeout!r}",
                option="patroni",
            )
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ConfigurationError(
                f"patroni: max_body must be a positive number of bytes, got {max_body!r}",
                option="patroni",
            )
        self._endpoints = [_endpoint(url, username, password) for url in urls]
        self._secrets = {e.password for e in self._endpoints if e.password}
        self.name = name
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout) if connect_timeout else self.timeout
        self.max_body = max_body
        self.keepalive = float(keepalive)
        self._ssl: ssl.SSLContext | None = ssl_context
        if ssl_context is None and any(e.url.startswith("https:") for e in self._endpoints):
            # Built here, not at the first fetch: a missing CA file is a configuration
            # error, raised by the constructor (reading a local file is not network I/O).
            self._ssl = _ssl_context(cafile, certfile, keyfile, verify)
        #: The last view any endpoint gave (kept when later fetches fail).
        self.last: PatroniView | None = None
        self.fetches = 0
        self.failures = 0
        self._scope: str | None = None
        self._client: aiohttp.ClientSession | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._busy = 0  # fetches under way
        self._used = 0.0  # loop time of the last fetch's end
        self._failing_since: float | None = None
        self._failed_in_row = 0
        self._warned_at = -math.inf

    @property
    def urls(self) -> list[str]:
        """The endpoints, the preferred one first, passwords masked."""
        return [e.shown for e in self._endpoints]

    def __repr__(self) -> str:
        return f"<PatroniSource {self.name} {self.urls}>"

    # ------------------------------------------------------------------ client

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        client = self._client
        if client is not None and (client.closed or self._client_loop is not loop):
            # Closed, or made by another event loop (a manager reopened under a new
            # asyncio.run(), which cancelled the keeper and so closed it): not usable here.
            self._client = None
            if not client.closed:
                client.detach()
            client = None
        if client is None:
            aiohttp = self._aiohttp
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=4,
                keepalive_timeout=self.keepalive,
                ttl_dns_cache=10,
            )
            client = aiohttp.ClientSession(
                connector=connector,
                # Each fetch has its own deadline (below); these bound the socket waits.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.connect_timeout, sock_read=self.timeout
                ),
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,  # no proxy from the environment, no .netrc credentials
            )
            self._client = client
            self._client_loop = loop
            self._keeper = loop.create_task(self._keep(client), name=f"{self.name}-patroni")
        return client

    async def _keep(self, client: aiohttp.ClientSession) -> None:
        """Own the open client: close it after ``keepalive`` idle seconds, or when cancelled.

        The manager closes its source from ``close()``, which cancels this task. It also
        ends a client that nobody closes: after ``keepalive`` seconds without a fetch, or
        when its event loop shuts down (``asyncio.run()`` and ``asyncio.Runner`` cancel
        every task before closing the loop), so that no socket outlives its loop.
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                idle = loop.time() - self._used
                if self._busy:  # a fetch under way: look again a keepalive later
                    idle = 0.0
                elif idle >= self.keepalive:
                    break
                await asyncio.sleep(self.keepalive - idle)
        finally:
            if self._client is client:
                self._client = None
            if self._keeper is asyncio.current_task():
                self._keeper = None
            await client.close()

    async def close(self) -> None:
        """Close the HTTP client and its connections (idempotent; a later fetch reopens)."""
        keeper, self._keeper = self._keeper, None
        client, self._client = self._client, None
        if keeper is None or keeper.done():
            if client is not None and not client.closed:
                client.detach()  # pragma: no cover - the keeper always closes its client
            return
        if keeper.get_loop() is not asyncio.get_running_loop():
            if client is not None:
                client.detach()  # another loop's connections: nothing to close from here
            return
        keeper.cancel()
        # The keeper closes the client as it ends; a cancelled close() lets it finish.
        await asyncio.shield(asyncio.wait({keeper}))

    # ------------------------------------------------------------------ fetch

    async def fetch(self) -> PatroniView | None:
        """The cluster as the first answering endpoint sees it; ``None`` if none answers.

        Ends within ``timeout``. A failure is logged (one line) and leaves ``last`` as it
        was.
        """
        self.fetches += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._busy += 1
        try:
            view, winner, errors = await self._race(deadline)
        finally:
            self._busy -= 1
            self._used = loop.time()
        if view is not None:
            if winner is not None and self._endpoints[0] is not winner:
                # Ask the one that answered first next time.
                self._endpoints.remove(winner)
                self._endpoints.insert(0, winner)
            if self._failing_since is not None:
                logger.warning(
                    "%s: Patroni answers again (%s) after %d failed fetch(es) in %.1fs",
                    self.name,
                    self._endpoints[0].shown,
                    self._failed_in_row,
                    time.monotonic() - self._failing_since,
                )
            self._failing_since = None
            self._failed_in_row = 0
            self.last = view
            return view
        self.failures += 1
        self._failed_in_row += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        level = logging.DEBUG
        if self._failed_in_row == 1 or now - self._warned_at >= _REPEAT_WARNING:
            level = logging.WARNING
            self._warned_at = now
        logger.log(
            level,
            "%s: no Patroni endpoint answered (%d in a row, keeping the last view): %s",
            self.name,
            self._failed_in_row,
            self._mask("; ".join(errors) or f"no answer within {self.timeout:g}s"),
        )
        return None

    async def _race(
        self, deadline: float
    ) -> tuple[PatroniView | None, _Endpoint | None, list[str]]:
        """Ask the endpoints in order, the next one when the last failed or is slow."""
        loop = asyncio.get_running_loop()
        order = list(self._endpoints)  # a concurrent fetch may reorder the list meanwhile
        count = len(order)
        stagger = self.timeout / count
        attempts: dict[asyncio.Task[PatroniView], int] = {}
        errors: dict[int, str] = {}
        started = 0
        next_start = loop.time()
        try:
            while True:
                now = loop.time()
                if started < count and (now >= next_start or not attempts):
                    endpoint = order[started]
                    task = asyncio.ensure_future(self._attempt(endpoint, deadline))
                    attempts[task] = started
                    started += 1
                    next_start = now + stagger
                if not attempts or now >= deadline:
                    break
                wake = deadline if started >= count else min(deadline, next_start)
                done, _ = await asyncio.wait(
                    attempts, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
                winner: tuple[PatroniView, int] | None = None
                for task in done:
                    index = attempts.pop(task)
                    exc = task.exception()
                    if exc is None:
                        if winner is None or index < winner[1]:
                            winner = (task.result(), index)
                    else:
                        errors[index] = f"{order[index].shown}: {_describe(exc)}"
                if winner is not None:
                    return winner[0], order[winner[1]], []
        finally:
            for task in attempts:
                task.cancel()
            if attempts:
                # Each attempt ends quickly once cancelled (aiohttp closes its socket); wait
                # so that no task outlives the fetch, even when the fetch itself is cancelled.
                await asyncio.shield(asyncio.wait(attempts))
                for task in attempts:
                    if not task.cancelled():
                        task.exception()  # retrieved: no "exception never retrieved"
        for index in range(count):
            if index not in errors:
                if index < started:
                    errors[index] = f"{order[index].shown}: no answer within {self.timeout:g}s"
                else:
                    errors[index] = f"{order[index].shown}: not asked (no time left)"
        return None, None, [errors[i] for i in sorted(errors)]

    async def _attempt(self, endpoint: _Endpoint, deadline: float) -> PatroniView:
        loop = asyncio.get_running_loop()
        try:
            async with _timeout(max(0.0, deadline - loop.time())):
                body = await self._get(endpoint)
        except asyncio.TimeoutError:
            raise _FetchError(f"no answer within {self.timeout:g}s") from None
        try:
            view = parse_cluster(json.loads(body))
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
            raise _FetchError(f"not a Patroni /cluster answer ({exc})"[:160]) from None
        if view.scope is not None:
            if self._scope is None:
                self._scope = view.scope
            elif view.scope != self._scope:
                raise _FetchError(
                    f"answers for cluster {view.scope!r}, not {self._scope!r}: "
                    "every URL must belong to one Patroni cluster"
                )
        return view

    async def _get(self, endpoint: _Endpoint) -> bytes:
        client = self._session()
        async with client.get(
            endpoint.url + "/cluster",
            headers=endpoint.headers,
            ssl=self._ssl if self._ssl is not None and endpoint.url.startswith("https:") else True,
            allow_redirects=False,
        ) as response:
            if response.status != 200:
                hint = " (check the credentials)" if response.status in (401, 403) else ""
                raise _FetchError(f"HTTP {response.status}{hint}")
            length = response.content_length
            if length is not None and length > self.max_body:
                raise _FetchError(f"an answer of {length} bytes is over {self.max_body}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > self.max_body:
                    raise _FetchError(f"an answer over {self.max_body} bytes")
        return bytes(body)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
            text = text.replace(urllib.parse.quote(secret, safe=""), MASK)
        return text


def _describe(exc: BaseException) -> str:
    """One line for a failed attempt: the error's kind and words, no traceback."""
    if isinstance(exc, _FetchError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, OSError) or type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return text[:200]


def _endpoint(url: str, username: str | None, password: str | None) -> _Endpoint:
    """Parse and check one REST URL; user-info becomes credentials, never part of the URL."""
    if not isinstance(url, str):
        raise ConfigurationError(
            f"patroni: expected http(s)://host:port URLs, got {type(url).__name__}",
            option="patroni",
        )
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ConfigurationError(
            f"patroni: expected http(s)://host:port URLs, got {_masked_url(url)!r:.100}",
            option="patroni",
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(
            f"patroni: a REST URL takes no query or fragment: {_masked_url(url)!r:.100}",
            option="patroni",
        )
    url_user = urllib.parse.unquote(parts.username) if parts.username else None
    url_password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if username is None:
        username, password = url_user, url_password
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    bare = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    shown = bare
    headers: dict[str, str] = {}
    if username is not None:
        user = urllib.parse.quote(username, safe="")
        shown = f"{parts.scheme}://{user}:{MASK}@{bare.split('://', 1)[1]}"
        # Basic auth (RFC 7617) in UTF-8, as Patroni decodes it.
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    return _Endpoint(bare, shown, password, headers)


def _masked_url(url: str) -> str:
    """A URL as text for an error: everything between ``://`` and the last ``@`` masked."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://{MASK}@{rest.rsplit('@', 1)[1]}"
    return url


def _ssl_context(
    cafile: str | None, certfile: str | None, keyfile: str | None, verify: bool
) -> ssl.SSLContext:
    """The TLS context for ``https://`` endpoints; a bad file is a ``ConfigurationError``."""
    try:
        context = ssl.create_default_context(cafile=cafile)
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
        elif keyfile is not None:
            raise ConfigurationError(
                "patroni: keyfile needs certfile (a client certificate)", option="patroni"
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"patroni: cannot load the TLS files: {type(exc).__name__}: {exc}",
            option="patroni",
        ) from None
    return context
