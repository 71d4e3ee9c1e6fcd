"""An example third-party plugin: its own `[example]` config table, a lifecycle named
`example-subprocess`, an HTTP route and an event observer. (The package's other plugin, `files`, is a
durable storage backend: README, "Writing a backend".)

The lifecycle reuses the built-in subprocess lifecycle under its own name and shows its validated
`[example]` section in its status; the route `GET /api/example/greet/{name}` answers the configured
greeting, documented in the OpenAPI document (so schemathesis exercises it); the observer records the
events it sees. That is all the test suite needs to see a plugin discovered through the `ondemand`
entry-point group and configured like the core:

    [example]
    greeting = "bonjour"   # or EXAMPLE_GREETING=bonjour, or ONDEMAND_EXAMPLE__GREETING=bonjour
    level = 3              # or ONDEMAND_EXAMPLE__LEVEL=3
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from aiohttp import web

from ondemand import InvalidInput, hookimpl
from ondemand.config import SECRET, SectionRegistry, between, matches
from ondemand.plugins.lifecycle_subprocess import SubprocessConfig, SubprocessLifecycle
from ondemand.redis import LifecycleContext, LifecycleFactory
from ondemand.registry import Registry
from ondemand.web.route_registry import RouteRegistry

SEEN_EVENTS: list[tuple[str, dict[str, Any]]] = []


@attrs.frozen
class ExampleConfig:
    """The [example] table; every field has a default, so a config without the table is valid."""

    greeting: str = attrs.field(
        default="hello", validator=matches(r"[A-Za-z][A-Za-z ,!]{0,39}", "1 to 40 letters, spaces, ',' or '!'"))
    level: int = attrs.field(default=1, validator=between(1, 5))
    # Secrets, to show check-config and status hiding them: the whole token, a URL's credentials.
    api_key: str | None = attrs.field(default=None, metadata={SECRET: "token"})
    upstream: str | None = attrs.field(default=None, metadata={SECRET: "url"})


@attrs.define
class ExampleLifecycle(SubprocessLifecycle):
    example: ExampleConfig = ExampleConfig()
    name: str = "example-subprocess"

    def status(self) -> dict[str, Any]:
        return {**super().status(), "example_plugin": True,
                "example": {"greeting": self.example.greeting, "level": self.example.level}}


@hookimpl
def ondemand_config_sections(sections: SectionRegistry) -> None:
    sections.add("example", ExampleConfig, env={"EXAMPLE_GREETING": "greeting"})


@hookimpl
def ondemand_register_lifecycles(registry: Registry[LifecycleFactory]) -> None:
    registry.add("example-subprocess", make_lifecycle)


def make_lifecycle(context: LifecycleContext) -> ExampleLifecycle:
    return ExampleLifecycle(context.config.lifecycle, context.config.section(SubprocessConfig), context.events,
                            example=context.config.section(ExampleConfig))


GREET_PATH = "/api/example/greet/{name}"
_NAME = "[A-Za-z]{1,40}"
_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
GREET_OPERATION = {
    "summary": "The [example] greeting for a name (a route of the example plugin)",
    "parameters": [{"name": "name", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": f"^{_NAME}$"}}],
    "responses": {
        "200": {"description": "the greeting", "content": {"application/json": {"schema": {
            "type": "object", "required": ["greeting"], "properties": {"greeting": {"type": "string"}}}}}},
        "400": {"description": "the name is not 1 to 40 ASCII letters", **_ERROR},
        "404": {"description": "no name (an empty or dot segment is not this route)", **_ERROR},
    },
}


@hookimpl
def ondemand_register_routes(routes: RouteRegistry) -> None:
    greeting = routes.config.section(ExampleConfig).greeting

    async def greet(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not re.fullmatch(_NAME, name):
            raise InvalidInput(f"name must be 1 to 40 ASCII letters, got {name!r}")  # the wrapper answers 400 JSON
        return web.json_response({"greeting": f"{greeting}, {name}"})

    routes.add("GET", GREET_PATH, greet, openapi=GREET_OPERATION)


@hookimpl
def ondemand_redis_ready(lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
    SEEN_EVENTS.append(("ready", {"lifecycle": lifecycle, "pid": pid}))
