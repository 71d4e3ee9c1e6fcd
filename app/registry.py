"""Registries that plugins fill through `ondemand_register_*` hooks, each name remembered with its plugin.

`Collector.collect(hook)` calls the hook's implementations in pluggy's own order (LIFO, tryfirst and
trylast respected), one at a time, so that every name added is attributed to the plugin that added it.
Hook wrappers cannot take part in a registration (they would see no registry of their own): a plugin
that declares one is refused with an error that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Self, TypeVar

import pluggy

from ondemand.errors import PluginError

F = TypeVar("F", bound=Callable[..., Any])

CORE = "core"  # the owner of what the core itself declares


class Collector:
    """Something plugins add named entries to; knows which plugin is adding right now."""

    kind = "entry"

    def __init__(self) -> None:
        self._current_plugin = CORE

    def collect(self, hook: pluggy.HookCaller) -> Self:
        """Call every implementation of a register hook with this collector as its only argument."""
        impls = hook.get_hookimpls()
        wrappers = [impl.plugin_name for impl in impls if impl.hookwrapper or impl.wrapper]
        if wrappers:
            raise PluginError(f"plugin {wrappers[0]!r} implements {hook.name} as a hook wrapper; register hooks "
                              "take plain implementations only")
        for impl in reversed(impls):  # pluggy's call order
            self._current_plugin = impl.plugin_name
            try:
                impl.function(**{name: self for name in impl.argnames})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook.name}: {exc!r}") from exc
            finally:
                self._current_plugin = CORE
        return self


class Registry(Collector, Generic[F]):
    """Named factories of one kind ("lifecycle", "storage")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._factories: dict[str, F] = {}
        self._owners: dict[str, str] = {}

    def add(self, name: str, factory: F) -> None:
        if not name or not isinstance(name, str):
            raise PluginError(f"plugin {self._current_plugin!r} registered a {self.kind} with an empty name")
        if not callable(factory):
            raise PluginError(f"plugin {self._current_plugin!r} registered {self.kind} {name!r} with a factory "
                              f"that is not callable ({type(factory).__name__})")
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
