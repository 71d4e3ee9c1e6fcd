"""The postgres storage plugin against a real PostgreSQL (pgserver's bundled binaries); no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiopg
import pytest

from ondemand.config.load import load_config
from ondemand.errors import PostgresUnavailable
from ondemand.events import Events
from ondemand.health import OutageTracker
from ondemand.plugins import storage_postgres
from ondemand.plugins.storage_postgres import PostgresConfig, PostgresStorage
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from ondemand.registry import Registry
from ondemand.store.protocols import Entry, Namespace, Storage
from tests.support import (
    clone_data_dir,
    new_temp_dir,
    pid_alive,
    process_tree,
    query,
    remove_temp_dir,
    wait_gone,
)

SESSION = Namespace("session", 86400.0, True, "session", "ondemand:session:")
PROFILE = Namespace("profile", 3600.0, False, "default", "ondemand:profile:")
COUNT = "SELECT count(*) FROM ondemand_values"


class Recorder(Events):
    """Events that records what is emitted instead of calling plugins."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _emit(self, hook_name: str, **fields: Any) -> None:
        self.events.append((hook_name, fields))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def config(**overrides: Any) -> PostgresConfig:
    base: dict[str, Any] = {
        "connect_timeout": 0.5, "statement_timeout": 0.5, "startup_timeout": 20.0,
        "pool_min": 1, "pool_max": 4, "purge_interval": 60.0,
    }
    return PostgresConfig(**{**base, **overrides})


@contextlib.asynccontextmanager
async def opened(cfg: PostgresConfig, events: Recorder | None = None) -> AsyncIterator[PostgresStorage]:
    storage = PostgresStorage(cfg, health=OutageTracker("postgres", events or Recorder()))
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


async def count_rows(dsn: str) -> int:
    rows = await query(dsn, COUNT)
    return int(rows[0][0])  # type: ignore[call-overload]


def test_registers_the_postgres_storage() -> None:
    registry: Registry[Any] = Registry("storage")
    storage_postgres.ondemand_register_storages(registry=registry)
    storage = registry.get("postgres")(SimpleNamespace(config=load_config(None, environ={}),
                                                       health=OutageTracker.quiet("postgres")))
    assert isinstance(storage, Storage)
    assert storage.name == "postgres"
    assert storage.embedded is not None
    assert storage.embedded.data_dir == Path(os.path.abspath(".ondemand/pgdata"))  # absolute, never resolved
    assert storage.embedded.pid is None  # nothing starts before open()
    assert storage.status()["state"] == "starting"


async def test_round_trip(pg: EmbeddedPostgres) -> None:
    async with opened(config(dsn=pg.dsn)) as s:
        assert await s.get(SESSION, "a") is None
        await s.set(SESSION, "a", b'{"v":1}', None)
        await s.set(SESSION, "a", b'{"v":2}', 60.0)  # upsert
        await s.set(PROFILE, "a", b'"other"', None)  # same id, other namespace
        assert await s.get(SESSION, "a") == b'{"v":2}'

        await s.set_many([
            Entry(SESSION, "b", b"1", None),
            Entry(PROFILE, "c", b"2", 30.0),
            Entry(SESSION, "b", b"3", None),  # a later duplicate wins
        ])
        await s.set_many([])
        assert await s.get_many(SESSION, ["a", "b", "missing", "a"]) == [b'{"v":2}', b"3", None, b'{"v":2}']
        assert await s.get_many(PROFILE, ["a", "c"]) == [b'"other"', b"2"]
        assert await s.get_many(SESSION, []) == []

        assert (await s.expire(SESSION, "b", 60.0)).id == "b"
        assert await s.expire(SESSION, "missing", 60.0) is None
        rows = await query(pg.dsn, "SELECT expires_at IS NOT NULL FROM ondemand_values WHERE id = 'b'")
        assert rows == [(True,)]

        assert (await s.delete(SESSION, ["a", "missing"])).removed == 1
        assert (await s.delete(SESSION, [])).removed == 0
        assert await s.get(SESSION, "a") is None
        assert await s.get(PROFILE, "a") == b'"other"'

        blob = bytes(range(256))  # bytes in, the same bytes out
        await s.set(SESSION, "blob", blob, None)
        assert await s.get(SESSION, "blob") == blob

        many = [Entry(SESSION, f"m{i}", b"%d" % i, 60.0) for i in range(2000)]
        await s.set_many(many)
        assert await s.get_many(SESSION, ["m0", "m1999"]) == [b"0", b"1999"]

        status = s.status()
        assert status["state"] == "up"
        assert status["errors"] == 0
        assert status["ops"] >= 15
        assert status["embedded"] is False
        json.dumps(status)


async def test_ttl_is_honoured_and_purge_deletes_expired_rows(pg: EmbeddedPostgres) -> None:
    async with opened(config(dsn=pg.dsn)) as s:
        await s.set(SESSION, "short", b"1", 0.3)
        await s.set_many([
            Entry(SESSION, "short2", b"2", 0.3),
            Entry(SESSION, "long", b"3", 60.0),
            Entry(SESSION, "forever", b"4", None),
        ])
        await s.set(SESSION, "cleared", b"5", 0.3)
        await s.set(SESSION, "cleared", b"5", None)  # a new write without ttl removes the expiry
        assert await s.get(SESSION, "short") == b"1"

        await asyncio.sleep(0.5)
        assert await s.get(SESSION, "short") is None
        assert await s.get_many(SESSION, ["short", "short2", "long", "forever", "cleared"]) == [
            None, None, b"3", b"4", b"5",
        ]
        assert await s.expire(SESSION, "short", 10.0) is None
        assert (await s.delete(SESSION, ["short2"])).removed == 0  # an expired row did not "exist"
        assert await count_rows(pg.dsn) == 4  # "short" is expired but still stored

        assert await s.purge_expired() == 1
        assert await count_rows(pg.dsn) == 3
        assert await s.purge_expired() == 0

        # A backlog larger than one batch goes in one call, batch by batch.
        await query(pg.dsn, "INSERT INTO ondemand_values SELECT 'session', 'old' || i, '\\x00', "
                            "now() - interval '1 second' FROM generate_series(1, 2500) AS i")
        assert await s.purge_expired() == 2500
        assert await count_rows(pg.dsn) == 3


async def test_periodic_purge(pg: EmbeddedPostgres) -> None:
    async with opened(config(dsn=pg.dsn, purge_interval=0.1)) as s:
        await s.set(SESSION, "keep", b"1", None)
        await s.set(SESSION, "gone", b"1", 0.05)
        for _ in range(60):
            if await count_rows(pg.dsn) == 1:
                break
            await asyncio.sleep(0.05)
        assert await count_rows(pg.dsn) == 1
        assert await s.get(SESSION, "keep") == b"1"


async def test_schema_creation_is_idempotent(pg: EmbeddedPostgres) -> None:
    cfg = config(dsn=pg.dsn)
    a, b = PostgresStorage(cfg), PostgresStorage(cfg)
    try:
        await asyncio.gather(a.open(), b.open(), a.open())  # both create the schema at once
        await asyncio.gather(a.set(SESSION, "x", b"1", None), b.set(SESSION, "y", b"2", None))
    finally:
        await a.close()
        await b.close()
    async with opened(cfg) as c:
        assert await c.get_many(SESSION, ["x", "y"]) == [b"1", b"2"]
    assert await query(pg.dsn, "SELECT version FROM ondemand_schema_version") == [(2,)]


async def test_embedded_first_use_survives_restart_and_close_leaves_nothing() -> None:
    base = new_temp_dir()
    data_dir = base / "not" / "yet" / "pgdata"  # created, then initdb'd, on first use
    cfg = config(data_dir=str(data_dir))
    try:
        s = PostgresStorage(cfg)
        started = time.monotonic()
        await s.open()
        assert time.monotonic() - started < 0.1  # open() does not wait for initdb
        try:
            await s.set(SESSION, "durable", b'{"ok":true}', None)
            status = s.status()
            assert status["state"] == "up"
            assert status["embedded"] is True
            assert status["data_dir"] == str(data_dir)
            pid = status["pid"]
            assert isinstance(pid, int)
            tree = process_tree(pid)
            assert len(tree) > 1  # the postmaster and its helpers
            socket_dir = s.embedded.socket_dir if s.embedded else None
            assert socket_dir is not None
            assert len(str(socket_dir)) < 60
            assert socket_dir.stat().st_mode & 0o777 == 0o700
        finally:
            await s.close()
        assert [p for p in tree if pid_alive(p)] == []
        assert not socket_dir.exists()
        assert s.status()["pid"] is None

        async with opened(cfg) as again:
            assert await again.get(SESSION, "durable") == b'{"ok":true}'
            assert again.status()["pid"] not in (None, pid)
    finally:
        remove_temp_dir(base)


async def test_unreachable_postgres_fails_fast_and_clearly() -> None:
    events = Recorder()
    s = PostgresStorage(config(dsn="host=/tmp/nonexistent-dir dbname=x"), health=OutageTracker("postgres", events))
    started = time.monotonic()
    await s.open()
    assert time.monotonic() - started < 0.1
    try:
        started = time.monotonic()
        with pytest.raises(PostgresUnavailable, match="nonexistent-dir"):
            await s.get(SESSION, "a")
        with pytest.raises(PostgresUnavailable):
            await s.set(SESSION, "a", b"1", None)
        assert time.monotonic() - started < 1.0
        status = s.status()
        assert status["state"] == "down"
        assert status["errors"] == 2
        assert "nonexistent-dir" in status["last_error"]
        assert events.names() == ["ondemand_degraded"]  # once, on the transition
        assert events.events[0][1]["component"] == "postgres"
    finally:
        await s.close()


async def test_unresponsive_server_is_bounded_and_password_never_shown() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        s = PostgresStorage(config(dsn=f"postgresql://app:s3cret@127.0.0.1:{port}/db", connect_timeout=0.3))
        await s.open()
        try:
            started = time.monotonic()
            with pytest.raises(PostgresUnavailable) as info:
                await s.get(SESSION, "a")
            assert time.monotonic() - started < 1.0
            assert "s3cret" not in str(info.value)
            assert "app:***@" in str(info.value)
            assert "s3cret" not in json.dumps(s.status())
        finally:
            await s.close()


async def test_killed_server_fails_fast_then_recovers_when_back(pg: EmbeddedPostgres) -> None:
    events = Recorder()
    async with opened(config(dsn=pg.dsn), events) as s:
        await s.set(SESSION, "k", b"1", None)
        assert pg.pid is not None and pg.child is not None
        tree = process_tree(pg.pid)
        os.kill(pg.pid, signal.SIGKILL)
        await pg.child.process.wait()
        # The orphaned backends notice their postmaster's death and exit on their own (until then, the
        # pooled connection's backend may still answer a query).
        assert await wait_gone(tree, timeout=5.0) == []

        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(PostgresUnavailable):
                await s.get(SESSION, "k")
        assert time.monotonic() - started < 1.0
        assert s.status()["state"] == "down"

        await pg.start()  # stale postmaster.pid of a dead pid: postgres copes
        assert await s.get(SESSION, "k") == b"1"
        assert s.status()["state"] == "up"
        assert events.names() == ["ondemand_degraded", "ondemand_recovered"]
        assert events.events[1][1]["down_seconds"] > 0


async def test_embedded_server_restarts_by_itself_after_a_kill(pg_template: Path) -> None:
    data_dir = clone_data_dir(pg_template)
    s = PostgresStorage(config(data_dir=str(data_dir)))
    await s.open()
    tree: set[int] = set()
    try:
        await s.set(SESSION, "k", b"1", None)
        pid = s.status()["pid"]
        tree = process_tree(pid)
        assert s.embedded is not None and s.embedded.child is not None
        os.kill(pid, signal.SIGKILL)
        await s.embedded.child.process.wait()  # else a still-living backend may answer one more query
        deadline = time.monotonic() + 10.0
        value = None
        while value is None and time.monotonic() < deadline:
            try:
                value = await s.get(SESSION, "k")
            except PostgresUnavailable:
                await asyncio.sleep(0.05)
        assert value == b"1"
        assert s.status()["pid"] not in (None, pid)
    finally:
        await s.close()
        assert await wait_gone(tree, timeout=5.0) == []
        remove_temp_dir(data_dir.parent)


async def test_a_second_server_object_on_a_live_data_dir_adopts_it_and_never_stops_it(pg: EmbeddedPostgres) -> None:
    # (tests/test_postgres_hosting.py: sharing across processes, stale pid files, hostile state files)
    other = EmbeddedPostgres(pg.data_dir, startup_timeout=5.0)
    await other.start()
    assert (other.owner, other.pid) == ("sibling", pg.pid)
    assert await query(other.dsn, "SELECT 1") == [(1,)]
    await other.stop()
    assert pg.running and await query(pg.dsn, "SELECT 1") == [(1,)]


async def test_statement_timeout_bounds_a_blocked_statement(pg: EmbeddedPostgres) -> None:
    async with opened(config(dsn=pg.dsn, statement_timeout=0.3)) as s:
        await s.set(SESSION, "locked", b"1", None)
        async with aiopg.connect(pg.dsn, enable_hstore=False) as conn, conn.cursor() as cur:
            await cur.execute("BEGIN")
            await cur.execute("SELECT 1 FROM ondemand_values WHERE id = 'locked' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(PostgresUnavailable, match="statement_timeout"):
                await s.set(SESSION, "locked", b"2", None)
            assert 0.25 < time.monotonic() - started < 0.8
            await cur.execute("ROLLBACK")
        assert await s.get(SESSION, "locked") == b"1"
        assert s.status()["state"] == "up"


async def test_closed_storage_refuses_operations(pg: EmbeddedPostgres) -> None:
    s = PostgresStorage(config(dsn=pg.dsn))
    await s.open()
    await s.set(SESSION, "a", b"1", None)
    await s.close()
    await s.close()  # idempotent
    assert s.status()["pool"] is None
    with pytest.raises(PostgresUnavailable, match="closed"):
        await s.get(SESSION, "a")
