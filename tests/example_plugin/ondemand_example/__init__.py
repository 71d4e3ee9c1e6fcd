"""An example third-party plugin: a lifecycle named `example-subprocess` and an event observer.

It reuses the built-in subprocess lifecycle under its own name and records the events it observes,
which is all the test suite needs to see it discovered through the `ondemand` entry-point group.
"""

from __future__ import annotations

from typing import Any

import attrs

from app import hookimpl
from plugins.lifecycle_subprocess import SubprocessConfig, SubprocessLifecycle

SEEN_EVENTS: list[tuple[str, dict[str, Any]]] = []


@attrs.define
class ExampleLifecycle(SubprocessLifecycle):
    name: str = "example-subprocess"

    def status(self) -> dict[str, Any]:
        return {**super().status(), "example_plugin": True}


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("example-subprocess", lambda context: ExampleLifecycle(
        context.config.lifecycle, context.config.section(SubprocessConfig), context.events))


@hookimpl
def ondemand_redis_ready(lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
    SEEN_EVENTS.append(("ready", {"lifecycle": lifecycle, "pid": pid}))
