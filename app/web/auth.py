"""Optional bearer-token authentication (`server.api_token`).

When a token is configured, every request except GET (and HEAD) of the open probes (`/healthz`,
`/readyz`, `/metrics`) and of the status page's files (`/`, `/static/status.css`,
`/static/status.js`: static, they hold no data; the page sends the token itself when it polls
`/api/cache/status`) needs `Authorization: Bearer <token>`: 401 without a bearer credential, 403 with
a wrong one. That covers every `/api/` path; other paths and methods are not routed anyway and answer
401 before 404 or 405 (`POST /healthz` too), so an unauthenticated client learns nothing about the URL
table. Without a token every path is open and nothing is checked. The check runs in each route's
wrapper (`app.web.endpoint`), so its answers have the usual JSON error shape. The paths are the routes'
own: mounted under a prefix (`ondemand.web.setup(app, config, routes="/ondemand")`), `/ondemand/healthz`
is open and `/ondemand/api/...` is not. A plugin's routes (`ondemand_register_routes`) need the token.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from ondemand.web.page import PAGE_PATHS
from ondemand.web.responses import error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", *PAGE_PATHS})


def needs_token(method: str, path: str) -> bool:
    """Whether a route registered for `method path` (the path without any prefix the app is mounted
    under) checks the token when one is configured (the OpenAPI document declares bearer security on
    exactly these). Only GET of the open paths is open: another method there (the catch-all, or a
    plugin's route) is not."""
    return not (method == "GET" and path in OPEN_PATHS)


def refuse_without_token(request: web.Request, token: str) -> web.Response | None:
    """The 401 or 403 answer for a request without `Authorization: Bearer <token>`; None if it has it."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return error_response(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": 'Bearer realm="ondemand"'})
    # compare_digest takes time independent of where the strings differ; tokens are ASCII (config).
    if not (credentials.isascii() and hmac.compare_digest(credentials.encode(), token.encode())):
        return error_response(403, "forbidden", "the bearer token is not valid")
    return None
