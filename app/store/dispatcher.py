"""The cache dispatcher: validates keys and values and routes each operation by namespace policy.

- Cache-only namespaces (`durable = false`): Redis only. With Redis unavailable a read is a miss and
  a write is dropped and counted.
- Durable namespaces (`durable = true`, with a durable storage configured): the durable storage
  (PostgreSQL) is the system of record. A write is acknowledged only after it committed there, and
  is then written to Redis; a read tries Redis and on a miss reads the durable store and puts the
  value back (SET NX, so a newer value written meanwhile is never overwritten).
- A circuit breaker guards Redis: one timeout or connection error opens it and operations skip Redis
  with no network time until a background PING succeeds.
- No stale reads after recovery: every key whose Redis write or delete failed or was skipped while
  the breaker was open is remembered, and deleted from Redis before the breaker closes. The set is
  bounded (`dirty_limit`); past that we forget the keys and instead delete every key of every
  namespace (SCAN + UNLINK) before closing: slower recovery, never a stale read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import orjson

from ondemand.errors import (
    BackendUnavailable,
    CacheReplaced,
    InvalidInput,
    NodeUnavailable,
    OndemandError,
    RedisCommandError,
    StorageUnavailable,
    WriteOutcomeUnknown,
    first_line,
)
from ondemand.health import OutageTracker
from ondemand.store.breaker import CircuitBreaker
from ondemand.store.protocols import OVERFLOW, CacheStorage, DurableStorage, Entry, InvalidationOutbox, Namespace
from ondemand.store.values import CORRUPT, check_id, check_ttl, decode, encode

log = logging.getLogger("ondemand.dispatcher")

_NOT_WRITTEN = object()  # a cache write skipped (breaker open) or failed
_OUTBOX_BATCH = 1000


Target = tuple[Namespace, str]  # a namespace and an id: what a write touches


class _LazyTargets:
    """The (namespace, id) of some entries, computed only when iterated (on the failure path)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._entries = entries

    def __iter__(self):
        return ((e.namespace, e.id) for e in self._entries)


@attrs.define
class NamespaceStats:
    hits: int = 0  # served from Redis
    durable_hits: int = 0  # served from the durable store
    misses: int = 0
    writes: int = 0
    deletes: int = 0
    fallback_reads: int = 0  # reads served by the durable store because Redis was unavailable
    fallback_writes: int = 0  # durable writes that could not reach Redis
    dropped_writes: int = 0  # cache-only writes lost because Redis was unavailable
    cache_errors: int = 0
    durable_errors: int = 0
    corrupt_values: int = 0


class Lookup(NamedTuple):
    """A read's value and where it came from (a NamedTuple: one per read, built cheaply)."""

    value: Any
    source: str  # "redis", "postgres" (the durable storage's name) or "miss"


class Dispatcher:
    def __init__(
        self,
        *,
        cache: CacheStorage,
        durable: DurableStorage | None,
        namespaces: Mapping[str, Namespace],
        cache_health: OutageTracker,
        durable_health: OutageTracker | None = None,
        dirty_limit: int = 100_000,
        outbox_poll: float = 1.0,
    ) -> None:
        """`namespaces` say whether each is durable; one marked durable needs a `durable` store."""
        self.cache = cache
        self.durable = durable
        self.namespaces = dict(namespaces)
        if durable is None and any(ns.durable for ns in self.namespaces.values()):
            raise ValueError("a durable namespace needs a durable storage")
        self.stats = {name: NamespaceStats() for name in self.namespaces}
        self.error_replies: Counter[str] = Counter()  # cache error replies by kind (oom, readonly, ...)
        self.durable_health = durable_health
        self.outbox = durable if isinstance(durable, InvalidationOutbox) else None
        self.outbox_poll = outbox_poll
        self.outbox_recorded = self.outbox_delivered = 0
        self._outbox_task: asyncio.Task[None] | None = None
        self.dirty_limit = dirty_limit
        self._dirty: set[str] = set()
        self._purge_durable = False  # set when the cache turned out to be another server (CacheReplaced)
        self._dirty_overflow = False
        self.breaker = CircuitBreaker(
            probe=self._probe,
            on_recover=self._invalidate_stale,
            health=cache_health,
        )

    def namespace(self, name: str) -> Namespace:
        try:
            return self.namespaces[name]
        except KeyError:
            raise InvalidInput(
                f"unknown namespace {name!r}; configured: {', '.join(sorted(self.namespaces))}"
            ) from None

    # -- reads --------------------------------------------------------------------------------

    async def get(self, namespace: str, item_id: str) -> Any:
        return (await self.lookup(namespace, item_id)).value

    async def lookup(self, namespace: str, item_id: str) -> Lookup:
        # The hot path of every cached read: helpers are inlined where a call would be most of the cost.
        ns = self.namespaces.get(namespace) or self.namespace(namespace)  # the latter raises the error
        check_id(item_id)
        stats = self.stats[ns.name]
        cache_error: OndemandError | None = None
        corrupt = False
        if self.breaker.closed:
            try:
                raw = await self.cache.get(ns, item_id)
            except RedisCommandError as exc:
                if exc.kind == "wrongtype":  # another type under our key: as good as corrupt, replaced below
                    self._count_cache_error(stats, exc)
                    stats.corrupt_values += 1
                    corrupt = True
                else:
                    cache_error = self._read_failed(stats, exc)
            except BackendUnavailable as exc:
                cache_error = self._read_failed(stats, exc)
            else:
                if raw is not None:
                    try:
                        value = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        stats.corrupt_values += 1
                        corrupt = True
                    else:
                        stats.hits += 1
                        return Lookup(value, "redis")
        else:
            cache_error = BackendUnavailable(f"Redis circuit breaker is open: {self.breaker.last_reason}")
        if not ns.durable:
            stats.misses += 1
            return Lookup(None, "miss")
        entry = await self._durable_call(stats, cache_error, lambda: self.durable.get_entry(ns, item_id))  # type: ignore[union-attr]
        if cache_error is not None:
            stats.fallback_reads += 1
        if entry is None:
            stats.misses += 1
            return Lookup(None, "miss")
        raw, remaining = entry
        stats.durable_hits += 1
        if cache_error is None:
            await self._backfill(stats, ns, item_id, raw, remaining, replace_corrupt=corrupt)
        return Lookup(decode(raw), self.durable.name)  # type: ignore[union-attr]

    async def get_many(self, namespace: str, ids: Sequence[str]) -> list[Any]:
        """Values for `ids` in order (None when absent): one cache round trip; in a durable namespace the
        ids the cache lacks come from the durable store in one more, and are put back like `lookup` does."""
        ns = self.namespace(namespace)
        ids = list(ids)
        for item_id in ids:
            check_id(item_id)
        stats = self.stats[ns.name]
        raws: list[bytes | None] = [None] * len(ids)
        cache_error: OndemandError | None = None
        if self.breaker.closed:
            try:
                raws = await self.cache.get_many(ns, ids)
            except (BackendUnavailable, RedisCommandError) as exc:
                cache_error = self._read_failed(stats, exc)
        else:
            cache_error = BackendUnavailable(f"Redis circuit breaker is open: {self.breaker.last_reason}")
        values = [CORRUPT if raw is None else decode(raw) for raw in raws]
        corrupt = {i for i, raw in enumerate(raws) if raw is not None and values[i] is CORRUPT}
        stats.corrupt_values += len(corrupt)
        missing = [i for i, value in enumerate(values) if value is CORRUPT]
        stats.hits += len(ids) - len(missing)
        if missing and ns.durable:
            found = await self._durable_call(
                stats, cache_error, lambda: self.durable.get_entries(ns, [ids[i] for i in missing])  # type: ignore[union-attr]
            )
            if cache_error is not None:
                stats.fallback_reads += len(missing)
            backfills = []
            for i, entry in zip(missing, found, strict=True):
                if entry is None:
                    continue
                raw, remaining = entry
                values[i] = decode(raw)
                stats.durable_hits += 1
                if cache_error is None:
                    backfills.append(self._backfill(stats, ns, ids[i], raw, remaining, replace_corrupt=i in corrupt))
            await asyncio.gather(*backfills)  # issued in one loop tick: one pipelined round trip
        stats.misses += sum(1 for value in values if value is CORRUPT)
        return [None if value is CORRUPT else value for value in values]

    async def _backfill(
        self, stats: NamespaceStats, ns: Namespace, item_id: str, raw: bytes, remaining: float | None,
        *, replace_corrupt: bool = False,
    ) -> None:
        """Put a durable value back into Redis for no longer than it lives in the durable store.

        SET NX never overwrites a newer value; a value that was not JSON is deleted first, or it
        would block the repair forever.
        """
        ttl = ns.ttl if remaining is None else min(remaining, ns.ttl or remaining)
        if ttl is not None and ttl <= 0:
            return
        try:
            if replace_corrupt:
                await self.cache.delete_keys([ns.key(item_id)])
            await self.cache.set_if_absent(ns, item_id, raw, ttl)
        except (BackendUnavailable, RedisCommandError) as exc:  # a put-back that failed never fails the read
            self._read_failed(stats, exc, (ns.key(item_id),))

    # -- writes -------------------------------------------------------------------------------

    async def set(self, namespace: str, item_id: str, value: Any, ttl: float | None = None) -> None:
        ns = self.namespace(namespace)
        check_id(item_id)
        ttl = check_ttl(ttl, ns.ttl)
        raw = encode(value)
        stats = self.stats[ns.name]
        stats.writes += 1
        recorded = False
        if ns.durable:
            kw, recorded = self._recording()
            await self._durable_write(stats, ((ns, [item_id]),), lambda: self.durable.set(ns, item_id, raw, ttl, **kw),  # type: ignore[union-attr]
                                      recorded=recorded)
        if self.breaker.closed:  # the common case, inline: no closure, no extra frame
            try:
                await self.cache.set(ns, item_id, raw, ttl)
                return
            except (BackendUnavailable, RedisCommandError) as exc:
                await self._write_failed(stats, exc, ((ns, item_id),))
        else:
            await self._skipped(((ns, item_id),), recorded)
        self._count_lost_write(stats, ns)

    async def append(self, namespace: str, item_id: str, items: list[Any], ttl: float | None = None, *,
                     max_items: int) -> int:
        """Append `items` to the JSON list stored for `item_id` (created if absent); returns its new length.

        In a cache-only namespace this is one atomic step in the cache (`CacheStorage.append_list`):
        concurrent appends from any process all land. A durable namespace has no atomic append in the
        durable store, so there it is a read and a write, and concurrent appends can lose one another.
        The list gets `ttl` (or the namespace default). More than `max_items` is an InvalidInput, a
        stored value that is not a list a Conflict; neither writes anything. With Redis down a
        cache-only append is dropped and counted, like any cache-only write, and reports the length
        of the items alone.
        """
        ns = self.namespace(namespace)
        check_id(item_id)
        ttl = check_ttl(ttl, ns.ttl)
        if ns.durable:
            current = await self.get(namespace, item_id)
            if current is not None and not isinstance(current, list):
                raise ns.not_a_list(item_id)
            merged = [*(current or ()), *items]
            if len(merged) > max_items:
                raise ns.list_too_long(item_id, len(merged), max_items)
            await self.set(namespace, item_id, merged, ttl)
            return len(merged)
        if len(items) > max_items:
            raise ns.list_too_long(item_id, len(items), max_items)
        raw = encode(items)
        stats = self.stats[ns.name]
        stats.writes += 1
        length = await self._cache_write(stats, ((ns, item_id),),
                                         lambda: self.cache.append_list(ns, item_id, raw, len(items), ttl, max_items))
        if length is _NOT_WRITTEN:
            self._count_lost_write(stats, ns)
            return len(items)
        return length

    async def set_many(self, entries: Iterable[tuple[str, str, Any, float | None]]) -> None:
        """Write (namespace, id, value, ttl) tuples: one durable transaction, one Redis round trip."""
        prepared: list[Entry] = []
        durable: list[Entry] = []
        recorded = False
        for namespace, item_id, value, ttl in entries:
            ns = self.namespace(namespace)
            check_id(item_id)
            entry = Entry(ns, item_id, encode(value), check_ttl(ttl, ns.ttl))
            prepared.append(entry)
            if ns.durable:
                durable.append(entry)
        if not prepared:
            return
        for entry in prepared:  # counted once every entry passed validation: a bad one writes nothing
            self.stats[entry.namespace.name].writes += 1
        if durable:
            stats = self.stats[durable[0].namespace.name]
            by_namespace: dict[str, tuple[Namespace, list[str]]] = {}
            for entry in durable:
                by_namespace.setdefault(entry.namespace.name, (entry.namespace, []))[1].append(entry.id)
            kw, recorded = self._recording()
            await self._durable_write(stats, by_namespace.values(), lambda: self.durable.set_many(durable, **kw),  # type: ignore[union-attr]
                                      recorded=recorded)
        first = self.stats[prepared[0].namespace.name]
        targets = _LazyTargets(prepared)  # built only if the write fails
        # The durable write recorded its own keys; with cache-only entries too, all are recorded again.
        all_recorded = recorded and len(durable) == len(prepared)
        if await self._cache_write(first, targets, lambda: self.cache.set_many(prepared),
                                   recorded=all_recorded) is _NOT_WRITTEN:
            for entry in prepared:
                self._count_lost_write(self.stats[entry.namespace.name], entry.namespace)

    async def delete(self, namespace: str, ids: str | Sequence[str]) -> int:
        ns = self.namespace(namespace)
        ids = [ids] if isinstance(ids, str) else list(ids)
        for item_id in ids:
            check_id(item_id)
        stats = self.stats[ns.name]
        stats.deletes += len(ids)
        removed, recorded = 0, False
        if ns.durable:
            kw, recorded = self._recording()
            removed = await self._durable_write(stats, ((ns, ids),), lambda: self.durable.delete(ns, ids, **kw),  # type: ignore[union-attr]
                                                recorded=recorded)
        cached = await self._cache_write(stats, [(ns, i) for i in ids], lambda: self.cache.delete(ns, ids),
                                         recorded=recorded)
        if ns.durable:
            return removed
        return 0 if cached is _NOT_WRITTEN else cached

    async def expire(self, namespace: str, item_id: str, ttl: float) -> bool:
        ns = self.namespace(namespace)
        check_id(item_id)
        checked = check_ttl(ttl, None)
        if checked is None:
            raise InvalidInput("ttl is required for expire")
        stats = self.stats[ns.name]
        found, recorded = False, False
        if ns.durable:
            kw, recorded = self._recording()
            found = await self._durable_write(stats, ((ns, [item_id]),),
                                              lambda: self.durable.expire(ns, item_id, checked, **kw),  # type: ignore[union-attr]
                                              recorded=recorded)
        cached = await self._cache_write(stats, ((ns, item_id),), lambda: self.cache.expire(ns, item_id, checked),
                                         recorded=recorded)
        if ns.durable:
            return found
        return cached is not _NOT_WRITTEN and bool(cached)

    # -- failure handling ---------------------------------------------------------------------

    def _count_lost_write(self, stats: NamespaceStats, ns: Namespace) -> None:
        if ns.durable:
            stats.fallback_writes += 1
        else:
            stats.dropped_writes += 1

    async def _cache_write(
        self, stats: NamespaceStats, targets: Iterable[Target], write: Callable[[], Awaitable[Any]], *,
        recorded: bool = False,
    ) -> Any:
        """Run a Redis write unless the breaker is open and return its result; when it did not
        happen, make sure no older copy is served (see _write_failed, _skipped) and return _NOT_WRITTEN.
        `recorded`: the durable write already put these keys in the outbox."""
        if self.breaker.closed:
            try:
                return await write()
            except (BackendUnavailable, RedisCommandError) as exc:
                await self._write_failed(stats, exc, targets)
        else:
            await self._skipped(targets, recorded)
        return _NOT_WRITTEN

    async def _durable_write(
        self, stats: NamespaceStats, targets: Iterable[tuple[Namespace, Sequence[str]]],
        call: Callable[[], Awaitable[Any]], *, recorded: bool = False,
    ) -> Any:
        """A write to the system of record. When it fails, it may still commit later (a statement
        sent to a server that froze), so the cached copies of `targets` are invalidated (with
        tombstones, so no read puts an older value back) before the error is raised: whatever the
        durable store ends up holding, the next read returns it."""
        try:
            result = await call()
        except BackendUnavailable as exc:
            stats.durable_errors += 1
            for ns, ids in targets:
                await self._cache_write(stats, [(ns, i) for i in ids],
                                        lambda ns=ns, ids=ids: self.cache.delete(ns, ids))
            if exc.outcome_unknown:
                raise WriteOutcomeUnknown(
                    f"{first_line(exc)}; the write may still take effect: the cached copy was invalidated, so "
                    f"the next read returns what {self.durable.name} holds"  # type: ignore[union-attr]
                ) from exc
            raise
        if recorded:
            self.outbox_recorded += sum(len(ids) for _, ids in targets)
        return result

    async def _durable_call(
        self, stats: NamespaceStats, cache_error: OndemandError | None, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        try:
            return await call()
        except BackendUnavailable as exc:
            stats.durable_errors += 1
            if cache_error is not None:
                raise StorageUnavailable(
                    f"Redis and the durable store are both unavailable (Redis: {first_line(cache_error)}; "
                    f"durable: {first_line(exc)})"
                ) from exc
            raise

    def _count_cache_error(self, stats: NamespaceStats, exc: OndemandError) -> None:
        stats.cache_errors += 1
        if isinstance(exc, RedisCommandError):
            self.error_replies[exc.kind] += 1

    def _read_failed(self, stats: NamespaceStats, exc: OndemandError, keys: Iterable[str] = ()) -> OndemandError:
        """A cache read (or put-back) failed: the read goes on as a miss. An error reply that concerns
        this command alone (out of memory, ...) leaves the breaker closed."""
        if (isinstance(exc, RedisCommandError) and not exc.server_unusable) or isinstance(exc, NodeUnavailable):
            # (One cluster master out of reach: only its keys are affected; the breaker stays closed.)
            self._count_cache_error(stats, exc)
            return exc
        return self._cache_failed(stats, exc, keys)

    async def _write_failed(self, stats: NamespaceStats, exc: OndemandError, targets: Iterable[Target]) -> None:
        """A cache write did not happen, or may have half happened: no older copy may be served.

        A server that refused it but still serves (out of memory, read-only, ...) is asked to delete
        the keys now (DEL is served under maxmemory); otherwise, or if that fails too, the keys are
        remembered here and recorded in the outbox, so that whoever reaches Redis first deletes them."""
        targets = list(targets)
        keys = [ns.key(item_id) for ns, item_id in targets]
        if isinstance(exc, NodeUnavailable):
            # One cluster master out of reach: its keys are remembered (and deleted before it serves again,
            # see ClusterConnection), the breaker stays closed for every other master's keys.
            self._count_cache_error(stats, exc)
            self._mark_dirty(keys)
            await self._record(targets)
            return
        if isinstance(exc, RedisCommandError) and not exc.server_unusable:
            self._count_cache_error(stats, exc)
            try:
                await self.cache.delete_keys(keys)
                return
            except (BackendUnavailable, RedisCommandError) as again:
                exc = again
        self._cache_failed(stats, exc, keys)
        await self._record(targets)

    async def _skipped(self, targets: Iterable[Target], recorded: bool) -> None:
        """A write that skipped Redis (breaker open): its keys are stale there until deleted."""
        targets = list(targets)
        self._mark_dirty(ns.key(item_id) for ns, item_id in targets)
        if not recorded:
            await self._record(targets)

    def _recording(self) -> tuple[dict[str, bool], bool]:
        """For a durable write: ask it to record its keys in the outbox in the same transaction when
        Redis is known to be out of reach already (the breaker is open)."""
        if self.outbox is not None and not self.breaker.closed:
            return {"invalidate": True}, True
        return {}, False

    async def _record(self, targets: list[Target]) -> None:
        """Put keys in the durable store's outbox (a best effort: they stay in our own stale set too).
        Skipped while the durable store is known down, so an outage of both never waits on it."""
        if self.outbox is None or not targets or (self.durable_health is not None and self.durable_health.degraded):
            return
        try:
            await self.outbox.record_invalidations(targets)
            self.outbox_recorded += len(targets)
        except BackendUnavailable as exc:
            log.warning("could not record %d stale keys in the outbox: %s", len(targets), first_line(exc))

    def _cache_failed(self, stats: NamespaceStats, exc: OndemandError, keys: Iterable[str]) -> OndemandError:
        """Redis could not be used: remember the keys as stale and open the breaker."""
        self._count_cache_error(stats, exc)
        self._mark_dirty(keys)
        self.breaker.failure(first_line(exc))
        if isinstance(exc, CacheReplaced):
            self._purge_durable = True  # another server: its durable copies may be older than the store's
            self.breaker.probe_soon()  # and it answers now: no reason to wait out a backed-off probe
        return exc

    def _mark_dirty(self, keys: Iterable[str]) -> None:
        if self._dirty_overflow:
            return
        self._dirty.update(keys)
        if len(self._dirty) > self.dirty_limit:
            log.warning("more than %d stale keys; recovery will clear every namespace instead", self.dirty_limit)
            self._dirty.clear()
            self._dirty_overflow = True

    async def _clear_namespaces(self) -> None:
        for ns in self.namespaces.values():
            await self.cache.delete_prefix(ns.key_prefix)

    async def _probe(self) -> None:
        """The breaker's half-open check. A server that turns out to be another one (CacheReplaced) is
        reachable: the recovery that follows clears its durable copies first."""
        try:
            await self.cache.ping()
        except CacheReplaced:
            self._purge_durable = True
            await self.cache.ping()

    async def _invalidate_stale(self) -> None:
        try:
            await self._invalidate_stale_keys()
        except CacheReplaced:  # met another server on the way (a failover while we recovered): start over
            self._purge_durable = True
            self.breaker.probe_soon()
            raise

    async def _invalidate_stale_keys(self) -> None:
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
        while self._dirty or self._dirty_overflow:
            if self._dirty_overflow:
                self._dirty_overflow = False
                self._dirty.clear()
                try:
                    await self._clear_namespaces()
                except BaseException:
                    self._dirty_overflow = True
                    raise
                continue
            batch = [self._dirty.pop() for _ in range(min(1000, len(self._dirty)))]
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
                        self._mark_dirty(batch)
                        self._mark_dirty(unreachable)
                        raise result from None
            except BaseException:
                self._mark_dirty(batch)
                self._mark_dirty(unreachable)
                raise
        self._mark_dirty(unreachable)
        await self._deliver_outbox()

    # -- the outbox: invalidations other processes could not deliver -------------------------

    async def _deliver_outbox(self) -> int:
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
            self.outbox_delivered += len(rows)
            if len(rows) < _OUTBOX_BATCH:
                return delivered

    async def _outbox_loop(self) -> None:
        """Deliver the outbox whenever the durable store says rows may be there, and at least every
        `outbox_poll` seconds, while Redis is reachable (the breaker's recovery delivers it otherwise)."""
        assert self.outbox is not None
        while True:
            try:
                if await self.outbox.wait_for_invalidations(self.outbox_poll) and self.breaker.closed:
                    await self._deliver_outbox()
            except asyncio.CancelledError:
                raise
            except (BackendUnavailable, RedisCommandError) as exc:
                log.debug("outbox delivery failed: %s", first_line(exc))
                await asyncio.sleep(min(self.outbox_poll, 0.2))
            except Exception:
                log.exception("outbox delivery failed; retrying")
                await asyncio.sleep(self.outbox_poll)

    def start(self) -> None:
        """Start delivering the outbox (when the durable store has one)."""
        if self.outbox is not None and self._outbox_task is None:
            self._outbox_task = asyncio.create_task(self._outbox_loop(), name="ondemand-outbox")

    def status(self) -> dict[str, Any]:
        return {
            "breaker": self.breaker.status(),
            "stale_keys_pending": len(self._dirty),
            "stale_overflow": self._dirty_overflow,
            "error_replies": dict(self.error_replies),
            "outbox": None if self.outbox is None else {"recorded": self.outbox_recorded,
                                                        "delivered": self.outbox_delivered},
            "namespaces": {name: attrs.asdict(stats) for name, stats in self.stats.items()},
        }

    async def close(self) -> None:
        task, self._outbox_task = self._outbox_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.breaker.close()
