"""The `sqlite` storage plugin: durable namespaced values in one SQLite file, with no server process.

The single-host durable store (README, "SQLite"). The standard library's sqlite3 on a thread of its own
per storage, not aiosqlite (the same design as a package): we need what it lacks, every operation
bounded in time. Each job carries a deadline the thread enforces itself (a job that waited past it is
skipped, a statement still running at it is aborted by the progress handler and rolled back), and the
event loop stops waiting at `op_timeout` whatever the thread does. The schema is PostgreSQL's, with the
outbox in a table of the same file, found by other processes' polls (SQLite has no notifications).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from ondemand.config import FieldError, SectionRegistry, positive
from ondemand.errors import BackendUnavailable, first_line
from ondemand.health import OutageTracker, StoreHealth, StoreState
from ondemand.hookspecs import hookimpl
from ondemand.host import files
from ondemand.registry import Registry
from ondemand.store.protocols import (
    OVERFLOW,
    Committed,
    Deleted,
    DurableEntry,
    Entry,
    Namespace,
    OutboxRow,
    StorageFactory,
    Target,
    purge_in_batches,
)
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.sqlite")

T = TypeVar("T")

SCHEMA_VERSION = 2
_PURGE_BATCH = 1000
_PURGE_MAX_BATCHES = 100  # per run: a huge backlog is worked off over several runs
_CHUNK = 500  # ids per statement: older SQLite builds allow at most 999 bound parameters
_PROGRESS_STEPS = 1000  # SQLite VM instructions between two deadline checks
_BUSY_SLACK = 0.05  # seconds a lock wait may outlast a job's deadline before the busy timeout is lowered
# How long after op_timeout the event loop stops waiting for the thread: it enforces the deadline itself
# (and reports a known outcome); this only matters when it is stuck in a system call (a hung disk).
_BACKSTOP = 0.25

_SCHEMA_SQL = (
    """CREATE TABLE IF NOT EXISTS ondemand_values (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        value BLOB NOT NULL,
        expires_at REAL,
        version INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, id)
    )""",
    "CREATE INDEX IF NOT EXISTS ondemand_values_expires_at ON ondemand_values (expires_at)"
    " WHERE expires_at IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS ondemand_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)",
    # AUTOINCREMENT: a sequence number is never reused, so acknowledging rows read earlier can never
    # delete a newer row that took the number of a delivered one.
    """CREATE TABLE IF NOT EXISTS ondemand_invalidations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at REAL NOT NULL,
        version INTEGER,
        urgent INTEGER NOT NULL DEFAULT 1
    )""",
    # The version counter: one for the whole file, bumped in each write's transaction. Writes are serialized
    # by SQLite's write lock (BEGIN IMMEDIATE), so versions follow commit order, and one counter never goes
    # back (not after a delete either).
    "CREATE TABLE IF NOT EXISTS ondemand_version (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO ondemand_version (id, value) VALUES (1, 0)",
)
# Version 1 (the first release) had no versions: its rows get version 0 (the oldest), its outbox rows are due
# at once. SQLite's ALTER TABLE has no IF NOT EXISTS: the columns are looked up first.
_MIGRATIONS = (
    ("ondemand_values", "version", "ALTER TABLE ondemand_values ADD COLUMN version INTEGER NOT NULL DEFAULT 0"),
    ("ondemand_invalidations", "version", "ALTER TABLE ondemand_invalidations ADD COLUMN version INTEGER"),
    ("ondemand_invalidations", "urgent",
     "ALTER TABLE ondemand_invalidations ADD COLUMN urgent INTEGER NOT NULL DEFAULT 1"),
)
OUTBOX_BOUND = 100_000  # urgent outbox rows; past it one OVERFLOW row stands for all (clear every namespace)
_SQL_VERSION = "INSERT OR IGNORE INTO ondemand_schema_version (version, applied_at) VALUES (?, ?)"

_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_SQL_GET = f"SELECT value FROM ondemand_values WHERE namespace = ? AND id = ? AND {_LIVE}"
_SQL_GET_ENTRY = f"SELECT value, expires_at, version FROM ondemand_values WHERE namespace = ? AND id = ? AND {_LIVE}"
_SQL_SET = """
INSERT INTO ondemand_values (namespace, id, value, expires_at, version) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (namespace, id) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at,
    version = excluded.version
"""
_SQL_EXPIRE = f"UPDATE ondemand_values SET expires_at = ?, version = ? WHERE namespace = ? AND id = ? AND {_LIVE}"
_SQL_RECORD = "INSERT INTO ondemand_invalidations (namespace, id, version, urgent, created_at) VALUES (?, ?, ?, ?, ?)"
_SQL_PENDING = ("SELECT seq, namespace, id, version FROM ondemand_invalidations WHERE urgent OR created_at <= ?"
                " ORDER BY seq LIMIT ?")
_SQL_PURGE = f"""
DELETE FROM ondemand_values WHERE rowid IN (
    SELECT rowid FROM ondemand_values WHERE expires_at <= ? LIMIT {_PURGE_BATCH}
)
"""


class SqliteUnavailable(BackendUnavailable):
    """The SQLite file could not serve the operation in time (locked, unreadable, not a database)."""

    code = "sqlite_unavailable"
    http_status = 503


def _a_file_path(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value or value == ":memory:" or value.startswith("file:"):
        raise FieldError(attribute.name, "expected the path of a file (not ':memory:' or a URI: the store must "
                                         f"outlive the process and be shared by its workers), got {value!r}")


@attrs.frozen
class SqliteConfig:
    """The [sqlite] table."""

    # The database file, relative to the working directory; its directory is created (0700) if missing.
    path: str = attrs.field(default=".ondemand/ondemand.sqlite3", validator=_a_file_path)
    # Seconds a statement waits for a lock another connection (another worker) holds; at most op_timeout.
    busy_timeout: float = attrs.field(default=1.0, validator=positive)
    # Seconds an operation may take in all, its wait behind other operations of this storage included.
    op_timeout: float = attrs.field(default=2.0, validator=positive)
    # Seconds between purges of expired rows (they are invisible from the moment they expire).
    purge_interval: float = attrs.field(default=60.0, validator=positive)
    # "full": a commit is on disk (fsync) before it is acknowledged; "normal": in WAL mode, safe against a
    # crash of the app, but an OS crash or power loss may lose the last commits. Faster.
    synchronous: Literal["full", "normal"] = "full"


@hookimpl
def ondemand_config_sections(sections: SectionRegistry) -> None:
    sections.add("sqlite", SqliteConfig)


@hookimpl
def ondemand_register_storages(registry: Registry[StorageFactory]) -> None:
    registry.add("sqlite", lambda context: SqliteStorage(context.config.section(SqliteConfig),
                                                         health=context.health))


# Workers a forked child inherited from its parent: their connections are the parent's (SQLite forbids
# using one across fork, and closing it here could disturb the parent's locks), so the child keeps them
# referenced, never used, never closed, never finalized.
_FORKED_AWAY: list[_Worker] = []


class _Worker:
    """One daemon thread and the one connection it owns; jobs run one at a time, in submission order.

    A job carries a deadline (time.monotonic()): one that expired while queued is skipped, and the
    progress handler (`past_deadline`, installed on the connection) aborts a statement running past it.
    """

    def __init__(self, name: str) -> None:
        self.conn: sqlite3.Connection | None = None
        self.journal_mode: str | None = None
        self.deadline = math.inf  # the running job's; math.inf between jobs and during a rollback
        self.busy_timeout = 0.0  # what the connection's busy timeout is set to now
        self._jobs: queue.SimpleQueue[tuple[Callable[[_Worker], Any], Future[Any], float] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[_Worker], T], deadline: float) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((job, future, deadline))
        return future

    def stop(self) -> None:
        """The thread ends after the jobs already queued."""
        self._jobs.put(None)

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future, deadline = item
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up (timed out or was cancelled) before the job started
            self.deadline = deadline
            try:
                result = job(self)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                self.deadline = math.inf
            del item, job, future  # no reference to a finished job's result while waiting for the next


def _expires_at(now: float, ttl: float | None) -> float | None:
    return None if ttl is None else now + ttl


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(ids))
    return [unique[i:i + _CHUNK] for i in range(0, len(unique), _CHUNK)]


def _transaction(worker: _Worker, body: Callable[[], T], *, write: bool = True) -> T:
    """`body` in one transaction; a write one takes the write lock at BEGIN (waiting up to busy_timeout),
    so it never has to upgrade a read lock halfway, the case where SQLite fails at once instead of waiting."""
    conn = worker.conn
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = body()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            worker.deadline = math.inf  # the rollback itself must not be aborted
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


def _select(w: _Worker, columns: str, ns: Namespace, ids: Sequence[str], now: float) -> list[tuple[Any, ...]]:
    """Live rows (id first) of `ids`; several statements run in one read transaction (one snapshot)."""
    chunks = _chunks(ids)

    def body() -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for chunk in chunks:
            rows += w.conn.execute(f"SELECT id, {columns} FROM ondemand_values WHERE namespace = ? AND id IN"
                                   f" ({','.join('?' * len(chunk))}) AND {_LIVE}", (ns.name, *chunk, now))
        return rows

    return body() if len(chunks) == 1 else _transaction(w, body, write=False)


def _versions(w: _Worker, count: int) -> range:
    """`count` new versions, in the caller's (write) transaction."""
    w.conn.execute("UPDATE ondemand_version SET value = value + ? WHERE id = 1", (count,))
    last = w.conn.execute("SELECT value FROM ondemand_version WHERE id = 1").fetchone()[0]
    return range(last - count + 1, last + 1)


def _record(w: _Worker, targets: Sequence[Target], now: float, bound: int) -> None:
    """Urgent outbox rows for `targets`, in the caller's transaction; past `bound` rows, one OVERFLOW row instead."""
    if not targets:
        return
    full = w.conn.execute(f"SELECT EXISTS (SELECT 1 FROM ondemand_invalidations LIMIT 1 OFFSET {int(bound)})"
                          ).fetchone()[0]
    if not full:
        w.conn.executemany(_SQL_RECORD, [(t.namespace.name, t.id, t.version, 1, now) for t in targets])
    elif not w.conn.execute("SELECT 1 FROM ondemand_invalidations WHERE namespace = ? LIMIT 1", (OVERFLOW,)).fetchall():
        w.conn.execute(_SQL_RECORD, (OVERFLOW, "", None, 1, now))


def _commit_rows(w: _Worker, written: Sequence[tuple[Namespace, str, int]], now: float, urgent: bool,
                 bound: int) -> list[Committed]:
    """The outbox rows of a write, in its transaction: not urgent (the writer acknowledges them once its cache
    write succeeded; any process delivers them after the grace), or urgent (bounded: see _record)."""
    if urgent:
        _record(w, [Target(ns, item_id, version) for ns, item_id, version in written], now, bound)
        return [Committed(ns, item_id, version, None) for ns, item_id, version in written]
    committed = []
    for ns, item_id, version in written:
        seq = w.conn.execute(_SQL_RECORD, (ns.name, item_id, version, 0, now)).lastrowid
        committed.append(Committed(ns, item_id, version, seq))
    return committed


_PATH_RULE = ("The SQLite file must be ours: a regular file (not a symbolic link, not a directory) owned by our "
              "user and writable by no one else, in a directory of ours that no one else can write (so that no one "
              "can plant its -wal or -shm files either); one someone else prepared is never used. Fix or remove it, "
              "or set sqlite.path to another path")


def _set_wal(conn: sqlite3.Connection, deadline: float) -> str:
    """PRAGMA journal_mode=WAL, retried while another process holds the lock it needs. Two processes
    opening a new file at once can meet in a lock upgrade that SQLite refuses at once instead of waiting
    (its deadlock rule: the busy handler is not called), so the busy timeout alone does not cover it."""
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _prepare_file(path: Path) -> None:
    """Check, or create, the file and its directory (ondemand.host.files): missing directories are created
    0700 and a missing file 0600 (O_EXCL, never through a symlink); an existing one is used only if it is
    ours, its -wal, -shm and -journal files too (_PATH_RULE). Anything else is one SqliteUnavailable naming
    the path and the rule."""
    parent = path.parent
    try:
        files.make_private_dirs(parent)
    except OSError as exc:
        raise SqliteUnavailable(f"cannot create the directory {exc.filename or parent} for the SQLite file: "
                                f"{exc.strerror or exc}") from None
    try:
        files.check_dir(parent)
    except files.Untrusted as exc:
        raise SqliteUnavailable(f"refusing the directory {parent}: it {exc.reason}; it would hold the SQLite file "
                                f"{path}. {_PATH_RULE}") from None
    except OSError as exc:
        raise SqliteUnavailable(f"cannot look at the directory {parent} of the SQLite file: "
                                f"{exc.strerror or exc}") from None
    try:
        files.create_private(path)  # an existing file (or anything else by that name): checked next
    except OSError as exc:
        raise SqliteUnavailable(f"cannot create the SQLite file {path}: {exc.strerror or exc}") from None
    for entry in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        try:
            files.lstat_private(entry)
        except files.Untrusted as exc:
            raise SqliteUnavailable(f"refusing the SQLite file {entry}: it {exc.reason}. {_PATH_RULE}") from None
        except OSError as exc:
            raise SqliteUnavailable(f"cannot look at the SQLite file {entry}: {exc.strerror or exc}") from None
    try:  # unreadable, or on a read-only file system: said here, with the path, not by sqlite3 later
        os.close(os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as exc:
        raise SqliteUnavailable(f"cannot open the SQLite file {path}: {exc.strerror or exc}") from None


@attrs.define(eq=False)
class SqliteStorage:
    """Storage in one SQLite file: (namespace, id) -> value blob with an optional expiry. See the module docstring."""

    config: SqliteConfig
    health: OutageTracker = attrs.field(factory=lambda: OutageTracker.quiet("sqlite"))
    name: str = "sqlite"
    path: Path = attrs.field(init=False)
    outbox_bound: int = attrs.field(init=False, default=OUTBOX_BOUND)
    _worker: _Worker | None = attrs.field(init=False, default=None)
    _connecting: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _purge_task: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _closed: bool = attrs.field(init=False, default=False)
    store_health: StoreHealth = attrs.field(init=False)
    _ops: int = attrs.field(init=False, default=0)
    _errors: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.store_health = StoreHealth(self.health, "SQLite storage", state=StoreState.STOPPED, log=log)
        self.path = Path(self.config.path).expanduser().absolute()
        # A forked copy of this process must not use the parent's connection (see _FORKED_AWAY).
        after_fork = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (method := after_fork()) and method())

    @property
    def _busy_timeout(self) -> float:
        return min(self.config.busy_timeout, self.config.op_timeout)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Never fails, never waits: starts the thread and queues the first connect (which creates the
        directory and the file); its outcome shows in status() and the health tracker."""
        self._closed = False
        self.store_health.set_state(StoreState.STARTING)
        if self._connecting is None or self._connecting.done():
            task = asyncio.create_task(self._run("open", lambda w, now: None), name="ondemand-sqlite-open")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # recorded by _run already
            self._connecting = task
        if self._purge_task is None or self._purge_task.done():
            self._purge_task = asyncio.create_task(self._purge_loop(), name="ondemand-sqlite-purge")

    async def close(self) -> None:
        """Bounded: the connection is closed by its thread within op_timeout + 1 s, else left to it."""
        self._closed = True
        await stop_tasks(self._purge_task, self._connecting, timeout=self.config.op_timeout + 1.0)
        self._purge_task = self._connecting = None
        worker, self._worker = self._worker, None
        if worker is not None:
            closed = worker.submit(_close_connection, math.inf)
            worker.stop()
            try:
                async with asyncio.timeout(self.config.op_timeout + 1.0):
                    await asyncio.wrap_future(closed)
            except TimeoutError:
                log.warning("the SQLite thread did not finish within %g s; left to finish on its own",
                            self.config.op_timeout + 1.0)
        self.store_health.set_state(StoreState.STOPPED)

    def _after_fork_in_child(self) -> None:
        if self._worker is not None:
            _FORKED_AWAY.append(self._worker)
            self._worker = None
        self._connecting = self._purge_task = None

    # -- the Storage operations --------------------------------------------------------------------
    # Each `work` runs on the storage's thread with that thread's worker (its open connection is
    # `w.conn`) and the wall-clock time the job started at.

    async def get(self, ns: Namespace, item_id: str) -> bytes | None:
        def work(w: _Worker, now: float) -> bytes | None:
            row = w.conn.execute(_SQL_GET, (ns.name, item_id, now)).fetchone()
            return None if row is None else row[0]

        return await self._run("get", work)

    async def get_entry(self, ns: Namespace, item_id: str) -> DurableEntry | None:
        """The value, its remaining lifetime in seconds (None: no expiry) and its version, or None when absent."""

        def work(w: _Worker, now: float) -> DurableEntry | None:
            row = w.conn.execute(_SQL_GET_ENTRY, (ns.name, item_id, now)).fetchone()
            if row is None:
                return None
            return DurableEntry(row[0], None if row[1] is None else row[1] - now, row[2])

        return await self._run("get", work)

    async def get_entries(self, ns: Namespace, ids: Sequence[str]) -> list[DurableEntry | None]:
        """get_entry for many ids in one job (one read snapshot), in the order of `ids`."""
        if not ids:
            return []

        def work(w: _Worker, now: float) -> list[DurableEntry | None]:
            found = {row[0]: DurableEntry(row[1], None if row[2] is None else row[2] - now, row[3])
                     for row in _select(w, "value, expires_at, version", ns, ids, now)}
            return [found.get(item_id) for item_id in ids]

        return await self._run("get_many", work)

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []

        def work(w: _Worker, now: float) -> list[bytes | None]:
            found = {row[0]: row[1] for row in _select(w, "value", ns, ids, now)}
            return [found.get(item_id) for item_id in ids]

        return await self._run("get_many", work)

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *,
                  invalidate: bool = False) -> Committed:
        """One transaction: the version, the row, its outbox row (urgent when `invalidate`)."""
        return await self._set(ns, item_id, value, ttl, invalidate)  # type: ignore[return-value]

    async def set_if(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *, version: int | None,
                     invalidate: bool = False) -> Committed | None:
        """`set` while the id holds no live value (version None) or one of `version`, checked in the same
        (write-locked) transaction."""
        return await self._set(ns, item_id, value, ttl, invalidate, condition=(version,))

    async def _set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, invalidate: bool, *,
                   condition: tuple[int | None] | None = None) -> Committed | None:
        def work(w: _Worker, now: float) -> Committed | None:
            def body() -> Committed | None:
                if condition is not None:
                    live = w.conn.execute(_SQL_GET_ENTRY, (ns.name, item_id, now)).fetchone()
                    if (None if live is None else live[2]) != condition[0]:
                        return None
                version = _versions(w, 1)[0]
                w.conn.execute(_SQL_SET, (ns.name, item_id, value, _expires_at(now, ttl), version))
                return _commit_rows(w, [(ns, item_id, version)], now, invalidate, self.outbox_bound)[0]

            return _transaction(w, body)

        return await self._run("set" if condition is None else "set_if", work)

    async def set_many(self, entries: Sequence[Entry], *, invalidate: bool = False) -> list[Committed]:
        """One transaction: every entry or none, and a reader sees all of them or none. Later duplicates win."""
        latest = {(e.namespace.name, e.id): e for e in entries}
        if not latest:
            return []

        def work(w: _Worker, now: float) -> list[Committed]:
            def body() -> list[Committed]:
                versions = _versions(w, len(latest))
                w.conn.executemany(_SQL_SET, [(name, item_id, e.value, _expires_at(now, e.ttl), version)
                                              for ((name, item_id), e), version in zip(latest.items(), versions,
                                                                                       strict=True)])
                written = [(e.namespace, e.id, version) for e, version in zip(latest.values(), versions, strict=True)]
                committed = {(c.namespace.name, c.id): c
                             for c in _commit_rows(w, written, now, invalidate, self.outbox_bound)}
                return [committed[(e.namespace.name, e.id)] for e in entries]

            return _transaction(w, body)

        return await self._run("set_many", work)

    async def delete(self, ns: Namespace, ids: Sequence[str], *, invalidate: bool = False) -> Deleted:
        """Remove ids, expired rows too; counts the live ones that existed, versions every id. One transaction."""
        unique = list(dict.fromkeys(ids))
        if not unique:
            return Deleted(0, [])

        def work(w: _Worker, now: float) -> Deleted:
            def body() -> Deleted:
                live = 0
                for chunk in _chunks(unique):
                    marks = ",".join("?" * len(chunk))
                    live += w.conn.execute(
                        f"SELECT count(*) FROM ondemand_values WHERE namespace = ? AND id IN ({marks}) AND {_LIVE}",
                        (ns.name, *chunk, now)).fetchone()[0]
                    w.conn.execute(f"DELETE FROM ondemand_values WHERE namespace = ? AND id IN ({marks})",
                                   (ns.name, *chunk))
                written = [(ns, item_id, version) for item_id, version in zip(unique, _versions(w, len(unique)),
                                                                              strict=True)]
                return Deleted(live, _commit_rows(w, written, now, invalidate, self.outbox_bound))

            return _transaction(w, body)

        return await self._run("delete", work)

    async def expire(self, ns: Namespace, item_id: str, ttl: float, *, invalidate: bool = False) -> Committed | None:
        def work(w: _Worker, now: float) -> Committed | None:
            def body() -> Committed | None:
                version = _versions(w, 1)[0]
                if w.conn.execute(_SQL_EXPIRE, (now + ttl, version, ns.name, item_id, now)).rowcount == 0:
                    return None
                return _commit_rows(w, [(ns, item_id, version)], now, invalidate, self.outbox_bound)[0]

            return _transaction(w, body)

        return await self._run("expire", work)

    # -- the outbox (ondemand.store.InvalidationOutbox) --------------------------------------------

    async def record_invalidations(self, targets: Sequence[Target]) -> None:
        if not targets:
            return

        def work(w: _Worker, now: float) -> None:
            _transaction(w, lambda: _record(w, targets, now, self.outbox_bound))

        await self._run("record_invalidations", work)

    async def pending_invalidations(self, limit: int, grace: float) -> list[OutboxRow]:
        def work(w: _Worker, now: float) -> list[OutboxRow]:
            return [OutboxRow(int(seq), str(name), str(item_id), None if version is None else int(version))
                    for seq, name, item_id, version in w.conn.execute(_SQL_PENDING, (now - grace, limit))]

        return await self._run("pending_invalidations", work)

    async def ack_invalidations(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return

        def work(w: _Worker, now: float) -> None:
            def body() -> None:
                unique = list(dict.fromkeys(seqs))
                for i in range(0, len(unique), _CHUNK):
                    chunk = unique[i:i + _CHUNK]
                    w.conn.execute(f"DELETE FROM ondemand_invalidations WHERE seq IN ({','.join('?' * len(chunk))})",
                                   chunk)

            _transaction(w, body)

        await self._run("ack_invalidations", work)

    async def wait_for_invalidations(self, timeout: float) -> bool:
        """SQLite has no notifications: this is the poll. True after `timeout` seconds when the storage is
        in use; False soon while it is not (closed, or its file not opened yet: nothing is opened for this)."""
        worker = self._worker
        if self._closed or worker is None or worker.conn is None:
            await asyncio.sleep(min(timeout, 0.1))
            return False
        await asyncio.sleep(timeout)
        return True

    async def purge_expired(self) -> int:
        """Delete expired rows in short batches, each its own job (other operations run in between)."""
        def work(w: _Worker, now: float) -> int:
            return w.conn.execute(_SQL_PURGE, (now,)).rowcount

        return await purge_in_batches(lambda: self._run("purge", work), _PURGE_BATCH, _PURGE_MAX_BATCHES)

    def status(self) -> dict[str, Any]:
        worker = self._worker
        return {
            "name": self.name,
            **self.store_health.status(),
            "path": str(self.path),
            "server_version": f"SQLite {sqlite3.sqlite_version}",
            "journal_mode": None if worker is None else worker.journal_mode,
            "synchronous": self.config.synchronous,
            "busy_timeout": self._busy_timeout,
            "op_timeout": self.config.op_timeout,
            "ops": self._ops,
            "errors": self._errors,
        }

    # -- the thread's side -------------------------------------------------------------------------

    def _connect(self, worker: _Worker, busy_timeout: float) -> None:
        _prepare_file(self.path)
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None,
                               cached_statements=64)
        try:
            conn.set_progress_handler(worker.past_deadline, _PROGRESS_STEPS)
            journal_mode = _set_wal(conn, time.monotonic() + busy_timeout)
            if journal_mode != "wal":
                log.warning("SQLite file %s is in journal mode %r, not WAL (a file system without shared "
                            "memory?): readers and the writer of several processes wait for one another",
                            self.path, journal_mode)
            conn.execute(f"PRAGMA synchronous={self.config.synchronous.upper()}")

            def schema() -> int:
                for statement in _SCHEMA_SQL:
                    conn.execute(statement)
                for table, column, alter in _MIGRATIONS:
                    if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                        conn.execute(alter)
                conn.execute(_SQL_VERSION, (SCHEMA_VERSION, time.time()))
                return conn.execute("SELECT max(version) FROM ondemand_schema_version").fetchone()[0]

            worker.conn = conn  # for the schema's transaction; forgotten again if anything fails
            version = _transaction(worker, schema)
            if version > SCHEMA_VERSION:
                raise SqliteUnavailable(f"the SQLite file {self.path} has schema version {version}, written by a "
                                        f"newer ondemand; this one knows version {SCHEMA_VERSION}")
        except BaseException:
            worker.conn = None
            conn.close()
            raise
        worker.journal_mode, worker.busy_timeout = journal_mode, busy_timeout

    def _in_thread(self, worker: _Worker, what: str, work: Callable[[_Worker, float], T]) -> T:
        remaining = worker.deadline - time.monotonic()
        if remaining <= 0:
            raise self._expired(what)  # it waited in the queue for all of its time: not even started
        try:
            # No lock wait may outlast the job's deadline (it may have waited in the queue): a job that
            # could not finish in time always fails here, rolled back, and the outcome is known.
            busy = min(self._busy_timeout, remaining)
            if worker.conn is None:
                self._connect(worker, busy)
            elif busy < worker.busy_timeout - _BUSY_SLACK or busy > worker.busy_timeout:
                worker.conn.execute(f"PRAGMA busy_timeout = {max(1, int(busy * 1000))}")
                worker.busy_timeout = busy
            return work(worker, time.time())
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", "") or ""
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise SqliteUnavailable(
                    f"SQLite {what} waited {self._busy_timeout:g} s (busy_timeout) for a lock another connection "
                    f"holds on {self.path}") from None
            if name == "SQLITE_INTERRUPT":
                raise self._expired(what) from None
            _close_connection(worker)  # the file may be broken or replaced: the next job opens it again
            raise SqliteUnavailable(f"SQLite {what} failed on {self.path}: {first_line(exc)}") from None
        except OSError as exc:
            _close_connection(worker)
            raise SqliteUnavailable(f"SQLite {what} failed on {self.path}: {exc.strerror or exc}") from None

    def _expired(self, what: str = "operation") -> SqliteUnavailable:
        return SqliteUnavailable(f"SQLite {what} did not complete within {self.config.op_timeout:g} s (op_timeout)")

    # -- the event loop's side ---------------------------------------------------------------------

    def _ready_worker(self) -> _Worker:
        if self._closed:
            raise SqliteUnavailable("the SQLite storage is closed")
        if self._worker is None:
            self._worker = _Worker("ondemand-sqlite")
        return self._worker

    async def _run(self, what: str, work: Callable[[_Worker, float], T]) -> T:
        self._ops += 1
        try:
            worker = self._ready_worker()
            timeout = self.config.op_timeout
            job = worker.submit(lambda w: self._in_thread(w, what, work), time.monotonic() + timeout)
            try:
                async with asyncio.timeout(timeout + _BACKSTOP):
                    result = await asyncio.wrap_future(job)  # cancelling it cancels a job not started yet
            except TimeoutError:
                # The thread is stuck: a job it started (a write waiting on fsync) may still complete.
                error = self._expired(what)
                error.outcome_unknown = not job.cancel()  # False: it had started (or just finished)
                raise error from None
        except SqliteUnavailable as exc:
            self._errors += 1
            self.store_health.failed(str(exc))
            raise
        self.store_health.succeeded()
        return result


    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.purge_interval)
            worker = self._worker
            if worker is None or worker.conn is None:
                continue  # not open (a failed open is retried by the next operation, not by the purge)
            try:
                deleted = await self.purge_expired()
            except SqliteUnavailable as exc:
                log.debug("purge of expired rows skipped: %s", exc)
            except Exception:
                log.exception("purge of expired rows failed")
            else:
                if deleted:
                    log.debug("purged %d expired rows", deleted)


def _close_connection(worker: _Worker) -> None:
    conn, worker.conn = worker.conn, None
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
