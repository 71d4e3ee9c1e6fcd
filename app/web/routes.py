"""URL table: our routes (`add_core_routes`) and their registration on an app (`register`).

Every route, ours and plugins', goes through `add_route`, which wraps its handler (`app.web.endpoint`);
the catch-all comes last.
"""

from __future__ import annotations

from aiohttp import web

from ondemand.cache import MESSAGES, PROFILE, SESSION
from ondemand.config import Config
from ondemand.errors import ConfigError
from ondemand.web import api, openapi, views
from ondemand.web.endpoint import add_route, add_unrouted
from ondemand.web.page import ASSETS, asset
from ondemand.web.route_registry import RouteRegistry

SESSIONS_PATH = "/api/sessions/{session_id}"
MESSAGES_PATH = "/api/users/{user_id}/messages"
PROFILE_PATH = "/api/users/{user_id}/profile"
WARMUP_PATH = "/api/users/{user_id}/warmup"
HISTORY_PATH = "/api/cache/history"
CACHE_TEST_PATH = "/api/cache/test"
SESSION_TEST_PATH = "/api/cache/session/test"
BATCH_TEST_PATH = "/api/cache/batch/test"
NAMESPACE_PATH = "/api/ns/{namespace}/{id}"  # a namespace the config lacks; each configured one has its own


def namespace_path(namespace: str) -> str:
    return f"/api/ns/{namespace}/{{id}}"


def _needed_namespaces(config: Config) -> dict[str, list[str]]:
    """Namespace -> the seed's routes that read or write it, among those `config` serves."""
    needs = {SESSION: [SESSIONS_PATH, WARMUP_PATH], MESSAGES: [MESSAGES_PATH, WARMUP_PATH],
             PROFILE: [PROFILE_PATH, WARMUP_PATH]}
    if config.server.test_endpoints:
        needs[SESSION] += [SESSION_TEST_PATH, BATCH_TEST_PATH]
        needs[MESSAGES] += [BATCH_TEST_PATH]
        needs[PROFILE] += [CACHE_TEST_PATH, BATCH_TEST_PATH]
    return needs


def check_namespaces(config: Config) -> None:
    """Refuse (ConfigError naming the key) a config without a namespace the seed's routes need: a built-in
    namespace removed with `enabled = false`, or a Config built by hand without it."""
    for namespace, paths in _needed_namespaces(config).items():
        if namespace not in config.namespaces:
            raise ConfigError(f"the HTTP API's routes {', '.join(paths)} need namespace {namespace!r}, which this "
                              f"config removes; drop `enabled = false` from [namespaces.{namespace}], or serve "
                              "no routes", key=f"namespaces.{namespace}.enabled")


def _add_value_resource(routes: RouteRegistry, path: str, resource: api.ValueResource) -> None:
    routes.add("PUT", path, resource.put)
    routes.add("GET", path, resource.get)
    routes.add("DELETE", path, resource.delete)


def add_core_routes(routes: RouteRegistry, config: Config) -> None:
    """Our routes, owned by the core; ConfigError if the config lacks a namespace they need."""
    check_namespaces(config)
    routes.add("GET", "/api/cache/status", views.status)
    routes.add("GET", HISTORY_PATH, views.history)
    if config.server.test_endpoints:
        routes.add("GET", CACHE_TEST_PATH, views.cache_test)
        routes.add("POST", SESSION_TEST_PATH, views.session_test)
        routes.add("POST", BATCH_TEST_PATH, views.batch_test)

    _add_value_resource(routes, SESSIONS_PATH, api.SESSIONS)

    routes.add("PUT", MESSAGES_PATH, api.put_messages)
    routes.add("POST", MESSAGES_PATH, api.append_messages)
    routes.add("GET", MESSAGES_PATH, api.get_messages)
    routes.add("DELETE", MESSAGES_PATH, api.delete_messages)

    _add_value_resource(routes, PROFILE_PATH, api.PROFILES)

    routes.add("POST", WARMUP_PATH, api.warmup)

    for namespace in config.namespaces:
        _add_value_resource(routes, namespace_path(namespace), api.namespace_resource(namespace))
    unknown = api.unknown_namespace(config.namespaces)
    for method in ("PUT", "GET", "DELETE"):
        routes.add(method, NAMESPACE_PATH, unknown)

    routes.add("GET", "/healthz", api.healthz)
    routes.add("GET", "/readyz", api.readyz)
    routes.add("GET", "/metrics", api.metrics)
    routes.add("GET", openapi.OPENAPI_PATH, openapi.openapi)
    for path in ASSETS:  # GET / and its static assets: the status page
        routes.add("GET", path, asset(path))


def register(app: web.Application, routes: RouteRegistry) -> None:
    """Serve every route of `routes` on `app`, then the catch-all: 404 and 405 for everything else."""
    for route in routes.routes:
        add_route(app, route.method, route.path, route.handler)
    add_unrouted(app)
