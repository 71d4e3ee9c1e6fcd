"""The cache dispatcher: checks ids, ttls and values, and routes each operation by its namespace's policy.

Cache-only namespaces live in the cache alone. Durable ones are written to the system of record first,
then to the cache, and read from the cache with the durable store behind it (a miss is put back). The
circuit breaker decides whether the cache is tried at all; when a cache write does not happen,
`ondemand.store.invalidation` keeps the older copy from being served. The guarantees are the README's
("Namespaces and fallback").
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

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
    error_text,
)
from ondemand.health import OutageTracker
from ondemand.store.aside import DEFAULT_OPTIONS, Aside, AsideOptions, Loader
from ondemand.store.breaker import CircuitBreaker
from ondemand.store.invalidation import Invalidation
from ondemand.store.near import NearCache
from ondemand.store.protocols import (
    CacheStorage,
    Committed,
    Deleted,
    DurableEntry,
    DurableStorage,
    Entry,
    Namespace,
    Target,
    WritesConditionally,
)
from ondemand.store.values import CORRUPT, check_id, check_ttl, decode, encode

log = logging.getLogger("ondemand.dispatcher")
T = TypeVar("T")

_NOT_WRITTEN = object()  # a cache write skipped (breaker open) or failed


class _LazyTargets:
    """The targets of some entries, computed only when iterated (on the failure path)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._entries = entries

    def __iter__(self):
        return (Target(e.namespace, e.id, e.version) for e in self._entries)


@attrs.define
class NamespaceStats:
    hits: int = 0  # served from Redis (near_hits included)
    near_hits: int = 0  # served from the near cache (this process's coherent copy of Redis's value)
    near_misses: int = 0  # reads of a near-cached namespace the near cache could not serve
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


class WriteOutcome(StrEnum):
    """What a write returns when it could not do all it was asked (it returns None when it did)."""

    DROPPED = "dropped"  # a cache-only namespace and the cache did not take it: stored nowhere, a read misses
    DURABLE_ONLY = "durable-only"  # committed to the durable store, not in the cache: reads come from there


class Appended(int):
    """`append`'s count when the list was not stored as asked, with `outcome` (a plain int when it was)."""

    outcome: WriteOutcome

    def __new__(cls, count: int, outcome: WriteOutcome) -> Appended:
        made = super().__new__(cls, count)
        made.outcome = outcome
        return made


class Lookup(NamedTuple):
    """A read's value and where it came from (a NamedTuple: one per read, built cheaply)."""

    value: Any
    source: str  # "redis", "postgres" (the durable storage's name) or "miss"


class Dispatcher:
    # Seconds after a durable call began past which its result is not written into the cache as a value: a
    # put-back is skipped, a write-through becomes a tombstone of its version. The cache keeps tombstones far
    # longer (the redis storage: 30 s), so a late write can only meet one that is still there, or nothing older.
    late_after = 2.0

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
        outbox_grace: float = 1.0,
        near: NearCache | None = None,
    ) -> None:
        """`namespaces` say whether each is durable; one marked durable needs a `durable` store. `near`: the near
        cache of the namespaces that keep one (their hits are served from it while the breaker is closed)."""
        self.cache = cache
        self.durable = durable
        self.namespaces = dict(namespaces)
        if durable is None and any(ns.durable for ns in self.namespaces.values()):
            raise ValueError("a durable namespace needs a durable storage")
        self.stats = {name: NamespaceStats() for name in self.namespaces}
        self.error_replies: Counter[str] = Counter()  # cache error replies by kind (oom, readonly, ...)
        self.durable_health = durable_health
        self.invalidation = Invalidation(cache=cache, durable=durable, namespaces=self.namespaces,
                                         durable_health=durable_health, stale_limit=dirty_limit,
                                         outbox_poll=outbox_poll, outbox_grace=outbox_grace)
        self.near = near
        self.breaker = CircuitBreaker(probe=self.invalidation.probe, on_recover=self.invalidation.recover,
                                      health=cache_health, on_open=self._near_off, on_close=self._near_on)
        self.invalidation.probe_soon = self.breaker.probe_soon
        # Durable writes run in tasks of their own, which finish (commit, cache write, acknowledgement) even
        # when their caller gives up: a write cancelled after its commit still reaches the cache.
        self._writes: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()
        self.aside = Aside(self)

    def namespace(self, name: str) -> Namespace:
        try:
            return self.namespaces[name]
        except KeyError:
            raise InvalidInput(
                f"unknown namespace {name!r}; configured: {', '.join(sorted(self.namespaces))}"
            ) from None

    # -- reads --------------------------------------------------------------------------------

    async def get(self, namespace: str, item_id: str) -> Any:
        ns = self.namespaces.get(namespace)
        if ns is not None and ns.near_cache and type(item_id) is str and self.breaker.closed:
            # A near-cache hit without lookup's frame: only a checked id was ever installed (its key is its id's).
            raw = self.near.get(ns.key_prefix + item_id + ns.key_suffix)  # type: ignore[union-attr]
            if raw is not None:
                try:
                    value = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    pass
                else:
                    stats = self.stats[ns.name]
                    stats.hits += 1
                    stats.near_hits += 1
                    return value
        return (await self.lookup(namespace, item_id)).value

    async def lookup(self, namespace: str, item_id: str) -> Lookup:
        # The hot path of every cached read: helpers are inlined where a call would be most of the cost.
        ns = self.namespaces.get(namespace) or self.namespace(namespace)  # the latter raises the error
        check_id(item_id)
        stats = self.stats[ns.name]
        cache_error: OndemandError | None = None
        corrupt = False
        if self.breaker.closed:
            if ns.near_cache:  # before any await: a hit costs a dict lookup, an LRU touch and a decode
                raw = self.near.get(ns.key_prefix + item_id + ns.key_suffix)  # type: ignore[union-attr]
                if raw is not None:
                    try:
                        value = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        pass  # read from Redis, where the corrupt value is dealt with
                    else:
                        stats.hits += 1
                        stats.near_hits += 1
                        return Lookup(value, "redis")
                stats.near_misses += 1
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
        began = self._loop.time()
        entry = await self._durable_call(stats, cache_error, lambda: self.durable.get_entry(ns, item_id))  # type: ignore[union-attr]
        if cache_error is not None:
            stats.fallback_reads += 1
        if entry is None:
            stats.misses += 1
            return Lookup(None, "miss")
        stats.durable_hits += 1
        if cache_error is None:
            await self._backfill(stats, ns, item_id, entry, began, replace_corrupt=corrupt)
        return Lookup(decode(entry.value), self.durable.name)  # type: ignore[union-attr]

    def get_or_compute(self, namespace: str, item_id: str, loader: Loader, *, ttl: float | None = None,
                       stale_ttl: float | None = None, early: float = 0.0, negative_ttl: float | None = None,
                       not_found: type[BaseException] | tuple[type[BaseException], ...] = (),
                       lease_ttl: float = 10.0, wait: float = 5.0, options: AsideOptions | None = None
                       ) -> Awaitable[Any]:
        """The value of `item_id`, or else `await loader()`'s, cached: one load per key at a time in this
        process and, through the cache's lease, across processes (ondemand.store.aside; README "Cache-aside").
        `options` (checked once, e.g. by `@cached`) replaces the keyword options."""
        if options is None:
            if (ttl is None and stale_ttl is None and not early and negative_ttl is None and not not_found
                    and lease_ttl == DEFAULT_OPTIONS.lease_ttl and wait == DEFAULT_OPTIONS.wait):
                options = DEFAULT_OPTIONS
            else:
                options = AsideOptions.checked(ttl=ttl, stale_ttl=stale_ttl, early=early, negative_ttl=negative_ttl,
                                               not_found=not_found, lease_ttl=lease_ttl, wait=wait)
        return self.aside.get_or_compute(namespace, item_id, loader, options)

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
            asked = list(range(len(ids)))
            if ns.near_cache:
                near = self.near
                raws = [near.get(ns.key_prefix + item_id + ns.key_suffix) for item_id in ids]  # type: ignore[union-attr]
                asked = [i for i, raw in enumerate(raws) if raw is None]
                stats.near_hits += len(ids) - len(asked)
                stats.near_misses += len(asked)
            try:
                if len(asked) == len(ids):
                    raws = await self.cache.get_many(ns, ids)
                elif asked:
                    for i, raw in zip(asked, await self.cache.get_many(ns, [ids[i] for i in asked]), strict=True):
                        raws[i] = raw
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
            began = self._loop.time()
            found = await self._durable_call(
                stats, cache_error, lambda: self.durable.get_entries(ns, [ids[i] for i in missing])  # type: ignore[union-attr]
            )
            if cache_error is not None:
                stats.fallback_reads += len(missing)
            backfills = []
            for i, entry in zip(missing, found, strict=True):
                if entry is None:
                    continue
                values[i] = decode(entry.value)
                stats.durable_hits += 1
                if cache_error is None:
                    backfills.append(self._backfill(stats, ns, ids[i], entry, began, replace_corrupt=i in corrupt))
            await asyncio.gather(*backfills)  # issued in one loop tick: one pipelined round trip
        stats.misses += sum(1 for value in values if value is CORRUPT)
        return [None if value is CORRUPT else value for value in values]

    async def _backfill(
        self, stats: NamespaceStats, ns: Namespace, item_id: str, entry: DurableEntry, began: float,
        *, replace_corrupt: bool = False,
    ) -> None:
        """Put a durable value back into the cache, with its version (refused when the cache holds a newer one
        or a newer tombstone), for no longer than it lives in the durable store. Skipped when its durable read
        began more than `late_after` seconds ago: a newer version may have come and gone meanwhile."""
        remaining = entry.remaining
        ttl = ns.ttl if remaining is None else min(remaining, ns.ttl or remaining)
        if (ttl is not None and ttl <= 0) or self._loop.time() - began > self.late_after:
            return
        try:
            await self.cache.put_back(ns, item_id, entry.value, ttl, entry.version, repair=replace_corrupt)
        except (BackendUnavailable, RedisCommandError) as exc:  # a put-back that failed never fails the read
            self._read_failed(stats, exc, (Target(ns, item_id, entry.version),))

    # -- writes -------------------------------------------------------------------------------

    async def set(self, namespace: str, item_id: str, value: Any, ttl: float | None = None) -> WriteOutcome | None:
        """Store `value`; None when stored as asked, else what happened (the cache did not take it)."""
        ns = self.namespace(namespace)
        check_id(item_id)
        ttl = check_ttl(ttl, ns.ttl)
        raw = encode(value)
        stats = self.stats[ns.name]
        stats.writes += 1
        if ns.durable:
            return await self._shielded(self._durable_set(stats, ns, item_id, raw, ttl))
        if self.breaker.closed:  # the common case, inline: no closure, no extra frame
            if ns.near_cache:
                return await self._near_write(stats, ns, item_id, raw, ttl)
            try:
                await self.cache.set(ns, item_id, raw, ttl)
                return None
            except (BackendUnavailable, RedisCommandError) as exc:
                await self._write_failed(stats, exc, (Target(ns, item_id),))
        else:
            await self._skipped((Target(ns, item_id),), False)
        return self._count_lost_write(stats, ns)

    async def _near_write(self, stats: NamespaceStats, ns: Namespace, item_id: str, raw: bytes,
                          ttl: float | None) -> None:
        """`set` in a cache-only namespace with a near cache. The local copy goes now; the cache storage drops
        it again as the write is queued and reads the key back right behind it on the same connection (see
        ondemand.redis.tracking), so that nothing read before the write is kept and the next read is a hit."""
        key = ns.key(item_id)
        self.near.evict(key)  # type: ignore[union-attr]
        try:
            await self.cache.set(ns, item_id, raw, ttl)
            return
        except (BackendUnavailable, RedisCommandError) as exc:
            self.near.evict(key)  # type: ignore[union-attr]  # (it may have happened, or not: read it again)
            await self._write_failed(stats, exc, (Target(ns, item_id),))
        self._count_lost_write(stats, ns)

    def _evict(self, targets: Iterable[Target]) -> None:
        """Our own write of `targets` is about to be sent, or was answered: drop their near-cached copies."""
        near = self.near
        if near is not None:
            for target in targets:
                ns = target.namespace
                if ns.near_cache:
                    near.evict(ns.key_prefix + target.id + ns.key_suffix)

    def _near_off(self) -> None:
        """The breaker opened: the near cache serves and keeps nothing until it closes."""
        if self.near is not None:
            self.near.serving = False
            self.near.flush_all("breaker")

    def _near_on(self) -> None:
        if self.near is not None:
            self.near.serving = True

    async def set_loaded(self, ns: Namespace, item_id: str, value: Any, ttl: float | None, *,
                         version: int | None) -> bool:
        """get_or_compute's write of a value it loaded, in a durable namespace: where the durable store can make
        it conditional (WritesConditionally), written only while the id's live value is the one it was loaded
        after (`version`; None: no value), so that a write committed during the load wins; returns whether it
        was written. Otherwise as `set`."""
        if not isinstance(self.durable, WritesConditionally):
            await self.set(ns.name, item_id, value, ttl)
            return True
        ttl = check_ttl(ttl, ns.ttl)
        raw = encode(value)
        stats = self.stats[ns.name]
        stats.writes += 1
        written = await self._shielded(self._durable_set(stats, ns, item_id, raw, ttl, condition=(version,)))
        return written is not False

    async def _durable_set(self, stats: NamespaceStats, ns: Namespace, item_id: str, raw: bytes,
                           ttl: float | None, *, condition: tuple[int | None] | None = None
                           ) -> WriteOutcome | bool | None:
        """The durable `set`; with a `condition` (the version to write over), False when it did not hold."""
        began = self._loop.time()
        kw, recorded = self.invalidation.recording(self.breaker.closed)
        store = self.durable
        write = (lambda: store.set(ns, item_id, raw, ttl, **kw)) if condition is None else (  # type: ignore[union-attr]
            lambda: store.set_if(ns, item_id, raw, ttl, version=condition[0], **kw))  # type: ignore[union-attr]
        committed: Committed | None = await self._durable_write(stats, ((ns, [item_id]),), write, recorded=recorded)
        if committed is None:
            return False
        target = Target(ns, item_id, committed.version)
        if self.breaker.closed:
            self._evict((target,))  # (a near-cached write-through drops it again as it is queued, and reads it back)
            try:
                if self._loop.time() - began <= self.late_after:
                    await self.cache.set(ns, item_id, raw, ttl, committed.version)
                else:
                    try:
                        await self.cache.invalidate((target,))
                    finally:
                        self._evict((target,))
            except (BackendUnavailable, RedisCommandError) as exc:
                self._evict((target,))
                if await self._write_failed(stats, exc, (target,)):
                    self.invalidation.acknowledge(committed.outbox)  # (a row due at once stands for it now)
            else:
                self.invalidation.acknowledge(committed.outbox)
                return None
        else:
            await self._skipped((target,), recorded)
        return self._count_lost_write(stats, ns)

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a durable write in a task of its own that the caller's cancellation does not reach: once it may
        have committed, its cache write and acknowledgement happen whatever the caller does."""
        task = self._loop.create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._write_done)
        return await asyncio.shield(task)

    def _write_done(self, task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that gave up no longer awaits it (and it was handled)

    async def append(self, namespace: str, item_id: str, items: list[Any], ttl: float | None = None, *,
                     max_items: int) -> int:
        """Append `items` to the JSON list stored for `item_id` (created if absent); returns its new length.

        In a cache-only namespace this is one atomic step in the cache (`CacheStorage.append_list`):
        concurrent appends from any process all land. A durable namespace has no atomic append in the
        durable store, so there it is a read and a write, and concurrent appends can lose one another.
        The list gets `ttl` (or the namespace default). More than `max_items` is an InvalidInput, a
        stored value that is not a list a Conflict; neither writes anything. With Redis down a
        cache-only append is dropped and counted, like any cache-only write, and reports the length
        of the items alone; a list not stored as asked is counted by an `Appended`, which says so.
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
            outcome = await self.set(namespace, item_id, merged, ttl)
            return len(merged) if outcome is None else Appended(len(merged), outcome)
        if len(items) > max_items:
            raise ns.list_too_long(item_id, len(items), max_items)
        raw = encode(items)
        stats = self.stats[ns.name]
        stats.writes += 1
        length = await self._cache_write(stats, (Target(ns, item_id),),
                                         lambda: self.cache.append_list(ns, item_id, raw, len(items), ttl, max_items))
        if length is _NOT_WRITTEN:
            return Appended(len(items), self._count_lost_write(stats, ns))
        return length

    async def set_many(self, entries: Iterable[tuple[str, str, Any, float | None]]) -> WriteOutcome | None:
        """Write (namespace, id, value, ttl) tuples: one durable transaction, one Redis round trip. None when
        all were stored as asked; else DROPPED if a cache-only entry was stored nowhere, or DURABLE_ONLY."""
        latest: dict[tuple[str, str], Entry] = {}
        for namespace, item_id, value, ttl in entries:
            ns = self.namespace(namespace)
            check_id(item_id)
            latest.pop((ns.name, item_id), None)  # a later duplicate wins, in the place of its last occurrence
            latest[(ns.name, item_id)] = Entry(ns, item_id, encode(value), check_ttl(ttl, ns.ttl))
        prepared = list(latest.values())
        if not prepared:
            return None
        for entry in prepared:  # counted once every entry passed validation: a bad one writes nothing
            self.stats[entry.namespace.name].writes += 1
        if any(entry.namespace.durable for entry in prepared):
            return await self._shielded(self._set_many(prepared))
        return await self._set_many(prepared)

    async def _set_many(self, prepared: list[Entry]) -> WriteOutcome | None:
        durable = [entry for entry in prepared if entry.namespace.durable]
        recorded, late, acks = False, False, []
        if durable:
            began = self._loop.time()
            stats = self.stats[durable[0].namespace.name]
            by_namespace: dict[str, tuple[Namespace, list[str]]] = {}
            for entry in durable:
                by_namespace.setdefault(entry.namespace.name, (entry.namespace, []))[1].append(entry.id)
            kw, recorded = self.invalidation.recording(self.breaker.closed)
            committed: list[Committed] = await self._durable_write(
                stats, by_namespace.values(), lambda: self.durable.set_many(durable, **kw), recorded=recorded)  # type: ignore[union-attr]
            versions = {(c.namespace.name, c.id): c.version for c in committed}
            prepared = [entry._replace(version=versions[(entry.namespace.name, entry.id)])
                        if entry.namespace.durable else entry for entry in prepared]
            acks = [c.outbox for c in committed]
            late = self._loop.time() - began > self.late_after
        first = self.stats[prepared[0].namespace.name]
        targets = _LazyTargets(prepared)  # built only if the write fails
        # The durable write recorded its own keys; with cache-only entries too, all are recorded again.
        all_recorded = recorded and len(durable) == len(prepared)
        if late:  # the durable values as tombstones of their versions, the cache-only ones as they are
            written = [e for e in prepared if not e.namespace.durable]
            tombstones = [Target(e.namespace, e.id, e.version) for e in prepared if e.namespace.durable]

            async def write() -> None:
                await self.cache.invalidate(tombstones)
                await self.cache.set_many(written)
        else:
            def write() -> Awaitable[Any]:
                return self.cache.set_many(prepared)
        if await self._cache_write(first, targets, write, recorded=all_recorded, acks=acks) is not _NOT_WRITTEN:
            return None
        outcomes = {self._count_lost_write(self.stats[entry.namespace.name], entry.namespace) for entry in prepared}
        return WriteOutcome.DROPPED if WriteOutcome.DROPPED in outcomes else WriteOutcome.DURABLE_ONLY

    async def delete(self, namespace: str, ids: str | Sequence[str]) -> int:
        ns = self.namespace(namespace)
        ids = [ids] if isinstance(ids, str) else list(ids)
        for item_id in ids:
            check_id(item_id)
        stats = self.stats[ns.name]
        stats.deletes += len(ids)
        if ns.durable:
            return await self._shielded(self._durable_delete(stats, ns, ids))
        cached = await self._cache_write(stats, [Target(ns, i) for i in ids], lambda: self.cache.delete(ns, ids))
        return 0 if cached is _NOT_WRITTEN else cached

    async def _durable_delete(self, stats: NamespaceStats, ns: Namespace, ids: list[str]) -> int:
        kw, recorded = self.invalidation.recording(self.breaker.closed)
        deleted: Deleted = await self._durable_write(stats, ((ns, ids),), lambda: self.durable.delete(ns, ids, **kw),  # type: ignore[union-attr]
                                                     recorded=recorded)
        targets = [Target(ns, c.id, c.version) for c in deleted.committed]
        await self._cache_write(stats, targets, lambda: self.cache.invalidate(targets), recorded=recorded,
                                acks=[c.outbox for c in deleted.committed])
        return deleted.removed

    async def expire(self, namespace: str, item_id: str, ttl: float) -> bool:
        ns = self.namespace(namespace)
        check_id(item_id)
        checked = check_ttl(ttl, None)
        if checked is None:
            raise InvalidInput("ttl is required for expire")
        stats = self.stats[ns.name]
        if ns.durable:
            return await self._shielded(self._durable_expire(stats, ns, item_id, checked))
        cached = await self._cache_write(stats, (Target(ns, item_id),), lambda: self.cache.expire(ns, item_id, checked))
        return cached is not _NOT_WRITTEN and bool(cached)

    async def _durable_expire(self, stats: NamespaceStats, ns: Namespace, item_id: str, ttl: float) -> bool:
        """A new ttl is a new version: the cached copy gives way to a tombstone of it, and the next read puts
        the value back with the ttl it has now."""
        kw, recorded = self.invalidation.recording(self.breaker.closed)
        committed: Committed | None = await self._durable_write(
            stats, ((ns, [item_id]),), lambda: self.durable.expire(ns, item_id, ttl, **kw), recorded=recorded)  # type: ignore[union-attr]
        if committed is None:
            return False
        targets = (Target(ns, item_id, committed.version),)
        await self._cache_write(stats, targets, lambda: self.cache.invalidate(targets), recorded=recorded,
                                acks=(committed.outbox,))
        return True

    # -- failure handling ---------------------------------------------------------------------

    def _count_lost_write(self, stats: NamespaceStats, ns: Namespace) -> WriteOutcome:
        if ns.durable:
            stats.fallback_writes += 1
            return WriteOutcome.DURABLE_ONLY
        stats.dropped_writes += 1
        return WriteOutcome.DROPPED

    async def _cache_write(
        self, stats: NamespaceStats, targets: Iterable[Target], write: Callable[[], Awaitable[Any]], *,
        recorded: bool = False, acks: Iterable[int | None] = (),
    ) -> Any:
        """Run a cache write unless the breaker is open and return its result (and acknowledge the outbox rows
        `acks` it stood for); when it did not happen, make sure no older copy is served (see _write_failed,
        _skipped) and return _NOT_WRITTEN. `recorded`: the durable write already put these keys in the outbox,
        due at once."""
        if self.breaker.closed:
            self._evict(targets)
            try:
                result = await write()
            except (BackendUnavailable, RedisCommandError) as exc:
                if not await self._write_failed(stats, exc, targets):
                    return _NOT_WRITTEN
            else:
                for seq in acks:
                    self.invalidation.acknowledge(seq)
                return result
            finally:
                self._evict(targets)
            for seq in acks:  # the keys were recorded again, due at once: those rows stand for these now
                self.invalidation.acknowledge(seq)
        else:
            await self._skipped(targets, recorded)
        return _NOT_WRITTEN

    async def _durable_write(
        self, stats: NamespaceStats, targets: Iterable[tuple[Namespace, Sequence[str]]],
        call: Callable[[], Awaitable[Any]], *, recorded: bool = False,
    ) -> Any:
        """A write to the system of record. When it fails, it may still commit later (a statement
        sent to a server that froze), so the cached copies of `targets` are invalidated (with
        tombstones of no known version, so no read puts an older value back while they last; if it
        commits, its outbox row carries its version to the cache) before the error is raised:
        whatever the durable store ends up holding, the next read returns it."""
        try:
            result = await call()
        except BackendUnavailable as exc:
            stats.durable_errors += 1
            for ns, ids in targets:
                unknown = [Target(ns, i) for i in ids]
                await self._cache_write(stats, unknown, lambda unknown=unknown: self.cache.invalidate(unknown))
            if exc.outcome_unknown:
                raise WriteOutcomeUnknown(
                    f"{error_text(exc)}; the write may still take effect: the cached copy was invalidated, so "
                    f"the next read returns what {self.durable.name} holds"  # type: ignore[union-attr]
                ) from exc
            raise
        if recorded:
            self.invalidation.recorded += sum(len(ids) for _, ids in targets)
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
                    f"Redis and the durable store are both unavailable (Redis: {error_text(cache_error)}; "
                    f"durable: {error_text(exc)})"
                ) from exc
            raise

    def _count_cache_error(self, stats: NamespaceStats, exc: OndemandError) -> None:
        stats.cache_errors += 1
        if isinstance(exc, RedisCommandError):
            self.error_replies[exc.kind] += 1

    def _read_failed(self, stats: NamespaceStats, exc: OndemandError, targets: Iterable[Target] = ()
                     ) -> OndemandError:
        """A cache read (or put-back) failed: the read goes on as a miss. An error reply that concerns
        this command alone (out of memory, ...) leaves the breaker closed."""
        if (isinstance(exc, RedisCommandError) and not exc.server_unusable) or isinstance(exc, NodeUnavailable):
            # (One cluster master out of reach: only its keys are affected; the breaker stays closed.)
            self._count_cache_error(stats, exc)
            return exc
        return self._cache_failed(stats, exc, targets)

    async def _write_failed(self, stats: NamespaceStats, exc: OndemandError, targets: Iterable[Target]) -> bool:
        """A cache write did not happen, or may have half happened: no older copy may be served.

        A server that refused it but still serves (out of memory, read-only, ...) is asked to delete
        the keys now (DEL is served under maxmemory); otherwise, or if that fails too, the keys are
        remembered here and recorded in the outbox (due at once), so that whoever reaches Redis first
        invalidates them. Returns whether they were recorded so."""
        targets = list(targets)
        if isinstance(exc, NodeUnavailable):
            # One cluster master out of reach: its keys are remembered (and invalidated before it serves again,
            # see ClusterConnection), the breaker stays closed for every other master's keys.
            self._count_cache_error(stats, exc)
            self.invalidation.mark_stale(targets)
            return await self.invalidation.record(targets)
        if isinstance(exc, RedisCommandError) and not exc.server_unusable:
            self._count_cache_error(stats, exc)
            try:
                await self.cache.delete_keys([t.namespace.key(t.id) for t in targets])
                return False  # (the outbox rows of a durable write stay: delivered after the grace, versioned)
            except (BackendUnavailable, RedisCommandError) as again:
                exc = again
        self._cache_failed(stats, exc, targets)
        return await self.invalidation.record(targets)

    async def _skipped(self, targets: Iterable[Target], recorded: bool) -> None:
        """A write that skipped Redis (breaker open): its keys are stale there until invalidated."""
        targets = list(targets)
        self.invalidation.mark_stale(targets)
        if not recorded:
            await self.invalidation.record(targets)

    def _cache_failed(self, stats: NamespaceStats, exc: OndemandError, targets: Iterable[Target]) -> OndemandError:
        """Redis could not be used: remember the keys as stale and open the breaker."""
        self._count_cache_error(stats, exc)
        self.invalidation.mark_stale(targets)
        self.breaker.failure(error_text(exc))
        if isinstance(exc, CacheReplaced):  # another server: its durable copies may be older than the store's
            self.invalidation.cache_replaced()
        return exc

    def start(self) -> None:
        """Start delivering the outbox (when the durable store has one) while the breaker is closed."""
        self.invalidation.start(lambda: self.breaker.closed)

    def status(self) -> dict[str, Any]:
        return {
            "breaker": self.breaker.status(),
            **self.invalidation.status(),
            "writes_in_flight": len(self._writes),
            "error_replies": dict(self.error_replies),
            "namespaces": {name: attrs.asdict(stats) for name, stats in self.stats.items()},
            "aside": self.aside.status(),
        }

    async def settled(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until no durable write is in flight, those whose callers gave up
        included."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)

    async def close(self) -> None:
        await self.aside.close()
        await self.settled(10.0)  # each is bounded by the stores' own timeouts
        await self.invalidation.close()
        await self.breaker.close()
