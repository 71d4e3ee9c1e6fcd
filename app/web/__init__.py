"""The aiohttp application factory, used by run.py and by the tests alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from aiohttp import web

from ondemand.config import Config
from ondemand.metrics import Metrics
from ondemand.runtime import Runtime
from ondemand.web.keys import CONFIG, METRICS, RUNTIME
from ondemand.web.routes import setup_routes


def create_app(config: Config, *, plugins: Iterable[object] = ()) -> web.Application:
    """Build the app; the Runtime starts in cleanup_ctx (spawning nothing) and closes on shutdown.

    No middlewares: every route's handler is wrapped once at registration (`app.web.endpoint`)."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    # The runtime collector reads this app's Runtime (absent before startup).
    app[METRICS] = Metrics(lambda: app[RUNTIME].status() if RUNTIME in app else None)
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
