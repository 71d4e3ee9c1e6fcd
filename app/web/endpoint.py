"""What every request goes through: each route's handler is wrapped once, when it is registered.

The wrapper answers every exception as `{"error": {"code", "message"}}` with its status, checks the
bearer token where one is configured (`app.web.auth`), and records the request in the app's metrics
under its route template. This is the work of a middleware, done without one on purpose: aiohttp runs
middlewares through a per-request chain (a cache lookup, a partial and its own `current_app` layer
besides ours), measured at about 13% of the instructions of a cached `GET /api/sessions/{id}`.

Requests no route serves reach the catch-all route `add_unrouted` registers last, wrapped the same way,
which answers 405 with `Allow` when another route serves the path, else 404; both are recorded as the
route `unmatched`. Mounted under a prefix (`ondemand.web.setup(app, config, routes="/ondemand")`) our
routes live on a sub-application of their own, so the catch-all there answers only below the prefix.
An application that adds routes of its own to `create_app`'s app should use `add_route` too: aiohttp's
router tries the catch-all (indexed under `/`) only after every more specific prefix, so such routes are
reached either way, but only `add_route` gives them the wrapper. A user's own app gets a middleware
instead (`app.web.mount`), which answers only our typed errors as JSON.

With CORS on (`app.web.cors`) the wrapper adds its headers to every answer, and the catch-all also
answers preflights, before and without the token check. aiohttp's own answers (a request it cannot
parse, or place on any route) are made JSON by the server's protocol (`app.web.serving`).
"""

from __future__ import annotations

import logging
import time

from aiohttp import hdrs, web

from ondemand.errors import OndemandError
from ondemand.web.auth import needs_token, refuse_without_token
from ondemand.web.cors import Cors
from ondemand.web.keys import CONFIG, METRICS
from ondemand.web.responses import HTTP_CODES, RequestTimeout, error_response
from ondemand.web.route_registry import Handler

log = logging.getLogger("ondemand.web")

UNMATCHED = "unmatched"  # the route label of requests no route serves

def endpoint(app: web.Application, handler: Handler, *, route: str, method: str, path: str,
             token_checked: bool = True) -> Handler:
    """`handler` wrapped for `app`: JSON errors, the bearer token unless `method path` is open (or
    `token_checked` is False: the handler checks it itself), CORS headers when CORS is on, metrics as `route`."""
    observe = app[METRICS].observe
    config = app[CONFIG]
    token = config.server.api_token if token_checked and needs_token(method, path) else None
    cors = Cors.from_config(config)

    async def handle(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500  # also what a cancelled request (client gone) is recorded as
        try:
            try:
                refused = None if token is None else refuse_without_token(request, token)
                response = refused if refused is not None else await handler(request)
            except RequestTimeout as exc:  # the rest of its body may still come: never wait for it
                response = exc.answer(request)
            except OndemandError as exc:
                response = error_response(exc.http_status, exc.code, str(exc))
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
                response = error_response(exc.status, HTTP_CODES.get(exc.status, f"http_{exc.status}"), exc.reason,
                                          headers)
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.path)
                response = error_response(500, "internal_error", "internal error; see the server log")
            if cors is not None:
                cors.decorate(request, response)
            status = response.status
            return response
        finally:
            observe(request.method, route, status, time.perf_counter() - start)

    handle.__name__ = handle.__qualname__ = getattr(handler, "__name__", "handle")
    handle.__doc__ = handler.__doc__
    return handle


def add_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """Register `handler` for `method path` (a GET also for HEAD, as aiohttp's add_get), wrapped by `endpoint`."""
    wrapped = endpoint(app, handler, route=path, method=method, path=path)
    if method == hdrs.METH_GET:
        app.router.add_get(path, wrapped)
    else:
        app.router.add_route(method, path, wrapped)


def add_unrouted(app: web.Application) -> None:
    """The catch-all for every method and path, registered after every other route."""
    resource = app.router.add_resource("/{unrouted_path:.*}", name="unrouted")

    async def unrouted(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for other in app.router.resources():
            if other is not resource:
                allowed |= (await other.resolve(request))[1]
        if allowed:
            methods = sorted(allowed)
            return error_response(405, "method_not_allowed",
                                  f"{request.method} is not allowed here; allowed: {', '.join(methods)}",
                                  headers={"Allow": ",".join(methods)})
        return error_response(404, "not_found", "no such route; see GET /api/openapi.json for the API")

    cors = Cors.from_config(app[CONFIG])
    if cors is not None:
        token = app[CONFIG].server.api_token

        async def options(request: web.Request) -> web.StreamResponse:
            """A preflight, open (a browser sends no token on it); any other OPTIONS as everything else."""
            if cors.is_preflight(request):
                return cors.preflight(request)
            refused = None if token is None else refuse_without_token(request, token)
            return refused if refused is not None else await unrouted(request)

        resource.add_route(hdrs.METH_OPTIONS, endpoint(app, options, route=UNMATCHED, method=hdrs.METH_OPTIONS,
                                                       path="", token_checked=False))
    resource.add_route(hdrs.METH_ANY, endpoint(app, unrouted, route=UNMATCHED, method=hdrs.METH_ANY, path=""))
