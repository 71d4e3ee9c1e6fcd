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

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> None: ...

    async def set_many(self, entries: Sequence[Entry]) -> None:
        """Write all entries, in one round trip where the backend allows it."""

    async def delete(self, ns: Namespace, ids: Sequence[str]) -> int:
        """Remove ids; returns how many existed."""

    async def expire(self, ns: Namespace, item_id: str, ttl: float) -> bool:
        """Set a new ttl; returns False if the id does not exist."""

    def status(self) -> dict[str, Any]:
        """A JSON-serializable snapshot, with no secrets in it."""


@runtime_checkable
class DurableStorage(Storage, Protocol):
    """A storage that can be the system of record behind the cache (the `postgres` and `sqlite` plugins).

    When it is also an InvalidationOutbox, the dispatcher passes `invalidate=True` to its writes while the
    cache is out of reach: the write records its own keys in the outbox in the same transaction. A store
    without an outbox is never passed `invalidate`."""

    async def get_entry(self, ns: Namespace, item_id: str) -> tuple[bytes, float | None] | None:
        """The value and its remaining ttl in seconds (None: no expiry); the cache copy must not outlive it."""

    async def get_entries(self, ns: Namespace, ids: Sequence[str]) -> list[tuple[bytes, float | None] | None]:
        """get_entry for many ids in one round trip, in the order of `ids`."""

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *,
                  invalidate: bool = False) -> None:
        """Commit the value; acknowledged only once it is durable."""

    async def set_many(self, entries: Sequence[Entry], *, invalidate: bool = False) -> None:
        """Commit every entry in one transaction: a concurrent reader sees all of them or none."""

    async def delete(self, ns: Namespace, ids: Sequence[str], *, invalidate: bool = False) -> int:
        """Remove ids in one transaction; returns how many existed (live ones only)."""

    async def expire(self, ns: Namespace, item_id: str, ttl: float, *, invalidate: bool = False) -> bool:
        """Set a new ttl; returns False if the id does not exist."""


@runtime_checkable
class InvalidationOutbox(Protocol):
    """A durable storage that carries cache invalidations between processes (the outbox).

    A process that cannot delete a key from the shared cache (its route to Redis is cut) records the
    key here, and any process that reaches the cache deletes it there and then acknowledges the row:
    no other process goes on serving a copy older than what the durable store acknowledged. An
    `OVERFLOW` row (namespace "*") means: too many keys to list, clear every namespace."""

    async def record_invalidations(self, targets: Sequence[tuple[Namespace, str]]) -> None:
        """Record (namespace, id) pairs to invalidate; bounded (past the bound, one OVERFLOW row)."""

    async def pending_invalidations(self, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` undelivered rows, oldest first: (sequence number, namespace name, id)."""

    async def ack_invalidations(self, seqs: Sequence[int]) -> None:
        """Delete delivered rows."""

    async def wait_for_invalidations(self, timeout: float) -> bool:
        """Wait until rows may have been recorded (a notification) or `timeout` seconds passed, then return
        True when the outbox should be read now: after a notification, and after every timeout while the
        store is in use (the poll that backs notifications up; a store without notifications returns True
        after each timeout). False: nothing to read (the store is not in use, or is down). Never starts an
        embedded server; while the store is not in use it just waits."""


OVERFLOW = "*"  # the namespace of the outbox row that stands for "clear everything"


@runtime_checkable
class CacheStorage(Storage, Protocol):
    """A storage that can serve as the cache in front of a durable store (the `redis` plugin)."""

    async def ping(self) -> None:
        """Succeed only when the backend answers; used by the circuit breaker's half-open probe."""

    async def set_if_absent(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> bool:
        """Write only if the key does not exist and was not deleted moments ago: puts durable values back
        without overwriting newer ones, and without reviving one deleted after the durable store was
        read (the `redis` plugin keeps a tombstone per id deleted from a durable namespace)."""

    async def append_list(self, ns: Namespace, item_id: str, items: bytes, count: int, ttl: float | None,
                          max_items: int) -> int:
        """Append the JSON list `items` (`count` elements) to the list stored for `item_id`, as one
        atomic step, and give it `ttl`; returns the new length. Absent or corrupt (not JSON) stored
        values count as an empty list. Raises `ns.list_too_long(...)` past `max_items` and
        `ns.not_a_list(...)` for a stored value that is JSON but not a list, writing nothing."""

    async def delete_keys(self, keys: Sequence[str]) -> int:
        """Delete full keys (as built by Namespace.key); used to invalidate keys that went stale."""

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
