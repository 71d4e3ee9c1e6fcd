"""Keeping older copies out of the cache: stale keys, the outbox, and the recoveries before the cache serves again.

Four pieces of one job. Keys whose cache write failed or was skipped (breaker open) are remembered with the
version they should have had, and invalidated (versioned tombstones, see CacheStorage.invalidate) before the
breaker closes, or before a cluster master that was out of reach serves again (bounded: past `stale_limit`,
every namespace is cleared instead). The durable store's outbox carries every durable write's keys until the
writer acknowledges them after its cache write (`acknowledge`, batched in the background), and the keys a
process could not invalidate in a shared cache; every process that reaches the cache delivers what is due.
A cache that turns out to be another server has its durable copies cleared first (a cluster master: on that
master alone). The dispatcher decides when; this module does it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from ondemand.errors import BackendUnavailable, CacheReplaced, NodeUnavailable, RedisCommandError, first_line
from ondemand.health import OutageTracker
from ondemand.store.protocols import OVERFLOW, CacheStorage, DurableStorage, InvalidationOutbox, Namespace, Target
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.invalidation")

_OUTBOX_BATCH = 1000
_STALE_BATCH = 1000
_ACK_DELAY = 0.02  # seconds acknowledgements gather before one statement deletes them all
_NODE_PASSES = 5  # stale keys arriving while a master is recovered: passes before it gives up (and retries)


class CacheNode(Protocol):
    """A cluster master to bring up to date (ondemand.redis.cluster.NodeRecovery)."""

    replaced: bool

    def owns(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int: ...


def _merge(held: Target | None, new: Target) -> Target:
    """One stale key known twice: the newer version; an unknown one (a write whose outcome is unknown) wins."""
    if held is None:
        return new
    if held.version is None or new.version is None:
        return new._replace(version=None)
    return new if new.version >= held.version else held


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
        outbox_grace: float = 1.0,
    ) -> None:
        self.cache = cache
        self.namespaces = namespaces
        self.durable_health = durable_health
        self.outbox = durable if isinstance(durable, InvalidationOutbox) else None
        self.outbox_poll = outbox_poll
        self.outbox_grace = outbox_grace  # seconds before another process delivers a write's unacknowledged rows
        self.recorded = self.delivered = self.acknowledged = 0  # outbox rows
        self.stale_limit = stale_limit
        self._stale: dict[str, Target] = {}  # full key -> what to invalidate there
        self._stale_overflow = False
        self._purge_durable = False  # set when the cache turned out to be another server (CacheReplaced)
        self._outbox_task: asyncio.Task[None] | None = None
        self._acks: list[int] = []
        self._ack_wake = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None
        self.probe_soon: Callable[[], None] = lambda: None  # the breaker's, once it exists

    def cache_replaced(self) -> None:
        """The cache is another server than the one we wrote to: clear its durable copies before serving."""
        self._purge_durable = True
        self.probe_soon()  # it answers now: no reason to wait out a backed-off probe

    def recording(self, cache_usable: bool) -> tuple[dict[str, bool], bool]:
        """For a durable write: ask for its outbox rows to be due at once (and other processes woken) when
        Redis is known to be out of reach already (the breaker is open)."""
        if self.outbox is not None and not cache_usable:
            return {"invalidate": True}, True
        return {}, False

    async def record(self, targets: list[Target]) -> bool:
        """Put keys in the durable store's outbox, due at once (a best effort: they stay in our own stale set
        too); returns whether they were. Skipped while the durable store is known down, so an outage of both
        never waits on it."""
        if self.outbox is None or not targets or (self.durable_health is not None and self.durable_health.degraded):
            return False
        try:
            await self.outbox.record_invalidations(targets)
        except BackendUnavailable as exc:
            log.warning("could not record %d stale keys in the outbox: %s", len(targets), first_line(exc))
            return False
        self.recorded += len(targets)
        return True

    def acknowledge(self, seq: int | None) -> None:
        """A write's cache write succeeded: its outbox row goes, with others, in the background (until then,
        and if that fails, another process may deliver it after the grace: a no-op, the version is there)."""
        if seq is None:
            return
        self._acks.append(seq)
        if len(self._acks) == 1:
            if self._ack_task is None and self.outbox is not None:
                self._ack_task = asyncio.ensure_future(self._ack_loop())
            self._ack_wake.set()

    async def _ack_loop(self) -> None:
        assert self.outbox is not None
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await asyncio.sleep(_ACK_DELAY)
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        assert self.outbox is not None
        while self._acks:
            batch, self._acks = self._acks[:_OUTBOX_BATCH], self._acks[_OUTBOX_BATCH:]
            try:
                await self.outbox.ack_invalidations(batch)
                self.acknowledged += len(batch)
            except BackendUnavailable as exc:
                log.debug("%d outbox rows not acknowledged (delivered after the grace instead): %s", len(batch),
                          first_line(exc))
            except Exception:
                log.exception("acknowledging %d outbox rows failed (delivered after the grace instead)", len(batch))

    def mark_stale(self, targets: Iterable[Target]) -> None:
        if self._stale_overflow:
            return
        stale = self._stale
        for target in targets:
            key = target.namespace.key(target.id)
            stale[key] = _merge(stale.get(key), target)
        if len(stale) > self.stale_limit:
            log.warning("more than %d stale keys; recovery will clear every namespace instead", self.stale_limit)
            stale.clear()
            self._stale_overflow = True

    async def _clear_namespaces(self) -> None:
        for ns in self.namespaces.values():
            await self.cache.delete_prefix(ns.key_prefix)

    async def _clear_overflow(self) -> None:
        if self._stale_overflow:
            self._stale_overflow = False
            self._stale.clear()
            try:
                await self._clear_namespaces()
            except BaseException:
                self._stale_overflow = True
                raise

    async def _invalidate_stale(self, owns: Callable[[str], bool] | None = None) -> None:
        """Invalidate the stale keys (only those `owns`, for a cluster master being recovered: then any that
        fails fails the recovery). Keys on a cluster master out of reach are kept for when it is back."""
        keys = [key for key in self._stale if owns is None or owns(key)]
        for start in range(0, len(keys), _STALE_BATCH):
            batch = [self._stale.pop(key) for key in keys[start:start + _STALE_BATCH] if key in self._stale]
            try:
                await self.cache.invalidate(batch)
                continue
            except NodeUnavailable:
                pass
            except BaseException:
                self.mark_stale(batch)
                raise
            # Some live on a cluster master out of reach: the others one by one, those kept.
            results = await asyncio.gather(*(self.cache.invalidate([target]) for target in batch),
                                           return_exceptions=True)
            failed = [(target, result) for target, result in zip(batch, results, strict=True)
                      if isinstance(result, BaseException)]
            self.mark_stale(target for target, _ in failed)
            for _, result in failed:
                if owns is not None or not isinstance(result, NodeUnavailable):
                    raise result

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
        await self._clear_overflow()
        await self._invalidate_stale()
        await self.deliver_outbox()

    async def recover_node(self, node: CacheNode) -> None:
        """Bring one cluster master up to date before it serves again (ClusterConnection calls this while it
        holds the master, and retries while this raises): a replaced one's durable copies cleared (on it
        alone), then the stale keys it owns and the outbox delivered."""
        if node.replaced:
            for ns in self.namespaces.values():
                if ns.durable:
                    await node.delete_prefix(ns.key_prefix)
        await self._clear_overflow()
        for _ in range(_NODE_PASSES):
            await self._invalidate_stale(node.owns)
            await self.deliver_outbox(must=node.owns)
            if not any(node.owns(key) for key in self._stale):
                return  # (no await from here until the master serves: nothing can go stale in between)
        raise NodeUnavailable("keys kept going stale on the master while it was brought up to date")

    # -- the outbox: every write's keys until acknowledged, and what other processes could not deliver ----

    async def deliver_outbox(self, *, must: Callable[[str], bool] | None = None) -> int:
        """Invalidate in the cache every key the outbox has due, then acknowledge the rows; returns how many.

        Cache failures propagate, except a cluster master out of reach: its rows stay for later (unless `must`
        says the key is on the master being recovered); a durable store that cannot be read is logged and
        skipped: its rows wait for the next delivery, and our own reads do not."""
        if self.outbox is None:
            return 0
        delivered = 0
        while True:
            try:
                rows = await self.outbox.pending_invalidations(_OUTBOX_BATCH, self.outbox_grace)
            except BackendUnavailable as exc:
                log.debug("outbox not readable: %s", first_line(exc))
                return delivered
            if not rows:
                return delivered
            done = [row.seq for row in rows]
            if any(row.namespace == OVERFLOW for row in rows):
                await self._clear_namespaces()
            else:
                # Versioned tombstones: a no-op where the cache holds that version or a newer one already (the
                # writer's own cache write landed), and no read can put an older value back after them. Rows
                # of a namespace this process does not have: nothing it caches.
                due = [(row.seq, Target(self.namespaces[row.namespace], row.id, row.version)) for row in rows
                       if row.namespace in self.namespaces]
                kept = await self._deliver([target for _, target in due], must)
                if kept:
                    done = [row.seq for row in rows if row.seq not in {due[i][0] for i in kept}]
            try:
                await self.outbox.ack_invalidations(done)
            except BackendUnavailable as exc:
                log.debug("outbox rows delivered but not acknowledged (delivered again later): %s", first_line(exc))
                return delivered
            delivered += len(done)
            self.delivered += len(done)
            if len(rows) < _OUTBOX_BATCH or len(done) < len(rows):
                return delivered

    async def _deliver(self, targets: Sequence[Target], must: Callable[[str], bool] | None) -> list[int]:
        """Invalidate `targets`; returns the indexes of those kept for later (on a cluster master out of reach)."""
        try:
            await self.cache.invalidate(targets)
            return []
        except NodeUnavailable:
            pass
        results = await asyncio.gather(*(self.cache.invalidate([target]) for target in targets),
                                       return_exceptions=True)
        kept = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                if not isinstance(result, NodeUnavailable) or (
                        must is not None and must(targets[i].namespace.key(targets[i].id))):
                    raise result
                kept.append(i)
        return kept

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
            "outbox": None if self.outbox is None else {
                "recorded": self.recorded, "delivered": self.delivered, "acknowledged": self.acknowledged,
                "acknowledgements_pending": len(self._acks), "grace": self.outbox_grace},
        }

    async def close(self) -> None:
        await stop_tasks(self._outbox_task, self._ack_task)
        self._outbox_task = self._ack_task = None
        if self.outbox is not None and self._acks:
            await self._flush_acks()  # bounded by the store's own timeouts
