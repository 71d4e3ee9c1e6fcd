"""The HTTP routes of an app, ours and plugins' (`ondemand_register_routes`), each with its owner.

Every route, whoever registered it, gets the same wrapper (`app.web.endpoint`: JSON errors, the bearer
token, metrics) and, when it declares an OpenAPI operation, a place in `/api/openapi.json`. A method and
path registered twice is a startup error naming both owners; paths that differ only in the names of
their variables (`/items/{id}`, `/items/{item_id}`) are the same path.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import orjson
from aiohttp import web

from ondemand.config import Config
from ondemand.errors import PluginError
from ondemand.registry import Collector

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # a GET route also answers HEAD, as aiohttp's add_get
# A variable of an aiohttp path: `{name}` or `{name:regex}` (a regex may hold one level of braces: `\d{2}`).
_VARIABLE = re.compile(r"\{([_a-zA-Z][_a-zA-Z0-9]*)(:[^{}]*(?:\{[^{}]*\}[^{}]*)*)?\}")


def openapi_path(path: str) -> str:
    """`path` as an OpenAPI path template: `{name:regex}` becomes `{name}`."""
    return _VARIABLE.sub(lambda m: "{" + m[1] + "}", path)


def path_variables(path: str) -> list[str]:
    return [m[1] for m in _VARIABLE.finditer(path)]


def _shape(path: str) -> str:
    """What two paths must differ in to be two routes: anything but the names of their variables."""
    return _VARIABLE.sub(lambda m: "{" + (m[2] or "") + "}", path)


@attrs.frozen
class Route:
    method: str
    path: str  # as registered, without any prefix the app is mounted under
    handler: Handler
    plugin: str  # the owner: a plugin's name, or "core"
    openapi: Mapping[str, Any] | None = None  # an OpenAPI operation object; None: not in the document


class RouteRegistry(Collector):
    """What `ondemand_register_routes` fills; `config` is the config the app is set up with (plugins'
    sections included), for plugins whose routes depend on it."""

    kind = "route"

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.routes: list[Route] = []
        self._by_shape: dict[tuple[str, str], Route] = {}

    def add(self, method: str, path: str, handler: Handler, *, openapi: Mapping[str, Any] | None = None) -> None:
        """Serve `handler` for `method path` (an aiohttp path: `/api/things/{thing_id}`).

        `openapi` is the route's OpenAPI 3.1 operation object (`summary`, `parameters`, `requestBody`,
        `responses`, ...); its path variables are declared as string parameters unless it declares them.
        Without it the route is served but not documented."""
        plugin = self._current_plugin
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise PluginError(f"plugin {plugin!r} registered a route with method {method!r}; expected one of "
                              f"{', '.join(METHODS)} (a GET route also answers HEAD)")
        method = method.upper()
        if not isinstance(path, str) or not path.startswith("/"):
            raise PluginError(f"plugin {plugin!r} registered {method} {path!r}; a path starts with '/'")
        try:
            web.UrlDispatcher().add_resource(path)  # aiohttp's own check of the path's syntax
        except ValueError as exc:
            raise PluginError(f"plugin {plugin!r} registered {method} {path!r}, which aiohttp refuses: {exc}") from None
        if not callable(handler):
            raise PluginError(f"plugin {plugin!r} registered {method} {path} with a handler that is not callable "
                              f"({type(handler).__name__})")
        operation = None if openapi is None else self._operation(method, path, openapi)
        route = Route(method, path, handler, plugin, operation)
        known = self._by_shape.get((method, _shape(path)))
        if known is not None:
            raise PluginError(f"route {method} {path} is registered twice: by plugin {known.plugin!r} "
                              f"({known.path}) and by plugin {plugin!r}; disable one with [plugins] disable = [...]")
        self._by_shape[(method, _shape(path))] = route
        self.routes.append(route)

    def _operation(self, method: str, path: str, openapi: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `openapi` (later changes by the plugin do not reach the document), checked to be JSON
        with `responses`, its path variables declared."""
        where = f"plugin {self._current_plugin!r} registered {method} {path} with an OpenAPI operation"
        try:
            operation = orjson.loads(orjson.dumps(openapi))
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise PluginError(f"{where} that is not JSON: {exc}") from None
        if not isinstance(operation, dict) or not isinstance(operation.get("responses"), dict):
            raise PluginError(f"{where} without 'responses'; expected an OpenAPI operation object")
        parameters = operation.get("parameters", [])
        if not isinstance(parameters, list):
            raise PluginError(f"{where} whose 'parameters' is not a list")
        declared = {p.get("name") for p in parameters if isinstance(p, dict) and p.get("in") == "path"}
        missing = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                   for name in path_variables(path) if name not in declared]
        if missing:
            operation["parameters"] = [*parameters, *missing]
        return operation
