"""What a storage backend is: the protocol every storage plugin implements.

Values cross this boundary as JSON-encoded bytes (the dispatcher encodes and decodes), keys as a
Namespace plus an id that the dispatcher has already validated. TTLs are seconds (float) or None
for no expiry. Every method is bounded in time by the backend's own timeouts and raises a subclass
of BackendUnavailable when the backend cannot answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import attrs

from ondemand.config import Config
from ondemand.errors import Conflict, InvalidInput
from ondemand.events import Events
from ondemand.health import OutageTracker

if TYPE_CHECKING:
    from ondemand.redis.server import OnDemandRedis


async def purge_in_batches(purge_one: Callable[[], Awaitable[int]], batch: int, max_batches: int) -> int:
    """Run `purge_one` (one short statement deleting up to `batch` expired rows) until fewer than
    `batch` go, at most `max_batches` times (a huge backlog is worked off over several runs, never one
    long statement); returns how many rows went."""
    total = 0
    for _ in range(max_batches):
        deleted = await purge_one()
        total += deleted
        if deleted < batch:
            break
    return total


@attrs.frozen
class Namespace:
    """A configured namespace: `session`, `messages`, `profile`, or any the config adds."""

    name: str
    ttl: float | None
    durable: bool  # the durable store is its system of record (configured durable, and a durable store exists)
    connection_id: str
    key_prefix: str  # "ondemand:session:" -- the full Redis key is key_prefix + id + key_suffix
    # On a cluster the id is the key's hash tag ("ondemand:session:{=" + id + "}": never an empty tag,
    # whatever the id), so that a key, its tombstone and every script's keys share a slot; on one server
    # there is no suffix.
    key_suffix: str = ""
    # Hot values are served from this process's memory, kept coherent by the server (ondemand.store.near).
    near_cache: bool = False

    def key(self, item_id: str) -> str:
        return self.key_prefix + item_id + self.key_suffix

    def list_too_long(self, item_id: str, length: int, max_items: int) -> InvalidInput:
        """The error for an append past `max_items` (raised by the dispatcher or the cache storage)."""
        return InvalidInput(f"the list in {self.name} for {item_id!r} holds at most {max_items} items; "
                            f"this would make {length}")

    def not_a_list(self, item_id: str) -> Conflict:
        """The error for an append to a stored value that is not a JSON list."""
        return Conflict(f"the value stored in {self.name} for {item_id!r} is not a JSON list")


class Entry(NamedTuple):
    """One value to write: used by set_many, the warm-up path (a NamedTuple: built per value, cheaply)."""

    namespace: Namespace
    id: str
    value: bytes
    ttl: float | None
    # For a cache, in a durable namespace: the version the durable store gave this value (see CacheStorage.set).
    version: int | None = None


class Target(NamedTuple):
    """A key a write touched: its namespace, its id and, in a durable namespace, the version the durable store
    gave that write (None: no version is known: a cache-only namespace, or a write whose outcome is unknown)."""

    namespace: Namespace
    id: str
    version: int | None = None


class DurableEntry(NamedTuple):
    """A value as the durable store holds it: the value, its remaining ttl in seconds (None: no expiry), and the
    version of the write that stored it."""

    value: bytes
    remaining: float | None
    version: int


class Committed(NamedTuple):
    """What a durable write or delete committed for one id: the version it got, and the outbox row recorded with
    it, which stands for its cache write until the writer acknowledges it (None: the store carries no outbox)."""

    namespace: Namespace
    id: str
    version: int
    outbox: int | None


class Deleted(NamedTuple):
    """What a durable delete committed: how many of the ids held a live value, and one Committed per distinct id
    (deleted or not: each gets a version, which the cache keeps as a tombstone)."""

    removed: int
    committed: list[Committed]


class OutboxRow(NamedTuple):
    """An undelivered outbox row: its sequence number, the namespace name, the id, and the version to invalidate
    up to (None: no version known; in a durable namespace the cache refuses put-backs for its tombstone window)."""

    seq: int
    namespace: str
    id: str
    version: int | None


@runtime_checkable
class Storage(Protocol):
    """A key-value store for namespaced JSON values with expiry: what both a cache and a durable store do."""

    name: str

    async def open(self) -> None:
        """Prepare (schema, pools). Must not start a Redis server: that happens on first use."""

    async def close(self) -> None:
        """Release every resource; bounded in time."""

    async def get(self, ns: Namespace, item_id: str) -> bytes | None: ...

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]: ...

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> Any: ...

    async def set_many(self, entries: Sequence[Entry]) -> Any:
        """Write all entries, in one round trip where the backend allows it."""

    async def delete(self, ns: Namespace, ids: Sequence[str]) -> Any:
        """Remove ids; a cache returns how many existed, a durable store a Deleted."""

    async def expire(self, ns: Namespace, item_id: str, ttl: float) -> Any:
        """Set a new ttl; a cache returns whether the id exists, a durable store a Committed or None."""

    def status(self) -> dict[str, Any]:
        """A JSON-serializable snapshot, with no secrets in it."""


@runtime_checkable
class DurableStorage(Storage, Protocol):
    """A storage that can be the system of record behind the cache (the `postgres` and `sqlite` plugins).

    Every committed write or delete of an id gets a version: an integer that grows with every commit of that
    id, in commit order, across every process and host writing to the store, and never comes back (not after
    a delete either: one counter for the whole store does it). The cache keeps the version with the value and
    refuses anything older, so two writes that reach the cache in the other order than they committed, or a
    read that puts back what it read just before a newer write, never leave the older value there.

    When it is also an InvalidationOutbox, each write records its keys and versions in the outbox in the same
    transaction: the row stands for the write's cache write until the writer acknowledges it, so a writer that
    dies, hangs or is cancelled between its commit and its cache write leaves a row that other processes
    deliver. `invalidate=True` (the dispatcher passes it while the cache is out of reach) asks for rows to be
    delivered at once, and wakes the other processes. A store without an outbox is never passed `invalidate`."""

    async def get_entry(self, ns: Namespace, item_id: str) -> DurableEntry | None:
        """The value, its remaining ttl (the cache copy must not outlive it) and its version; None when absent."""

    async def get_entries(self, ns: Namespace, ids: Sequence[str]) -> list[DurableEntry | None]:
        """get_entry for many ids in one round trip, in the order of `ids`."""

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *,
                  invalidate: bool = False) -> Committed:
        """Commit the value; acknowledged only once it is durable."""

    async def set_many(self, entries: Sequence[Entry], *, invalidate: bool = False) -> list[Committed]:
        """Commit every entry in one transaction: a concurrent reader sees all of them or none. One Committed
        per entry, in order; entries for the same id (a later duplicate wins) share the one the id got."""

    async def delete(self, ns: Namespace, ids: Sequence[str], *, invalidate: bool = False) -> Deleted:
        """Remove ids in one transaction; counts the live ones that existed, versions every distinct id."""

    async def expire(self, ns: Namespace, item_id: str, ttl: float, *, invalidate: bool = False) -> Committed | None:
        """Set a new ttl (a new version too); None if the id does not exist."""


@runtime_checkable
class InvalidationOutbox(Protocol):
    """A durable storage that carries cache invalidations between processes (the outbox).

    Rows come from two places: every durable write records its keys with their versions in the write's own
    transaction (acknowledged by the writer once its cache write succeeded), and a process that cannot reach
    the shared cache records the keys it could not write or invalidate there (for delivery at once). Any
    process that reaches the cache delivers the rows due (a versioned tombstone per key: a no-op where the
    cache already holds that version or a newer one) and then acknowledges them: no process goes on serving
    a copy older than what the durable store acknowledged. An `OVERFLOW` row (namespace "*") means: too many
    keys to list, clear every namespace."""

    async def record_invalidations(self, targets: Sequence[Target]) -> None:
        """Record keys to invalidate, for delivery at once; bounded (past the bound, one OVERFLOW row)."""

    async def pending_invalidations(self, limit: int, grace: float) -> list[OutboxRow]:
        """Up to `limit` rows due, oldest first: those recorded for delivery at once, and those a write recorded
        more than `grace` seconds ago (its writer did not acknowledge them: it failed, hung or died)."""

    async def ack_invalidations(self, seqs: Sequence[int]) -> None:
        """Delete delivered (or acknowledged) rows."""

    async def wait_for_invalidations(self, timeout: float) -> bool:
        """Wait until rows may have been recorded (a notification) or `timeout` seconds passed, then return
        True when the outbox should be read now: after a notification, and after every timeout while the
        store is in use (the poll that backs notifications up; a store without notifications returns True
        after each timeout). False: nothing to read (the store is not in use, or is down). Never starts an
        embedded server; while the store is not in use it just waits."""


@runtime_checkable
class WritesConditionally(Protocol):
    """A durable storage whose write can be conditional on the id's live value: what `get_or_compute` writes a
    loaded value with, so that a write committed while it loaded wins (without it, one committed in the round
    trip between the lease's check and the loaded value's write can be overtaken)."""

    async def set_if(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *, version: int | None,
                     invalidate: bool = False) -> Committed | None:
        """`set`, in one transaction with the check that the id's live value has `version` (None: that the id
        holds no live value; an expired one counts as none); None, nothing written, when it does not."""


OVERFLOW = "*"  # the namespace of the outbox row that stands for "clear everything"


@runtime_checkable
class CacheStorage(Storage, Protocol):
    """A storage that can serve as the cache in front of a durable store (the `redis` plugin).

    In a durable namespace it keeps, with each value, the version the durable store gave it, and after a delete
    or an invalidation a tombstone of that version (for a window of its own, at least several seconds: Redis
    keeps them 30 s), in one record per id that nothing (eviction included) can split. A write or a put-back
    applies only when its version is newer than the value held, and not older than the tombstone: the cache
    never goes back in time. Cache-only namespaces have no versions: the last write wins."""

    async def ping(self) -> None:
        """Succeed only when the backend answers; used by the circuit breaker's half-open probe."""

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None,
                  version: int | None = None) -> Any:
        """Write a value. In a durable namespace `version` is the durable write's and the write applies only
        when newer than the value held and not older than a tombstone (equal: nothing to do); without one the
        value replaces whatever is there, as version 0."""

    async def set_many(self, entries: Sequence[Entry]) -> Any:
        """`set` for every entry (each with its own `version`), in one round trip where the backend allows it."""

    async def put_back(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, version: int, *,
                       repair: bool = False) -> bool:
        """Write a value read from the durable store back, under the rules of a versioned `set`, and also not
        while an unversioned tombstone holds the id (a write whose outcome is unknown): never overwrites a
        newer value, never revives a deleted one. `repair`: the value held is corrupt; replace it even at the
        same version. Returns whether it was written."""

    async def invalidate(self, targets: Sequence[Target]) -> None:
        """Make sure no copy older than each target's version is served. In a durable namespace a tombstone of
        that version replaces an older value or tombstone (the same or a newer one stays); without a version,
        a tombstone that keeps the version held and refuses every put-back for its window. In a cache-only
        namespace the key is deleted."""

    async def append_list(self, ns: Namespace, item_id: str, items: bytes, count: int, ttl: float | None,
                          max_items: int) -> int:
        """Append the JSON list `items` (`count` elements) to the list stored for `item_id`, as one
        atomic step, and give it `ttl`; returns the new length. Absent or corrupt (not JSON) stored
        values count as an empty list. Raises `ns.list_too_long(...)` past `max_items` and
        `ns.not_a_list(...)` for a stored value that is JSON but not a list, writing nothing."""

    async def delete_keys(self, keys: Sequence[str]) -> int:
        """Delete full keys (as built by Namespace.key), unconditionally: the fallback of a refused write on a
        server that still serves deletes (out of memory)."""

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; used when too many keys went stale to remember."""


@attrs.frozen
class StorageContext:
    """What a storage factory gets: the config (its own section through `config.section(...)`), the
    events to emit, the on-demand Redis (the cache storage's connection to it), and the outage tracker
    of the component the storage serves as (a durable store reports its outages there)."""

    config: Config
    events: Events
    redis: OnDemandRedis
    health: OutageTracker


class StorageFactory(Protocol):
    def __call__(self, context: StorageContext) -> Storage: ...
