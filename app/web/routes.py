"""URL table."""

from __future__ import annotations

from aiohttp import web

from app.config import Config
from app.web import api, openapi, views
from app.web.page import setup_page_routes


def _add_value_resource(app: web.Application, path: str, resource: api.ValueResource) -> None:
    app.router.add_put(path, resource.put)
    app.router.add_get(path, resource.get)
    app.router.add_delete(path, resource.delete)


def setup_routes(app: web.Application, config: Config) -> None:
    app.router.add_get("/api/cache/status", views.status)
    if config.server.test_endpoints:
        app.router.add_get("/api/cache/test", views.cache_test)
        app.router.add_post("/api/cache/session/test", views.session_test)
        app.router.add_post("/api/cache/batch/test", views.batch_test)

    _add_value_resource(app, "/api/sessions/{session_id}", api.SESSIONS)

    app.router.add_put("/api/users/{user_id}/messages", api.put_messages)
    app.router.add_post("/api/users/{user_id}/messages", api.append_messages)
    app.router.add_get("/api/users/{user_id}/messages", api.get_messages)
    app.router.add_delete("/api/users/{user_id}/messages", api.delete_messages)

    _add_value_resource(app, "/api/users/{user_id}/profile", api.PROFILES)

    app.router.add_post("/api/users/{user_id}/warmup", api.warmup)

    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/api/openapi.json", openapi.openapi)
    setup_page_routes(app)  # GET / and its static assets: the status page
