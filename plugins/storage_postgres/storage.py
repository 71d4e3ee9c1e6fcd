"""PostgresStorage: durable namespaced values in PostgreSQL, through aiopg.

With `postgres.dsn = "embedded"` (the default) the plugin uses the PostgreSQL of `postgres.data_dir`,
from the binaries bundled in the `pgserver` package (server.py): started on first use
by the first process that needs it, adopted by every other process using the same data directory (the
workers of `run.py --workers N`, a script beside `run.py`), stopped by its owner when all of them were
idle for `postgres.idle_timeout`. Any other dsn is a libpq DSN or a postgresql:// URL of a server
someone else runs. Its settings are the [postgres] table (`PostgresConfig`); `DATABASE_URL` sets
`postgres.dsn`.

PostgreSQL being down never stops the app: open() returns at once and connects in the background;
operations wait a bounded time and raise PostgresUnavailable; the next operation tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiopg
import attrs
import psycopg2
import psycopg2.extensions

from ondemand.config import SECRET, between, positive, redact_url
from ondemand.errors import ConfigError, PostgresUnavailable, first_line
from ondemand.health import OutageTracker, StoreHealth, StoreState
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from ondemand.plugins.storage_postgres.tls import check_tls
from ondemand.store.protocols import (
    OVERFLOW,
    Committed,
    Deleted,
    DurableEntry,
    Entry,
    Namespace,
    OutboxRow,
    Target,
    purge_in_batches,
)
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.postgres")

T = TypeVar("T")

SCHEMA_VERSION = 2
# pg_advisory_xact_lock key serializing schema creation between apps sharing one database ("ondemand").
_SCHEMA_LOCK_KEY = 0x6F6E64656D616E64
_PURGE_BATCH = 1000
_PURGE_MAX_BATCHES = 100  # per run: a huge backlog is worked off over several runs, never in one go
_RECONNECT_FIRST, _RECONNECT_MAX = 0.1, 2.0  # seconds between background reconnects after a failure, doubling

# Version 1 (the first release) had no versions: its tables get the columns here, its rows version 0 (the
# oldest, so any write of the new release replaces their cached copies) and its outbox rows are due at once.
_SCHEMA_SQL = f"""
BEGIN;
SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY});
CREATE TABLE IF NOT EXISTS ondemand_values (
    namespace text NOT NULL,
    id text NOT NULL,
    value bytea NOT NULL,
    expires_at timestamptz NULL,
    version bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS ondemand_values_expires_at
    ON ondemand_values (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS ondemand_invalidations (
    seq bigserial PRIMARY KEY,
    namespace text NOT NULL,
    id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    version bigint NULL,
    urgent boolean NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS ondemand_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE IF NOT EXISTS ondemand_version AS bigint;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM ondemand_schema_version WHERE version >= 2) THEN
        ALTER TABLE ondemand_values ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
        ALTER TABLE ondemand_invalidations ADD COLUMN IF NOT EXISTS version bigint NULL;
        ALTER TABLE ondemand_invalidations ADD COLUMN IF NOT EXISTS urgent boolean NOT NULL DEFAULT true;
    END IF;
END $$;
INSERT INTO ondemand_schema_version (version) VALUES ({SCHEMA_VERSION}) ON CONFLICT DO NOTHING;
COMMIT;
"""
_SQL_SCHEMA_VERSION = "SELECT max(version) FROM ondemand_schema_version"

# Versions: one sequence for every id of every namespace, so a version never comes back, not after a delete
# either. Every write first takes a transaction-scoped advisory lock on each of its (namespace, id) in the
# same round trip (one id: in the statement itself; several: a statement of its own before the write's, the
# two run in one implicit transaction), in a fixed order so that two writes of several ids cannot deadlock.
# `nextval` is evaluated under that lock, so of two commits of one id the later has the higher version, the
# first insert of an id included (no row to lock there, and its VALUES are evaluated before the insert: a
# delete racing it would otherwise win a higher version and commit first). The two-int form of the lock
# never meets the schema lock's bigint one.
_LOCK_MANY = """SELECT pg_advisory_xact_lock(a, b) FROM (
    SELECT DISTINCT hashtext(ns) AS a, hashtext(id) AS b FROM unnest(%s::text[], %s::text[]) AS t(ns, id) ORDER BY 1, 2
) AS locks;
"""

# The outbox: every write records its keys and versions in the same statement (a CTE), not urgent; the writer
# acknowledges (deletes) them once its cache write succeeded, and any process delivers those older than the
# grace. `urgent` rows (a process that cannot reach the cache) are due at once and wake every listening
# process with NOTIFY at commit. Past the bound, urgent recording inserts one OVERFLOW row instead (the
# deliverer clears every namespace); a write's own rows are not bounded (they are acknowledged at once).
_OUTBOX_CHANNEL = "ondemand_invalidations"
OUTBOX_BOUND = 100_000
_OUTBOX_FULL = f"EXISTS (SELECT 1 FROM ondemand_invalidations OFFSET {OUTBOX_BOUND} LIMIT 1)"
_NOTIFY = f"SELECT pg_notify('{_OUTBOX_CHANNEL}', '');\n"
_SQL_OVERFLOW = f"""INSERT INTO ondemand_invalidations (namespace, id) SELECT '{OVERFLOW}', '' WHERE {_OUTBOX_FULL}
    AND NOT EXISTS (SELECT 1 FROM ondemand_invalidations WHERE namespace = '{OVERFLOW}');
"""
_SQL_RECORD = _SQL_OVERFLOW + f"""INSERT INTO ondemand_invalidations (namespace, id, version)
SELECT ns, id, v FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS t(ns, id, v) WHERE NOT {_OUTBOX_FULL};
""" + _NOTIFY
_SQL_PENDING = """SELECT seq, namespace, id, version FROM ondemand_invalidations
WHERE urgent OR created_at <= now() - %s::float8 * interval '1 second' ORDER BY seq LIMIT %s"""
_SQL_ACK = "DELETE FROM ondemand_invalidations WHERE seq = ANY(%s::bigint[])"


def _with_outbox(written: str, urgent: bool, *, more: str = "") -> str:
    """A write statement `written` (a CTE named `w` returning namespace, id, version) that records its rows in
    the outbox and answers (namespace, id, version, outbox seq, then `more` of w's columns). Not urgent and
    nothing more: the outbox INSERT answers them itself (no join: every durable write's path). Urgent: bounded
    (so some rows may record nothing: w is joined with what was), and NOTIFY first."""
    if not urgent and not more:
        return f"""WITH {written}
INSERT INTO ondemand_invalidations (namespace, id, version, urgent) SELECT namespace, id, version, false FROM w
RETURNING namespace, id, version, seq"""
    sql = f"""WITH {written},
ob AS (INSERT INTO ondemand_invalidations (namespace, id, version, urgent)
       SELECT namespace, id, version, {urgent} FROM w {f"WHERE NOT {_OUTBOX_FULL}" if urgent else ""}
       RETURNING seq, namespace, id)
SELECT w.namespace, w.id, w.version, ob.seq{more} FROM w LEFT JOIN ob USING (namespace, id)"""
    return _NOTIFY + _SQL_OVERFLOW + sql if urgent else sql


_LIVE = "(expires_at IS NULL OR expires_at > now())"
# NULL ttl -> NULL expires_at (no expiry), because NULL * interval is NULL.
_EXPIRES = "now() + %s::float8 * interval '1 second'"

_SQL_GET = f"SELECT value FROM ondemand_values WHERE namespace = %s AND id = %s AND {_LIVE}"
_SQL_GET_ENTRY = (
    "SELECT value, EXTRACT(EPOCH FROM expires_at - now())::float8, version FROM ondemand_values"
    f" WHERE namespace = %s AND id = %s AND {_LIVE}"
)
_SQL_GET_ENTRIES = (
    "SELECT id, value, EXTRACT(EPOCH FROM expires_at - now())::float8, version FROM ondemand_values"
    f" WHERE namespace = %s AND id = ANY(%s::text[]) AND {_LIVE}"
)
_SQL_GET_MANY = f"SELECT id, value FROM ondemand_values WHERE namespace = %s AND id = ANY(%s::text[]) AND {_LIVE}"
_UPSERT = """ON CONFLICT (namespace, id) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at,
    version = nextval('ondemand_version')
RETURNING namespace, id, version)"""
# One id: the lock in the statement itself, a MATERIALIZED CTE the insert selects from, so that it is taken
# before the row (and its VALUES' nextval) is produced.
_LOCKED_ONE = "l AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s)) AS locked),\n"
_SET = _LOCKED_ONE + f"""w AS (INSERT INTO ondemand_values (namespace, id, value, expires_at, version)
SELECT %s, %s, %s, {_EXPIRES}, nextval('ondemand_version') FROM l
{_UPSERT}"""
# get_or_compute's writes of a loaded value, conditional on the id's live value: none (an insert that leaves a
# live row alone: no row is written or recorded; the existing row's expiry is named in full, EXCLUDED's is the
# new one), or the version it was loaded after (an update of that row alone).
_SET_IF_ABSENT = _LOCKED_ONE + f"""w AS (INSERT INTO ondemand_values (namespace, id, value, expires_at, version)
SELECT %s, %s, %s, {_EXPIRES}, nextval('ondemand_version') FROM l
ON CONFLICT (namespace, id) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at,
    version = nextval('ondemand_version')
    WHERE ondemand_values.expires_at IS NOT NULL AND ondemand_values.expires_at <= now()
RETURNING namespace, id, version)"""
_SET_IF_VERSION = _LOCKED_ONE + f"""w AS (UPDATE ondemand_values
    SET value = %s, expires_at = {_EXPIRES}, version = nextval('ondemand_version')
    WHERE namespace = %s AND id = %s AND version = %s AND {_LIVE} AND EXISTS (SELECT FROM l)
    RETURNING namespace, id, version)"""
_SET_MANY = f"""w AS (INSERT INTO ondemand_values (namespace, id, value, expires_at, version)
SELECT ns, id, value, now() + ttl * interval '1 second', nextval('ondemand_version')
FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::float8[]) AS t(ns, id, value, ttl)
{_UPSERT}"""
# Expired rows are removed too, but only live ones count as "existed". Every id gets a version: a deleted row
# the one evaluated after it was deleted, an absent id a fresh one.
_DELETE = f"""gone AS (DELETE FROM ondemand_values WHERE namespace = %s AND id = ANY(%s::text[])
    RETURNING id, {_LIVE} AS live, nextval('ondemand_version') AS version),
w AS (SELECT %s::text AS namespace, u.id, COALESCE(g.version, nextval('ondemand_version')) AS version,
             COALESCE(g.live, false) AS live
      FROM unnest(%s::text[]) AS u(id) LEFT JOIN gone g USING (id))"""
_EXPIRE = _LOCKED_ONE + f"""w AS (UPDATE ondemand_values
    SET expires_at = {_EXPIRES}, version = nextval('ondemand_version')
    WHERE namespace = %s AND id = %s AND {_LIVE} AND EXISTS (SELECT FROM l) RETURNING namespace, id, version)"""
_SQL_SET = {urgent: _with_outbox(_SET, urgent) for urgent in (False, True)}
_SQL_SET_IF_ABSENT = {urgent: _with_outbox(_SET_IF_ABSENT, urgent) for urgent in (False, True)}
_SQL_SET_IF_VERSION = {urgent: _with_outbox(_SET_IF_VERSION, urgent) for urgent in (False, True)}
_SQL_SET_MANY = {urgent: _LOCK_MANY + _with_outbox(_SET_MANY, urgent) for urgent in (False, True)}
_SQL_EXPIRE = {urgent: _with_outbox(_EXPIRE, urgent) for urgent in (False, True)}
_SQL_DELETE = {urgent: _LOCK_MANY + _with_outbox(_DELETE, urgent, more=", w.live") for urgent in (False, True)}
# ctid batches keep each purge statement short, so it never holds many row locks for long.
_SQL_PURGE = f"""
DELETE FROM ondemand_values WHERE ctid IN (
    SELECT ctid FROM ondemand_values WHERE expires_at <= now() LIMIT {_PURGE_BATCH}
) AND expires_at <= now()
"""


@attrs.frozen
class PostgresConfig:
    """The [postgres] table."""

    dsn: str = attrs.field(default="embedded", metadata={SECRET: "url"})
    data_dir: str = ".ondemand/pgdata"
    connect_timeout: float = attrs.field(default=2.0, validator=positive)
    statement_timeout: float = attrs.field(default=2.0, validator=positive)
    startup_timeout: float = attrs.field(default=30.0, validator=positive)
    pool_min: int = attrs.field(default=1, validator=between(0, 1000))
    pool_max: int = attrs.field(default=10, validator=between(1, 1000))
    purge_interval: float = attrs.field(default=60.0, validator=positive)
    # The embedded server: stopped when every process using it was idle this long (the next use starts it).
    idle_timeout: float = attrs.field(default=300.0, validator=positive)


def _check_dsn(dsn: str) -> None:
    """A DSN libpq cannot parse, or a port that is not one, is a ConfigError at startup: every connection
    would fail. libpq's complaint is shown with what it quotes hidden (it may be part of the password)."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        problem = re.sub(r'"([^"]*)"', lambda m: m[0] if re.fullmatch(r"[=\]]", m[1]) else '"..."', first_line(exc))
        raise ConfigError(f"not a libpq connection string or postgresql:// URL ({problem})",
                          key="postgres.dsn") from None
    for port in params.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) <= 65535):
            raise ConfigError(f"port {port!r} is not a port number (1 to 65535)", key="postgres.dsn")
    check_tls(params)


def _version_name(number: int) -> str:
    """libpq's server_version (160004) as people write it: PostgreSQL 16.4."""
    return f"PostgreSQL {number // 10000}.{number % 10000}" if number >= 100000 else \
        f"PostgreSQL {number // 10000}.{number // 100 % 100}.{number % 100}"


def _first_line(exc: BaseException) -> str:
    return redact_url(first_line(exc))


def _committed(rows: Sequence[Sequence[Any]], namespaces: dict[str, Namespace]) -> dict[tuple[str, str], Committed]:
    """(namespace, id, version, outbox seq) rows -> Committed by (namespace name, id)."""
    return {(name, item_id): Committed(namespaces[name], item_id, int(version), None if seq is None else int(seq))
            for name, item_id, version, seq, *_ in rows}


def _unavailable(message: str, outcome_unknown: bool) -> PostgresUnavailable:
    error = PostgresUnavailable(message)
    error.outcome_unknown = outcome_unknown
    return error


def _is_statement_cancel(exc: asyncio.CancelledError) -> bool:
    """aiopg turns a server-side cancel (statement_timeout) into CancelledError; tell it from a real one."""
    task = asyncio.current_task()
    return isinstance(exc.__context__, psycopg2.extensions.QueryCanceledError) and (
        task is None or task.cancelling() == 0
    )


@attrs.define(eq=False)
class PostgresStorage:
    """Storage on PostgreSQL: one table of (namespace, id) -> bytea value with an optional expiry."""

    config: PostgresConfig
    health: OutageTracker = attrs.field(factory=lambda: OutageTracker.quiet("postgres"))
    name: str = "postgres"
    embedded: EmbeddedPostgres | None = attrs.field(init=False, default=None)
    _pool: aiopg.Pool | None = attrs.field(init=False, default=None)
    _connecting: asyncio.Task[aiopg.Pool] | None = attrs.field(init=False, default=None)
    _reconnecting: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _dsn: str | None = attrs.field(init=False, default=None)  # where the pool connects (the outbox listens there)
    _listener: aiopg.Connection | None = attrs.field(init=False, default=None)  # LISTENs for outbox rows
    _purge_task: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _idle_task: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _background: set[asyncio.Task[Any]] = attrs.field(init=False, factory=set)
    _closed: bool = attrs.field(init=False, default=False)
    store_health: StoreHealth = attrs.field(init=False)
    _ops: int = attrs.field(init=False, default=0)
    _errors: int = attrs.field(init=False, default=0)
    _server_version: str | None = attrs.field(init=False, default=None)  # "PostgreSQL 16.4", once connected

    def __attrs_post_init__(self) -> None:
        self.store_health = StoreHealth(self.health, "PostgreSQL storage", state=StoreState.STARTING, log=log)
        if self.config.dsn != "embedded":
            _check_dsn(self.config.dsn)
        else:
            self.embedded = EmbeddedPostgres(self.config.data_dir, startup_timeout=self.config.startup_timeout,
                                             activity_interval=min(1.0, self.config.idle_timeout / 10))
            self.embedded.set_exit_callback(self._sibling_server_exited)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Never fails, never waits. An external server is connected to in the background at once
        (so status shows early whether it is there); the embedded one starts on first use, like
        Redis: starting the app spawns nothing."""
        self._closed = False
        if self.embedded is None:
            self._start_connecting()
        else:
            self.store_health.set_state(StoreState.STOPPED)
        if self._purge_task is None or self._purge_task.done():
            self._purge_task = asyncio.create_task(self._purge_loop(), name="ondemand-postgres-purge")
        if self.embedded is not None and (self._idle_task is None or self._idle_task.done()):
            self._idle_task = asyncio.create_task(self._idle_loop(), name="ondemand-postgres-idle")

    async def close(self) -> None:
        self._closed = True
        await stop_tasks(self._purge_task, self._idle_task, self._connecting, self._reconnecting,
                         timeout=self.config.startup_timeout)
        self._purge_task = self._idle_task = self._connecting = self._reconnecting = None
        self._close_listener()
        if self._pool is not None:
            self._drop_pool(self._pool)
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.config.statement_timeout + 2.0)
        if self.embedded is not None:
            await self.embedded.stop()

    # -- the Storage operations --------------------------------------------------------------------

    async def get(self, ns: Namespace, item_id: str) -> bytes | None:
        self._note_use()

        async def work(cur: aiopg.Cursor) -> bytes | None:
            await cur.execute(_SQL_GET, (ns.name, item_id))
            row = await cur.fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._run("get", work)

    async def get_entry(self, ns: Namespace, item_id: str) -> DurableEntry | None:
        """The value, its remaining lifetime in seconds (None: no expiry) and its version, or None when absent."""
        self._note_use()

        async def work(cur: aiopg.Cursor) -> DurableEntry | None:
            await cur.execute(_SQL_GET_ENTRY, (ns.name, item_id))
            row = await cur.fetchone()
            return DurableEntry(bytes(row[0]), row[1], int(row[2])) if row is not None else None

        return await self._run("get", work)

    async def get_entries(self, ns: Namespace, ids: Sequence[str]) -> list[DurableEntry | None]:
        """get_entry for many ids, one statement."""
        self._note_use()
        if not ids:
            return []

        async def work(cur: aiopg.Cursor) -> list[DurableEntry | None]:
            await cur.execute(_SQL_GET_ENTRIES, (ns.name, list(ids)))
            found = {row[0]: DurableEntry(bytes(row[1]), row[2], int(row[3])) for row in await cur.fetchall()}
            return [found.get(item_id) for item_id in ids]

        return await self._run("get_many", work)

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]:
        self._note_use()
        if not ids:
            return []

        async def work(cur: aiopg.Cursor) -> list[bytes | None]:
            await cur.execute(_SQL_GET_MANY, (ns.name, list(ids)))
            found = {row[0]: bytes(row[1]) for row in await cur.fetchall()}
            return [found.get(item_id) for item_id in ids]

        return await self._run("get_many", work)

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *,
                  invalidate: bool = False) -> Committed:
        """One statement: the upsert, its version and its outbox row (see _with_outbox)."""
        self._note_use()

        async def work(cur: aiopg.Cursor) -> Committed:
            await cur.execute(_SQL_SET[invalidate], (ns.name, item_id, ns.name, item_id, value, ttl))
            _, _, version, seq = await cur.fetchone()
            return Committed(ns, item_id, int(version), None if seq is None else int(seq))

        return await self._run("set", work)

    async def set_if(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, *, version: int | None,
                     invalidate: bool = False) -> Committed | None:
        """`set` while the id holds no live value (version None) or one of `version`: one statement, under the
        id's lock like every write of it."""
        self._note_use()
        if version is None:
            sql, params = _SQL_SET_IF_ABSENT[invalidate], (ns.name, item_id, ns.name, item_id, value, ttl)
        else:
            sql, params = _SQL_SET_IF_VERSION[invalidate], (ns.name, item_id, value, ttl, ns.name, item_id, version)

        async def work(cur: aiopg.Cursor) -> Committed | None:
            await cur.execute(sql, params)
            row = await cur.fetchone()
            return None if row is None else Committed(ns, item_id, int(row[2]), None if row[3] is None else int(row[3]))

        return await self._run("set_if", work)

    async def set_many(self, entries: Sequence[Entry], *, invalidate: bool = False) -> list[Committed]:
        """One statement: atomic, one round trip. Later duplicates win (ON CONFLICT cannot touch a row twice)."""
        self._note_use()
        latest = {(e.namespace.name, e.id): e for e in entries}
        if not latest:
            return []
        columns = (
            [ns for ns, _ in latest],
            [item_id for _, item_id in latest],
            [e.value for e in latest.values()],
            [e.ttl for e in latest.values()],
        )
        namespaces = {e.namespace.name: e.namespace for e in entries}

        async def work(cur: aiopg.Cursor) -> list[Committed]:
            await cur.execute(_SQL_SET_MANY[invalidate], (columns[0], columns[1], *columns))
            committed = _committed(await cur.fetchall(), namespaces)
            return [committed[(e.namespace.name, e.id)] for e in entries]

        return await self._run("set_many", work)

    async def delete(self, ns: Namespace, ids: Sequence[str], *, invalidate: bool = False) -> Deleted:
        self._note_use()
        unique = list(dict.fromkeys(ids))
        if not unique:
            return Deleted(0, [])

        async def work(cur: aiopg.Cursor) -> Deleted:
            await cur.execute(_SQL_DELETE[invalidate],
                              ([ns.name] * len(unique), unique, ns.name, unique, ns.name, unique))
            rows = await cur.fetchall()
            committed = _committed(rows, {ns.name: ns})
            return Deleted(sum(1 for row in rows if row[4]), [committed[(ns.name, i)] for i in unique])

        return await self._run("delete", work)

    async def expire(self, ns: Namespace, item_id: str, ttl: float, *, invalidate: bool = False) -> Committed | None:
        self._note_use()

        async def work(cur: aiopg.Cursor) -> Committed | None:
            await cur.execute(_SQL_EXPIRE[invalidate], (ns.name, item_id, ttl, ns.name, item_id))
            row = await cur.fetchone()
            return None if row is None else Committed(ns, item_id, int(row[2]), None if row[3] is None else int(row[3]))

        return await self._run("expire", work)

    # -- the outbox (ondemand.store.InvalidationOutbox) --------------------------------------------

    async def record_invalidations(self, targets: Sequence[Target]) -> None:
        if not targets:
            return
        columns = ([t.namespace.name for t in targets], [t.id for t in targets], [t.version for t in targets])

        async def work(cur: aiopg.Cursor) -> None:
            await cur.execute(_SQL_RECORD, columns)

        await self._run("record_invalidations", work)

    async def pending_invalidations(self, limit: int, grace: float) -> list[OutboxRow]:
        async def work(cur: aiopg.Cursor) -> list[OutboxRow]:
            await cur.execute(_SQL_PENDING, (grace, limit))
            return [OutboxRow(int(seq), str(namespace), str(item_id), None if version is None else int(version))
                    for seq, namespace, item_id, version in await cur.fetchall()]

        return await self._run("pending_invalidations", work)

    async def ack_invalidations(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return

        async def work(cur: aiopg.Cursor) -> None:
            await cur.execute(_SQL_ACK, (list(seqs),))

        await self._run("ack_invalidations", work)

    async def wait_for_invalidations(self, timeout: float) -> bool:
        """LISTEN on a connection of its own; a NOTIFY (sent at commit of every recording transaction)
        wakes us at once, `timeout` is the poll that backs it up. False while the storage is not in use
        (an embedded server is never started for this) or down (it reconnects in the background)."""
        if self._pool is None or self._dsn is None or self._closed:
            await asyncio.sleep(min(timeout, 0.1))  # no I/O: only notices soon that the storage came into use
            return False
        try:
            async with asyncio.timeout(timeout):
                listener = self._listener
                if listener is None or listener.closed:
                    self._listener = None
                    listener = await aiopg.connect(self._dsn, timeout=self.config.connect_timeout, enable_json=False,
                                                   enable_hstore=False, enable_uuid=False)
                    try:
                        async with listener.cursor() as cur:
                            await cur.execute(f"LISTEN {_OUTBOX_CHANNEL}")
                    except BaseException:
                        listener.close()
                        raise
                    self._listener = listener
                    return True  # rows recorded before we listened are found by the check that follows
                await listener.notifies.get()
                while not listener.notifies.empty():  # one check serves every notification so far
                    listener.notifies.get_nowait()
        except TimeoutError:
            pass
        except (psycopg2.Error, OSError) as exc:
            log.debug("outbox listener failed (%s); polling until it reconnects", _first_line(exc))
            self._close_listener()
            await asyncio.sleep(min(timeout, 0.5))
        return True

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.closed:
            listener.close()

    async def purge_expired(self) -> int:
        """Delete expired rows in short batches; returns how many went."""
        async def work(cur: aiopg.Cursor) -> int:
            await cur.execute(_SQL_PURGE)
            return cur.rowcount

        return await purge_in_batches(lambda: self._run("purge", work), _PURGE_BATCH, _PURGE_MAX_BATCHES)

    def status(self) -> dict[str, Any]:
        pool = self._pool
        return {
            "name": self.name,
            **self.store_health.status(),
            "embedded": self.embedded is not None,
            "dsn": self._where(),
            "server_version": self._server_version,
            "pid": self.embedded.pid if self.embedded is not None else None,
            # "self": this process started the embedded server; "sibling": another process did, we use it
            "owner": self.embedded.owner if self.embedded is not None else None,
            "data_dir": str(self.embedded.data_dir) if self.embedded is not None else None,
            "ops": self._ops,
            "errors": self._errors,
            "pool": None if pool is None else {"size": pool.size, "free": pool.freesize,
                                               "min": self.config.pool_min, "max": self.config.pool_max},
        }

    # -- connecting --------------------------------------------------------------------------------

    def _where(self) -> str:
        if self.embedded is None:
            return redact_url(self.config.dsn)
        return f"embedded ({self.embedded.data_dir})"

    def _op_timeout(self) -> float:
        # Acquiring may have to open a connection, then the statement runs.
        return self.config.connect_timeout + self.config.statement_timeout

    def _start_connecting(self) -> asyncio.Task[aiopg.Pool]:
        if self._connecting is None or self._connecting.done():
            task = asyncio.create_task(self._connect(), name="ondemand-postgres-connect")
            # Mark the outcome as retrieved: an op that timed out may never look at it.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._connecting = task
        return self._connecting

    async def _ready_pool(self) -> aiopg.Pool:
        pool = self._pool
        if pool is not None:
            if self.embedded is None or self.embedded.running:
                return pool
            self._drop_pool(pool)  # our server died: every pooled connection is dead
        if self._closed:
            raise PostgresUnavailable("the PostgreSQL storage is closed")
        budget = self._op_timeout()
        if self.embedded is not None and not self.embedded.running:
            budget += self.config.startup_timeout
        try:
            async with asyncio.timeout(budget):
                # Shielded: the attempt is shared by every waiting op, one op's timeout must not end it.
                return await asyncio.shield(self._start_connecting())
        except TimeoutError:
            raise PostgresUnavailable(f"PostgreSQL at {self._where()} was not reachable within {budget:g} s") from None

    async def _connect(self) -> aiopg.Pool:
        try:
            if self.embedded is not None:
                try:
                    await self.embedded.start()
                except OSError as exc:  # e.g. permissions on data_dir
                    raise PostgresUnavailable(f"cannot start the embedded PostgreSQL: {exc}") from None
                dsn = self.embedded.dsn
            else:
                dsn = self.config.dsn
            options = f"-c statement_timeout={round(self.config.statement_timeout * 1000)}"
            with contextlib.suppress(psycopg2.Error):  # keep options the DSN itself sets
                options = " ".join(filter(None, (psycopg2.extensions.parse_dsn(dsn).get("options"), options)))
            async with asyncio.timeout(self._op_timeout()):
                pool = await aiopg.create_pool(
                    dsn,
                    minsize=self.config.pool_min,
                    maxsize=self.config.pool_max,
                    timeout=self.config.connect_timeout,
                    enable_json=False, enable_hstore=False, enable_uuid=False,  # hstore costs a query per connection
                    options=options,
                    application_name="ondemand",
                )
                try:
                    async with pool.acquire() as conn, conn.cursor() as cur:
                        await cur.execute(_SCHEMA_SQL)
                        self._server_version = _version_name(conn.raw.server_version)
                        await cur.execute(_SQL_SCHEMA_VERSION)
                        (version,) = await cur.fetchone()
                    if version > SCHEMA_VERSION:
                        raise PostgresUnavailable(
                            f"the database at {self._where()} has schema version {version}, written by a newer "
                            f"ondemand; this one knows version {SCHEMA_VERSION}")
                except BaseException:
                    self._drop_pool(pool)
                    raise
        except PostgresUnavailable as exc:
            self.store_health.failed(str(exc))
            self._reconnect_in_background()
            raise
        except (psycopg2.Error, OSError, TimeoutError) as exc:
            what = "did not answer in time" if isinstance(exc, TimeoutError) else _first_line(exc)
            message = f"cannot connect to PostgreSQL at {self._where()}: {what}"
            self.store_health.failed(message)
            self._reconnect_in_background()
            raise PostgresUnavailable(message) from None
        self._pool, self._dsn = pool, dsn
        self.store_health.succeeded()
        return pool

    def _reconnect_in_background(self) -> None:
        """After a failure: connect again in the background (bounded backoff), so that the outbox resumes and
        readiness recovers without waiting for a request that needs the store."""
        if self._closed or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        self._reconnecting = asyncio.create_task(self._reconnect(), name="ondemand-postgres-reconnect")

    async def _reconnect(self) -> None:
        delay = _RECONNECT_FIRST
        while not self._closed and self._pool is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)
            if self.embedded is not None and not self.embedded.running:
                return  # stopped or gone: an embedded server is started by an operation, never for this
            with contextlib.suppress(PostgresUnavailable):
                await asyncio.shield(self._start_connecting())

    def _drop_pool(self, pool: aiopg.Pool) -> None:
        """Forget a pool and close it in the background, bounded; in-use connections close on release."""
        if self._pool is pool:
            self._pool = None
        pool.close()

        async def finish() -> None:
            try:
                async with asyncio.timeout(self.config.statement_timeout + 1.0):
                    await pool.wait_closed()
            except TimeoutError:
                pool.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await pool.wait_closed()

        task = asyncio.create_task(finish(), name="ondemand-postgres-pool-close")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- running operations ------------------------------------------------------------------------

    async def _run(self, what: str, work: Callable[[aiopg.Cursor], Awaitable[T]]) -> T:
        self._ops += 1
        sent = False  # once the statement may have reached the server, a failure leaves its outcome unknown

        async def run(cur: aiopg.Cursor) -> T:
            nonlocal sent
            sent = True
            return await work(cur)

        try:
            pool = await self._ready_pool()
            timeout = self._op_timeout()
            try:
                async with asyncio.timeout(timeout), pool.acquire() as conn, conn.cursor(timeout=timeout) as cur:
                    result = await run(cur)
            except asyncio.CancelledError as exc:
                if not _is_statement_cancel(exc):
                    raise
                # The server cancelled the statement itself: it was rolled back, the outcome is known.
                raise PostgresUnavailable(
                    f"PostgreSQL {what} exceeded statement_timeout ({self.config.statement_timeout:g} s)"
                ) from None
            except TimeoutError:
                raise _unavailable(f"PostgreSQL {what} did not complete within {timeout:g} s", sent) from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError, OSError) as exc:
                self._drop_pool(pool)  # the connection broke: a new pool is made in the background or by the next op
                self._reconnect_in_background()
                raise _unavailable(f"PostgreSQL {what} failed: {_first_line(exc)}", sent) from None
            except psycopg2.Error as exc:
                raise PostgresUnavailable(f"PostgreSQL {what} failed: {_first_line(exc)}") from None
        except PostgresUnavailable as exc:
            self._errors += 1
            self.store_health.failed(str(exc))
            raise
        self.store_health.succeeded()
        return result


    # -- the embedded server's use and idleness ------------------------------------------------------

    def _note_use(self) -> None:
        """An operation for a caller (not the purge's, nor the outbox's polls): keeps the server from idling."""
        if self.embedded is not None:
            self.embedded.note_activity()

    def _detach(self) -> None:
        """The embedded server stops (idle) or stopped: forget every connection to it; the next
        operation starts (or adopts) one. The outbox's polls do not: they never start a server."""
        self._close_listener()
        if self._pool is not None:
            self._drop_pool(self._pool)
        self.store_health.set_state(StoreState.STOPPED)

    def _sibling_server_exited(self, reason: str) -> None:
        log.info("%s; the next operation starts it again", reason)
        self._detach()

    async def _idle_loop(self) -> None:
        period = min(max(self.config.idle_timeout / 4, 0.05), 5.0)
        server = self.embedded
        assert server is not None
        while True:
            await asyncio.sleep(period)
            if server.owner != "self" or (self._connecting is not None and not self._connecting.done()):
                continue
            pid, idle_for = server.pid, server.idle_seconds()
            try:
                stopped = await server.stop_if_idle(self.config.idle_timeout, self._detach)
            except Exception:
                log.exception("the idle stop of the embedded PostgreSQL failed")
                continue
            if stopped:
                log.info("embedded PostgreSQL pid %s stopped: unused by every process for %.1f s "
                         "(postgres.idle_timeout); the next operation starts it again", pid, idle_for)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.purge_interval)
            if self._pool is None:
                continue  # nothing in use yet (an embedded server is not started just to purge)
            try:
                deleted = await self.purge_expired()
            except PostgresUnavailable as exc:
                log.debug("purge of expired rows skipped: %s", exc)
            except Exception:
                log.exception("purge of expired rows failed")
            else:
                if deleted:
                    log.debug("purged %d expired rows", deleted)

