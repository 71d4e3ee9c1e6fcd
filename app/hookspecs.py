"""Every hook of ondemand. Plugins implement them with `@app.hookimpl`.

Hooks declare config sections, register named factories at startup and observe lifecycle events.
None of them is on the per-operation path: the runtime calls the objects the factories made directly
(pluggy cannot await). Observer hooks are called synchronously from the event loop; keep them quick
and never block. An exception raised by an observer is logged and does not disturb the service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ondemand.config import Config, SectionRegistry
    from ondemand.host.services import HostService
    from ondemand.registry import Registry
    from ondemand.web.route_registry import RouteRegistry

PROJECT = "ondemand"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ondemand_config_sections(sections: SectionRegistry) -> None:
    """Declare config tables: `sections.add("name", FrozenAttrsClass, env={"VAR": "key"})`. Collects all."""


@hookspec(historic=True)
def ondemand_configure(config: Config) -> None:
    """Receive the loaded configuration once; historic, so plugins registered late see it too. Collects all."""


@hookspec
def ondemand_register_lifecycles(registry: Registry) -> None:
    """Add lifecycle factories with `registry.add(name, factory)`; factory(LifecycleContext) -> Lifecycle.
    Collects all."""


@hookspec
def ondemand_register_storages(registry: Registry) -> None:
    """Add storage factories with `registry.add(name, factory)`; factory(StorageContext) -> Storage. Collects all."""


@hookspec
def ondemand_register_routes(routes: RouteRegistry) -> None:
    """Add HTTP routes with `routes.add(method, path, handler, openapi=None)`, served with ours (under the
    same prefix, wrapped the same way) when the app is set up; `routes.config` is the config. Collects all."""


@hookspec
def ondemand_host_services(config: Config) -> HostService | None:
    """A service that must run once per host for N workers (an embedded database server), or None.
    Called by the supervisor of `--workers N` before the workers start. Collects all."""


@hookspec
def ondemand_redis_spawned(lifecycle: str, pid: int, endpoint: str) -> None:
    """A redis-server child was started (not yet ready). Collects all."""


@hookspec
def ondemand_redis_ready(lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
    """Redis answered PING after `seconds` from the start request. Collects all."""


@hookspec
def ondemand_redis_idle_stopped(lifecycle: str, pid: int | None, idle_seconds: float) -> None:
    """The Redis server was stopped after `idle_seconds` without a cache operation. Collects all."""


@hookspec
def ondemand_degraded(component: str, reason: str) -> None:
    """`component` ("redis", or the durable storage's name) stopped serving; `reason` says why. Collects all."""


@hookspec
def ondemand_recovered(component: str, down_seconds: float) -> None:
    """`component` serves again after `down_seconds` of degradation. Collects all."""


@hookspec
def ondemand_shutdown(lifecycle: str, pid: int | None) -> None:
    """The runtime closed: pools closed and any Redis child stopped. Collects all."""
