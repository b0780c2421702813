"""aiohttp: ``setup(app, mgr)`` (a ``cleanup_ctx`` and the token middleware) and a typed key.

```python
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from areplica.contrib.aiohttp import AREPLICA, setup

app = web.Application()
setup(app, mgr)

async def handler(request: web.Request) -> web.Response:
    mgr = request.app[AREPLICA]
```
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..manager import ReplicaManager
from . import COOKIE_MAX_AGE, TOKEN_COOKIE, TOKEN_HEADER

__all__ = ["AREPLICA", "setup", "token_middleware"]

AREPLICA: web.AppKey[ReplicaManager] = web.AppKey("areplica", ReplicaManager)


def setup(app: web.Application, manager: ReplicaManager, *, secure_cookie: bool = False) -> None:
    """Open the manager with the app, close it on cleanup, run requests in sessions."""
    app[AREPLICA] = manager

    async def areplica_ctx(app: web.Application) -> AsyncIterator[None]:
        async with manager:
            yield

    app.cleanup_ctx.append(areplica_ctx)
    app.middlewares.append(token_middleware(secure_cookie=secure_cookie))


def token_middleware(*, secure_cookie: bool = False) -> Middleware:
    """The middleware: session from the header or cookie; the advanced token back in both."""

    @web.middleware
    async def areplica_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        manager = request.app[AREPLICA]
        incoming = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
        async with manager.session(incoming, client=request.remote):
            start = manager.token
            response: web.StreamResponse = await handler(request)
            token = await manager.settled_token()  # with finished child tasks' work
            if token is not None and token != start and not response.prepared:
                response.headers[TOKEN_HEADER] = token
                response.set_cookie(
                    TOKEN_COOKIE,
                    token,
                    max_age=COOKIE_MAX_AGE,
                    path="/",
                    httponly=True,
                    samesite="Lax",
                    secure=secure_cookie,
                )
            return response

    return areplica_token
