"""The storage contract kit (app.testing) run against every built-in storage, and the kit's own checks.

- `redis`, the cache storage, through a real Runtime: its subprocess lifecycle spawns a redis-server
  per test (the storage fixture's Runtime stops it again), unreachable as a binary that does not exist
  and as an external Redis nobody listens for.
- `postgres`, durable, on the `pg` fixture's real server; unreachable as a port nobody listens on.
- `sqlite`, durable, on a file of the test's own; unreachable as a path under a regular file, and as
  a file that is not a database.

Then the kit must be able to fail: each of its checks named below is run against a storage broken in
the one way that check is about, and must fail. Last, a third party's suite as the README shows it
(strict asyncio mode, the kit imported from `app.testing`) runs in a pytest of its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.config import Config
from ondemand.host.net import free_port
from ondemand.plugins.storage_postgres import PostgresConfig, PostgresStorage
from ondemand.plugins.storage_redis import RedisStorage
from ondemand.plugins.storage_sqlite import SqliteConfig, SqliteStorage
from ondemand.store.protocols import Namespace
from ondemand.testing import CacheStorageContract, DurableStorageContract
from tests.support import ROOT

FAST = {"short_ttl": 0.2, "expiry_slack": 0.15}


class TestRedisStorage(CacheStorageContract):
    short_ttl, expiry_slack = FAST["short_ttl"], FAST["expiry_slack"]

    @pytest.fixture
    async def storage(self, make_config: Callable[..., Config]) -> AsyncIterator[Any]:
        async with Runtime(make_config()) as rt:  # a fresh redis-server, started by the first operation
            yield rt.cache_storage

    @pytest.fixture(params=["binary-missing", "external-refused"])
    async def unavailable_storage(self, request: pytest.FixtureRequest,
                                  make_config: Callable[..., Config]) -> AsyncIterator[Any]:
        if request.param == "binary-missing":
            overrides = {"lifecycle": {"redis_binary": "/nonexistent/redis-server"}}
        else:
            overrides = {"lifecycle": {"plugin": "external", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}}
        async with Runtime(make_config(overrides)) as rt:
            yield rt.cache_storage


class TestPostgresStorage(DurableStorageContract):
    short_ttl, expiry_slack = FAST["short_ttl"], FAST["expiry_slack"]
    secrets = ("s3cret",)

    @pytest.fixture
    async def storage(self, pg: Any) -> AsyncIterator[PostgresStorage]:
        # The server trusts local connections, so the password is never used, only shown (or not).
        store = PostgresStorage(PostgresConfig(dsn=f"{pg.dsn} password=s3cret", connect_timeout=0.5,
                                               statement_timeout=0.5))
        await store.open()
        yield store
        await store.close()

    @pytest.fixture
    async def unavailable_storage(self) -> AsyncIterator[PostgresStorage]:
        store = PostgresStorage(PostgresConfig(dsn=f"postgresql://app:s3cret@127.0.0.1:{free_port()}/db",
                                               connect_timeout=0.3, statement_timeout=0.3))
        await store.open()
        yield store
        await store.close()


class TestSqliteStorage(DurableStorageContract):
    short_ttl, expiry_slack = FAST["short_ttl"], FAST["expiry_slack"]

    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[SqliteStorage]:
        store = SqliteStorage(SqliteConfig(path=str(tmp_path / "db.sqlite3"), busy_timeout=0.5, op_timeout=1.0))
        await store.open()
        yield store
        await store.close()

    @pytest.fixture(params=["parent-is-a-file", "not-a-database"])
    async def unavailable_storage(self, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
        if request.param == "parent-is-a-file":
            (tmp_path / "file").write_text("")
            path = tmp_path / "file" / "db.sqlite3"
        else:
            path = tmp_path / "db.sqlite3"
            path.write_bytes(b"garbage " * 1000)
        store = SqliteStorage(SqliteConfig(path=str(path), busy_timeout=0.2, op_timeout=0.5))
        await store.open()
        yield store
        await store.close()


# -- the kit must be able to fail ------------------------------------------------------------------


class RedisWithoutTombstones(RedisStorage):
    """Puts back whatever is not a value (the previous release's rule, SET NX, on the new layout)."""

    async def put_back(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, version: int, *,
                       repair: bool = False) -> bool:
        if await self.on_demand.execute("HEXISTS", ns.key(item_id), "v"):
            return False
        await self.on_demand.execute("DEL", ns.key(item_id))
        return bool(await self.on_demand.execute("HSET", ns.key(item_id), "v", value, "n", version))


class RedisLastWriteWins(RedisStorage):
    """Ignores versions: every write lands (a write-through that arrives late replaces a newer value)."""

    def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, version: int | None = None) -> Any:
        return super().set(ns, item_id, value, ttl, None)


class RedisReadThenWriteAppend(RedisStorage):
    async def append_list(self, ns: Namespace, item_id: str, items: bytes, count: int, ttl: float | None,
                          max_items: int) -> int:
        import orjson

        current = await self.get(ns, item_id)
        merged = [*(orjson.loads(current) if current else []), *orjson.loads(items)]
        await asyncio.sleep(0)
        await self.set(ns, item_id, orjson.dumps(merged), ttl)
        return len(merged)


class SqliteVersionPerRow(SqliteStorage):
    """Counts versions per row (1, 2, ...): a re-insert after a delete starts over, below the delete's version."""

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, **kw: Any) -> Any:
        entry = await self.get_entry(ns, item_id)
        committed = await super().set(ns, item_id, value, ttl, **kw)
        return committed._replace(version=1 if entry is None else entry.version + 1)


class SqliteIgnoringTtls(SqliteStorage):
    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, **kw: Any) -> Any:
        return await super().set(ns, item_id, value, None, **kw)


class SqliteSetManyOneByOne(SqliteStorage):
    async def set_many(self, entries: Any, **kw: Any) -> Any:
        return [await self.set(entry.namespace, entry.id, entry.value, entry.ttl, **kw) for entry in entries]


class SqliteCountingEveryId(SqliteStorage):
    async def delete(self, ns: Namespace, ids: Any, **kw: Any) -> Any:
        return (await super().delete(ns, ids, **kw))._replace(removed=len(ids))


class SqliteNamespaceBlind(SqliteStorage):
    """Ignores the namespace on reads (a backend keyed by id alone)."""

    def _ns(self, ns: Namespace) -> Namespace:
        return Namespace("a", ns.ttl, ns.durable, ns.connection_id, ns.key_prefix)

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, **kw: Any) -> Any:
        return await super().set(self._ns(ns), item_id, value, ttl, **kw)

    async def get(self, ns: Namespace, item_id: str) -> bytes | None:
        return await super().get(self._ns(ns), item_id)


class SqliteFullTtlEntries(SqliteStorage):
    """Answers the ttl first written instead of the remaining one (a copy put back would outlive it)."""

    async def get_entry(self, ns: Namespace, item_id: str) -> Any:
        entry = await super().get_entry(ns, item_id)
        return entry if entry is None or entry.remaining is None else entry._replace(remaining=60.0)


class SqliteHangingWhenDown(SqliteStorage):
    async def get(self, ns: Namespace, item_id: str) -> bytes | None:
        await asyncio.Event().wait()
        return None


class SqliteBytearray(SqliteStorage):
    async def get(self, ns: Namespace, item_id: str) -> Any:
        value = await super().get(ns, item_id)
        return None if value is None else bytearray(value)


REDIS, SQLITE = "redis", "sqlite"
BROKEN = [
    (REDIS, RedisWithoutTombstones, CacheStorageContract,
     "test_contract_put_back_refuses_an_id_deleted_from_a_durable_namespace", "revived a deleted value"),
    (REDIS, RedisWithoutTombstones, CacheStorageContract,
     "test_contract_a_tombstone_refuses_older_versions_and_keeps_newer_values", ""),
    (REDIS, RedisLastWriteWins, CacheStorageContract,
     "test_contract_a_versioned_write_never_replaces_a_newer_version", "an older version replaced a newer one"),
    (SQLITE, SqliteVersionPerRow, DurableStorageContract,
     "test_contract_versions_grow_per_id_in_commit_order_and_never_come_back", "versions must grow"),
    (REDIS, RedisReadThenWriteAppend, CacheStorageContract,
     "test_contract_append_list_is_atomic_under_concurrent_appends", "each append must see"),
    (SQLITE, SqliteIgnoringTtls, DurableStorageContract,
     "test_contract_ttls_expire_in_real_time_and_none_never_expires", ""),
    (SQLITE, SqliteSetManyOneByOne, DurableStorageContract,
     "test_contract_set_many_is_all_or_nothing_to_a_concurrent_reader", "half written"),
    (SQLITE, SqliteCountingEveryId, DurableStorageContract,
     "test_contract_delete_counts_the_live_values_it_removed", ""),
    (SQLITE, SqliteNamespaceBlind, DurableStorageContract, "test_contract_namespaces_are_isolated", ""),
    (SQLITE, SqliteFullTtlEntries, DurableStorageContract, "test_contract_get_entry_gives_the_remaining_ttl", ""),
    (SQLITE, SqliteBytearray, DurableStorageContract, "test_contract_values_are_bytes_returned_unchanged",
     "expected bytes"),
]


@pytest.mark.parametrize(("backend", "broken", "kit", "check", "words"), BROKEN,
                         ids=[row[1].__name__ for row in BROKEN])
async def test_the_kit_fails_a_storage_broken_the_way_a_check_is_about(
        backend: str, broken: type, kit: type, check: str, words: str, make_config: Callable[..., Config],
        tmp_path: Path) -> None:
    contract = kit()
    contract.short_ttl = contract.expiry_slack = 0.1
    if backend == REDIS:
        async with Runtime(make_config()) as rt:
            with pytest.raises(AssertionError, match=words or None):
                await getattr(contract, check)(broken(rt.on_demand))
            # The same check passes on the real storage: it is the breakage that fails it.
            await rt.on_demand.execute("FLUSHALL")
            await getattr(contract, check)(rt.cache_storage)
        return
    for cls, fails in ((broken, True), (SqliteStorage, False)):
        store = cls(SqliteConfig(path=str(tmp_path / f"{cls.__name__}.sqlite3"), synchronous="normal"))
        await store.open()
        try:
            if fails:
                with pytest.raises(AssertionError, match=words or None):
                    await getattr(contract, check)(store)
            else:
                await getattr(contract, check)(store)
        finally:
            await store.close()


async def test_the_kit_fails_a_storage_that_hangs_when_its_backend_is_down(tmp_path: Path) -> None:
    contract = DurableStorageContract()
    contract.unavailable_within = 0.3
    (tmp_path / "file").write_text("")
    store = SqliteHangingWhenDown(SqliteConfig(path=str(tmp_path / "file" / "db")))
    await store.open()
    try:
        with pytest.raises(pytest.fail.Exception, match=r"did not end within 0\.3 s"):
            await contract.test_contract_unavailable_backend_raises_a_typed_error_in_bounded_time(store, "get")
        await contract.test_contract_unavailable_backend_raises_a_typed_error_in_bounded_time(store, "set")
    finally:
        await store.close()


async def test_the_kit_fails_a_status_that_shows_a_secret(tmp_path: Path) -> None:
    contract = DurableStorageContract()
    contract.secrets = ("db.sqlite3",)  # the path is in sqlite's status: as if it were a secret
    store = SqliteStorage(SqliteConfig(path=str(tmp_path / "db.sqlite3")))
    await store.open()
    try:
        with pytest.raises(AssertionError, match="shows a secret"):
            await contract.test_contract_status_is_json_with_a_state_and_no_secret(store)
    finally:
        await store.close()


THIRD_PARTY = textwrap.dedent('''
    import pytest, pytest_asyncio
    from ondemand.testing import DurableStorageContract
    from ondemand.plugins.storage_sqlite import SqliteConfig, SqliteStorage

    class TestThirdPartyStore(DurableStorageContract):
        short_ttl = expiry_slack = 0.1

        @pytest_asyncio.fixture
        async def storage(self, tmp_path):
            store = SqliteStorage(SqliteConfig(path=str(tmp_path / "db")))
            await store.open()
            yield store
            await store.close()
''')


def test_a_third_party_suite_runs_the_kit_in_strict_mode(tmp_path: Path) -> None:
    (tmp_path / "test_mine.py").write_text(THIRD_PARTY)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider",
         "-o", "asyncio_mode=strict", "-rs", "-k", "round_trip or get_entry or unavailable", "test_mine.py"],
        # Only pytest-asyncio, the one plugin the kit needs (and the installed ones are slow to load).
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 passed, 8 skipped" in out, out
    assert "defines no `unavailable_storage` fixture" in out, out  # the skips say why
