"""Optional bearer-token authentication (`server.api_token`).

When a token is configured, every request except the open probes (`/healthz`, `/readyz`,
`/metrics`) and the status page's files (`/`, `/static/status.css`, `/static/status.js`: static, they
hold no data; the page sends the token itself when it polls `/api/cache/status`) needs
`Authorization: Bearer <token>`: 401 without a bearer credential, 403 with a wrong one. That covers
every `/api/` path; other paths are not routed anyway and answer 401 before 404, so an
unauthenticated client learns nothing about the URL table. Without a token every path is open.
Registered after the error middleware, so its answers have the usual JSON error shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.web.keys import CONFIG
from app.web.middlewares import error_response
from app.web.page import PAGE_PATHS

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", *PAGE_PATHS})


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[CONFIG].server.api_token
    if token is None or request.path in OPEN_PATHS:
        return await handler(request)
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return error_response(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": 'Bearer realm="ondemand"'})
    # compare_digest takes time independent of where the strings differ; tokens are ASCII (config).
    if not (credentials.isascii() and hmac.compare_digest(credentials.encode(), token.encode())):
        return error_response(403, "forbidden", "the bearer token is not valid")
    return await handler(request)
