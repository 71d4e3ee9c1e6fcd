"""Runtime: assembles the plugins, the lifecycle, the storages, the dispatcher and CacheService.

    async with Runtime(config) as rt:
        await rt.cache.cache_session("s1", {"user": 1}, ttl=60)

Starting a Runtime spawns nothing: Redis starts on the first operation that needs it. The objects the
plugins' factories make are built first, opening nothing (`build_parts`, which serve and check-config
also run before anything listens: `ondemand.preflight`); then each is opened, its teardown registered on
one exit stack, and assigned to the runtime only once the whole runtime stands; `close` unwinds the
stack in reverse order.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import attrs

from ondemand.cache import CacheService
from ondemand.config import Config, with_sections
from ondemand.config.load import load_config
from ondemand.errors import PluginError
from ondemand.health import OutageTracker
from ondemand.history import StatusHistory
from ondemand.plugin_manager import Plugins
from ondemand.redis.lifecycle import Lifecycle, LifecycleContext, LifecycleFactory, resolve_lifecycle_name
from ondemand.redis.server import OnDemandRedis, RedisState
from ondemand.registry import Registry
from ondemand.store.breaker import BreakerState
from ondemand.store.dispatcher import Dispatcher
from ondemand.store.near import NearCache
from ondemand.store.protocols import CacheStorage, DurableStorage, Namespace, StorageContext, StorageFactory


class Readiness(StrEnum):
    READY = "ready"  # every configured store serves
    DEGRADED = "degraded"  # one is down, the other serves
    UNAVAILABLE = "unavailable"  # Redis is down and no durable store can take a write (none configured, or down)


@attrs.frozen
class ReadinessReport:
    state: Readiness
    redis_ok: bool
    durable_ok: bool | None  # None: no durable store configured

    @property
    def serving(self) -> bool:
        return self.state != Readiness.UNAVAILABLE


@attrs.frozen
class Parts:
    """What a Runtime is made of, as the plugins' factories made it: nothing opened, nothing started (so
    nothing to close when it is dropped)."""

    config: Config  # with every loaded plugin's section
    plugins: Plugins
    lifecycles: Registry[LifecycleFactory]
    storages: Registry[StorageFactory]
    lifecycle_name: str  # `lifecycle.plugin` resolved (`auto`)
    lifecycle: Lifecycle
    on_demand: OnDemandRedis
    redis_health: OutageTracker
    cache: CacheStorage
    durable: DurableStorage | None
    durable_health: OutageTracker | None


def _factory(registry: Registry[Any], name: str, key: str) -> Any:
    try:
        return registry.get(name)
    except PluginError as exc:
        raise PluginError(exc.message, key=key) from None


def build_parts(config: Config, extra_plugins: Iterable[object] = ()) -> Parts:
    """Load the plugins, give them the config (`ondemand_configure`) and build the lifecycle and the storages
    with their factories: every check a start makes before it opens anything. `Runtime.start` opens what this
    returns; `ondemand.preflight` (serve and check-config) only looks at it. Call it in the event loop the
    parts will run in (OnDemandRedis binds to it). Raises ConfigError or PluginError (with the key at fault)."""
    plugins = Plugins(config.plugins.disable, extra_plugins)
    config = with_sections(config, plugins.config_sections())
    plugins.configure(config)
    events = plugins.events
    lifecycles, storages = plugins.lifecycles(), plugins.storages()

    lifecycle_name = resolve_lifecycle_name(config.lifecycle.plugin, docker=config.environment.docker,
                                            skip_in_docker=config.lifecycle.skip_in_docker)
    lifecycle = _factory(lifecycles, lifecycle_name, "lifecycle.plugin")(LifecycleContext(config=config, events=events))
    redis_health = OutageTracker("redis", events)
    on_demand = OnDemandRedis(lifecycle, config, events, redis_health)

    context = StorageContext(config, events, on_demand, redis_health)
    cache = _factory(storages, config.storage.cache, "storage.cache")(context)
    if not isinstance(cache, CacheStorage):
        raise PluginError(f"storage {config.storage.cache!r} cannot serve as the cache: it lacks ping, "
                          "put_back, invalidate, append_list, delete_keys or delete_prefix", key="storage.cache")
    durable: DurableStorage | None = None
    durable_health: OutageTracker | None = None
    if config.storage.durable:
        durable_health = OutageTracker(config.storage.durable, events)
        made = _factory(storages, config.storage.durable, "storage.durable")(
            StorageContext(config, events, on_demand, durable_health))
        if not isinstance(made, DurableStorage):
            raise PluginError(f"storage {config.storage.durable!r} cannot serve as the durable store: it lacks "
                              "get_entry or get_entries", key="storage.durable")
        durable = made
    return Parts(config=config, plugins=plugins, lifecycles=lifecycles, storages=storages,
                 lifecycle_name=lifecycle_name, lifecycle=lifecycle, on_demand=on_demand, redis_health=redis_health,
                 cache=cache, durable=durable, durable_health=durable_health)


class Runtime:
    """See the module docstring. Attributes exist once `start()` returned."""

    config: Config
    plugins: Plugins
    lifecycle: Lifecycle
    on_demand: OnDemandRedis
    cache_storage: CacheStorage
    durable_storage: DurableStorage | None
    dispatcher: Dispatcher
    cache: CacheService
    lifecycles: Registry[LifecycleFactory]
    storages: Registry[StorageFactory]
    redis_health: OutageTracker
    durable_health: OutageTracker | None
    history: StatusHistory

    def __init__(self, config: Config | None = None, *, plugins: Iterable[object] = ()) -> None:
        self._config = config
        if config is not None:
            self.config = config  # until start() adds the plugins' sections
        self._extra_plugins = tuple(plugins)
        self.started_at = time.time()
        self._stack: contextlib.AsyncExitStack | None = None
        self._pid = os.getpid()

    async def start(self) -> Runtime:
        async with contextlib.AsyncExitStack() as stack:
            config = self._config if self._config is not None else load_config(plugins=self._extra_plugins)
            parts = build_parts(config, self._extra_plugins)
            config, on_demand, cache, durable = parts.config, parts.on_demand, parts.cache, parts.durable
            stack.push_async_callback(on_demand.close)  # last out: after every storage
            for storage in (cache, durable):
                if storage is not None:
                    await storage.open()
                    stack.push_async_callback(_close_quietly, storage)

            prefix = config.redis.key_prefix
            tagged = config.lifecycle.topology == "cluster"  # the id is the hash tag
            namespaces = {
                name: Namespace(name=name, ttl=ns.ttl, durable=ns.durable and durable is not None,
                                connection_id=ns.connection_id,
                                # "{=" + id + "}": the tag is never empty, even for an id that starts with "}"
                                key_prefix=f"{prefix}:{name}:" + ("{=" if tagged else ""),
                                key_suffix="}" if tagged else "", near_cache=ns.near_cache)
                for name, ns in config.namespaces.items()
            }
            near = near_cache_for(config, namespaces.values())
            on_demand.near = near
            dispatcher = Dispatcher(cache=cache, durable=durable, namespaces=namespaces,
                                    cache_health=parts.redis_health, durable_health=parts.durable_health,
                                    outbox_poll=config.storage.outbox_poll, near=near)
            stack.push_async_callback(dispatcher.close)
            dispatcher.start()
            # A cluster master held after a failure or a failover is brought up to date by the dispatcher.
            on_demand.node_recovery = dispatcher.invalidation.recover_node

            self.config, self.plugins, self.lifecycles, self.storages = (config, parts.plugins, parts.lifecycles,
                                                                         parts.storages)
            self.lifecycle, self.on_demand, self.redis_health = parts.lifecycle, on_demand, parts.redis_health
            self.cache_storage, self.durable_storage, self.durable_health = cache, durable, parts.durable_health
            self.dispatcher, self.cache = dispatcher, CacheService(dispatcher)
            self.history = StatusHistory(config.server.history_interval, config.server.history_seconds)
            stack.push_async_callback(self.history.close)
            self.history.start(self.history_sample)
            self._stack = stack.pop_all()
        return self

    async def close(self) -> None:
        """Close in reverse order of opening; every step bounded, every step attempted."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if os.getpid() != self._pid:
            # A forked copy: the servers and connections are the parent's. on_demand forgot its own
            # at fork and may have started a server of this process's, which it stops here.
            await self.on_demand.close()
            return
        await stack.aclose()

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def readiness(self) -> ReadinessReport:
        """Which stores can serve. Redis is down when its breaker is not closed or the server failed or is
        disabled (a stopped server is fine: it starts on demand); the durable store when its outage
        tracker says so. Unavailable when Redis is down and no durable store can take a write (none is
        configured, or it is down too): nothing the service is asked to store would be stored. Any other
        outage is degraded."""
        redis_ok = (self.dispatcher.breaker.state == BreakerState.CLOSED
                    and self.on_demand.state not in (RedisState.FAILED, RedisState.DISABLED))
        durable_ok = None if self.durable_health is None else not self.durable_health.degraded
        if redis_ok and durable_ok is not False:
            state = Readiness.READY
        elif redis_ok or durable_ok:
            state = Readiness.DEGRADED
        else:
            state = Readiness.UNAVAILABLE
        return ReadinessReport(state=state, redis_ok=redis_ok, durable_ok=durable_ok)

    def history_sample(self) -> dict[str, Any]:
        """One sample of the status history (ondemand.history): cumulative counters, states now."""
        hits = durable_hits = misses = writes = deletes = dropped = 0
        for stats in self.dispatcher.stats.values():
            hits += stats.hits
            durable_hits += stats.durable_hits
            misses += stats.misses
            writes += stats.writes
            deletes += stats.deletes
            dropped += stats.dropped_writes
        report = self.readiness()
        return {
            "t": round(time.time(), 3),
            "ops": hits + durable_hits + misses + writes + deletes,
            "hits": hits,
            "reads": hits + durable_hits + misses,
            "dropped_writes": dropped,
            "commands": self.on_demand.counters.commands,
            "readiness": report.state.value,
            "redis_ok": report.redis_ok,
            "durable_ok": report.durable_ok,
            "redis_state": str(self.on_demand.state),
            "breaker": str(self.dispatcher.breaker.state),
        }

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
            "near_cache": self.near_cache_status(),
            "plugins": self.plugins.names(),
        }

    def near_cache_status(self) -> dict[str, Any] | None:
        """The near cache's state, size and counters, with the hits and misses of its namespaces; None without one."""
        near = self.dispatcher.near
        if near is None:
            return None
        stats = self.dispatcher.stats
        namespaces = sorted(name for name, ns in self.dispatcher.namespaces.items() if ns.near_cache)
        return {"namespaces": namespaces, "hits": sum(stats[name].near_hits for name in namespaces),
                "misses": sum(stats[name].near_misses for name in namespaces), **near.status()}


def near_cache_for(config: Config, namespaces: Iterable[Namespace]) -> NearCache | None:
    """The near cache of the namespaces with `near_cache = true` (their key prefixes by pool), or None."""
    prefixes: dict[str, list[str]] = {}
    for ns in namespaces:
        if ns.near_cache:
            prefixes.setdefault(ns.connection_id, []).append(ns.key_prefix)
    return NearCache(config.near_cache, prefixes) if prefixes else None


async def _close_quietly(storage: CacheStorage | DurableStorage) -> None:
    """A storage that fails to close must not keep the others (and Redis) from closing."""
    with contextlib.suppress(Exception):
        await storage.close()
