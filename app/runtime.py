"""Runtime: owns the plugin manager, the lifecycle, the storages, the dispatcher and CacheService.

    async with Runtime(config) as rt:
        await rt.cache.cache_session("s1", {"user": 1}, ttl=60)

Starting a Runtime spawns nothing: Redis starts on the first operation that needs it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from typing import Any

import pluggy

from app.cache import CacheService
from app.config import Config, load_config
from app.dispatcher import Dispatcher
from app.errors import PluginError
from app.lifecycle import Lifecycle, LifecycleFactory, resolve_lifecycle_name
from app.ondemand import OnDemandRedis
from app.plugins import Events, Registry, make_plugin_manager
from app.storage import CacheStorage, DurableStorage, Namespace, Storage, StorageFactory


class Runtime:
    def __init__(self, config: Config | None = None, *, plugins: Iterable[object] = ()) -> None:
        self.config = config if config is not None else load_config()
        self._extra_plugins = tuple(plugins)
        self.started_at = time.time()
        self.pm: pluggy.PluginManager
        self.events: Events
        self.lifecycles: Registry[LifecycleFactory]
        self.storages: Registry[StorageFactory]
        self.lifecycle: Lifecycle
        self.on_demand: OnDemandRedis
        self.cache_storage: CacheStorage
        self.durable_storage: DurableStorage | None = None
        self.dispatcher: Dispatcher
        self.cache: CacheService
        self._opened: list[Storage] = []
        self._pid = os.getpid()

    async def start(self) -> Runtime:
        config = self.config
        self.pm = make_plugin_manager(config, self._extra_plugins)
        self.events = Events(self.pm)
        self.lifecycles = Registry("lifecycle").collect(self.pm.hook.ondemand_register_lifecycles)
        self.storages = Registry("storage").collect(self.pm.hook.ondemand_register_storages)
        lifecycle_name = resolve_lifecycle_name(
            config.lifecycle.plugin, docker=config.environment.docker, skip_in_docker=config.lifecycle.skip_in_docker
        )
        self.lifecycle = self.lifecycles.get(lifecycle_name)(self)
        self.on_demand = OnDemandRedis(self.lifecycle, config, self.events)
        cache = self.storages.get(config.storage.cache)(self)
        if not isinstance(cache, CacheStorage):
            raise PluginError(f"storage {config.storage.cache!r} cannot serve as the cache: it lacks "
                              "ping, set_if_absent, append_list, delete_keys or delete_prefix")
        self.cache_storage = cache
        if config.storage.durable:
            durable = self.storages.get(config.storage.durable)(self)
            if not isinstance(durable, DurableStorage):
                raise PluginError(f"storage {config.storage.durable!r} cannot serve as the durable store: "
                                  "it lacks get_entry")
            self.durable_storage = durable
        try:
            for storage in (self.cache_storage, self.durable_storage):
                if storage is not None:
                    await storage.open()
                    self._opened.append(storage)
        except BaseException:
            await self.close()
            raise
        prefix = config.redis.key_prefix
        namespaces = {
            name: Namespace(name=name, ttl=ns.ttl, durable=ns.durable, connection_id=ns.connection_id,
                            key_prefix=f"{prefix}:{name}:")
            for name, ns in config.namespaces.items()
        }
        self.dispatcher = Dispatcher(cache=self.cache_storage, durable=self.durable_storage,
                                     namespaces=namespaces, events=self.events)
        self.cache = CacheService(self.dispatcher)
        return self

    async def close(self) -> None:
        """Close in reverse order of opening; every step bounded, every step attempted."""
        if os.getpid() != self._pid:
            # A forked copy: the servers and connections are the parent's. on_demand forgot its own
            # at fork and may have started a server of this process's, which it stops here.
            if hasattr(self, "on_demand"):
                await self.on_demand.close()
            return
        if hasattr(self, "dispatcher"):
            await self.dispatcher.close()
        while self._opened:
            storage = self._opened.pop()
            with contextlib.suppress(Exception):
                await storage.close()
        if hasattr(self, "on_demand"):
            await self.on_demand.close()

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def status(self) -> dict[str, Any]:
        """JSON-serializable; the same document as GET /api/cache/status. No secrets."""
        return {
            "service": "ondemand",
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "redis": self.on_demand.status(),
            "storages": {
                "cache": self.cache_storage.status(),
                "durable": self.durable_storage.status() if self.durable_storage else None,
            },
            "dispatcher": self.dispatcher.status(),
            "plugins": sorted(name for name, _ in self.pm.list_name_plugin()),
        }
