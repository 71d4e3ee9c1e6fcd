"""The cache never goes back in time (issue 19): versions from the system of record, with real servers.

Two runtimes sharing one Redis (or one local cluster) and one durable store stand for two hosts; a
third, whose Redis URL leads nowhere, for a host cut off from Redis. The races are forced, not hoped for:
a test holds one host between its durable read and its put-back, or between its commit and its cache
write (a hook on the storage that waits for the test), lets the newer write land, and releases it.
Then cancelled writes, late deliveries, and data the previous release left behind (PostgreSQL, SQLite,
Redis) read by this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.config import Config
from ondemand.config.load import merge
from ondemand.plugins.storage_postgres import PostgresConfig, PostgresStorage
from ondemand.plugins.storage_redis import RedisStorage
from ondemand.plugins.storage_sqlite import SqliteConfig, SqliteStorage
from ondemand.store.protocols import Namespace, Target
from tests.support import query, wait_for

V1, V2, V3, V4, V5 = ({"v": n} for n in range(1, 6))
CLUSTER = {"lifecycle": {"topology": "cluster", "cluster_masters": 3, "cluster_replicas": 0, "startup_timeout": 20.0}}
SESSION = Namespace("session", 86400.0, True, "session", "ondemand:session:")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["postgres", "sqlite", "cluster"])
def backend(request: pytest.FixtureRequest, make_config: Callable[..., Config], tmp_path: Path) -> Any:
    """(kind, durable(overrides) -> Config): PostgreSQL (this test's server), one SQLite file, or PostgreSQL
    behind a local 3-master cluster."""
    if request.param == "sqlite":
        base: dict[str, Any] = {"storage": {"durable": "sqlite", "outbox_poll": 0.2},
                                "sqlite": {"path": str(tmp_path / "shared.sqlite3"), "busy_timeout": 4.0,
                                           "op_timeout": 5.0}}
    else:
        pg = request.getfixturevalue("pg")
        base = {"storage": {"durable": "postgres"},
                "postgres": {"dsn": pg.dsn, "connect_timeout": 2.0, "statement_timeout": 5.0}}
    # (Roomy bounds: these tests are about order, not about a loaded machine's slow statements.)
    return request.param, lambda overrides=None: make_config(merge(base, overrides or {}))


@contextlib.asynccontextmanager
async def two_hosts(kind: str, durable: Callable[..., Config]) -> AsyncIterator[tuple[Runtime, Runtime, Config]]:
    """Two runtimes on one Redis (our own, over TCP) or one local cluster (the first one's), and the config of a
    third host whose route to that Redis leads nowhere."""
    cluster = kind == "cluster"
    async with Runtime(durable(CLUSTER if cluster else {"lifecycle": {"tcp": True}})) as one:
        if cluster:
            await one.cache.cache_profile("first", {})  # spawns the cluster
            nodes = one.on_demand.lifecycle.cluster
            url = f"redis://:{nodes.password}@127.0.0.1:{nodes.master_nodes()[0].port}/0"
        else:
            endpoint = await one.on_demand.ensure()
            url = f"redis://:{endpoint.password}@127.0.0.1:{endpoint.port}/0"
        external = {"plugin": "external", **({"topology": "cluster"} if cluster else {})}
        async with Runtime(durable({"lifecycle": {**external, "redis_url": url}})) as two:
            yield one, two, durable({"lifecycle": {**external, "redis_url": f"redis://127.0.0.1:{closed_port()}/0"}})


class Hold:
    """A hook on one storage's method: the first call matching `when` runs up to `at` ("before" or "after" the
    real call), then waits until `release()`. `reached` is set when it waits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: Any, method: str, when: Callable[..., bool],
                 at: str) -> None:
        self.reached, self._go = asyncio.Event(), asyncio.Event()
        real = getattr(type(target), method)
        hold = self

        async def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self is not target or hold.reached.is_set() or not when(*args, **kwargs):
                return await real(self, *args, **kwargs)
            result = await real(self, *args, **kwargs) if at == "after" else None
            hold.reached.set()
            await hold._go.wait()
            return result if at == "after" else await real(self, *args, **kwargs)

        monkeypatch.setattr(type(target), method, hooked)

    def release(self) -> None:
        self._go.set()


async def cached(rt: Runtime, item_id: str) -> bytes | None:
    """The value field of a session's record in Redis (None: no value, a tombstone or nothing)."""
    return await rt.on_demand.execute("HGET", rt.dispatcher.namespace("session").key(item_id), "v",
                                      connection_id="session")


async def test_put_backs_and_writes_that_arrive_late_never_replace_a_newer_version(
        backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    kind, durable = backend
    async with two_hosts(kind, durable) as (one, two, cut_off):
        ns = two.dispatcher.namespace("session")

        # 1. A put-back held between its durable read and its write: meanwhile a host cut off from Redis
        #    acknowledges a newer value and the outbox delivers it (the previous release deleted the key,
        #    and the put-back then installed its older value).
        await one.cache.cache_session("s", V1)
        await two.on_demand.execute("DEL", ns.key("s"), connection_id="session")  # evicted, say: B misses
        hold = Hold(monkeypatch, two.durable_storage, "get_entry", lambda ns, item_id: item_id == "s", "after")
        reader = asyncio.ensure_future(two.dispatcher.lookup("session", "s"))
        await asyncio.wait_for(hold.reached.wait(), 5)
        delivered = one.dispatcher.invalidation.delivered + two.dispatcher.invalidation.delivered
        async with Runtime(cut_off) as cut:
            await cut.cache.cache_session("s", V2)  # acknowledged: the durable store committed it
        await wait_for(lambda: one.dispatcher.invalidation.delivered + two.dispatcher.invalidation.delivered
                       > delivered, timeout=5)
        hold.release()
        assert (await reader).value == V1  # read before the write: a fine answer for that read
        assert await cached(two, "s") is None, "the held put-back installed the older value"
        for host in (one, two):
            assert await host.cache.get_session("s") == V2
        assert json.loads(await cached(one, "s")) == V2  # put back again, by the reads just now

        # 2. A write-through held between its commit and its cache write while a later write lands: the
        #    older one arrives last (the previous release's plain SET then replaced the newer value).
        hold = Hold(monkeypatch, two.cache_storage, "set", lambda ns, item_id, *a: item_id == "t", "before")
        writer = asyncio.ensure_future(two.cache.cache_session("t", V3))
        await asyncio.wait_for(hold.reached.wait(), 5)
        await one.cache.cache_session("t", V4)  # committed after V3: the newer version
        hold.release()
        await writer
        assert json.loads(await cached(one, "t")) == V4, "an older write replaced a newer one in Redis"
        for host in (one, two):
            assert (await host.dispatcher.lookup("session", "t")) == (V4, "redis")

        # 3. A PUT racing a DELETE: the PUT commits first and its cache write arrives after the delete's
        #    tombstone (the previous release then brought the deleted session back).
        await one.cache.cache_session("u", V1)
        hold = Hold(monkeypatch, one.cache_storage, "set", lambda ns, item_id, *a: item_id == "u", "before")
        writer = asyncio.ensure_future(one.cache.cache_session("u", V5))
        await asyncio.wait_for(hold.reached.wait(), 5)
        assert await two.cache.delete_session("u") is True  # committed after the PUT
        hold.release()
        await writer
        for host in (one, two):
            assert await host.cache.get_session("u") is None, "a deleted session came back"
        assert await cached(one, "u") is None


async def test_a_write_or_put_back_later_than_the_bound_installs_nothing_older(
        backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host frozen (here: held) between its commit and its cache write, or between its durable read and its
    put-back, for longer than the lateness bound, while the newer version's record left Redis (evicted, say):
    there is nothing newer in Redis to refuse it, so the bound must: the late write becomes a tombstone of its
    version, the late put-back is skipped."""
    kind, durable = backend
    async with two_hosts(kind, durable) as (one, two, _):
        ns = one.dispatcher.namespace("session")
        for host in (one, two):
            host.dispatcher.late_after = 0.3
        await one.cache.cache_session("w", V1)
        # (held after the commit, before the dispatcher goes on: frozen there, the bound is checked after it)
        hold = Hold(monkeypatch, one.durable_storage, "set", lambda ns, item_id, *a, **kw: item_id == "w", "after")
        writer = asyncio.ensure_future(one.cache.cache_session("w", V2))
        await asyncio.wait_for(hold.reached.wait(), 5)
        await two.cache.cache_session("w", V3)  # newer: its record is in Redis...
        await two.on_demand.execute("DEL", ns.key("w"), connection_id="session")  # ...and evicted
        await asyncio.sleep(0.4)
        hold.release()
        await writer
        assert await cached(one, "w") is None, "a late write-through installed an older value"
        for host in (one, two):
            assert await host.cache.get_session("w") == V3

        await one.cache.cache_session("p", V1)
        await one.on_demand.execute("DEL", ns.key("p"), connection_id="session")
        hold = Hold(monkeypatch, one.durable_storage, "get_entry", lambda ns, item_id: item_id == "p", "after")
        reader = asyncio.ensure_future(one.dispatcher.lookup("session", "p"))
        await asyncio.wait_for(hold.reached.wait(), 5)
        await two.cache.cache_session("p", V4)
        await two.on_demand.execute("DEL", ns.key("p"), connection_id="session")  # evicted
        await asyncio.sleep(0.4)
        hold.release()
        assert (await reader).value == V1
        assert await cached(one, "p") is None, "a late put-back installed an older value"
        for host in (one, two):
            assert await host.cache.get_session("p") == V4


async def test_concurrent_writes_and_deletes_on_two_hosts_leave_every_read_equal_to_the_store(
        backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many writers on two hosts, the same ids, PUTs and DELETEs at once, each cache write a random moment after
    its commit (as a loaded host's would be: in one event loop they would otherwise keep commit order); then
    every read on both hosts answers what the durable store holds."""
    kind, durable = backend
    jitter = random.Random(3)
    for method in ("set", "invalidate", "delete"):
        real = getattr(RedisStorage, method)

        async def late(self: Any, *args: Any, real: Any = real, **kwargs: Any) -> Any:
            await asyncio.sleep(jitter.uniform(0, 0.005))
            return await real(self, *args, **kwargs)

        monkeypatch.setattr(RedisStorage, method, late)
    async with two_hosts(kind, durable) as (one, two, _):
        ids = [f"c{i}" for i in range(6)]
        store = one.durable_storage
        ns = one.dispatcher.namespace("session")

        async def writer(n: int) -> None:
            rng = random.Random(n)
            for item in rng.sample(ids, len(ids)):
                host = rng.choice((one, two))
                if rng.random() < 0.25:
                    await host.cache.delete_session(item)
                else:
                    await host.cache.cache_session(item, {"w": n, "id": item})

        wrong = []
        for round_ in range(6):  # each round's last writes, racing one another, decide what stays
            await asyncio.gather(*(writer(16 * round_ + n) for n in range(16)))
            entries = await store.get_entries(ns, ids)
            expected = {item: None if entry is None else json.loads(entry[0])
                        for item, entry in zip(ids, entries, strict=True)}
            wrong += [(round_, host_name, item, got, expected[item])
                      for host_name, host in (("one", one), ("two", two))
                      for item in ids if (got := await host.cache.get_session(item)) != expected[item]]
        assert not wrong, f"{len(wrong)} reads differ from the durable store: {wrong[:5]}"


@pytest.fixture(params=["postgres", "sqlite"])
def durable_only(request: pytest.FixtureRequest, make_config: Callable[..., Config], tmp_path: Path) -> Config:
    if request.param == "sqlite":
        return make_config({"storage": {"durable": "sqlite"},
                            "sqlite": {"path": str(tmp_path / "db.sqlite3"), "synchronous": "normal"}})
    pg = request.getfixturevalue("pg")
    return make_config({"storage": {"durable": "postgres"},
                        "postgres": {"dsn": pg.dsn, "connect_timeout": 1.0, "statement_timeout": 1.0}})


async def test_durable_writes_cancelled_at_random_moments_leave_every_read_equal_to_the_store(
        durable_only: Config) -> None:
    """Hundreds of PUTs and DELETEs whose caller gives up after a random part of the time one takes (as a handler
    whose client went away): many commit anyway, after their caller is gone. Each of those still reaches the
    cache: every read afterwards equals the durable store's row (the previous release left 2 or 3 of 300 stale,
    deleted sessions readable among them)."""
    async with Runtime(durable_only) as rt:
        d, ns = rt.dispatcher, rt.dispatcher.namespace("session")
        ids = [f"x{i}" for i in range(40)]
        timings = []
        for item in ids:  # every id cached, and how long one write takes here
            began = time.monotonic()
            await d.set("session", item, {"n": 0})
            timings.append(time.monotonic() - began)
        typical = statistics.median(timings)
        rng, cancelled = random.Random(7), 0
        for n in range(1, 401):
            item = rng.choice(ids)
            op = d.delete("session", item) if rng.random() < 0.3 else d.set("session", item, {"n": n})
            try:
                await asyncio.wait_for(op, rng.uniform(0.2, 1.5) * typical)
            except TimeoutError:
                cancelled += 1
        await d.settled(10.0)
        entries = await rt.durable_storage.get_entries(ns, ids)
        wrong = []
        for item, entry in zip(ids, entries, strict=True):
            stored = None if entry is None else json.loads(entry[0])
            for _ in range(2):  # from the cache, then (put back or not) again
                if (got := await d.get("session", item)) != stored:
                    wrong.append((item, got, stored))
        print(f"\n{cancelled} of 400 writes cancelled by their caller (a write takes {typical * 1e3:.2f} ms here)")
        assert cancelled >= 40, "too few cancellations to mean anything"
        assert not wrong, f"{len(wrong)} reads differ from the durable store: {wrong[:5]}"


async def test_a_late_outbox_delivery_or_put_back_leaves_the_newer_version(
        durable_config: Callable[..., Config]) -> None:
    async with Runtime(durable_config()) as rt:
        d, ns = rt.dispatcher, rt.dispatcher.namespace("session")
        await d.set("session", "n", V1)
        old = (await rt.durable_storage.get_entry(ns, "n")).version
        await d.set("session", "n", V2)
        # A row recorded for the first write, delivered after the second one's cache write.
        await rt.durable_storage.record_invalidations([Target(ns, "n", old)])
        assert await d.invalidation.deliver_outbox() >= 1
        assert await d.lookup("session", "n") == (V2, "redis"), "a late delivery removed the newer value"
        # A put-back of what a read found before the second write.
        assert await rt.cache_storage.put_back(ns, "n", b'{"v":1}', None, old) is False
        assert await d.lookup("session", "n") == (V2, "redis")


# -- data the previous release left behind --------------------------------------------------------------


# The first release's schema (SCHEMA_VERSION 1), as it created it: no versions, no urgent rows.
PREVIOUS_POSTGRES = """
CREATE TABLE ondemand_values (namespace text NOT NULL, id text NOT NULL, value bytea NOT NULL,
    expires_at timestamptz NULL, PRIMARY KEY (namespace, id));
CREATE INDEX ondemand_values_expires_at ON ondemand_values (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE ondemand_invalidations (seq bigserial PRIMARY KEY, namespace text NOT NULL, id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE ondemand_schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
INSERT INTO ondemand_schema_version (version) VALUES (1);
INSERT INTO ondemand_values VALUES ('session', 'old', '{"v": "old"}', NULL),
    ('session', 'expiring', '{"v": "e"}', now() + interval '1 hour');
INSERT INTO ondemand_invalidations (namespace, id) VALUES ('session', 'stale');
"""
PREVIOUS_SQLITE = (
    "CREATE TABLE ondemand_values (namespace TEXT NOT NULL, id TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL,"
    " PRIMARY KEY (namespace, id))",
    "CREATE INDEX ondemand_values_expires_at ON ondemand_values (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE TABLE ondemand_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)",
    "CREATE TABLE ondemand_invalidations (seq INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL,"
    " id TEXT NOT NULL, created_at REAL NOT NULL)",
    "INSERT INTO ondemand_schema_version VALUES (1, 0)",
    """INSERT INTO ondemand_values VALUES ('session', 'old', CAST('{"v": "old"}' AS BLOB), NULL),"""
    """ ('session', 'expiring', CAST('{"v": "e"}' AS BLOB), 9999999999)""",
    "INSERT INTO ondemand_invalidations (namespace, id, created_at) VALUES ('session', 'stale', 0)",
)


async def check_upgraded(store: Any) -> None:
    old = await store.get_entry(SESSION, "old")
    assert old is not None and (old.value, old.remaining, old.version) == (b'{"v": "old"}', None, 0)
    assert (await store.get_entry(SESSION, "expiring")).version == 0
    rows = await store.pending_invalidations(10, 3600.0)  # the previous release's rows: due at once
    assert [(row.namespace, row.id, row.version) for row in rows] == [("session", "stale", None)]
    committed = await store.set(SESSION, "old", b'{"v": "new"}', None)
    assert committed.version > 0 and committed.outbox is not None
    assert (await store.get_entry(SESSION, "old")) == (b'{"v": "new"}', None, committed.version)
    deleted = await store.delete(SESSION, ["expiring"])
    assert deleted.removed == 1 and deleted.committed[0].version > committed.version


async def test_a_postgres_database_of_the_previous_release_is_migrated(pg: Any) -> None:
    await query(pg.dsn, PREVIOUS_POSTGRES)
    store = PostgresStorage(PostgresConfig(dsn=pg.dsn, connect_timeout=1.0, statement_timeout=1.0))
    await store.open()
    try:
        await check_upgraded(store)
    finally:
        await store.close()
    assert await query(pg.dsn, "SELECT version FROM ondemand_schema_version ORDER BY 1") == [(1,), (2,)]
    again = PostgresStorage(PostgresConfig(dsn=pg.dsn))  # a second start: nothing to migrate, nothing lost
    await again.open()
    try:
        assert (await again.get_entry(SESSION, "old")).value == b'{"v": "new"}'
    finally:
        await again.close()


async def test_a_postgres_database_of_a_newer_release_is_refused(pg: Any) -> None:
    store = PostgresStorage(PostgresConfig(dsn=pg.dsn))
    await store.open()
    await store.set(SESSION, "x", b"1", None)
    await store.close()
    await query(pg.dsn, "INSERT INTO ondemand_schema_version (version) VALUES (3)")
    newer = PostgresStorage(PostgresConfig(dsn=pg.dsn, connect_timeout=0.5))
    await newer.open()
    try:
        with pytest.raises(Exception, match="schema version 3, written by a newer ondemand"):
            await newer.get(SESSION, "x")
    finally:
        await newer.close()


async def test_a_sqlite_file_of_the_previous_release_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    path.touch(mode=0o600)
    with sqlite3.connect(path) as conn:
        for statement in PREVIOUS_SQLITE:
            conn.execute(statement)
    store = SqliteStorage(SqliteConfig(path=str(path)))
    await store.open()
    try:
        await check_upgraded(store)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM ondemand_schema_version ORDER BY 1").fetchall() == [(1,), (2,)]


async def test_redis_keys_of_the_previous_release_are_read_and_replaced(durable_config: Callable[..., Config]) -> None:
    """The previous release kept a durable value as a plain string and a delete's tombstone as a key beside it:
    both read as absent now (the durable store answers), and the put-back replaces the string."""
    async with Runtime(durable_config()) as rt:
        d, ns = rt.dispatcher, rt.dispatcher.namespace("session")
        assert isinstance(rt.cache_storage, RedisStorage)
        for item in ("one", "many"):
            await rt.durable_storage.set(ns, item, b'{"v": "db"}', None)
            await rt.on_demand.execute("SET", ns.key(item), b'{"v": "db"}', connection_id="session")
        await rt.on_demand.execute("SET", ns.key("gone") + "\x00deleted", b"1", "PX", 30000, connection_id="session")
        assert await d.lookup("session", "one") == ({"v": "db"}, "postgres")
        assert await d.lookup("session", "one") == ({"v": "db"}, "redis")
        assert await d.get_many("session", ["many", "gone"]) == [{"v": "db"}, None]
        assert await d.lookup("session", "many") == ({"v": "db"}, "redis")
        assert await d.lookup("session", "gone") == (None, "miss")
        await d.set("session", "one", {"v": "new"})
        assert await d.lookup("session", "one") == ({"v": "new"}, "redis")
