"""Cache-aside: `get_or_compute`, one load per key at a time, in this process and across processes.

In a process, concurrent callers of one key share one load (a task of its own, so a caller that gives up
does not cancel it for the others). Across processes a cache storage that offers `Leases` (the redis storage
does) hands one of them a lease; the others serve the stale value or wait for a notification of the install.
The install is conditional on the lease and on the value being as the lease found it (a delete revokes the
lease, a write changes the value), so a value loaded before a write is never installed over it. Early
refresh is XFetch (Vattani, Chierichetti and Lowenstein, VLDB 2015). The guarantees are the README's
("Cache-aside").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import attrs

from ondemand.errors import BackendUnavailable, InvalidInput, LoadTimeout, RedisCommandError
from ondemand.store.protocols import Namespace, WritesConditionally
from ondemand.store.values import CORRUPT, check_id, check_ttl, decode, encode
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.aside")

Loader = Callable[[], Awaitable[Any]]
ACQUIRED = -1.0  # Leases.acquire: the lease is ours
PRESENT = -2.0  # Leases.acquire: a value is there (a miss), or it was refreshed since it was read (a refresh)
_UNREACHABLE = (BackendUnavailable, RedisCommandError)


@runtime_checkable
class Leases(Protocol):
    """What a cache storage offers for leases across processes (as its `leases` attribute). Keys are a
    namespace and an id; `meta` is the text `get_or_compute` keeps beside a value (its logical expiry and
    its last load time). Every call is bounded by the storage's own timeouts."""

    async def read(self, ns: Namespace, item_id: str) -> tuple[bytes | None, bytes | None]:
        """The value's bytes (None: absent) and its meta (None: none, e.g. written by a plain `set`)."""

    async def acquire(self, ns: Namespace, item_id: str, token: str, lease_ttl: float, seen: bytes | None) -> float:
        """Take the lease for `lease_ttl` seconds: ACQUIRED; PRESENT when (seen is None) a value is there or
        (seen given) the meta is no longer `seen`; else the seconds the holder's lease has left."""

    async def install(self, ns: Namespace, item_id: str, token: str, value: bytes, ttl: float | None,
                      meta: bytes) -> bool:
        """In a cache-only namespace: store the value and its meta for `ttl`, in one step, if the lease is still
        `token`'s (a delete revokes it) and the value is still as the lease found it (a write changes it);
        notify either way; returns whether it stored it."""

    async def held(self, ns: Namespace, item_id: str, token: str) -> bool:
        """Whether the lease is still `token`'s."""

    async def finish(self, ns: Namespace, item_id: str, meta: bytes, ttl: float | None) -> None:
        """In a durable namespace, after the value's versioned write: store its meta and notify."""

    async def release(self, ns: Namespace, item_id: str, token: str) -> None:
        """Give the lease up (a load that failed or is not cached) and notify the waiters."""

    async def listen(self, timeout: float) -> bool:
        """Make sure this process receives notifications (at most `timeout` seconds); False if it cannot."""

    def arrival(self, ns: Namespace, item_id: str) -> asyncio.Future[None]:
        """A future done when a notification for the key arrives (call `forget` when no longer waiting)."""

    def forget(self, ns: Namespace, item_id: str, arrival: asyncio.Future[None]) -> None: ...


def _positive(name: str, value: Any, *, zero: bool = False) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise InvalidInput(f"{name} must be a number {'of at least 0' if zero else 'greater than 0'}, got {value!r}")
    return float(value)


@attrs.frozen
class AsideOptions:
    """One call's options, checked (see Dispatcher.get_or_compute); `@cached` checks them once."""

    ttl: float | None = None  # None: the namespace's ttl
    stale_ttl: float | None = None  # seconds a value is still served, as stale, past its ttl while it is refreshed
    early: float = 0.0  # XFetch's beta: 0 off, 1 the paper's default, more refreshes earlier
    negative_ttl: float | None = None  # cache a None (or a `not_found` exception) for this long; None: never
    not_found: tuple[type[BaseException], ...] = ()  # loader exceptions that mean "no value" (negative caching)
    lease_ttl: float = 10.0  # seconds a lease lasts: longer than a load takes
    wait: float = 5.0  # seconds a caller waits for another process's load before it loads itself
    # A hit needs the value's logical expiry (to serve it as stale, or to refresh it early); set by `checked`.
    needs_meta: bool = False

    @classmethod
    def checked(cls, *, ttl: Any = None, stale_ttl: Any = None, early: Any = 0.0, negative_ttl: Any = None,
                not_found: Any = (), lease_ttl: Any = 10.0, wait: Any = 5.0) -> AsideOptions:
        if ttl is not None:
            check_ttl(ttl, None)
        found = not_found if isinstance(not_found, tuple) else (not_found,)
        if not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in found):
            raise InvalidInput(f"not_found must be an exception class or a tuple of them, got {not_found!r}")
        return cls(
            ttl=ttl,
            stale_ttl=None if stale_ttl is None else _positive("stale_ttl", stale_ttl),
            early=_positive("early", early, zero=True),
            negative_ttl=None if negative_ttl is None else _positive("negative_ttl", negative_ttl),
            not_found=found,
            lease_ttl=_positive("lease_ttl", lease_ttl),
            wait=_positive("wait", wait, zero=True),
            needs_meta=stale_ttl is not None or bool(early),
        )


DEFAULT_OPTIONS = AsideOptions()


@attrs.define
class AsideStats:
    loads: int = 0  # loader calls that returned
    load_seconds: float = 0.0  # their total time
    load_errors: int = 0  # loader calls that raised (not cached; every waiter got the error)
    joins: int = 0  # callers that shared a load already running in this process
    lease_waits: int = 0  # loads that waited for another process's lease holder
    lease_timeouts: int = 0  # waits past their bound: the caller loaded itself (and did not install)
    stale_served: int = 0  # values served past their ttl while one refresh ran
    early_refreshes: int = 0  # XFetch refreshes started before the ttl
    not_installed: int = 0  # loaded values not installed: a write or delete revoked the lease (or it expired)
    negative_cached: int = 0  # "not found" results cached (negative_ttl)


def _meta(ttl: float | None, delta: float, raw: bytes) -> bytes:
    """The logical expiry (ms since the epoch, 0: none), the last load's duration (ms) and the CRC-32 of the value
    they are about (a plain write replaces the value, not the meta: a reader then ignores it)."""
    expiry = 0 if ttl is None else int((time.time() + ttl) * 1000)
    return b"%d %d %d" % (expiry, max(1, int(delta * 1000)), zlib.crc32(raw))


class Aside:
    """The dispatcher's `get_or_compute` (one per dispatcher; see the module docstring)."""

    def __init__(self, dispatcher: Any) -> None:  # the Dispatcher (which imports this module)
        self.dispatcher = dispatcher
        leases = getattr(dispatcher.cache, "leases", None)
        self.leases: Leases | None = leases if isinstance(leases, Leases) else None
        self.stats = {name: AsideStats() for name in dispatcher.namespaces}
        self._flights: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._refreshes: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._held_elsewhere: dict[tuple[str, str], float] = {}  # key -> (loop time) when that lease ends
        self._loop = asyncio.get_running_loop()

    async def get_or_compute(self, namespace: str, item_id: str, loader: Loader, options: AsideOptions) -> Any:
        d = self.dispatcher
        if not options.needs_meta:  # a hit is a plain lookup (which checks the namespace and the id)
            found = await d.lookup(namespace, item_id)
            if found.source != "miss":
                return found.value
            ns = d.namespaces[namespace]
        else:
            ns = d.namespaces.get(namespace) or d.namespace(namespace)  # the latter raises the error
            check_id(item_id)
            if self.leases is not None and d.breaker.closed:
                try:
                    raw, meta = await self.leases.read(ns, item_id)
                except _UNREACHABLE:
                    raw = meta = None  # the lookup below decides (and counts the failure)
                if raw is not None:
                    value = decode(raw)
                    if value is not CORRUPT:
                        d.stats[ns.name].hits += 1
                        if meta is not None:
                            self._consider_refresh(ns, item_id, loader, options, meta, raw)
                        return value
            found = await d.lookup(ns.name, item_id)  # a miss, a durable store's value, or no leases
            if found.source != "miss":
                return found.value
        if not callable(loader):
            raise InvalidInput(f"loader must be an async callable with no arguments, got {loader!r}")
        key = (ns.name, item_id)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._loop.create_task(self._load_shared(ns, item_id, loader, options))
            self._flights[key] = flight
            flight.add_done_callback(lambda task: self._landed(self._flights, key, task))
        else:
            self.stats[ns.name].joins += 1
        return await self._wait_for(ns, item_id, flight, options)

    async def _wait_for(self, ns: Namespace, item_id: str, flight: asyncio.Task[Any], options: AsideOptions) -> Any:
        """Await a shared load, bounded: a wait for another process plus one load's lease."""
        bound = options.wait + options.lease_ttl
        try:
            return await asyncio.wait_for(asyncio.shield(flight), bound)
        except TimeoutError:
            if flight.done():  # (the load itself raised TimeoutError)
                raise
            raise LoadTimeout(f"the load of {item_id!r} in {ns.name} did not finish within {bound:g} s "
                              "(wait + lease_ttl); it goes on for the callers that come next") from None

    @staticmethod
    def _landed(tasks: dict[tuple[str, str], asyncio.Task[Any]], key: tuple[str, str], task: asyncio.Task[Any]) -> None:
        if tasks.get(key) is task:
            del tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have given up

    # -- loading --------------------------------------------------------------------------------

    async def _load_shared(self, ns: Namespace, item_id: str, loader: Loader, options: AsideOptions) -> Any:
        """The one load of this process: under the lease when there is one, else after the holder's."""
        leases, d = self.leases, self.dispatcher
        if leases is None or not d.breaker.closed:
            return await self._load_and_set(ns, item_id, loader, options)
        stats = self.stats[ns.name]
        deadline = self._loop.time() + options.wait
        token = os.urandom(12).hex()
        try:
            listening = await leases.listen(min(1.0, options.wait or 1.0))
        except _UNREACHABLE:
            listening = False
        waited, present_misses, pause = False, 0, 0.01
        while True:
            arrival = leases.arrival(ns, item_id)  # before asking: a notification in between is not lost
            try:
                try:
                    got = await leases.acquire(ns, item_id, token, options.lease_ttl, None)
                except _UNREACHABLE:  # never fail a read because the lease cannot be reached
                    return await self._load_and_set(ns, item_id, loader, options)
                if got == ACQUIRED:
                    return await self._load_and_install(ns, item_id, loader, options, token)
                if got != PRESENT:
                    if not waited:
                        stats.lease_waits += 1
                        waited = True
                    remaining = deadline - self._loop.time()
                    if remaining <= 0:
                        stats.lease_timeouts += 1
                        return await self._load(ns, item_id, loader, options)
                    # Woken by the holder's install (or release); at the latest when its lease ends. Without
                    # notifications (the subscription failed: a server that refuses SUBSCRIBE) it looks again
                    # after a growing pause instead.
                    bound = min(remaining, got + 0.05)
                    if listening:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(arrival, bound)
                    else:
                        pause = min(pause * 2, 0.5)
                        await asyncio.sleep(min(bound, pause))
            finally:
                leases.forget(ns, item_id, arrival)
            found = await d.lookup(ns.name, item_id)
            if found.source != "miss":
                return found.value
            if got == PRESENT:
                present_misses += 1
                if present_misses > 1:  # something the cache holds that reads as a miss (corrupt): replace it
                    return await self._load_and_set(ns, item_id, loader, options)

    async def _load(self, ns: Namespace, item_id: str, loader: Loader, options: AsideOptions) -> Any:
        """Call the loader once, counted; a `not_found` exception is None."""
        stats = self.stats[ns.name]
        began = self._loop.time()
        try:
            value = await loader()
        except options.not_found:
            value = None
        except BaseException:
            stats.load_errors += 1
            raise
        delta = self._loop.time() - began
        stats.loads += 1
        stats.load_seconds += delta
        return value

    def _ttls(self, ns: Namespace, value: Any, options: AsideOptions) -> tuple[float | None, float | None] | None:
        """(logical ttl, physical ttl) for a loaded value; None when it is not cached (a None, not negative)."""
        if value is None:
            if options.negative_ttl is None:
                return None
            self.stats[ns.name].negative_cached += 1
            return options.negative_ttl, options.negative_ttl
        ttl = check_ttl(options.ttl, ns.ttl)
        if ttl is None or options.stale_ttl is None:
            return ttl, ttl
        return ttl, ttl + options.stale_ttl

    async def _load_and_set(self, ns: Namespace, item_id: str, loader: Loader, options: AsideOptions) -> Any:
        """Without leases (no storage support, Redis unreachable): a plain load and write."""
        value = await self._load(ns, item_id, loader, options)
        ttls = self._ttls(ns, value, options)
        if ttls is not None:
            try:
                if ns.durable:  # (after a miss: a write that committed during the load wins)
                    await self.dispatcher.set_loaded(ns, item_id, value, ttls[1], version=None)
                else:
                    await self.dispatcher.set(ns.name, item_id, value, ttls[1])
            except _UNREACHABLE as exc:  # (every store down) the value is returned all the same
                log.warning("a loaded value for %r in %s was not stored: %s", item_id, ns.name, exc)
        return value

    async def _load_and_install(self, ns: Namespace, item_id: str, loader: Loader, options: AsideOptions,
                                token: str, *, refresh: bool = False) -> Any:
        leases = self.leases
        assert leases is not None
        began = self._loop.time()
        try:
            # The value the load replaces, as the system of record has it now (a refresh; after a miss, none):
            # its write takes effect only over that one (see set_loaded).
            after = await self._durable_version(ns, item_id) if refresh and ns.durable else None
            value = await self._load(ns, item_id, loader, options)
            ttls = self._ttls(ns, value, options)
            raw = None if ttls is None else encode(value)  # a value that is not JSON fails here, uncached
        except BaseException:
            await self._release(ns, item_id, token)
            raise
        if ttls is None:
            await self._release(ns, item_id, token)
            return value
        meta = _meta(ttls[0], self._loop.time() - began, raw)  # type: ignore[arg-type]
        stats = self.stats[ns.name]
        try:
            if ns.durable:
                # The lease is checked just before the durable write, and that write is conditional on the value
                # the load replaces (where the store can: WritesConditionally), so a write that commits in between,
                # or one the lease never saw (a host cut off from Redis), wins.
                if not await leases.held(ns, item_id, token):
                    stats.not_installed += 1
                elif await self.dispatcher.set_loaded(ns, item_id, value, ttls[1], version=after):
                    await leases.finish(ns, item_id, meta, ttls[1])
                else:
                    stats.not_installed += 1
                    await self._release(ns, item_id, token)  # its waiters read what the write stored
            elif not await leases.install(ns, item_id, token, raw, ttls[1], meta):  # type: ignore[arg-type]
                stats.not_installed += 1
        except _UNREACHABLE as exc:  # the value is returned all the same; the next read loads again
            log.warning("a loaded value for %r in %s was not installed: %s", item_id, ns.name, exc)
        return value

    async def _durable_version(self, ns: Namespace, item_id: str) -> int | None:
        """The version of the id's live value in the system of record (None: no value, or a store without
        conditional writes, which would not use it)."""
        durable = self.dispatcher.durable
        if not isinstance(durable, WritesConditionally):
            return None
        entry = await durable.get_entry(ns, item_id)
        return None if entry is None else entry.version

    async def _release(self, ns: Namespace, item_id: str, token: str) -> None:
        with contextlib.suppress(*_UNREACHABLE):  # else it expires on its own
            await self.leases.release(ns, item_id, token)  # type: ignore[union-attr]

    # -- refreshing -----------------------------------------------------------------------------

    def _consider_refresh(self, ns: Namespace, item_id: str, loader: Loader, options: AsideOptions,
                          meta: bytes, raw: bytes) -> None:
        """Past its ttl (served stale) or chosen by XFetch: one refresh in the background."""
        try:
            expiry_ms, delta_ms, crc = meta.split()
            expiry, delta = int(expiry_ms) / 1000, int(delta_ms) / 1000
        except ValueError:
            return
        if not expiry or int(crc) != zlib.crc32(raw):  # (the meta of a value since replaced by a plain write)
            return
        now = time.time()
        stats = self.stats[ns.name]
        stale = now >= expiry
        if stale:
            stats.stale_served += 1
        elif not (options.early > 0 and now - delta * options.early * math.log(random.random() or 1e-300) >= expiry):
            return
        key = (ns.name, item_id)
        if key in self._refreshes or key in self._flights or self._held_elsewhere.get(key, 0.0) > self._loop.time():
            return  # one refresh at a time here; none while another process's lease on it lasts
        if not stale:
            stats.early_refreshes += 1
        task = self._loop.create_task(self._refresh(ns, item_id, loader, options, meta))
        self._refreshes[key] = task
        task.add_done_callback(lambda done: self._landed(self._refreshes, key, done))

    async def _refresh(self, ns: Namespace, item_id: str, loader: Loader, options: AsideOptions, seen: bytes) -> None:
        token = os.urandom(12).hex()
        key = (ns.name, item_id)
        try:
            got = await self.leases.acquire(ns, item_id, token, options.lease_ttl, seen)  # type: ignore[union-attr]
            if got == ACQUIRED:
                self._held_elsewhere.pop(key, None)
                await self._load_and_install(ns, item_id, loader, options, token, refresh=True)
            elif got != PRESENT:  # another process refreshes it: not asked again before its lease ends
                if len(self._held_elsewhere) > 10_000:
                    self._held_elsewhere.clear()
                self._held_elsewhere[key] = self._loop.time() + got
        except Exception as exc:  # a refresh's failure is the next reader's miss, never an error of this one
            log.warning("refreshing %r in %s failed: %s", item_id, ns.name, exc)

    # -- status and shutdown --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "leases": self.leases is not None,
            "loads_in_flight": len(self._flights),
            "refreshes_in_flight": len(self._refreshes),
            "namespaces": {name: attrs.asdict(stats) for name, stats in self.stats.items()},
        }

    async def close(self) -> None:
        await stop_tasks(*self._flights.values(), *self._refreshes.values(), timeout=5.0)
