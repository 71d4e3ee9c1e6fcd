"""URL table."""

from __future__ import annotations

from aiohttp import web

from app.config import Config
from app.web import views


def setup_routes(app: web.Application, config: Config) -> None:
    app.router.add_get("/api/cache/status", views.status)
    if config.server.test_endpoints:
        app.router.add_get("/api/cache/test", views.cache_test)
        app.router.add_post("/api/cache/session/test", views.session_test)
        app.router.add_post("/api/cache/batch/test", views.batch_test)
