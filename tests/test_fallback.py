"""Fallback to the durable store: real faults (SIGKILL, SIGSTOP, a stopped server), no lost write, no stale read.

The tests where the durable store matters run against both durable backends (`durable_backend`):
PostgreSQL and SQLite. The PostgreSQL-only ones stop its server in ways SQLite has no counterpart for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time

import pytest

from ondemand import Runtime
from ondemand.config.load import merge
from ondemand.errors import Conflict, InvalidInput, PostgresUnavailable, StorageUnavailable
from ondemand.web import create_app
from tests.support import wait_for


async def stop_keeping_address(pg) -> None:
    """Stop the postmaster but keep its socket directory, so the same DSN works once it restarts."""
    pg.child.signal(signal.SIGINT)
    await asyncio.wait_for(pg.child.process.wait(), 10)


class DurableBackend:
    """A durable store a test runs against: `name` (the lookup source), `config(overrides)`, and a fault
    that stops it serving writes (`stop()`) and its repair (`start()`)."""

    def __init__(self, name, config, stop, start) -> None:
        self.name, self.config, self.stop, self.start = name, config, stop, start


@pytest.fixture(params=["postgres", "sqlite"])
def durable_backend(request, make_config, tmp_path):
    """PostgreSQL (this test's own server; stop() stops the postmaster) or SQLite (a file of this test's;
    stop() has another connection take the write lock and hold it, so writes fail after busy_timeout)."""
    if request.param == "postgres":
        pg = request.getfixturevalue("pg")
        yield DurableBackend("postgres", request.getfixturevalue("durable_config"),
                             lambda: stop_keeping_address(pg), pg.start)
        return
    path = tmp_path / "durable.sqlite3"
    held: list[sqlite3.Connection] = []

    def config(overrides=None):
        return make_config(merge({"storage": {"durable": "sqlite"},
                                  "sqlite": {"path": str(path), "busy_timeout": 0.2, "op_timeout": 0.5}},
                                 overrides or {}))

    async def stop() -> None:
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        held.append(lock)

    async def start() -> None:
        while held:
            held.pop().close()  # rolls the transaction back, releasing the lock

    yield DurableBackend("sqlite", config, stop, start)
    for lock in held:
        lock.close()


async def test_sigkill_of_redis_under_load_loses_no_acknowledged_write(durable_backend) -> None:
    config = durable_backend.config({"lifecycle": {"restart_backoff": 0.05}})
    async with Runtime(config) as rt:
        acknowledged: dict[str, int] = {}
        errors: list[BaseException] = []
        await rt.cache.get_session("warm")  # Redis running before the load starts

        async def worker(n: int) -> None:
            for i in range(50):
                key = f"w{n}-{i % 10}"
                try:
                    await rt.cache.cache_session(key, {"n": n, "i": i})
                    acknowledged[key] = i
                    value = await rt.cache.get_session(key)
                    assert value is not None and value["n"] == n
                except Exception as exc:
                    errors.append(exc)

        async def killer() -> None:
            await asyncio.sleep(0.15)
            os.kill(rt.on_demand.lifecycle.pid(), signal.SIGKILL)

        await asyncio.gather(killer(), *(worker(n) for n in range(20)))
        assert errors == []
        assert rt.on_demand.counters.unexpected_exits == 1
        assert len(acknowledged) == 200  # 20 workers x 10 distinct keys
        for key, i in acknowledged.items():
            assert (await rt.cache.get_session(key))["i"] == i
        await wait_for(lambda: rt.dispatcher.breaker.closed, timeout=5)
        for key, i in acknowledged.items():
            assert (await rt.cache.get_session(key))["i"] == i


async def test_sigstop_falls_back_within_250ms_and_sigcont_recovers(durable_backend) -> None:
    config = durable_backend.config({"redis": {"op_timeout": 0.1}})
    async with Runtime(config) as rt:
        await rt.cache.cache_session("s", {"v": 0})
        pid = rt.on_demand.lifecycle.pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            latencies = []
            for i in range(1, 8):
                t0 = time.monotonic()
                await rt.cache.cache_session("s", {"v": i})
                assert await rt.cache.get_session("s") == {"v": i}
                latencies.append(time.monotonic() - t0)
            assert max(latencies) < 0.25, latencies
            assert rt.dispatcher.breaker.state != "closed"
            assert latencies[-1] < 0.05, "with the breaker open Redis costs no network time"
            counters = rt.on_demand.counters
            assert counters.timeouts >= 1 and counters.errors >= counters.timeouts, counters
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: rt.dispatcher.breaker.closed, timeout=5)
        # The frozen Redis still held {"v": 0} (and maybe late SETs); recovery invalidated the key.
        found = await rt.dispatcher.lookup("session", "s")
        assert found.value == {"v": 7}
        found = await rt.dispatcher.lookup("session", "s")
        assert found.source == "redis" and found.value == {"v": 7}


async def test_external_redis_returning_with_old_values_serves_no_stale_session(durable_backend, make_config) -> None:
    # The "external" Redis is one our subprocess lifecycle runs over TCP; SIGSTOP makes it unreachable
    # while it keeps its data, like a network partition.
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as server:
        endpoint = await server.on_demand.ensure()
        url = f"redis://:{endpoint.password}@127.0.0.1:{endpoint.port}/0"
        config = durable_backend.config({"lifecycle": {"plugin": "external", "redis_url": url},
                                 "redis": {"op_timeout": 0.1}})
        async with Runtime(config) as rt:
            for i in range(20):
                await rt.cache.cache_session(f"s{i}", {"v": "old"})
            await rt.cache.delete_session("s19")
            pid = server.on_demand.lifecycle.pid()
            os.kill(pid, signal.SIGSTOP)
            try:
                for i in range(19):
                    await rt.cache.cache_session(f"s{i}", {"v": "new"})
                await rt.cache.cache_session("s19", {"v": "new"})
                await rt.cache.delete_session("s18")
                for i in range(18):
                    assert await rt.cache.get_session(f"s{i}") == {"v": "new"}
            finally:
                os.kill(pid, signal.SIGCONT)
            # From the moment Redis answers again, no read may see "old".
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                for i in range(18):
                    assert await rt.cache.get_session(f"s{i}") == {"v": "new"}
                assert await rt.cache.get_session("s18") is None
                assert await rt.cache.get_session("s19") == {"v": "new"}
                if rt.dispatcher.breaker.closed:
                    break
                await asyncio.sleep(0.02)
            assert rt.dispatcher.breaker.closed
            for i in range(18):
                assert (await rt.dispatcher.lookup("session", f"s{i}")).value == {"v": "new"}
            assert await rt.cache.get_session("s18") is None


async def test_postgres_down_at_startup_then_recovers(make_config, pg_template) -> None:
    from tests.support import embedded_postgres

    async with embedded_postgres(template=pg_template) as pg:
        dsn = pg.dsn
        data_dir = pg.data_dir
        await stop_keeping_address(pg)
        config = make_config({"storage": {"durable": "postgres"},
                              "postgres": {"dsn": dsn, "connect_timeout": 0.3, "statement_timeout": 0.5}})
        async with Runtime(config) as rt:  # starts although PostgreSQL is down
            t0 = time.monotonic()
            with pytest.raises(PostgresUnavailable):
                await rt.cache.cache_session("s", {"v": 1})
            assert time.monotonic() - t0 < 2
            status = rt.status()["storages"]["durable"]
            assert status["state"] != "up"
            # Cache-only namespaces keep working meanwhile.
            await rt.cache.cache_profile("p", {"ok": 1})
            assert await rt.cache.get_profile("p") == {"ok": 1}
            await pg.start()
            assert pg.data_dir == data_dir and pg.dsn == dsn
            deadline = time.monotonic() + 10
            while True:
                try:
                    await rt.cache.cache_session("s", {"v": 2})
                    break
                except PostgresUnavailable:
                    assert time.monotonic() < deadline, "did not recover"
                    await asyncio.sleep(0.1)
            assert await rt.cache.get_session("s") == {"v": 2}
            assert rt.status()["storages"]["durable"]["state"] == "up"


async def test_both_down_gives_503_then_recovers(aiohttp_client, durable_backend) -> None:
    config = durable_backend.config({"redis": {"op_timeout": 0.1}, "lifecycle": {"restart_backoff": 0.05}})
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/api/cache/session/test", json={"session_id": "a", "data": {"v": 1}})
    assert resp.status == 200
    rt_status = await (await client.get("/api/cache/status")).json()
    redis_pid = rt_status["redis"]["pid"]
    os.kill(redis_pid, signal.SIGSTOP)
    await durable_backend.stop()
    try:
        t0 = time.monotonic()
        resp = await client.post("/api/cache/session/test", json={"session_id": "a", "data": {"v": 2}})
        assert resp.status == 503
        body = await resp.json()
        assert body["error"]["code"] in {f"{durable_backend.name}_unavailable", "storage_unavailable"}
        assert time.monotonic() - t0 < 3
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    await durable_backend.start()
    deadline = time.monotonic() + 10
    while True:
        resp = await client.post("/api/cache/session/test", json={"session_id": "a", "data": {"v": 3}})
        if resp.status == 200:
            break
        assert time.monotonic() < deadline, await resp.text()
        await asyncio.sleep(0.1)
    assert (await resp.json())["session"] == {"v": 3}


async def test_both_down_read_is_a_typed_error(durable_config, pg) -> None:
    async with Runtime(durable_config({"redis": {"op_timeout": 0.1}})) as rt:
        await rt.cache.cache_session("s", {"v": 1})
        os.kill(rt.on_demand.lifecycle.pid(), signal.SIGKILL)
        await stop_keeping_address(pg)
        with pytest.raises(StorageUnavailable, match="both unavailable"):
            await rt.cache.get_session("s")


async def test_ttl_is_honoured_in_both_stores(durable_backend) -> None:
    async with Runtime(durable_backend.config()) as rt:
        await rt.cache.cache_session("short", {"v": 1}, ttl=0.3)
        assert await rt.cache.get_session("short") == {"v": 1}
        await asyncio.sleep(0.5)
        assert await rt.cache.get_session("short") is None
        # A value put back from the durable store keeps its remaining lifetime, not the namespace's ttl.
        await rt.cache.cache_session("back", {"v": 1}, ttl=0.6)
        await rt.on_demand.with_connection(lambda r: r.delete("ondemand:session:back"))
        assert (await rt.dispatcher.lookup("session", "back")).source == durable_backend.name
        pttl = await rt.on_demand.with_connection(lambda r: r.pttl("ondemand:session:back"))
        assert 0 < pttl <= 600
        await asyncio.sleep(0.8)
        assert await rt.cache.get_session("back") is None


async def test_cache_only_namespace_with_redis_down_misses_and_counts_drops(durable_backend) -> None:
    config = durable_backend.config({"lifecycle": {"redis_binary": "/nonexistent/redis-server"}})
    async with Runtime(config) as rt:
        await rt.cache.cache_profile("p", {"v": 1})
        assert await rt.cache.get_profile("p") is None
        stats = rt.status()["dispatcher"]["namespaces"]["profile"]
        assert stats["dropped_writes"] == 1
        # Durable namespaces are still served, from the durable store.
        await rt.cache.cache_session("s", {"v": 1})
        found = await rt.dispatcher.lookup("session", "s")
        assert found == found.__class__({"v": 1}, durable_backend.name)
        assert rt.status()["dispatcher"]["namespaces"]["session"]["fallback_reads"] >= 1


async def test_a_read_racing_a_delete_does_not_bring_the_session_back(durable_backend, monkeypatch) -> None:
    """A read that missed Redis puts the durable value back; a delete landing between that read of
    the durable store and the put-back must win (a logged-out session must not come back for its ttl)."""
    async with Runtime(durable_backend.config()) as rt:
        await rt.cache.cache_session("s", {"v": 1})
        key = rt.dispatcher.namespace("session").key("s")
        await rt.on_demand.execute("DEL", key)  # gone from Redis only: the next read goes to the durable store
        read, deleted = asyncio.Event(), asyncio.Event()
        real_get_entry = type(rt.dispatcher.durable).get_entry

        async def read_then_wait_for_the_delete(self, ns, item_id):
            entry = await real_get_entry(self, ns, item_id)  # the real read, before the delete
            read.set()
            await deleted.wait()
            return entry

        monkeypatch.setattr(type(rt.dispatcher.durable), "get_entry", read_then_wait_for_the_delete)
        lookup = asyncio.ensure_future(rt.dispatcher.lookup("session", "s"))
        await asyncio.wait_for(read.wait(), 5)
        assert await rt.dispatcher.delete("session", "s") == 1
        deleted.set()
        assert (await lookup).value == {"v": 1}  # read before the delete: a fine answer for that read
        monkeypatch.undo()
        assert await rt.on_demand.execute("HGET", key, "v") is None, "the put-back revived a deleted session"
        assert (await rt.dispatcher.lookup("session", "s")).source == "miss"
        # The tombstone only blocks put-backs: writing the id again works at once, from Redis.
        await rt.cache.cache_session("s", {"v": 2})
        found = await rt.dispatcher.lookup("session", "s")
        assert found.source == "redis" and found.value == {"v": 2}


async def test_append_to_a_durable_list_goes_through_the_durable_store(durable_backend) -> None:
    """A durable namespace has no atomic append: read, then write through the durable store, with the same
    rules as the cache's atomic append (length cap, a stored non-list refused, nothing written then)."""
    config = durable_backend.config({"namespaces": {"messages": {"durable": True}}})
    async with Runtime(config) as rt:
        dispatcher = rt.dispatcher
        assert await dispatcher.append("messages", "u", [{"n": 1}], max_items=3) == 1
        assert await dispatcher.append("messages", "u", [{"n": 2}, {"n": 3}], max_items=3) == 3
        with pytest.raises(InvalidInput, match="at most 3 items; this would make 4"):
            await dispatcher.append("messages", "u", [{"n": 4}], max_items=3)
        entry = await dispatcher.durable.get_entry(dispatcher.namespace("messages"), "u")
        assert entry is not None and json.loads(entry[0]) == [{"n": 1}, {"n": 2}, {"n": 3}]
        await dispatcher.set("messages", "obj", {"not": "a list"})
        with pytest.raises(Conflict, match="not a JSON list"):
            await dispatcher.append("messages", "obj", [{}], max_items=3)
