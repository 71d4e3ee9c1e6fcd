"""The plugin manager: built-in plugin list, loading order, and one typed method per hook.

Loading order (pluggy's eggsample host, tox's manager): hookspecs, blocked names, built-ins, the
`ondemand` entry points, plugins passed in by the caller, then `check_pending`. Callers use the typed
methods of `Plugins` (`config_sections()`, `lifecycles()`, `routes(registry)`, `host_services(config)`,
`events`), never `pm.hook.<name>` by string, so a mistyped hook is an AttributeError at our call site.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pluggy

from ondemand import hookspecs
from ondemand.config import Config, SectionRegistry
from ondemand.errors import PluginError
from ondemand.events import Events
from ondemand.registry import Registry

if TYPE_CHECKING:
    from ondemand.host.services import HostService
    from ondemand.redis.lifecycle import LifecycleFactory
    from ondemand.store.protocols import StorageFactory
    from ondemand.web.route_registry import RouteRegistry

ENTRY_POINT_GROUP = "ondemand"

# Built-in behaviour is written as ordinary plugins, registered under these names; any of them can
# be blocked with `[plugins] disable = [...]` and replaced by a third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "ondemand.plugins.lifecycle_subprocess",
    "ondemand.plugins.lifecycle_external",
    "ondemand.plugins.lifecycle_noop",
    "ondemand.plugins.storage_redis",
    "ondemand.plugins.storage_postgres",
    "ondemand.plugins.storage_sqlite",
)


class Plugins:
    """A pluggy PluginManager with one method per hook of ours."""

    def __init__(self, disable: Sequence[str] = (), extra_plugins: Iterable[object] = ()) -> None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for name in disable:
            pm.set_blocked(name)
        for module_name in DEFAULT_PLUGINS:
            short = module_name.rsplit(".", 1)[-1]
            if not pm.is_blocked(short):
                pm.register(importlib.import_module(module_name), name=short)
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party plugin must say which one it is
            raise PluginError(f"loading plugins from entry-point group {ENTRY_POINT_GROUP!r} failed: {exc!r}") from exc
        for plugin in extra_plugins:
            pm.register(plugin)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc
        self.pm = pm
        self.events = Events(pm.hook)

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def config_sections(self) -> SectionRegistry:
        return SectionRegistry().collect(self.pm.hook.ondemand_config_sections)

    def configure(self, config: Config) -> None:
        self.pm.hook.ondemand_configure.call_historic(kwargs={"config": config})

    def lifecycles(self) -> Registry[LifecycleFactory]:
        return Registry("lifecycle").collect(self.pm.hook.ondemand_register_lifecycles)

    def storages(self) -> Registry[StorageFactory]:
        return Registry("storage").collect(self.pm.hook.ondemand_register_storages)

    def routes(self, routes: RouteRegistry) -> RouteRegistry:
        """`routes` (holding the core's routes) with every plugin's added, each attributed to its plugin."""
        return routes.collect(self.pm.hook.ondemand_register_routes)

    def host_services(self, config: Config) -> list[HostService]:
        """What must run once per host for the workers of `run.py --workers N` (the embedded PostgreSQL)."""
        return [service for service in self.pm.hook.ondemand_host_services(config=config) if service is not None]
