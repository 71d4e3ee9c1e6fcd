"""HTTP request metrics: count and latency per route, recorded into the app's Metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.metrics import Metrics
from app.web.keys import METRICS, RUNTIME


def make_metrics(app: web.Application) -> Metrics:
    """A Metrics whose runtime collector reads this app's Runtime (absent before startup)."""
    return Metrics(lambda: app[RUNTIME].status() if RUNTIME in app else None)


def route_label(request: web.Request) -> str:
    """The matched route's template, never the raw path (ids must not become label values)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost middleware: sees the final status, including JSON errors and auth refusals."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[METRICS].observe(request.method, route_label(request), status, time.perf_counter() - start)
