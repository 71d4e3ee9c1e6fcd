"""The `noop` lifecycle: no Redis at all. Cache reads miss and cache-only writes are dropped (and
counted); durable namespaces are served by the durable storage alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from app.errors import RedisDisabled
from app.hookspecs import hookimpl
from app.lifecycle import RedisEndpoint


@attrs.define
class NoopLifecycle:
    name: str = "noop"
    provides_redis: bool = False
    manages_process: bool = False

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        """Nothing runs, nothing exits."""

    def note_activity(self) -> None:
        """Nothing is shared."""

    def shared_idle_seconds(self) -> float | None:
        return None

    def pid(self) -> int | None:
        return None

    def status(self) -> dict[str, Any]:
        return {"note": "noop lifecycle: no Redis; cache reads miss, cache-only writes are dropped"}

    async def start(self) -> RedisEndpoint:
        raise RedisDisabled("the noop lifecycle provides no Redis")

    async def stop(self) -> None:
        """Nothing to stop."""


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("noop", lambda runtime: NoopLifecycle())
