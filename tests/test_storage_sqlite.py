"""The sqlite storage plugin against real files and real faults: a corrupt file, a path that cannot be a
database, another process holding the write lock, two processes writing at once, a fork. No mocks.

The storage contract itself (round trips, ttls, namespaces, ...) is checked by app.testing's kit in
tests/test_storage_contract.py; this file covers what is particular to SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.config import Config
from ondemand.config.load import load_config, merge
from ondemand.errors import ConfigError
from ondemand.events import Events
from ondemand.health import OutageTracker
from ondemand.host.net import free_port
from ondemand.plugins import storage_sqlite
from ondemand.plugins.storage_sqlite import SqliteConfig, SqliteStorage, SqliteUnavailable
from ondemand.registry import Registry
from ondemand.store.protocols import DurableStorage, Entry, Namespace, Target
from ondemand.web import create_app
from tests.support import ROOT, pid_alive, wait_for

SESSION = Namespace("session", 86400.0, True, "session", "ondemand:session:")


class Recorder(Events):
    """Events that records what is emitted instead of calling plugins."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def _emit(self, hook_name: str, **fields: Any) -> None:
        self.names.append(hook_name)


def config(path: Path, **overrides: Any) -> SqliteConfig:
    return SqliteConfig(**{"path": str(path), "busy_timeout": 0.2, "op_timeout": 0.5, **overrides})


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    storage = SqliteStorage(config(tmp_path / "db.sqlite3"))
    await storage.open()
    yield storage
    await storage.close()


def rows(path: Path, sql: str = "SELECT count(*) FROM ondemand_values") -> Any:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchone()[0]


@pytest.fixture
def sqlite_config(make_config: Any, tmp_path: Path) -> Any:
    def make(overrides: dict[str, Any] | None = None) -> Config:
        base = {"storage": {"durable": "sqlite"},
                "sqlite": {"path": str(tmp_path / "app" / "ondemand.sqlite3"), "busy_timeout": 0.2,
                           "op_timeout": 0.5}}
        return make_config(merge(base, overrides or {}))

    return make


def test_registers_the_sqlite_storage_and_validates_its_config(tmp_path: Path) -> None:
    registry: Registry[Any] = Registry("storage")
    storage_sqlite.ondemand_register_storages(registry=registry)
    loaded = load_config(None, overrides={"sqlite": {"path": str(tmp_path / "x.db"), "op_timeout": 3}}, environ={})
    storage = registry.get("sqlite")(SimpleNamespace(config=loaded, health=OutageTracker.quiet("sqlite")))
    assert isinstance(storage, DurableStorage)
    assert storage.name == "sqlite" and storage.config.op_timeout == 3.0
    assert storage.status()["state"] == "stopped"
    assert not (tmp_path / "x.db").exists()  # nothing happens before open()
    assert load_config(None, environ={}).section(SqliteConfig).path == ".ondemand/ondemand.sqlite3"
    assert load_config(None, environ={"ONDEMAND_SQLITE__BUSY_TIMEOUT": "0.5"}).section(SqliteConfig).busy_timeout == 0.5

    for bad, key, words in [({"op_timeout": 0}, "sqlite.op_timeout", "greater than 0"),
                            ({"busy_timeout": -1.0}, "sqlite.busy_timeout", "greater than 0"),
                            ({"path": ":memory:"}, "sqlite.path", "path of a file"),
                            ({"path": ""}, "sqlite.path", "path of a file"),
                            ({"synchronous": "off"}, "sqlite.synchronous", "'full', 'normal'"),
                            ({"journal": "wal"}, "sqlite.journal", "unknown key")]:
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides={"sqlite": bad}, environ={})
        assert info.value.key == key and words in str(info.value), str(info.value)


async def test_open_is_instant_and_creates_a_private_directory_and_file(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "db.sqlite3"
    storage = SqliteStorage(config(path))
    started = time.monotonic()
    await storage.open()
    assert time.monotonic() - started < 0.05
    try:
        await wait_for(lambda: storage.status()["state"] == "up", timeout=2)  # the queued connect ran
        assert path.stat().st_mode & 0o777 == 0o600  # it holds sessions
        assert path.parent.stat().st_mode & 0o777 == 0o700
        status = storage.status()
        assert status["journal_mode"] == "wal" and status["path"] == str(path)
        assert status["errors"] == 0 and status["last_error"] is None
        json.dumps(status)
        assert rows(path, "PRAGMA journal_mode") == "wal"
        assert rows(path, "SELECT max(version) FROM ondemand_schema_version") == 2
    finally:
        await storage.close()
    assert storage.status()["state"] == "stopped"


async def test_a_session_survives_a_restart_of_the_app(sqlite_config: Any) -> None:
    config_ = sqlite_config()
    async with Runtime(config_) as rt:
        await rt.cache.cache_session("s1", {"user": 1})
        await rt.cache.cache_session("gone", {"user": 2})
        await rt.cache.delete_session("gone")
        first_redis = rt.on_demand.lifecycle.pid()
    async with Runtime(config_) as rt:  # a new app: its own, empty Redis
        key = rt.dispatcher.namespace("session").key("s1")
        assert await rt.on_demand.execute("GET", key) is None
        assert rt.on_demand.lifecycle.pid() != first_redis
        found = await rt.dispatcher.lookup("session", "s1")
        assert (found.value, found.source) == ({"user": 1}, "sqlite")
        found = await rt.dispatcher.lookup("session", "s1")  # put back into Redis by the read
        assert (found.value, found.source) == ({"user": 1}, "redis")
        assert (await rt.dispatcher.lookup("session", "gone")).source == "miss"
        assert rt.status()["storages"]["durable"]["state"] == "up"


async def test_a_corrupt_file_is_a_503_with_a_typed_error_and_recovers_once_replaced(
        aiohttp_client: Any, sqlite_config: Any) -> None:
    config_ = sqlite_config()
    path = Path(config_.section(SqliteConfig).path)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"this is not a database\n" * 200)
    client = await aiohttp_client(create_app(config_))

    for method, url, body in [("PUT", "/api/sessions/s1", {"v": 1}), ("GET", "/api/sessions/s1", None),
                              ("DELETE", "/api/sessions/s1", None)]:
        resp = await client.request(method, url, json=body)
        text = await resp.text()
        assert resp.status == 503, text
        error = json.loads(text)["error"]
        assert error["code"] == "sqlite_unavailable"
        assert "not a database" in error["message"] and str(path) in error["message"]
        assert "Traceback" not in text
    ready = await (await client.get("/readyz")).json()
    assert ready["status"] == "degraded"  # Redis serves the cache-only namespaces meanwhile
    assert ready["durable"]["name"] == "sqlite" and ready["durable"]["ok"] is False
    assert "not a database" in ready["durable"]["last_error"]
    assert (await client.put("/api/users/u/profile", json={"name": "x"})).status == 200

    path.unlink()  # the operator removes the broken file: the next operation starts a new one
    assert (await client.put("/api/sessions/s1", json={"v": 2})).status == 200
    resp = await client.get("/api/sessions/s1")
    assert (await resp.json())["value"] == {"v": 2}
    assert (await (await client.get("/readyz")).json())["status"] == "ready"


@pytest.mark.parametrize(("make_path", "words"), [
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: tmp / "a-file" / "db.sqlite3", "not a directory"),
    (lambda tmp: tmp / "a-file" / "deeper" / "db.sqlite3", "Not a directory"),
])
async def test_a_path_that_cannot_hold_a_database_is_a_typed_error(tmp_path: Path, make_path: Any,
                                                                  words: str) -> None:
    (tmp_path / "a-file").write_text("I am a file")
    events = Recorder()
    storage = SqliteStorage(config(make_path(tmp_path)), health=OutageTracker("sqlite", events))
    await storage.open()  # never fails
    try:
        started = time.monotonic()
        for call in (lambda: storage.get(SESSION, "a"), lambda: storage.set(SESSION, "a", b"1", None),
                     lambda: storage.set_many([Entry(SESSION, "a", b"1", None)])):
            with pytest.raises(SqliteUnavailable, match=words) as info:
                await call()
            assert info.value.http_status == 503 and info.value.code == "sqlite_unavailable"
        assert time.monotonic() - started < 0.5
        status = storage.status()
        assert status["state"] == "down" and words in status["last_error"]
        assert status["errors"] == 4  # the three calls and the connect open() queued
        assert events.names == ["ondemand_degraded"]  # one outage, one event
    finally:
        await storage.close()


HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO ondemand_values (namespace, id, value) VALUES ('session', 'held', x'00')")
    print("locked", flush=True)
    sys.stdin.read()  # holds the write lock until the test closes our stdin (or kills us)
""")


@pytest.fixture
def lock_holder() -> Iterator[Any]:
    """Start a process that takes the write lock of a file and holds it until release() (or the test ends)."""
    procs: list[subprocess.Popen[str]] = []

    def hold(path: Path) -> Any:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"

        def release() -> None:
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(5) == 0

        return release

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_a_write_lock_held_by_another_process_is_a_bounded_typed_error(tmp_path: Path,
                                                                            lock_holder: Any) -> None:
    path = tmp_path / "db.sqlite3"
    events = Recorder()
    storage = SqliteStorage(config(path, busy_timeout=0.2, op_timeout=0.5), health=OutageTracker("sqlite", events))
    await storage.open()
    try:
        await storage.set(SESSION, "before", b"1", None)
        release = lock_holder(path)

        started = time.monotonic()
        with pytest.raises(SqliteUnavailable, match="busy_timeout") as info:
            await storage.set(SESSION, "a", b"1", None)
        assert 0.15 < time.monotonic() - started < 0.45
        assert getattr(info.value, "outcome_unknown", False) is False  # SQLite gave up: nothing was written
        # Twenty writers queue behind one another on the storage's one connection: none waits past its
        # own op_timeout, whatever the queue ahead of it.
        started = time.monotonic()
        outcomes = await asyncio.gather(*(storage.set(SESSION, f"q{i}", b"1", None) for i in range(20)),
                                        storage.set_many([Entry(SESSION, "m", b"1", None)]),
                                        storage.delete(SESSION, ["before"]), return_exceptions=True)
        assert time.monotonic() - started < 0.5 + 0.15
        assert all(isinstance(outcome, SqliteUnavailable) for outcome in outcomes), outcomes
        assert storage.status()["state"] == "down"
        # WAL: readers are not blocked by the writer, and see only what it committed. A read that
        # succeeds ends the outage (as for PostgreSQL, the state is that of the last operation).
        assert await storage.get_many(SESSION, ["before", "held", "a"]) == [b"1", None, None]
        assert storage.status()["state"] == "up"

        release()  # the other process rolls back and exits
        await storage.set(SESSION, "a", b"2", None)
        assert await storage.get_many(SESSION, ["a", "q0", "m", "before"]) == [b"2", None, None, b"1"]
        assert storage.status()["state"] == "up"
        assert events.names == ["ondemand_degraded", "ondemand_recovered"]
    finally:
        await storage.close()


async def test_an_operation_longer_than_op_timeout_is_aborted_and_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage(config(path, op_timeout=0.05))
    await storage.open()
    try:
        await storage.set(SESSION, "keep", b"1", None)
        many = [Entry(SESSION, f"m{i}", b"x" * 100, None) for i in range(100_000)]  # far over 0.05 s
        started = time.monotonic()
        with pytest.raises(SqliteUnavailable, match="op_timeout") as info:
            await storage.set_many(many)
        assert time.monotonic() - started < 1.0
        # The thread aborted the statement itself (the event loop's backstop would leave the outcome unknown).
        assert getattr(info.value, "outcome_unknown", False) is False
        assert rows(path) == 1  # the transaction was rolled back: all or nothing
        assert await storage.get(SESSION, "keep") == b"1"  # and the connection serves on
    finally:
        await storage.close()


WRITER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from ondemand.store.protocols import Entry, Namespace
    from ondemand.plugins.storage_sqlite import SqliteConfig, SqliteStorage

    NS = Namespace("session", None, True, "session", "ondemand:session:")

    async def main(path, name, go):
        storage = SqliteStorage(SqliteConfig(path=path, busy_timeout=5.0, op_timeout=10.0, synchronous="normal"))
        await storage.open()
        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.002)
        started = time.time()
        for i in range(150):
            await storage.set(NS, f"{name}-{i}", f"{name}:{i}".encode(), None)
            await storage.set(NS, "shared", f"{name}:{i}".encode(), None)
            if i % 10 == 0:
                await storage.set_many([Entry(NS, f"{name}-batch{i}-{j}", b"%d" % j, None) for j in range(10)])
        print(json.dumps({"started": started, "ended": time.time(), "errors": storage.status()["errors"]}),
              flush=True)
        await storage.close()

    asyncio.run(main(*sys.argv[1:]))
""")


async def test_two_processes_writing_at_once_lose_no_write(tmp_path: Path) -> None:
    path, go = tmp_path / "db.sqlite3", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(go)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
             for name in ("p1", "p2")]
    try:
        for proc in procs:  # both created the schema (at the same time) and wait for the signal
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        go.touch()
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            reports.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert [r["errors"] for r in reports] == [0, 0]
    assert max(r["started"] for r in reports) < min(r["ended"] for r in reports), "the writers did not overlap"

    storage = SqliteStorage(config(path))
    await storage.open()
    try:
        for name in ("p1", "p2"):
            ids = [f"{name}-{i}" for i in range(150)]
            assert await storage.get_many(SESSION, ids) == [f"{name}:{i}".encode() for i in range(150)]
            batch = [f"{name}-batch{i}-{j}" for i in range(0, 150, 10) for j in range(10)]
            assert await storage.get_many(SESSION, batch) == [b"%d" % j for _ in range(0, 150, 10) for j in range(10)]
        assert await storage.get(SESSION, "shared") in (b"p1:149", b"p2:149")  # the last write of one of them
        assert rows(path) == 2 * (150 + 150) + 1
    finally:
        await storage.close()


async def test_expired_rows_are_invisible_and_purged(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage(config(path, purge_interval=0.1))
    await storage.open()
    try:
        await storage.set_many([Entry(SESSION, "keep", b"1", None), Entry(SESSION, "soon", b"2", 0.05)])
        with sqlite3.connect(path) as conn:  # a backlog larger than one purge batch
            conn.executemany("INSERT INTO ondemand_values (namespace, id, value, expires_at)"
                             " VALUES ('session', ?, x'00', ?)",
                             [(f"old{i}", time.time() - 1) for i in range(2500)])
        assert await storage.get_many(SESSION, ["keep", "old1"]) == [b"1", None]
        await wait_for(lambda: rows(path) == 1, timeout=3)  # the periodic purge, batch after batch
        assert await storage.get(SESSION, "keep") == b"1"
        assert await storage.purge_expired() == 0
    finally:
        await storage.close()


async def test_many_ids_span_several_statements_in_one_snapshot(opened: SqliteStorage) -> None:
    ids = [f"k{i}" for i in range(1300)]  # more than one statement's worth of bound parameters
    await opened.set_many([Entry(SESSION, item_id, item_id.encode(), 60.0 if i % 2 else None)
                           for i, item_id in enumerate(ids)])
    assert await opened.get_many(SESSION, [*ids, "nope"]) == [i.encode() for i in ids] + [None]
    entries = await opened.get_entries(SESSION, ids)
    assert [e[0] for e in entries] == [i.encode() for i in ids]
    assert all((e[1] is None) if i % 2 == 0 else (0 < e[1] <= 60.0) for i, e in enumerate(entries))
    assert (await opened.delete(SESSION, [*ids, *ids[:10], "nope"])).removed == 1300
    assert await opened.get_many(SESSION, ids[:3]) == [None, None, None]


async def test_closed_storage_refuses_operations_and_can_be_opened_again(tmp_path: Path) -> None:
    storage = SqliteStorage(config(tmp_path / "db.sqlite3"))
    await storage.open()
    await storage.set(SESSION, "a", b"1", None)
    thread = storage._worker._thread  # type: ignore[union-attr]
    await storage.close()
    await storage.close()  # idempotent
    await wait_for(lambda: not thread.is_alive(), timeout=2)
    with pytest.raises(SqliteUnavailable, match="closed"):
        await storage.get(SESSION, "a")
    await storage.open()
    try:
        assert await storage.get(SESSION, "a") == b"1"
    finally:
        await storage.close()


async def test_a_forked_child_uses_a_connection_of_its_own(opened: SqliteStorage) -> None:
    await opened.set(SESSION, "parent", b"1", None)  # the parent's thread and connection exist now

    async def in_child() -> None:
        await opened.set(SESSION, "child", await opened.get(SESSION, "parent") + b"2", None)
        await opened.close()

    pid = os.fork()
    if pid == 0:  # the child: no pytest from here on, only an exit status
        code = 1
        try:
            asyncio.run(asyncio.wait_for(in_child(), 5))
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):  # noqa: ASYNC222 (WNOHANG: never blocks)
        assert time.monotonic() < deadline, "the child hung"
        await asyncio.sleep(0.02)
    assert os.waitstatus_to_exitcode(waited[1]) == 0
    assert not pid_alive(pid)
    assert await opened.get_many(SESSION, ["parent", "child"]) == [b"1", b"12"]  # the parent's connection still serves


async def test_the_outbox_records_with_the_write_in_one_transaction(tmp_path: Path, lock_holder: Any) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage(config(path))
    storage.outbox_bound = 5
    profile = Namespace("profile", 3600.0, False, "default", "ondemand:profile:")
    await storage.open()
    try:
        await storage.set(SESSION, "s", b"1", None, invalidate=True)
        await storage.set_many([Entry(SESSION, "m", b"1", None), Entry(profile, "p", b"1", None)], invalidate=True)
        assert (await storage.delete(SESSION, ["s", "s", "gone"], invalidate=True)).removed == 1
        assert await storage.expire(SESSION, "m", 60.0, invalidate=True) is not None
        quiet = await storage.set(SESSION, "quiet", b"1", None)  # without invalidate: due after the grace only
        pending = await storage.pending_invalidations(100, 3600.0)
        assert [(ns, i) for _, ns, i, _ in pending] == [("session", "s"), ("session", "m"), ("profile", "p"),
                                                        ("session", "s"), ("session", "gone"), ("session", "m")]
        seqs = [row.seq for row in pending]
        assert seqs == sorted(seqs) and len(set(seqs)) == 6  # oldest first
        assert [row.seq for row in await storage.pending_invalidations(100, 0.0)] == sorted([*seqs, quiet.outbox])
        await storage.ack_invalidations([quiet.outbox])

        # A write that fails records nothing: the rows are part of its transaction.
        release = lock_holder(path)
        with pytest.raises(SqliteUnavailable):
            await storage.set(SESSION, "locked", b"1", None, invalidate=True)
        release()
        assert len(await storage.pending_invalidations(100, 0.0)) == 6

        await storage.ack_invalidations(seqs[-1:])  # the newest: its number must never come back
        await storage.record_invalidations([Target(SESSION, "after", 9)])
        after = await storage.pending_invalidations(100, 3600.0)
        assert after[-1][1:] == ("session", "after", 9) and after[-1][0] > seqs[-1]
        # Six rows now, past the bound of 5: one overflow row stands for whatever comes next.
        await storage.record_invalidations([Target(SESSION, "x"), Target(SESSION, "y")])
        await storage.record_invalidations([Target(SESSION, "z")])
        names = [row.namespace for row in await storage.pending_invalidations(100, 3600.0)]
        assert names == ["session"] * 2 + ["profile"] + ["session"] * 3 + ["*"]
        await storage.ack_invalidations([row.seq for row in await storage.pending_invalidations(100, 0.0)])
        assert await storage.pending_invalidations(100, 0.0) == []
        assert await storage.ack_invalidations([]) is None and await storage.record_invalidations([]) is None
    finally:
        await storage.close()
    assert await storage.wait_for_invalidations(5.0) is False  # closed: returns at once, no file opened


async def test_a_process_that_cannot_reach_redis_invalidates_through_the_sqlite_outbox(
        sqlite_config: Any, make_config: Any) -> None:
    # A and B share the SQLite file and B's Redis (our subprocess lifecycle over TCP); A's route to that
    # Redis is a closed port, so A's writes reach SQLite only. B finds A's outbox rows by its poll.
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as server:
        endpoint = await server.on_demand.ensure()
        shared = f"redis://:{endpoint.password}@127.0.0.1:{endpoint.port}/0"
        closed = f"redis://127.0.0.1:{free_port()}/0"
        b_config = sqlite_config({"lifecycle": {"plugin": "external", "redis_url": shared},
                                  "storage": {"outbox_poll": 0.2}})
        a_config = sqlite_config({"lifecycle": {"plugin": "external", "redis_url": closed}})
        async with Runtime(b_config) as b, Runtime(a_config) as a:
            await b.cache.cache_session("s", {"v": 1})
            await b.cache.cache_session("t", {"v": 1})
            assert await b.cache.get_session("s") == {"v": 1}  # cached in the shared Redis
            await a.cache.cache_session("s", {"v": 2})  # acknowledged: SQLite committed it
            await a.cache.delete_session("t")
            loop = asyncio.get_running_loop()
            started = loop.time()
            while (await b.cache.get_session("s"), await b.cache.get_session("t")) != ({"v": 2}, None):
                assert loop.time() - started < 2.0, "B went on serving what A replaced"
                await asyncio.sleep(0.01)
            for _ in range(10):
                assert (await b.cache.get_session("s"), await b.cache.get_session("t")) == ({"v": 2}, None)
            assert a.dispatcher.status()["outbox"]["recorded"] >= 2
            assert b.dispatcher.status()["outbox"]["delivered"] >= 2
            await wait_for(lambda: rows(Path(b_config.section(SqliteConfig).path),
                                        "SELECT count(*) FROM ondemand_invalidations") == 0)


# -- paths someone else prepared -------------------------------------------------------------------


def _nobody() -> int:
    import pwd

    return pwd.getpwnam("nobody").pw_uid


def _hostile(kind: str, base: Path, victim: Path) -> tuple[Path, Path]:
    """Prepare `kind` of hostile SQLite path under `base` (0700, ours): (sqlite.path, the path the error names)."""
    path = base / "app" / "db.sqlite3"
    path.parent.mkdir(mode=0o700)
    named = path
    if kind == "symlinked file":
        path.symlink_to(victim / "precious")
    elif kind == "symlinked -wal":
        sqlite3.connect(path).close()
        path.chmod(0o600)
        named = path.with_name("db.sqlite3-wal")
        named.symlink_to(victim / "precious")
    elif kind == "file of another user":
        sqlite3.connect(path).close()
        os.chown(path, _nobody(), -1)
    elif kind == "file 0666":
        sqlite3.connect(path).close()
        path.chmod(0o666)
    elif kind == "a fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory 0777":
        path.parent.chmod(0o777)
        named = path.parent
    elif kind == "directory of another user":
        os.chown(path.parent, _nobody(), -1)
        named = path.parent
    elif kind == "symlinked directory":
        path.parent.rmdir()
        path.parent.symlink_to(victim, target_is_directory=True)
        named = path.parent
    return path, named


_SQLITE_REFUSALS = {
    "symlinked file": "it is a symbolic link",
    "symlinked -wal": "it is a symbolic link",
    "file of another user": "it is owned by nobody",
    "file 0666": r"it is writable by group or others \(mode 0666\)",
    "a fifo": "it is a FIFO, not a regular file",
    "directory 0777": r"it is writable by group or others \(mode 0777\)",
    "directory of another user": "it is owned by nobody",
    "symlinked directory": "it is a symbolic link",
}


@pytest.mark.parametrize("kind", list(_SQLITE_REFUSALS))
async def test_a_sqlite_path_someone_else_prepared_is_refused_and_nothing_outside_is_touched(
        kind: str, tmp_path: Path) -> None:
    if "another user" in kind and os.geteuid() != 0:
        pytest.skip("needs root to chown to another user (CI runs as root)")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep me")
    before = sorted(os.listdir(victim)), (victim / "precious").stat().st_mtime_ns
    path, named = _hostile(kind, tmp_path, victim)
    storage = SqliteStorage(config(path))
    await storage.open()
    try:
        for call in (lambda: storage.set(SESSION, "a", b"1", None), lambda: storage.get(SESSION, "a")):
            with pytest.raises(SqliteUnavailable, match=_SQLITE_REFUSALS[kind]) as info:
                await call()
            assert info.value.code == "sqlite_unavailable" and info.value.http_status == 503
            assert f"{named}: it " in str(info.value) and "must be ours" in str(info.value), str(info.value)
    finally:
        await storage.close()
    assert (victim / "precious").read_bytes() == b"keep me"
    assert (sorted(os.listdir(victim)), (victim / "precious").stat().st_mtime_ns) == before


async def test_a_new_sqlite_file_is_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "db.sqlite3"
    old = os.umask(0)
    try:
        storage = SqliteStorage(config(path))
        await storage.open()
        try:
            await storage.set(SESSION, "a", b"1", None)
        finally:
            await storage.close()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700 and path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("existing", [False, True])
async def test_a_sqlite_file_on_a_read_only_file_system_is_a_clear_error(tmp_path: Path, existing: bool) -> None:
    mount = tmp_path / "ro"
    mount.mkdir(mode=0o700)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = mount / "db.sqlite3"
        if existing:
            sqlite3.connect(path).close()
            path.chmod(0o600)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        storage = SqliteStorage(config(path))
        await storage.open()
        try:
            with pytest.raises(SqliteUnavailable, match=rf"{path}: Read-only file system"):
                await storage.set(SESSION, "a", b"1", None)
        finally:
            await storage.close()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


async def test_requests_needing_a_refused_sqlite_file_answer_503_never_500(aiohttp_client: Any, sqlite_config: Any,
                                                                         tmp_path: Path) -> None:
    config_ = sqlite_config()
    path = Path(config_.section(SqliteConfig).path)
    path.parent.mkdir(mode=0o700)
    (tmp_path / "victim").write_bytes(b"keep me")
    path.symlink_to(tmp_path / "victim")
    client = await aiohttp_client(create_app(config_))
    for method, body in (("PUT", {"v": 1}), ("GET", None), ("DELETE", None)):
        resp = await client.request(method, "/api/sessions/s1", json=body)
        text = await resp.text()
        assert resp.status == 503, text
        error = json.loads(text)["error"]
        assert error["code"] == "sqlite_unavailable" and f"{path}: it is a symbolic link" in error["message"]
    assert (tmp_path / "victim").read_bytes() == b"keep me"
    assert (await client.put("/api/users/u/profile", json={"name": "x"})).status == 200  # the cache still serves
