"""Adding ondemand to an aiohttp application, the ecosystem's way (`aiohttp_session.setup(app, ...)`).

`setup` puts the Runtime in the app's cleanup_ctx, exposes it (`app[RUNTIME]`, `get_runtime`), answers
an OndemandError raised by the app's own handlers as our JSON error (a middleware), and, when asked,
serves our routes and plugins' under a prefix: on a sub-application of their own, so their catch-all
404/405 stays below the prefix and the app's own routes are never shadowed. `create_app` is `setup` on
a fresh app with our routes at its root and no middleware: every route of that app is ours, already
wrapped (`app.web.endpoint` says why a middleware would cost the hot path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from aiohttp import web

from ondemand.config import Config, with_sections
from ondemand.errors import OndemandError
from ondemand.metrics import Metrics
from ondemand.plugin_manager import Plugins
from ondemand.runtime import Runtime
from ondemand.web.keys import CONFIG, METRICS, OPENAPI, RUNTIME
from ondemand.web.openapi import build_document
from ondemand.web.responses import error_response
from ondemand.web.route_registry import Handler, RouteRegistry
from ondemand.web.routes import add_core_routes, register


def setup(app: web.Application, config: Config, *, routes: str | None = None, plugins: Iterable[object] = (),
          json_errors: bool = True) -> None:
    """Add ondemand to `app`; call it before the app starts or is mounted (aiohttp freezes it then).

    `routes`: None serves none of our routes; a prefix such as "/ondemand" serves them, and plugins'
    (`ondemand_register_routes`), under it on a sub-application; "/" serves them on `app` itself with the
    catch-all that answers every unserved path (what `create_app` does). `plugins`: plugin objects
    registered besides the installed ones, as `Runtime(plugins=)`. `json_errors`: the middleware for
    the app's own handlers; False only for an app whose every route is ours or added with
    `ondemand.web.endpoint.add_route`. A ConfigError or PluginError here is a startup error."""
    if app.pre_frozen:
        raise RuntimeError("ondemand.web.setup(app, ...) must run before the app is started or mounted with "
                           "add_subapp (aiohttp freezes its routes, middlewares and cleanup_ctx then)")
    if CONFIG in app:
        raise RuntimeError("ondemand.web.setup was already called on this app")
    prefix = _prefix(routes)
    extra_plugins = tuple(plugins)
    app[CONFIG] = config
    # The runtime collector reads this app's Runtime (absent before startup).
    app[METRICS] = metrics = Metrics(lambda: app[RUNTIME].status() if RUNTIME in app else None)
    holders = [app]  # every app whose handlers read app[RUNTIME] directly (ours do: one lookup less)

    if prefix is not None:
        ours = app if not prefix else web.Application(client_max_size=config.server.max_body_bytes)
        if ours is not app:
            ours[CONFIG], ours[METRICS] = config, metrics
            holders.append(ours)
        table = route_table(config, extra_plugins)
        ours[OPENAPI] = build_document(table.config, table.routes)
        register(ours, table)
        if ours is not app:
            app.router.add_get(prefix, _to_page)  # before the sub-application, which would answer it 404
            app.add_subapp(prefix, ours)

    async def runtime_ctx(_: web.Application) -> AsyncIterator[None]:
        runtime = Runtime(config, plugins=extra_plugins)
        await runtime.start()
        for holder in holders:
            holder[RUNTIME] = runtime
        yield
        await runtime.close()

    app.cleanup_ctx.append(runtime_ctx)
    if json_errors:
        app.middlewares.append(ondemand_errors)


def create_app(config: Config, *, plugins: Iterable[object] = ()) -> web.Application:
    """Our server's app (run.py, the tests): `setup` on a fresh app, our routes at its root, no middleware."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    setup(app, config, routes="/", plugins=plugins, json_errors=False)
    return app


def get_runtime(request: web.Request) -> Runtime:
    """The Runtime `setup` added to the request's app or to an app it is mounted in (aiohttp's
    `request.config_dict`); RuntimeError if there is none or the app has not started."""
    runtime = request.config_dict.get(RUNTIME)
    if runtime is None:
        raise RuntimeError("no ondemand Runtime for this request: call ondemand.web.setup(app, config) on its app "
                           "or on an app it is mounted in, and start the app")
    return runtime


def route_table(config: Config, plugins: Iterable[object] = ()) -> RouteRegistry:
    """Our routes and every plugin's, each attributed to its owner; ConfigError if the config lacks a
    namespace ours need, PluginError for a plugin's bad or duplicate route."""
    manager = Plugins(config.plugins.disable, plugins)
    table = RouteRegistry(with_sections(config, manager.config_sections()))
    add_core_routes(table, config)
    return manager.routes(table)


@web.middleware
async def ondemand_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An OndemandError raised by one of the app's own handlers answers our JSON error with its status."""
    try:
        return await handler(request)
    except OndemandError as exc:
        return error_response(exc.http_status, exc.code, str(exc))


async def _to_page(request: web.Request) -> web.StreamResponse:
    """GET <prefix>: the status page lives at <prefix>/ (its URLs are relative to it); the query is kept."""
    path, mark, query = request.raw_path.partition("?")
    raise web.HTTPPermanentRedirect(f"{path}/{mark}{query}")


def _prefix(routes: str | None) -> str | None:
    """None (no routes), "" (on the app itself) or "/a/b" (no trailing slash, no variables)."""
    if routes is None:
        return None
    if not isinstance(routes, str) or not routes.startswith("/") or "{" in routes or "}" in routes or "//" in routes:
        raise ValueError(f"routes must be None, '/' or a prefix such as '/ondemand', got {routes!r}")
    return routes.rstrip("/")
