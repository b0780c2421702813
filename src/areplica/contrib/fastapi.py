"""FastAPI (and any ASGI app): a lifespan helper, a dependency, and the token middleware.

```python
from fastapi import FastAPI
from areplica.contrib.fastapi import AreplicaMiddleware, Manager, lifespan

app = FastAPI(lifespan=lifespan(mgr))
app.add_middleware(AreplicaMiddleware, manager=mgr)

@app.get("/users/{uid}")
async def read(uid: int, mgr: Manager): ...
```
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Annotated, Any

from fastapi import Depends, Request

from ..manager import ReplicaManager
from . import COOKIE_MAX_AGE, TOKEN_COOKIE, TOKEN_HEADER

__all__ = ["AreplicaMiddleware", "Manager", "get_manager", "lifespan"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def lifespan(
    manager: ReplicaManager,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan``: connects the manager at startup, closes it at shutdown."""

    @contextlib.asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[None]:
        async with manager:
            app.state.areplica = manager
            yield

    return _lifespan


def get_manager(request: Request) -> ReplicaManager:
    """A FastAPI dependency returning the app's manager (``Depends(get_manager)``)."""
    manager: ReplicaManager = request.app.state.areplica
    return manager


Manager = Annotated[ReplicaManager, Depends(get_manager)]
"""A handler parameter typed ``mgr: Manager`` receives the app's manager."""


class AreplicaMiddleware:
    """Pure ASGI middleware: each request runs in a consistency session.

    The session resumes from the ``X-Areplica-Token`` header or the ``areplica_token``
    cookie; when the request wrote, the advanced token goes back in both.
    """

    def __init__(
        self,
        app: ASGIApp,
        manager: ReplicaManager | None = None,
        *,
        header: str = TOKEN_HEADER,
        cookie: str = TOKEN_COOKIE,
        cookie_max_age: int = COOKIE_MAX_AGE,
        secure_cookie: bool = False,
    ) -> None:
        self.app = app
        self.manager = manager
        self.header = header.lower().encode("latin-1")
        self.header_name = header
        self.cookie = cookie
        self.cookie_max_age = cookie_max_age
        self.secure_cookie = secure_cookie

    def _incoming(self, scope: Scope) -> str | None:
        cookie_token = None
        for name, value in scope.get("headers", ()):
            if name == self.header:
                return bytes(value).decode("latin-1").strip() or None
            if name == b"cookie":
                jar: SimpleCookie = SimpleCookie()
                with contextlib.suppress(Exception):
                    jar.load(bytes(value).decode("latin-1"))
                if self.cookie in jar:
                    cookie_token = jar[self.cookie].value
        return cookie_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        manager = self.manager or scope["app"].state.areplica
        incoming = self._incoming(scope)
        client = scope.get("client")
        client_id = str(client[0]) if client else None
        async with manager.session(incoming, client=client_id):
            start = manager.token

            async def send_with_token(message: Message) -> None:
                if message["type"] == "http.response.start":
                    token = await manager.settled_token()  # with finished children's work
                    if token is not None and token != start:
                        headers = list(message.get("headers", ()))
                        headers.append((self.header, token.encode("latin-1")))
                        headers.append((b"set-cookie", self._cookie(token).encode("latin-1")))
                        message["headers"] = headers
                await send(message)

            await self.app(scope, receive, send_with_token)

    def _cookie(self, token: str) -> str:
        parts = [
            f"{self.cookie}={token}",
            "Path=/",
            f"Max-Age={self.cookie_max_age}",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.secure_cookie:
            parts.append("Secure")
        return "; ".join(parts)
