"""An example third-party plugin: its own `[example]` config table, a lifecycle named
`example-subprocess` and an event observer.

The lifecycle reuses the built-in subprocess lifecycle under its own name and shows its validated
`[example]` section in its status; the observer records the events it sees. That is all the test
suite needs to see a plugin discovered through the `ondemand` entry-point group and configured like
the core:

    [example]
    greeting = "bonjour"   # or EXAMPLE_GREETING=bonjour, or ONDEMAND_EXAMPLE__GREETING=bonjour
    level = 3              # or ONDEMAND_EXAMPLE__LEVEL=3
"""

from __future__ import annotations

from typing import Any

import attrs

from ondemand import hookimpl
from ondemand.config import SECRET, between, matches
from ondemand.plugins.lifecycle_subprocess import SubprocessConfig, SubprocessLifecycle

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
def ondemand_config_sections(sections: Any) -> None:
    sections.add("example", ExampleConfig, env={"EXAMPLE_GREETING": "greeting"})


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("example-subprocess", lambda context: ExampleLifecycle(
        context.config.lifecycle, context.config.section(SubprocessConfig), context.events,
        example=context.config.section(ExampleConfig)))


@hookimpl
def ondemand_redis_ready(lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
    SEEN_EVENTS.append(("ready", {"lifecycle": lifecycle, "pid": pid}))
