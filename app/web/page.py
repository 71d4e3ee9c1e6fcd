"""The operator's status page: `GET /` and its two static assets, no build step.

The page and its assets hold no data, so they are served without a bearer token even when
`server.api_token` is set (see `app.web.auth`); the page's script asks for the token and sends it as
`Authorization: Bearer` when it polls `GET /api/cache/status`, which stays protected.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

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


async def asset(request: web.Request) -> web.StreamResponse:
    """GET / and GET /static/status.{css,js}: the files of the status page."""
    name, content_type = ASSETS[request.match_info.route.resource.canonical]
    return web.FileResponse(STATIC_DIR / name, headers={"Content-Type": content_type, **SECURITY_HEADERS})
