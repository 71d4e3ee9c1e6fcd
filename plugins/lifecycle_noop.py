"""The `noop` lifecycle: no Redis at all. Cache reads miss and cache-only writes are dropped (and
counted); durable namespaces are served by the durable storage alone."""

from __future__ import annotations

from typing import Any

import attrs

from ondemand.errors import RedisDisabled
from ondemand.hookspecs import hookimpl
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.lifecycle import LifecycleFactory, WithoutProcess
from ondemand.registry import Registry


@attrs.define
class NoopLifecycle(WithoutProcess):
    name: str = "noop"
    provides_redis: bool = False

    def status(self) -> dict[str, Any]:
        return {"note": "noop lifecycle: no Redis; cache reads miss, cache-only writes are dropped"}

    async def start(self) -> RedisEndpoint:
        raise RedisDisabled("the noop lifecycle provides no Redis")


@hookimpl
def ondemand_register_lifecycles(registry: Registry[LifecycleFactory]) -> None:
    registry.add("noop", lambda context: NoopLifecycle())
