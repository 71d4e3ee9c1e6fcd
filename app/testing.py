"""The storage contract kit: pytest checks of what the dispatcher relies on, for any storage plugin.

A storage plugin's own test suite subclasses one of these classes and provides an opened, empty storage:

    import pytest
    from ondemand.testing import DurableStorageContract

    class TestMyStore(DurableStorageContract):
        @pytest.fixture
        async def storage(self, tmp_path):
            store = MyStore(MyConfig(path=tmp_path / "db"))
            await store.open()
            yield store
            await store.close()

        @pytest.fixture                     # optional: without it the outage checks are skipped
        async def unavailable_storage(self):
            store = MyStore(MyConfig(host="127.0.0.1", port=1))  # nothing listens there
            await store.open()
            yield store
            await store.close()

`DurableStorageContract` is for a `storage.durable` plugin (the system of record: versions, `get_entry`,
`get_entries`, an atomic `set_many`), `CacheStorageContract` for a `storage.cache` plugin (`ping`, versioned
`set`, `put_back` and `invalidate` (tombstones), `append_list`, `delete_keys`, `delete_prefix`). Both include
`StorageContract`, the methods every storage has. The `storage` fixture must give a fresh, empty store
for each test (a new file, database or server, or one flushed before the test).

What the kit needs: pytest and pytest-asyncio (the checks are coroutines marked `asyncio`, so they run
in strict mode as in auto mode). Your fixtures are async generators: in pytest-asyncio's strict mode
(its default) declare them with `@pytest_asyncio.fixture` instead of `@pytest.fixture`, or set
`asyncio_mode = "auto"` in your pytest configuration (this project does). The checks use real time with
short ttls (`short_ttl`, a few tenths of a second), so the whole kit runs in a few seconds per backend.

Tunable class attributes: `key_prefix` (the kit's namespaces live under `{key_prefix}:<name>:`),
`short_ttl` and `expiry_slack` (seconds), `max_items` (the cache kit's list cap), `unavailable_within`
(the bound, in seconds, on every call to an unreachable backend), `secrets` (strings that must never
appear in `status()`).

The contract, as the dispatcher (ondemand.store.dispatcher) uses it (ondemand.store.protocols states the protocol):

- Values are bytes, returned unchanged and as `bytes` (binary-safe, any size the API accepts); ids are
  any non-empty text of at most 256 UTF-8 bytes without control characters, compared exactly.
- `get` answers the last value written, or None once deleted or expired; `get_many` answers in the
  order of `ids`, None for a miss, once per id even when an id repeats.
- A ttl is seconds (a float); None means no expiry. Every write sets the ttl anew: a value written
  again without one no longer expires. An expired value is invisible at once, to every operation.
- `set_many` writes every entry, across namespaces; a later entry for the same id wins.
  In a durable store it is one atomic write: a concurrent reader sees all of it or none of it.
- `delete` returns how many of the ids held a live value (a durable store: in a `Deleted`); `expire`
  returns whether the id held one (a durable store: its `Committed`, or None), and gives it the new ttl.
- Namespaces are isolated: the same id in two namespaces is two values.
- A durable store's `get_entry`/`get_entries` answer (value, remaining seconds, version) with
  0 < remaining <= the ttl written, or None for no expiry, so a copy put back into the cache never
  outlives the record.
- Versions (a durable store): every committed write, delete and expire of an id answers a version that
  is greater than every version the id had before, in commit order, whichever process or connection
  commits, across a delete and a re-insert; `get_entry` answers the version of the write it reads;
  `set_many` answers one `Committed` per entry, in order.
- Versions (a cache, in a durable namespace): a write or put-back with a version applies only when it is
  newer than the value held (the same version: nothing to do) and not older than a tombstone left by
  `invalidate`; `invalidate` leaves a tombstone that refuses older versions and keeps a newer value; a
  put-back is also refused while an unversioned tombstone (a `delete`, or `invalidate` without a version)
  holds the id, even one the cache never held (a read that missed the cache and read the durable store
  just before a delete must not put the value back); a plain `set` (no version) still writes it.
- A cache's `append_list` is one atomic step (concurrent appends all land, each sees its own new
  length), creates the list, gives it the ttl, raises `ns.list_too_long(...)` (InvalidInput) past
  `max_items` and `ns.not_a_list(...)` (Conflict) for stored JSON that is not a list, writing nothing
  then; stored text that is not JSON counts as an empty list; numbers are never rounded.
- A cache's `delete_keys` deletes full keys (`ns.key(id)`) and counts those that existed;
  `delete_prefix` deletes every key starting with the prefix, taken literally (no glob), and counts them.
- `status()` is JSON-serializable, has a `state`, and holds no secret.
- A durable store that carries the invalidation outbox (ondemand.store.InvalidationOutbox; the checks are
  skipped for one that does not) records every write's keys and versions with the write, due only after
  the grace unless the write says `invalidate=True`; answers due rows oldest first with sequence numbers
  that only grow; deletes acknowledged ones; and its `wait_for_invalidations` returns within its timeout.
- A durable store with a conditional write (ondemand.store.WritesConditionally, optional; skipped otherwise):
  `set_if(..., version=)` writes only over a live value of that version, or where no live value is
  (version None; an expired one counts as none); of racing writers with one condition exactly one wins;
  its versions are as `set`'s.
- A backend that cannot answer makes every operation raise a BackendUnavailable (HTTP 503) within a
  bound, never hang and never raise anything else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from ondemand.errors import BackendUnavailable, Conflict, InvalidInput
from ondemand.store.protocols import (
    CacheStorage,
    Committed,
    Deleted,
    DurableStorage,
    Entry,
    InvalidationOutbox,
    Namespace,
    Storage,
    Target,
    WritesConditionally,
)

_asyncio = pytest.mark.asyncio

# Values that must come back byte for byte: every byte value, NUL, invalid UTF-8, a large one.
BINARY_VALUES = {
    "all-bytes": bytes(range(256)),
    "nul": b"\x00",
    "not-utf8": b"\xff\xfe\xc3\x28",
    "json": b'{"user":1,"roles":["a"],"name":"\\u00e9\xc3\xa9"}',
    "large": bytes(range(256)) * 4096 + b"end",  # 1 MiB and a bit: the API's default body limit
}
# Ids a backend must store and compare exactly: non-ASCII, quotes and SQL/glob metacharacters, spaces,
# case, the longest allowed (256 UTF-8 bytes).
ODD_IDS = (
    "ключ-😀", "日本語", "é" * 128, "a'b\"c;--", "x*y?[z]\\%_", "with space", "trailing ", "k", "K",
)


def namespace(name: str, *, durable: bool, key_prefix: str = "contract", ttl: float | None = 3600.0) -> Namespace:
    """A namespace for the checks, its keys under `{key_prefix}:{name}:`."""
    return Namespace(name=name, ttl=ttl, durable=durable, connection_id="default", key_prefix=f"{key_prefix}:{name}:")


def removed(result: Any) -> int:
    """How many values a `delete` removed: a cache answers the count, a durable store a `Deleted`."""
    return result if isinstance(result, int) else result.removed


def exists(result: Any) -> bool:
    """Whether an `expire` found the id: a cache answers a bool, a durable store a `Committed` or None."""
    return result if isinstance(result, bool) else result is not None


async def _within(seconds: float, call: Callable[[], Awaitable[Any]]) -> BackendUnavailable:
    """Run `call`, which must raise BackendUnavailable within `seconds`; returns the error."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            await call()
    except TimeoutError:
        pytest.fail(f"the call did not end within {seconds:g} s: an unreachable backend must not hang")
    except BackendUnavailable as exc:
        assert str(exc), "the error must say what failed"
        assert exc.http_status == 503
        assert time.monotonic() - started < seconds
        return exc
    pytest.fail("the call returned, but the backend is unavailable: it must raise BackendUnavailable")


class StorageContract:
    """What every storage must do (ondemand.store.Storage). Subclass it through DurableStorageContract or
    CacheStorageContract, and provide a `storage` fixture."""

    key_prefix: ClassVar[str] = "contract"
    short_ttl: ClassVar[float] = 0.3
    expiry_slack: ClassVar[float] = 0.3
    unavailable_within: ClassVar[float] = 5.0
    secrets: ClassVar[tuple[str, ...]] = ()
    protocol: ClassVar[type] = Storage

    @pytest.fixture
    def storage(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define a `storage` fixture: an opened, empty storage")

    @pytest.fixture
    def unavailable_storage(self) -> Any:
        pytest.skip(f"{type(self).__name__} defines no `unavailable_storage` fixture (an opened storage whose "
                    "backend is unreachable): the typed-error and bounded-wait checks are skipped")

    # A (durable) and B (cache-only): the cache treats deletes in durable namespaces specially.
    @property
    def a(self) -> Namespace:
        return namespace("a", durable=True, key_prefix=self.key_prefix)

    @property
    def b(self) -> Namespace:
        return namespace("b", durable=False, key_prefix=self.key_prefix)

    async def expire_soon(self) -> None:
        """Sleep until what was written with `short_ttl` has expired."""
        await asyncio.sleep(self.short_ttl + self.expiry_slack)

    # -- the checks ----------------------------------------------------------------------------------

    @_asyncio
    async def test_contract_implements_the_protocol(self, storage: Any) -> None:
        assert isinstance(storage, self.protocol), f"{type(storage).__name__} lacks methods of {self.protocol.__name__}"
        assert isinstance(storage.name, str) and storage.name

    @_asyncio
    async def test_contract_get_set_round_trip_and_overwrite(self, storage: Any) -> None:
        a = self.a
        assert await storage.get(a, "k") is None
        await storage.set(a, "k", b'{"v":1}', None)
        assert await storage.get(a, "k") == b'{"v":1}'
        await storage.set(a, "k", b'{"v":2}', 60.0)
        assert await storage.get(a, "k") == b'{"v":2}'
        assert await storage.get(a, "other") is None

    @_asyncio
    async def test_contract_values_are_bytes_returned_unchanged(self, storage: Any) -> None:
        a = self.a
        for item_id, value in BINARY_VALUES.items():
            await storage.set(a, item_id, value, None)
        for item_id, value in BINARY_VALUES.items():
            got = await storage.get(a, item_id)
            assert type(got) is bytes, f"{item_id}: got {type(got).__name__}, expected bytes"
            assert got == value, item_id
        got_many = await storage.get_many(a, list(BINARY_VALUES))
        assert got_many == list(BINARY_VALUES.values())
        assert all(type(v) is bytes for v in got_many)

    @_asyncio
    async def test_contract_ids_are_stored_and_compared_exactly(self, storage: Any) -> None:
        a = self.a
        assert max(len(i.encode()) for i in ODD_IDS) == 256
        for i, item_id in enumerate(ODD_IDS):
            await storage.set(a, item_id, b"%d" % i, None)
        assert await storage.get_many(a, list(ODD_IDS)) == [b"%d" % i for i in range(len(ODD_IDS))]
        for i, item_id in enumerate(ODD_IDS):
            assert await storage.get(a, item_id) == b"%d" % i, item_id
        assert await storage.get(a, "trailing") is None and await storage.get(a, "x*") is None
        assert removed(await storage.delete(a, ["k", "trailing "])) == 2
        assert await storage.get_many(a, ["k", "K", "trailing ", "trailing"]) == [
            None, b"%d" % ODD_IDS.index("K"), None, None]

    @_asyncio
    async def test_contract_get_many_answers_in_order_with_misses_and_repeats(self, storage: Any) -> None:
        a = self.a
        await storage.set(a, "x", b"1", None)
        await storage.set(a, "y", b"2", 60.0)
        assert await storage.get_many(a, ["y", "missing", "x", "y"]) == [b"2", None, b"1", b"2"]
        assert await storage.get_many(a, ["missing"]) == [None]
        assert await storage.get_many(a, []) == []

    @_asyncio
    async def test_contract_set_many_writes_every_entry_and_later_duplicates_win(self, storage: Any) -> None:
        a, b = self.a, self.b
        await storage.set(a, "old", b"0", None)
        await storage.set_many([
            Entry(a, "one", b"1", None),
            Entry(b, "one", b"b1", 60.0),  # same id, another namespace
            Entry(a, "two", b"first", None),
            Entry(a, "old", b"replaced", None),
            Entry(a, "two", b"second", 60.0),  # a later duplicate wins
        ])
        await storage.set_many([])  # nothing to write: no error
        assert await storage.get_many(a, ["one", "two", "old"]) == [b"1", b"second", b"replaced"]
        assert await storage.get(b, "one") == b"b1"
        many = [Entry(a, f"m{i}", b"%d" % i, 60.0) for i in range(1200)]
        await storage.set_many(many)
        assert await storage.get_many(a, [e.id for e in many]) == [e.value for e in many]

    @_asyncio
    async def test_contract_delete_counts_the_live_values_it_removed(self, storage: Any) -> None:
        a = self.a
        await storage.set_many([Entry(a, "d1", b"1", None), Entry(a, "d2", b"2", 60.0), Entry(a, "d3", b"3", None)])
        assert removed(await storage.delete(a, ["d1", "missing", "d2"])) == 2
        assert await storage.get_many(a, ["d1", "d2", "d3"]) == [None, None, b"3"]
        assert removed(await storage.delete(a, ["d1"])) == 0  # already gone
        assert removed(await storage.delete(a, [])) == 0
        await storage.set(a, "d1", b"again", None)  # a deleted id can be written again
        assert await storage.get(a, "d1") == b"again"

    @_asyncio
    async def test_contract_expire_says_whether_the_id_exists(self, storage: Any) -> None:
        a = self.a
        await storage.set(a, "e", b"1", None)
        assert exists(await storage.expire(a, "e", 60.0)) is True
        assert await storage.get(a, "e") == b"1"
        assert exists(await storage.expire(a, "missing", 60.0)) is False
        assert await storage.get(a, "missing") is None  # expire creates nothing

    @_asyncio
    async def test_contract_namespaces_are_isolated(self, storage: Any) -> None:
        a, b = self.a, self.b
        await storage.set(a, "same", b"in a", None)
        await storage.set(b, "same", b"in b", None)
        assert await storage.get(a, "same") == b"in a"
        assert await storage.get(b, "same") == b"in b"
        assert await storage.get_many(b, ["same"]) == [b"in b"]
        assert exists(await storage.expire(b, "same", self.short_ttl)) is True
        assert removed(await storage.delete(a, ["same"])) == 1
        assert await storage.get(b, "same") == b"in b"
        assert removed(await storage.delete(a, ["same"])) == 0
        await self.expire_soon()
        assert await storage.get(b, "same") is None  # b's ttl changed, not a's
        await storage.set(a, "only-a", b"1", None)
        assert await storage.get(b, "only-a") is None
        assert removed(await storage.delete(b, ["only-a"])) == 0
        assert exists(await storage.expire(b, "only-a", 60.0)) is False
        assert await storage.get(a, "only-a") == b"1"

    @_asyncio
    async def test_contract_ttls_expire_in_real_time_and_none_never_expires(self, storage: Any) -> None:
        a, ttl = self.a, self.short_ttl
        await storage.set(a, "short", b"1", ttl)
        await storage.set(a, "forever", b"2", None)
        await storage.set(a, "long", b"3", 60.0)
        await storage.set_many([Entry(a, "batch-short", b"4", ttl), Entry(a, "batch-forever", b"5", None)])
        await storage.set(a, "cleared", b"6", ttl)
        await storage.set(a, "cleared", b"7", None)  # written again without a ttl: no longer expires
        await storage.set(a, "extended", b"8", ttl)
        assert exists(await storage.expire(a, "extended", 60.0)) is True
        await storage.set(a, "shortened", b"9", None)
        assert exists(await storage.expire(a, "shortened", ttl)) is True
        await storage.set(a, "deleted-late", b"10", ttl)
        assert await storage.get(a, "short") == b"1"  # not expired yet

        await self.expire_soon()
        ids = ["short", "forever", "long", "batch-short", "batch-forever", "cleared", "extended", "shortened"]
        assert await storage.get_many(a, ids) == [None, b"2", b"3", None, b"5", b"7", b"8", None]
        for item_id in ("short", "batch-short", "shortened"):
            assert await storage.get(a, item_id) is None, item_id
        assert exists(await storage.expire(a, "short", 60.0)) is False  # an expired value does not exist
        assert await storage.get(a, "short") is None
        assert removed(await storage.delete(a, ["deleted-late", "forever"])) == 1  # only live values count

    @_asyncio
    async def test_contract_status_is_json_with_a_state_and_no_secret(self, storage: Any) -> None:
        await storage.set(self.a, "s", b"1", None)
        await storage.get(self.a, "s")
        status = storage.status()
        text = json.dumps(status)
        assert isinstance(status.get("state"), str) and status["state"]
        for secret in self.secrets:
            assert secret not in text, "status() shows a secret"

    @_asyncio
    @pytest.mark.parametrize("operation", ["get", "get_many", "set", "set_many", "delete", "expire"])
    async def test_contract_unavailable_backend_raises_a_typed_error_in_bounded_time(
            self, unavailable_storage: Any, operation: str) -> None:
        a = self.a
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "get": lambda: unavailable_storage.get(a, "k"),
            "get_many": lambda: unavailable_storage.get_many(a, ["k", "l"]),
            "set": lambda: unavailable_storage.set(a, "k", b"1", 60.0),
            "set_many": lambda: unavailable_storage.set_many([Entry(a, "k", b"1", None),
                                                              Entry(self.b, "k", b"2", 1.0)]),
            "delete": lambda: unavailable_storage.delete(a, ["k"]),
            "expire": lambda: unavailable_storage.expire(a, "k", 60.0),
        }
        await _within(self.unavailable_within, calls[operation])
        await _within(self.unavailable_within, calls[operation])  # and again: failing does not wedge it
        json.dumps(unavailable_storage.status())


class DurableStorageContract(StorageContract):
    """What a `storage.durable` plugin must do on top (ondemand.store.DurableStorage)."""

    protocol = DurableStorage

    @_asyncio
    async def test_contract_get_entry_gives_the_remaining_ttl(self, storage: Any) -> None:
        a, ttl = self.a, self.short_ttl
        assert await storage.get_entry(a, "missing") is None
        await storage.set(a, "forever", b"1", None)
        await storage.set(a, "minute", b"2", 60.0)
        await storage.set(a, "short", b"3", ttl)
        assert (await storage.get_entry(a, "forever"))[:2] == (b"1", None)
        value, remaining, _ = await storage.get_entry(a, "minute")
        assert value == b"2" and isinstance(remaining, float) and 59.0 < remaining <= 60.0
        await asyncio.sleep(0.05)
        value, remaining, _ = await storage.get_entry(a, "minute")
        assert remaining <= 60.0 - 0.05 + 0.01, "the remaining ttl must count down"
        assert exists(await storage.expire(a, "forever", 30.0)) is True
        value, remaining, _ = await storage.get_entry(a, "forever")
        assert value == b"1" and 29.0 < remaining <= 30.0
        await storage.set(a, "minute", b"2", None)
        assert (await storage.get_entry(a, "minute"))[:2] == (b"2", None)
        value, remaining, _ = await storage.get_entry(a, "short")
        assert value == b"3" and 0 < remaining <= ttl
        await self.expire_soon()
        assert await storage.get_entry(a, "short") is None

    @_asyncio
    async def test_contract_get_entries_answers_in_order(self, storage: Any) -> None:
        a, b = self.a, self.b
        await storage.set_many([Entry(a, "x", b"1", None), Entry(a, "y", b"2", 60.0), Entry(b, "z", b"3", None)])
        found = await storage.get_entries(a, ["y", "missing", "x", "z", "y"])
        assert [None if f is None else f[0] for f in found] == [b"2", None, b"1", None, b"2"]
        assert found[2][:2] == (b"1", None)
        assert found[0] is not None and found[0][1] is not None and 0 < found[0][1] <= 60.0
        assert type(found[0][0]) is bytes
        assert found[0][2] == (await storage.get_entry(a, "y"))[2]
        assert await storage.get_entries(a, []) == []
        ids = [f"many{i}" for i in range(1200)]
        await storage.set_many([Entry(a, i, i.encode(), None) for i in ids])
        assert [f[0] for f in await storage.get_entries(a, ids)] == [i.encode() for i in ids]

    @_asyncio
    async def test_contract_versions_grow_per_id_in_commit_order_and_never_come_back(self, storage: Any) -> None:
        a, b = self.a, self.b
        seen: list[int] = []

        def newer(committed: Any) -> int:
            assert isinstance(committed, Committed), f"a durable write must answer a Committed, got {committed!r}"
            assert isinstance(committed.version, int) and committed.version > 0
            assert not seen or committed.version > seen[-1], (
                f"version {committed.version} after {seen[-1]}: versions must grow with every commit of an id")
            seen.append(committed.version)
            return committed.version

        v = newer(await storage.set(a, "v", b"1", None))
        assert (await storage.get_entry(a, "v")).version == v, "get_entry answers the version of the write it reads"
        newer(await storage.set(a, "v", b"2", 60.0))
        newer(await storage.expire(a, "v", 30.0))
        assert await storage.expire(a, "never", 30.0) is None
        deleted = await storage.delete(a, ["v", "never"])
        assert isinstance(deleted, Deleted) and deleted.removed == 1
        assert [c.id for c in deleted.committed] == ["v", "never"], "a delete versions every id, in order"
        newer(deleted.committed[0])
        newer(await storage.set(a, "v", b"3", None))  # re-inserted after the delete: still newer
        assert (await storage.get_entry(a, "v")).version == seen[-1]
        committed = await storage.set_many([Entry(a, "v", b"4", None), Entry(b, "v", b"b", None),
                                            Entry(a, "v", b"5", None)])
        assert [(c.namespace.name, c.id) for c in committed] == [("a", "v"), ("b", "v"), ("a", "v")]
        assert committed[0] == committed[2], "duplicates in one set_many share the version their id got"
        newer(committed[2])
        assert (await storage.get_entry(a, "v"))[::2] == (b"5", seen[-1])

    @_asyncio
    async def test_contract_concurrent_writes_of_one_id_end_with_the_highest_version(self, storage: Any) -> None:
        """Whatever order they commit in, the value the store ends up holding is the one with the highest version:
        a cache that keeps the highest version it saw then holds what the store holds."""
        a = self.a
        for round_ in range(100):  # a fresh id each round: first inserts race deletes too
            item_id = f"race{round_}"
            writes = [storage.set(a, item_id, b"%d" % n, None) for n in range(6)]
            writes[1:1] = [storage.delete(a, [item_id]) for _ in range(3)]
            results = await asyncio.gather(*writes)
            sets, deletes = [results[0], *results[4:]], results[1:4]
            last = max([r.version for r in sets] + [r.committed[0].version for r in deletes])
            entry = await storage.get_entry(a, item_id)
            if any(r.committed[0].version == last for r in deletes):
                assert entry is None, "the delete had the highest version, yet a value remains"
            else:
                assert entry is not None and entry.version == last, "the value held is not the latest version's"
                assert entry.value == b"%d" % next(n for n, r in enumerate(sets) if r.version == last)

    @_asyncio
    async def test_contract_set_if_writes_only_over_the_value_it_names(self, storage: Any) -> None:
        """(An optional protocol, WritesConditionally: what get_or_compute writes a loaded value with.) Of writers
        racing with one condition exactly one wins; a value of another version stays; an expired value is none."""
        if not isinstance(storage, WritesConditionally):
            pytest.skip(f"{type(storage).__name__} has no conditional write (WritesConditionally)")
        a = self.a
        results = await asyncio.gather(*(storage.set_if(a, "once", b"%d" % n, None, version=None) for n in range(8)))
        won = [(n, r) for n, r in enumerate(results) if r is not None]
        assert len(won) == 1, f"{len(won)} writes of one absent id, each if it was absent, took effect"
        first = won[0][1]
        entry = await storage.get_entry(a, "once")
        assert entry is not None and entry.value == b"%d" % won[0][0] and entry.version == first.version
        racing = await asyncio.gather(*(storage.set_if(a, "once", b"r%d" % n, None, version=first.version)
                                        for n in range(8)))
        after = [r for r in racing if r is not None]
        assert len(after) == 1 and after[0].version > first.version, "one write over the version it named"
        later = await storage.set(a, "once", b"later", None)
        assert await storage.set_if(a, "once", b"loaded", None, version=None) is None
        assert await storage.set_if(a, "once", b"loaded", None, version=after[0].version) is None
        assert (await storage.get_entry(a, "once"))[::2] == (b"later", later.version)
        await storage.delete(a, ["once"])
        assert await storage.set_if(a, "once", b"loaded", None, version=later.version) is None, "a deleted value"
        await storage.set(a, "brief", b"expiring", 0.05)
        await asyncio.sleep(0.3)
        again = await storage.set_if(a, "brief", b"loaded", 60, version=None)
        assert again is not None and (await storage.get_entry(a, "brief")).value == b"loaded"

    @_asyncio
    async def test_contract_set_many_is_all_or_nothing_to_a_concurrent_reader(self, storage: Any) -> None:
        a = self.a
        ids = [f"atomic{i}" for i in range(200)]
        generations = [b"gen%d" % n for n in range(3)]
        await storage.set_many([Entry(a, i, generations[0], None) for i in ids])
        seen: list[set[bytes | None]] = []
        writing = True

        async def reader() -> None:
            while writing:
                seen.append(set(await storage.get_many(a, ids)))
                await asyncio.sleep(0)

        task = asyncio.ensure_future(reader())
        try:
            for generation in generations[1:]:
                await storage.set_many([Entry(a, i, generation, None) for i in ids])
                await asyncio.sleep(0.01)
        finally:
            writing = False
            await task
        assert seen, "the reader never ran"
        torn = [sorted(s, key=repr) for s in seen if len(s) != 1]
        assert not torn, f"a reader saw a set_many half written: {torn[:3]}"
        assert set(await storage.get_many(a, ids)) == {generations[-1]}

    @_asyncio
    async def test_contract_outbox_answers_rows_oldest_first_and_forgets_acknowledged_ones(self, storage: Any) -> None:
        if not isinstance(storage, InvalidationOutbox):
            pytest.skip(f"{type(storage).__name__} carries no invalidation outbox")
        a, b = self.a, self.b
        assert await storage.pending_invalidations(10, 0.0) == []
        await storage.record_invalidations([Target(a, "x", 7), Target(b, "x"), Target(a, "ключ", None)])
        await storage.record_invalidations([Target(a, "y", 2**62)])
        pending = await storage.pending_invalidations(10, 3600.0)  # recorded for delivery: due at once
        assert [row[1:] for row in pending] == [("a", "x", 7), ("b", "x", None), ("a", "ключ", None),
                                                ("a", "y", 2**62)]
        seqs = [row.seq for row in pending]
        assert seqs == sorted(set(seqs)), "sequence numbers must be distinct and grow"
        assert [row[0] for row in await storage.pending_invalidations(2, 3600.0)] == seqs[:2]
        await storage.ack_invalidations([seqs[0], seqs[3]])
        assert [row[0] for row in await storage.pending_invalidations(10, 3600.0)] == seqs[1:3]
        await storage.record_invalidations([Target(a, "z", 1)])
        newest = (await storage.pending_invalidations(10, 3600.0))[-1]
        assert newest[1:] == ("a", "z", 1) and newest[0] > seqs[3], "a sequence number must never come back"
        await storage.ack_invalidations([row[0] for row in await storage.pending_invalidations(10, 3600.0)])
        assert await storage.pending_invalidations(10, 0.0) == []
        loop = asyncio.get_running_loop()
        started = loop.time()
        await storage.wait_for_invalidations(0.2)
        assert loop.time() - started < 0.2 + 0.5

    @_asyncio
    async def test_contract_every_write_records_its_keys_for_after_the_grace(self, storage: Any) -> None:
        if not isinstance(storage, InvalidationOutbox):
            pytest.skip(f"{type(storage).__name__} carries no invalidation outbox")
        a, b = self.a, self.b
        s = await storage.set(a, "s", b"1", None)
        m = await storage.set_many([Entry(a, "m", b"1", None), Entry(b, "m", b"2", None)])
        e = await storage.expire(a, "m", 60.0)
        d = await storage.delete(a, ["s", "never"])
        written = [s, *m, e, *d.committed]
        assert all(c.outbox is not None for c in written), f"a write records its outbox rows: {written}"
        assert await storage.pending_invalidations(100, 3600.0) == [], "not due before the grace"
        await asyncio.sleep(0.05)
        rows = await storage.pending_invalidations(100, 0.01)  # unacknowledged past the grace: due
        assert [(row.seq, row.namespace, row.id, row.version) for row in rows] == [
            (c.outbox, c.namespace.name, c.id, c.version) for c in written]
        await storage.ack_invalidations([c.outbox for c in written])  # what a writer does after its cache write
        assert await storage.pending_invalidations(100, 0.0) == []

    @_asyncio
    async def test_contract_outbox_rows_ride_with_the_writes_that_ask(self, storage: Any) -> None:
        if not isinstance(storage, InvalidationOutbox):
            pytest.skip(f"{type(storage).__name__} carries no invalidation outbox")
        a, b = self.a, self.b
        s = await storage.set(a, "s", b"1", None, invalidate=True)
        m = await storage.set_many([Entry(a, "m", b"1", None), Entry(b, "m", b"2", None)], invalidate=True)
        e = await storage.expire(a, "m", 60.0, invalidate=True)
        d = await storage.delete(a, ["s", "never"], invalidate=True)
        await storage.set(a, "quiet", b"1", None)  # not asked: not due before the grace
        rows = [row[1:] for row in await storage.pending_invalidations(100, 3600.0)]
        assert rows[:1] == [("a", "s", s.version)]
        assert sorted(rows[1:3]) == sorted([("a", "m", m[0].version), ("b", "m", m[1].version)])
        assert rows[3] == ("a", "m", e.version)
        assert sorted(rows[4:]) == sorted((c.namespace.name, c.id, c.version) for c in d.committed)
        assert removed(d) == 1
        assert await storage.get_many(a, ["s", "m", "quiet"]) == [None, b"1", b"1"]  # and the writes happened

    @_asyncio
    @pytest.mark.parametrize("operation", ["get_entry", "get_entries"])
    async def test_contract_unavailable_backend_fails_durable_reads_in_bounded_time(
            self, unavailable_storage: Any, operation: str) -> None:
        a = self.a
        call = getattr(unavailable_storage, operation)
        await _within(self.unavailable_within, lambda: call(a, "k" if operation == "get_entry" else ["k", "l"]))


class CacheStorageContract(StorageContract):
    """What a `storage.cache` plugin must do on top (ondemand.store.CacheStorage)."""

    protocol = CacheStorage
    max_items: ClassVar[int] = 100

    @_asyncio
    async def test_contract_ping_answers(self, storage: Any) -> None:
        assert await storage.ping() is None

    @_asyncio
    async def test_contract_a_versioned_write_never_replaces_a_newer_version(self, storage: Any) -> None:
        a = self.a
        await storage.set(a, "w", b"five", None, 5)
        assert await storage.get(a, "w") == b"five"
        await storage.set(a, "w", b"three", None, 3)  # a write that committed earlier, arriving late
        assert await storage.get(a, "w") == b"five", "an older version replaced a newer one"
        await storage.set(a, "w", b"five again", None, 5)  # the same version: nothing to do
        assert await storage.get(a, "w") == b"five"
        await storage.set(a, "w", b"nine", 60.0, 9)
        assert await storage.get(a, "w") == b"nine"
        await storage.set(a, "w", b"ten", None, 10)
        await storage.set_many([Entry(a, "w", b"eight", None, 8), Entry(a, "n", b"new", None, 1)])
        assert await storage.get_many(a, ["w", "n"]) == [b"ten", b"new"]
        assert await storage.put_back(a, "w", b"seven", None, 7) is False
        assert await storage.put_back(a, "w", b"ten", None, 10) is False
        assert await storage.get(a, "w") == b"ten"
        assert await storage.put_back(a, "w", b"eleven", None, 11) is True  # a newer read: put back
        assert await storage.get(a, "w") == b"eleven"
        assert await storage.put_back(a, "fresh", b"1", None, 4) is True  # absent: put back
        assert await storage.put_back(a, "fresh", b"0", None, 4) is False  # the same version: kept as it is
        assert await storage.get(a, "fresh") == b"1"
        await storage.set(a, "w", b"plain", None)  # no version: written whatever is there
        assert await storage.get(a, "w") == b"plain"

    @_asyncio
    async def test_contract_a_tombstone_refuses_older_versions_and_keeps_newer_values(self, storage: Any) -> None:
        a = self.a
        await storage.set(a, "t", b"v5", None, 5)
        await storage.invalidate([Target(a, "t", 7)])  # a delete (or a write) with version 7
        assert await storage.get(a, "t") is None
        await storage.set(a, "t", b"v6", None, 6)  # a write that committed before it, arriving late
        assert await storage.put_back(a, "t", b"v5", None, 5) is False  # a read from before it
        assert await storage.get(a, "t") is None, "a write under a newer tombstone was applied"
        assert await storage.put_back(a, "t", b"v7", None, 7) is True  # what the durable store holds now
        assert await storage.get(a, "t") == b"v7"
        await storage.invalidate([Target(a, "t", 7)])  # a late delivery of the same version: a no-op
        assert await storage.get(a, "t") == b"v7"
        await storage.set(a, "t", b"v9", None, 9)
        await storage.invalidate([Target(a, "t", 8), Target(a, "u", 3)])  # older than what is held: a no-op
        assert await storage.get(a, "t") == b"v9", "a late invalidation removed a newer value"
        assert await storage.put_back(a, "u", b"u2", None, 2) is False  # (never held: the tombstone counts)
        assert await storage.put_back(a, "u", b"u3", None, 3) is True
        await storage.invalidate([Target(self.b, "c"), Target(a, "t", 12)])  # cache-only: deleted
        await storage.set(self.b, "c", b"1", None)
        await storage.invalidate([Target(self.b, "c")])
        assert await storage.get_many(self.b, ["c"]) == [None]
        assert await storage.get(a, "t") is None
        await storage.set(a, "t", b"v13", None, 13)
        assert await storage.get(a, "t") == b"v13"

    @_asyncio
    async def test_contract_put_back_refuses_an_id_deleted_from_a_durable_namespace(self, storage: Any) -> None:
        a = self.a
        assert a.durable
        await storage.set(a, "t", b"1", None, 1)
        assert removed(await storage.delete(a, ["t"])) == 1
        assert await storage.put_back(a, "t", b"1", None, 1) is False, "a put-back revived a deleted value"
        assert await storage.put_back(a, "t", b"2", None, 2) is False, "an unversioned tombstone refuses any"
        assert await storage.get(a, "t") is None
        # The cache never held it (the read that missed it went to the durable store): still refused.
        assert removed(await storage.delete(a, ["never-cached"])) == 0
        assert await storage.put_back(a, "never-cached", b"1", None, 1) is False
        assert await storage.get(a, "never-cached") is None
        assert await storage.get_many(a, ["t", "never-cached"]) == [None, None]  # no marker shows as a value
        await storage.invalidate([Target(a, "u", None)])  # invalidate without a version: the same
        assert await storage.put_back(a, "u", b"1", None, 99) is False
        # Only put-backs are refused: a write stores the id again at once.
        await storage.set(a, "t", b"2", None, 2)
        assert await storage.get(a, "t") == b"2"
        await storage.set(a, "never-cached", b"3", None)
        assert await storage.get(a, "never-cached") == b"3"
        assert await storage.put_back(a, "fresh", b"1", None, 1) is True  # other ids are unaffected

    @_asyncio
    async def test_contract_put_back_repairs_a_corrupt_value_of_its_version(self, storage: Any) -> None:
        a = self.a
        await storage.set(a, "c", b"{not json", None, 4)
        assert await storage.put_back(a, "c", b"{}", None, 4) is False
        assert await storage.put_back(a, "c", b"{}", None, 4, repair=True) is True
        assert await storage.get(a, "c") == b"{}"
        assert await storage.put_back(a, "c", b"{}", None, 3, repair=True) is False  # never an older one

    @_asyncio
    async def test_contract_put_back_set_and_append_list_honour_ttls(self, storage: Any) -> None:
        a, b, ttl = self.a, self.b, self.short_ttl
        assert await storage.put_back(a, "short", b"1", ttl, 1) is True
        assert await storage.put_back(a, "forever", b"2", None, 1) is True
        await storage.set(a, "versioned-short", b"3", ttl, 1)
        await storage.set(a, "versioned-cleared", b"4", ttl, 1)
        await storage.set(a, "versioned-cleared", b"5", None, 2)  # written again without a ttl: no longer expires
        assert await storage.append_list(b, "list-short", b"[1]", 1, ttl, self.max_items) == 1
        assert await storage.append_list(b, "list-forever", b"[1]", 1, None, self.max_items) == 1
        await storage.set(b, "list-cleared", b"[0]", ttl)
        assert await storage.append_list(b, "list-cleared", b"[1]", 1, None, self.max_items) == 2
        await self.expire_soon()
        found = await storage.get_many(a, ["short", "forever", "versioned-short", "versioned-cleared"])
        assert found == [None, b"2", None, b"5"]
        found = await storage.get_many(b, ["list-short", "list-forever", "list-cleared"])
        assert found[0] is None
        assert [json.loads(raw) for raw in found[1:]] == [[1], [0, 1]]
        assert await storage.put_back(a, "short", b"3", None, 1) is True  # expired: absent again

    @_asyncio
    async def test_contract_append_list_creates_appends_and_keeps_numbers(self, storage: Any) -> None:
        b, m = self.b, self.max_items
        assert await storage.append_list(b, "l", b'[{"n":1}]', 1, None, m) == 1
        assert json.loads(await storage.get(b, "l")) == [{"n": 1}]
        assert await storage.append_list(b, "l", b'[{"n":2},"three"]', 2, None, m) == 3
        assert json.loads(await storage.get(b, "l")) == [{"n": 1}, {"n": 2}, "three"]
        # The stored text is never re-encoded: numbers a JSON library might round come back as written.
        await storage.set(b, "nums", b"[12345678901234567890, 0.1, 1e300, -0.0]\n", None)
        assert await storage.append_list(b, "nums", b"[9007199254740993]", 1, None, m) == 5
        assert json.loads(await storage.get(b, "nums")) == [12345678901234567890, 0.1, 1e300, -0.0, 9007199254740993]
        await storage.set(b, "empty", b"[]", None)
        assert await storage.append_list(b, "empty", b"[1,2]", 2, None, m) == 2
        assert json.loads(await storage.get(b, "empty")) == [1, 2]

    @_asyncio
    async def test_contract_append_list_caps_and_refuses_a_non_list_writing_nothing(self, storage: Any) -> None:
        b = self.b
        assert await storage.append_list(b, "capped", b"[1,2]", 2, None, 3) == 2
        with pytest.raises(InvalidInput) as too_long:
            await storage.append_list(b, "capped", b"[3,4]", 2, None, 3)
        assert str(too_long.value) == str(b.list_too_long("capped", 4, 3))
        assert json.loads(await storage.get(b, "capped")) == [1, 2]
        with pytest.raises(InvalidInput):
            await storage.append_list(b, "new", b"[1,2,3,4]", 4, None, 3)
        assert await storage.get(b, "new") is None
        for stored in (b'{"not": "a list"}', b'"text"', b"12"):
            await storage.set(b, "obj", stored, None)
            with pytest.raises(Conflict) as conflict:
                await storage.append_list(b, "obj", b"[1]", 1, None, 3)
            assert str(conflict.value) == str(b.not_a_list("obj"))
            assert await storage.get(b, "obj") == stored

    @_asyncio
    async def test_contract_append_list_counts_corrupt_text_as_empty(self, storage: Any) -> None:
        b = self.b
        await storage.set(b, "corrupt", b"[1, 2", None)  # not JSON: a read treats it as absent
        assert await storage.append_list(b, "corrupt", b'["fresh"]', 1, None, self.max_items) == 1
        assert json.loads(await storage.get(b, "corrupt")) == ["fresh"]

    @_asyncio
    async def test_contract_append_list_is_atomic_under_concurrent_appends(self, storage: Any) -> None:
        b = self.b
        lengths = await asyncio.gather(*(storage.append_list(b, "busy", b'[{"i":%d}]' % i, 1, None, self.max_items)
                                         for i in range(50)))
        assert sorted(lengths) == list(range(1, 51)), "each append must see the list its predecessors left"
        stored = json.loads(await storage.get(b, "busy"))
        assert sorted(item["i"] for item in stored) == list(range(50))

    @_asyncio
    async def test_contract_delete_keys_deletes_full_keys(self, storage: Any) -> None:
        a, b = self.a, self.b
        await storage.set_many([Entry(a, "k1", b"1", None), Entry(a, "k2", b"2", None), Entry(b, "k1", b"3", None)])
        assert await storage.delete_keys([a.key("k1"), a.key("missing"), b.key("k1")]) == 2
        assert await storage.get_many(a, ["k1", "k2"]) == [None, b"2"]
        assert await storage.get(b, "k1") is None
        assert await storage.delete_keys([]) == 0

    @_asyncio
    async def test_contract_delete_prefix_deletes_a_namespace_literally(self, storage: Any) -> None:
        # Glob characters in a prefix are literal: "g*?[a]\:" must not match the namespace "gzza".
        g = Namespace("g", None, False, "default", f"{self.key_prefix}:g*?[a]\\:")
        near = Namespace("gzza", None, False, "default", f"{self.key_prefix}:gzza:")
        await storage.set_many([Entry(g, f"k{i}", b"1", None) for i in range(2500)])  # more than one batch
        await storage.set_many([Entry(near, "k1", b"2", None), Entry(self.b, "k1", b"3", None)])
        assert await storage.delete_prefix(g.key_prefix) == 2500
        assert await storage.get_many(g, ["k0", "k2499"]) == [None, None]
        assert await storage.get(near, "k1") == b"2"
        assert await storage.get(self.b, "k1") == b"3"
        assert await storage.delete_prefix(g.key_prefix) == 0

    @_asyncio
    @pytest.mark.parametrize("operation",
                             ["ping", "put_back", "invalidate", "append_list", "delete_keys", "delete_prefix"])
    async def test_contract_unavailable_backend_fails_cache_operations_in_bounded_time(
            self, unavailable_storage: Any, operation: str) -> None:
        b = self.b
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "ping": lambda: unavailable_storage.ping(),
            "put_back": lambda: unavailable_storage.put_back(self.a, "k", b"1", 60.0, 1),
            "invalidate": lambda: unavailable_storage.invalidate([Target(self.a, "k", 1), Target(b, "k")]),
            "append_list": lambda: unavailable_storage.append_list(b, "k", b"[1]", 1, None, self.max_items),
            "delete_keys": lambda: unavailable_storage.delete_keys([b.key("k")]),
            "delete_prefix": lambda: unavailable_storage.delete_prefix(b.key_prefix),
        }
        await _within(self.unavailable_within, calls[operation])
