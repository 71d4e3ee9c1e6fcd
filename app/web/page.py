"""The operator's status page: `GET /` and its two static assets, no build step.

The page and its assets hold no data, so they are served without a bearer token even when
`server.api_token` is set (see `app.web.auth`); the page's script asks for the token and sends it as
`Authorization: Bearer` when it polls `GET /api/cache/status`, which stays protected. Every URL in the
page and its script is relative to the page, so it works under any prefix (`/ondemand/`).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ondemand.web.route_registry import Handler

STATIC_DIR = Path(__file__).resolve().parent / "static"

# URL path -> (file under STATIC_DIR, Content-Type). A fixed table: no directory listing, no traversal.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/status.css": ("status.css", "text/css; charset=utf-8"),
    "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
}
PAGE_PATHS = frozenset(ASSETS)

# Everything the page needs comes from this origin; no inline script or style, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    # The token may arrive as ?token=; never send the URL elsewhere.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def asset(path: str) -> Handler:
    """The handler of GET `path` (/ or /static/status.{css,js}), bound to its file when it is registered:
    under a prefix the request's path is not the table's."""
    name, content_type = ASSETS[path]
    file = STATIC_DIR / name
    headers = {"Content-Type": content_type, **SECURITY_HEADERS}

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(file, headers=headers)

    serve.__name__ = serve.__qualname__ = f"asset_{name.replace('.', '_')}"
    return serve
