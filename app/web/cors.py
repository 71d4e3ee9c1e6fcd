"""CORS (`server.cors_*`): which other origins' pages may call the API from a browser; off by default.

Off (no origin listed), nothing is added to any answer and an OPTIONS request is like any other method
no route serves (405, or 401 first with a token). On, every answer to a listed origin carries
`Access-Control-Allow-Origin` (and exposes `Ondemand-Write`), and a preflight (`OPTIONS` with `Origin`
and `Access-Control-Request-Method`) is answered 204 on any path without the bearer token, which a
browser never sends on a preflight; the request that follows needs it as usual. Credentials (cookies)
are never allowed: the API authenticates with a bearer token the page sends itself.
"""

from __future__ import annotations

import attrs
from aiohttp import web

from ondemand.config import Config
from ondemand.web.responses import error_response

WRITE_HEADER = "Ondemand-Write"  # what a write the cache did not store says (app.web.api)
_PREFLIGHT_METHOD = "Access-Control-Request-Method"


@attrs.frozen
class Cors:
    origins: frozenset[str] | None  # None: any origin ("*")
    methods: str
    headers: str
    max_age: str

    @classmethod
    def from_config(cls, config: Config) -> Cors | None:
        """The CORS policy of `config`, or None when it lists no origin (CORS off)."""
        server = config.server
        if not server.cors_origins:
            return None
        any_origin = server.cors_origins == ("*",)
        return cls(origins=None if any_origin else frozenset(server.cors_origins),
                   methods=", ".join(server.cors_methods), headers=", ".join(server.cors_headers),
                   max_age=str(server.cors_max_age))

    def allows(self, origin: str) -> bool:
        return self.origins is None or origin in self.origins

    def decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS headers for the request's origin, when it is one we allow."""
        origin = request.headers.get("Origin")
        if origin is not None and self.allows(origin) and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = "*" if self.origins is None else origin
            response.headers["Access-Control-Expose-Headers"] = WRITE_HEADER
            if self.origins is not None:
                response.headers.add("Vary", "Origin")

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        return request.method == "OPTIONS" and "Origin" in request.headers and _PREFLIGHT_METHOD in request.headers

    def preflight(self, request: web.Request) -> web.Response:
        """204 with what an allowed origin may send; 403 for another origin."""
        origin = request.headers["Origin"]
        if not self.allows(origin):
            return error_response(403, "forbidden", f"origin {origin!r} is not among server.cors_origins")
        response = web.Response(status=204, headers={
            "Access-Control-Allow-Methods": self.methods,
            "Access-Control-Allow-Headers": self.headers,
            "Access-Control-Max-Age": self.max_age,
        })
        self.decorate(request, response)
        return response
