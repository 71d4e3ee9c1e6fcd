"""The plugin manager factory, the built-in plugin list and the registry of named factories."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import pluggy

from app import hookspecs
from app.config import Config
from app.errors import PluginError

log = logging.getLogger("ondemand.events")

ENTRY_POINT_GROUP = "ondemand"

# Built-in behaviour is written as ordinary plugins, registered under these names; any of them can
# be blocked with `[plugins] disable = [...]` and replaced by a third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.lifecycle_subprocess",
    "plugins.lifecycle_external",
    "plugins.lifecycle_noop",
    "plugins.storage_redis",
    "plugins.storage_postgres",
)

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Named factories of one kind ("lifecycle", "storage"), each remembered with the plugin that added it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}
        self._owners: dict[str, str] = {}
        self._current_plugin = "?"

    def add(self, name: str, factory: F) -> None:
        if not name or not isinstance(name, str):
            raise PluginError(f"plugin {self._current_plugin!r} registered a {self.kind} with an empty name")
        if name in self._factories:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {self._owners[name]!r} "
                f"and by plugin {self._current_plugin!r}; disable one with [plugins] disable = [...]"
            )
        self._factories[name] = factory
        self._owners[name] = self._current_plugin

    def get(self, name: str) -> F:
        try:
            return self._factories[name]
        except KeyError:
            available = ", ".join(sorted(self._factories)) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; available: {available}") from None

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def collect(self, hook: pluggy.HookCaller) -> Registry[F]:
        """Call every implementation of a register hook, noting which plugin added which name."""
        for impl in reversed(hook.get_hookimpls()):  # pluggy's own call order, LIFO
            self._current_plugin = impl.plugin_name
            impl.function(registry=self)
        self._current_plugin = "?"
        return self


def make_plugin_manager(config: Config, extra_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """Hookspecs, blocked names, built-ins, entry points, extra plugins, check, configure."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in config.plugins.disable:
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
    pm.hook.ondemand_configure.call_historic(kwargs={"config": config})
    return pm


class Events:
    """Calls observer hooks; an observer that raises is logged, never allowed to break the service."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def emit(self, name: str, **fields: Any) -> None:
        event = name.removeprefix("ondemand_")
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()),
                 extra={"event": event, "fields": fields})
        try:
            getattr(self._hook, name)(**fields)
        except Exception:
            log.exception("a plugin's %s hook raised; ignored", name)
