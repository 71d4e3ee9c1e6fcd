"""Keeping older copies out of the cache: stale keys, the outbox, and the recovery before the breaker closes.

Three pieces of one job. Keys whose cache write failed or was skipped (breaker open) are remembered and
deleted before the breaker closes (bounded: past `stale_limit`, every namespace is cleared instead). Keys
a process could not delete from a shared cache go into the durable store's outbox, which every process
that reaches the cache delivers. A cache that turns out to be another server has its durable copies
cleared first. The dispatcher decides when; this module does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ondemand.errors import BackendUnavailable, CacheReplaced, NodeUnavailable, RedisCommandError, first_line
from ondemand.health import OutageTracker
from ondemand.store.protocols import OVERFLOW, CacheStorage, DurableStorage, InvalidationOutbox, Namespace

log = logging.getLogger("ondemand.invalidation")

_OUTBOX_BATCH = 1000

Target = tuple[Namespace, str]  # a namespace and an id: what a write touches


class Invalidation:
    def __init__(
        self,
        *,
        cache: CacheStorage,
        durable: DurableStorage | None,
        namespaces: Mapping[str, Namespace],
        durable_health: OutageTracker | None = None,
        stale_limit: int = 100_000,
        outbox_poll: float = 1.0,
    ) -> None:
        self.cache = cache
        self.namespaces = namespaces
        self.durable_health = durable_health
        self.outbox = durable if isinstance(durable, InvalidationOutbox) else None
        self.outbox_poll = outbox_poll
        self.recorded = self.delivered = 0  # outbox rows
        self.stale_limit = stale_limit
        self._stale: set[str] = set()
        self._stale_overflow = False
        self._purge_durable = False  # set when the cache turned out to be another server (CacheReplaced)
        self._outbox_task: asyncio.Task[None] | None = None
        self.probe_soon: Callable[[], None] = lambda: None  # the breaker's, once it exists

    def cache_replaced(self) -> None:
        """The cache is another server than the one we wrote to: clear its durable copies before serving."""
        self._purge_durable = True
        self.probe_soon()  # it answers now: no reason to wait out a backed-off probe

    def recording(self, cache_usable: bool) -> tuple[dict[str, bool], bool]:
        """For a durable write: ask it to record its keys in the outbox in the same transaction when
        Redis is known to be out of reach already (the breaker is open)."""
        if self.outbox is not None and not cache_usable:
            return {"invalidate": True}, True
        return {}, False

    async def record(self, targets: list[Target]) -> None:
        """Put keys in the durable store's outbox (a best effort: they stay in our own stale set too).
        Skipped while the durable store is known down, so an outage of both never waits on it."""
        if self.outbox is None or not targets or (self.durable_health is not None and self.durable_health.degraded):
            return
        try:
            await self.outbox.record_invalidations(targets)
            self.recorded += len(targets)
        except BackendUnavailable as exc:
            log.warning("could not record %d stale keys in the outbox: %s", len(targets), first_line(exc))

    def mark_stale(self, keys: Iterable[str]) -> None:
        if self._stale_overflow:
            return
        self._stale.update(keys)
        if len(self._stale) > self.stale_limit:
            log.warning("more than %d stale keys; recovery will clear every namespace instead", self.stale_limit)
            self._stale.clear()
            self._stale_overflow = True

    async def _clear_namespaces(self) -> None:
        for ns in self.namespaces.values():
            await self.cache.delete_prefix(ns.key_prefix)

    async def probe(self) -> None:
        """The breaker's half-open check. A server that turns out to be another one (CacheReplaced) is
        reachable: the recovery that follows clears its durable copies first."""
        try:
            await self.cache.ping()
        except CacheReplaced:
            self._purge_durable = True
            await self.cache.ping()

    async def recover(self) -> None:
        try:
            await self._recover()
        except CacheReplaced:  # met another server on the way (a failover while we recovered): start over
            self._purge_durable = True
            self.probe_soon()
            raise

    async def _recover(self) -> None:
        """Runs while the breaker is half-open, after a PING succeeded; the breaker closes after it.
        Our own stale keys first, then the outbox (what other processes could not deliver)."""
        if self._purge_durable:
            # The cache is another server than the one we wrote to (a failover to a replica that may lack
            # the last acknowledged writes): none of its durable copies is trusted.
            self._purge_durable = False
            try:
                for ns in self.namespaces.values():
                    if ns.durable:
                        await self.cache.delete_prefix(ns.key_prefix)
            except BaseException:
                self._purge_durable = True
                raise
        unreachable: list[str] = []  # stale keys on a cluster master still out of reach: kept for later
        while self._stale or self._stale_overflow:
            if self._stale_overflow:
                self._stale_overflow = False
                self._stale.clear()
                try:
                    await self._clear_namespaces()
                except BaseException:
                    self._stale_overflow = True
                    raise
                continue
            batch = [self._stale.pop() for _ in range(min(1000, len(self._stale)))]
            try:
                await self.cache.delete_keys(batch)
            except NodeUnavailable:
                # Some of them live on a cluster master still out of reach: delete the others one by one,
                # keep those (its first command when back makes us try them again).
                results = await asyncio.gather(*(self.cache.delete_keys([key]) for key in batch),
                                               return_exceptions=True)
                for key, result in zip(batch, results, strict=True):
                    if isinstance(result, NodeUnavailable):
                        unreachable.append(key)
                    elif isinstance(result, BaseException):
                        self.mark_stale(batch)
                        self.mark_stale(unreachable)
                        raise result from None
            except BaseException:
                self.mark_stale(batch)
                self.mark_stale(unreachable)
                raise
        self.mark_stale(unreachable)
        await self.deliver_outbox()

    # -- the outbox: invalidations other processes could not deliver -------------------------

    async def deliver_outbox(self) -> int:
        """Delete from the cache every key the outbox holds, then acknowledge the rows; returns how many.

        Cache failures propagate (the breaker stays open); a durable store that cannot be read is
        logged and skipped: its rows wait for the next delivery, and our own reads do not."""
        if self.outbox is None:
            return 0
        delivered = 0
        while True:
            try:
                rows = await self.outbox.pending_invalidations(_OUTBOX_BATCH)
            except BackendUnavailable as exc:
                log.debug("outbox not readable: %s", first_line(exc))
                return delivered
            if not rows:
                return delivered
            if any(namespace == OVERFLOW for _, namespace, _ in rows):
                await self._clear_namespaces()
            else:
                # Plain deletes, like our own stale keys': a tombstone would keep these keys out of the cache
                # (served from the durable store) for its whole hold after every outage. The row was
                # committed with the write, so a read that misses from now on finds the new value.
                keys = [self.namespaces[namespace].key(item_id) for _, namespace, item_id in rows
                        if namespace in self.namespaces]  # another namespace: nothing this process caches
                await self.cache.delete_keys(keys)
            try:
                await self.outbox.ack_invalidations([seq for seq, _, _ in rows])
            except BackendUnavailable as exc:
                log.debug("outbox rows delivered but not acknowledged (delivered again later): %s", first_line(exc))
                return delivered
            delivered += len(rows)
            self.delivered += len(rows)
            if len(rows) < _OUTBOX_BATCH:
                return delivered

    async def _outbox_loop(self, cache_usable: Callable[[], bool]) -> None:
        """Deliver the outbox whenever the durable store says rows may be there, and at least every
        `outbox_poll` seconds, while Redis is reachable (the breaker's recovery delivers it otherwise)."""
        assert self.outbox is not None
        while True:
            try:
                if await self.outbox.wait_for_invalidations(self.outbox_poll) and cache_usable():
                    await self.deliver_outbox()
            except asyncio.CancelledError:
                raise
            except (BackendUnavailable, RedisCommandError) as exc:
                log.debug("outbox delivery failed: %s", first_line(exc))
                await asyncio.sleep(min(self.outbox_poll, 0.2))
            except Exception:
                log.exception("outbox delivery failed; retrying")
                await asyncio.sleep(self.outbox_poll)

    def start(self, cache_usable: Callable[[], bool]) -> None:
        """Start delivering the outbox (when the durable store has one) whenever `cache_usable()`."""
        if self.outbox is not None and self._outbox_task is None:
            self._outbox_task = asyncio.create_task(self._outbox_loop(cache_usable), name="ondemand-outbox")

    def status(self) -> dict[str, Any]:
        return {
            "stale_keys_pending": len(self._stale),
            "stale_overflow": self._stale_overflow,
            "outbox": None if self.outbox is None else {"recorded": self.recorded, "delivered": self.delivered},
        }

    async def close(self) -> None:
        task, self._outbox_task = self._outbox_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
