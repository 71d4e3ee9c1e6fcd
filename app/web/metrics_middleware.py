"""HTTP request metrics: the app's Metrics and the route label (recorded by app.web.middlewares)."""

from __future__ import annotations

from aiohttp import web

from app.metrics import Metrics
from app.web.keys import RUNTIME


def make_metrics(app: web.Application) -> Metrics:
    """A Metrics whose runtime collector reads this app's Runtime (absent before startup)."""
    return Metrics(lambda: app[RUNTIME].status() if RUNTIME in app else None)


def route_label(request: web.Request) -> str:
    """The matched route's template, never the raw path (ids must not become label values)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
