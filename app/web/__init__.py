"""The aiohttp application factory, used by run.py and by the tests alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from aiohttp import web

from app.config import Config
from app.runtime import Runtime
from app.web.auth import auth_middleware
from app.web.keys import CONFIG, METRICS, RUNTIME
from app.web.metrics_middleware import make_metrics
from app.web.middlewares import error_middleware
from app.web.routes import setup_routes


def create_app(config: Config, *, plugins: Iterable[object] = ()) -> web.Application:
    """Build the app; the Runtime starts in cleanup_ctx (spawning nothing) and closes on shutdown."""
    middlewares = [error_middleware]
    if config.server.api_token is not None:  # without a token, no layer at all on every request
        middlewares.append(auth_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = make_metrics(app)
    extra_plugins = tuple(plugins)

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        runtime = Runtime(config, plugins=extra_plugins)
        await runtime.start()
        app[RUNTIME] = runtime
        yield
        await runtime.close()

    app.cleanup_ctx.append(runtime_ctx)
    setup_routes(app, config)
    return app


__all__ = ["CONFIG", "METRICS", "RUNTIME", "create_app"]
