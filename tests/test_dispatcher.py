"""Dispatcher.get_many: one cache round trip, the rest from the durable store, put back like lookup does."""

from __future__ import annotations

import pytest

from ondemand import Runtime
from ondemand.errors import InvalidInput


async def test_get_many_reads_through_and_puts_back(durable_config) -> None:
    async with Runtime(durable_config()) as rt:
        d = rt.dispatcher
        await d.set("session", "a", {"v": "a"}, ttl=60)
        await d.set("session", "b", {"v": "b"}, ttl=60)
        await d.set("session", "c", {"v": "c"})
        # Only the durable store holds b and c now; c's cached copy is not even JSON (the version it says is
        # the durable one's: only a repair replaces it).
        version = (await rt.durable_storage.get_entry(d.namespace("session"), "c")).version
        await rt.on_demand.with_connection(lambda r: r.delete("ondemand:session:b"))
        await rt.on_demand.with_connection(lambda r: r.hset("ondemand:session:c", mapping={"v": b"{not json",
                                                                                         "n": version}))

        assert await d.get_many("session", ["c", "absent", "a", "b"]) == [{"v": "c"}, None, {"v": "a"}, {"v": "b"}]
        stats = rt.dispatcher.stats["session"]
        assert (stats.hits, stats.durable_hits, stats.misses, stats.corrupt_values) == (1, 2, 1, 1)

        # Put back: the cache serves b and c now, with a ttl no longer than the durable record's.
        for item_id in ("b", "c"):
            found = await d.lookup("session", item_id)
            assert found.source == "redis" and found.value == {"v": item_id}
        ttl_b = await rt.on_demand.with_connection(lambda r: r.pttl("ondemand:session:b"))
        assert 0 < ttl_b <= 60_000


async def test_get_many_refuses_a_bad_id_before_any_read(runtime: Runtime) -> None:
    with pytest.raises(InvalidInput, match="id must not be empty"):
        await runtime.dispatcher.get_many("profile", ["ok", ""])
    assert runtime.dispatcher.stats["profile"].misses == 0


async def test_get_many_in_a_cache_only_namespace(runtime: Runtime) -> None:
    d = runtime.dispatcher
    await d.set("profile", "x", [1, 2])
    assert await d.get_many("profile", ["x", "y"]) == [[1, 2], None]
    assert await d.get_many("profile", []) == []


async def test_get_many_does_not_put_back_an_id_deleted_moments_ago(durable_config, monkeypatch) -> None:
    async with Runtime(durable_config()) as rt:
        d = rt.dispatcher
        ns = d.namespace("session")
        await d.set("session", "gone", {"v": 1})
        before = await rt.durable_storage.get_entries(ns, ["gone"])  # a read just before the delete...
        await d.delete("session", "gone")

        async def read_before_the_delete(self, ns, ids):
            return before

        monkeypatch.setattr(type(rt.durable_storage), "get_entries", read_before_the_delete)
        assert await d.get_many("session", ["gone"]) == [{"v": 1}]  # ...answered after it
        # ...but the delete's tombstone kept the put-back from reviving it in the cache.
        assert await rt.on_demand.with_connection(lambda r: r.hexists("ondemand:session:gone", "v")) == 0
        monkeypatch.undo()
        assert await d.get_many("session", ["gone"]) == [None]
