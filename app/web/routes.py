"""URL table."""

from __future__ import annotations

from aiohttp import web

from app.config import Config
from app.web import api, openapi, views
from app.web.page import setup_page_routes


def setup_routes(app: web.Application, config: Config) -> None:
    app.router.add_get("/api/cache/status", views.status)
    if config.server.test_endpoints:
        app.router.add_get("/api/cache/test", views.cache_test)
        app.router.add_post("/api/cache/session/test", views.session_test)
        app.router.add_post("/api/cache/batch/test", views.batch_test)

    app.router.add_put("/api/sessions/{session_id}", api.SESSIONS.put)
    app.router.add_get("/api/sessions/{session_id}", api.SESSIONS.get)
    app.router.add_delete("/api/sessions/{session_id}", api.SESSIONS.delete)

    app.router.add_put("/api/users/{user_id}/messages", api.put_messages)
    app.router.add_post("/api/users/{user_id}/messages", api.append_messages)
    app.router.add_get("/api/users/{user_id}/messages", api.get_messages)
    app.router.add_delete("/api/users/{user_id}/messages", api.delete_messages)

    app.router.add_put("/api/users/{user_id}/profile", api.PROFILES.put)
    app.router.add_get("/api/users/{user_id}/profile", api.PROFILES.get)
    app.router.add_delete("/api/users/{user_id}/profile", api.PROFILES.delete)

    app.router.add_post("/api/users/{user_id}/warmup", api.warmup)

    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/api/openapi.json", openapi.openapi)
    setup_page_routes(app)  # GET / and its static assets: the status page
