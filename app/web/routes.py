"""URL table. Every route goes through `add_route`, which wraps its handler (`app.web.endpoint`)."""

from __future__ import annotations

from aiohttp import web

from ondemand.config import Config
from ondemand.web import api, openapi, views
from ondemand.web.endpoint import add_route, add_unrouted
from ondemand.web.page import ASSETS, asset


def _add_value_resource(app: web.Application, path: str, resource: api.ValueResource) -> None:
    add_route(app, "PUT", path, resource.put)
    add_route(app, "GET", path, resource.get)
    add_route(app, "DELETE", path, resource.delete)


def setup_routes(app: web.Application, config: Config) -> None:
    add_route(app, "GET", "/api/cache/status", views.status)
    if config.server.test_endpoints:
        add_route(app, "GET", "/api/cache/test", views.cache_test)
        add_route(app, "POST", "/api/cache/session/test", views.session_test)
        add_route(app, "POST", "/api/cache/batch/test", views.batch_test)

    _add_value_resource(app, "/api/sessions/{session_id}", api.SESSIONS)

    add_route(app, "PUT", "/api/users/{user_id}/messages", api.put_messages)
    add_route(app, "POST", "/api/users/{user_id}/messages", api.append_messages)
    add_route(app, "GET", "/api/users/{user_id}/messages", api.get_messages)
    add_route(app, "DELETE", "/api/users/{user_id}/messages", api.delete_messages)

    _add_value_resource(app, "/api/users/{user_id}/profile", api.PROFILES)

    add_route(app, "POST", "/api/users/{user_id}/warmup", api.warmup)

    add_route(app, "GET", "/healthz", api.healthz)
    add_route(app, "GET", "/readyz", api.readyz)
    add_route(app, "GET", "/metrics", api.metrics)
    add_route(app, "GET", "/api/openapi.json", openapi.openapi)
    for path in ASSETS:  # GET / and its static assets: the status page
        add_route(app, "GET", path, asset)
    add_unrouted(app)  # last: 404 and 405 for everything the routes above do not serve
