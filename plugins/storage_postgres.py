"""The built-in "postgres" storage: durable namespaced values in PostgreSQL, through aiopg.

With `postgres.dsn = "embedded"` (the default) the plugin runs its own PostgreSQL from the binaries
bundled in the `pgserver` package: one `postgres` child process per app, data in `postgres.data_dir`,
listening only on a unix socket in a private directory. Any other dsn is a libpq DSN or a
postgresql:// URL of a server someone else runs.

PostgreSQL being down never stops the app: open() returns at once and connects in the background;
operations wait a bounded time and raise PostgresUnavailable; the next operation tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiopg
import attrs
import psycopg2
import psycopg2.extensions

from app.config import PostgresConfig, redact_url
from app.errors import PostgresUnavailable, SpawnError
from app.hookspecs import hookimpl
from app.process import ChildProcess
from app.storage import Entry, Namespace

if TYPE_CHECKING:
    from app.plugins import Events, Registry

log = logging.getLogger("ondemand.postgres")

T = TypeVar("T")

SCHEMA_VERSION = 1
# pg_advisory_xact_lock key serializing schema creation between apps sharing one database ("ondemand").
_SCHEMA_LOCK_KEY = 0x6F6E64656D616E64
_SYSTEM_USER = "pgserver"  # the same non-root user pgserver itself uses when run as root
_PURGE_BATCH = 1000
_PURGE_MAX_BATCHES = 100  # per run: a huge backlog is worked off over several runs, never in one go

_SCHEMA_SQL = f"""
BEGIN;
SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY});
CREATE TABLE IF NOT EXISTS ondemand_values (
    namespace text NOT NULL,
    id text NOT NULL,
    value bytea NOT NULL,
    expires_at timestamptz NULL,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS ondemand_values_expires_at
    ON ondemand_values (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS ondemand_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO ondemand_schema_version (version) VALUES ({SCHEMA_VERSION}) ON CONFLICT DO NOTHING;
COMMIT;
"""

_LIVE = "(expires_at IS NULL OR expires_at > now())"
# NULL ttl -> NULL expires_at (no expiry), because NULL * interval is NULL.
_EXPIRES = "now() + %s::float8 * interval '1 second'"

_SQL_GET = f"SELECT value FROM ondemand_values WHERE namespace = %s AND id = %s AND {_LIVE}"
_SQL_GET_ENTRY = (
    "SELECT value, EXTRACT(EPOCH FROM expires_at - now())::float8 FROM ondemand_values"
    f" WHERE namespace = %s AND id = %s AND {_LIVE}"
)
_SQL_GET_MANY = f"SELECT id, value FROM ondemand_values WHERE namespace = %s AND id = ANY(%s::text[]) AND {_LIVE}"
_SQL_SET = f"""
INSERT INTO ondemand_values (namespace, id, value, expires_at) VALUES (%s, %s, %s, {_EXPIRES})
ON CONFLICT (namespace, id) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
"""
_SQL_SET_MANY = """
INSERT INTO ondemand_values (namespace, id, value, expires_at)
SELECT ns, id, value, now() + ttl * interval '1 second'
FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::float8[]) AS t(ns, id, value, ttl)
ON CONFLICT (namespace, id) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
"""
# Expired rows are removed too, but only live ones count as "existed".
_SQL_DELETE = f"""
WITH gone AS (DELETE FROM ondemand_values WHERE namespace = %s AND id = ANY(%s::text[]) RETURNING expires_at)
SELECT count(*) FILTER (WHERE {_LIVE}) FROM gone
"""
_SQL_EXPIRE = f"UPDATE ondemand_values SET expires_at = {_EXPIRES} WHERE namespace = %s AND id = %s AND {_LIVE}"
# ctid batches keep each purge statement short, so it never holds many row locks for long.
_SQL_PURGE = f"""
DELETE FROM ondemand_values WHERE ctid IN (
    SELECT ctid FROM ondemand_values WHERE expires_at <= now() LIMIT {_PURGE_BATCH}
) AND expires_at <= now()
"""


@hookimpl
def ondemand_register_storages(registry: Registry) -> None:
    registry.add("postgres", lambda runtime: PostgresStorage(runtime.config.postgres, events=runtime.events))


def postgres_bin_dir() -> Path:
    """pgserver's bundled PostgreSQL binaries, found without importing pgserver (its import has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable("the 'pgserver' package, which bundles the PostgreSQL binaries, is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact_url(text.splitlines()[0] if text else type(exc).__name__)


def _add_mode(path: Path, bits: int) -> None:
    with contextlib.suppress(OSError):  # read-only filesystems: the binaries may be fine already
        mode = path.stat().st_mode
        if mode & bits != bits:
            path.chmod(mode | bits)


# Group bits too: the child keeps root's group (subprocess `user=` changes only the uid), so on
# root-group directories the group bits, not the "other" bits, decide.
_TRAVERSE = stat.S_IXGRP | stat.S_IXOTH
_READ = stat.S_IRGRP | stat.S_IROTH


def _open_for_others(install_dir: Path) -> None:
    """Let a non-root user run the bundled binaries (pip as root may leave them root-only)."""
    for parent in (install_dir, *install_dir.parents):
        _add_mode(parent, _TRAVERSE)
    for root, dirs, files in os.walk(install_dir):
        for name in dirs:
            _add_mode(Path(root, name), _READ | _TRAVERSE)
        for name in files:
            path = Path(root, name)
            _add_mode(path, _READ | (_TRAVERSE if os.access(path, os.X_OK) else 0))


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True, timeout=30, check=False,
    )
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresUnavailable(
            f"PostgreSQL cannot run as root and creating the system user {name!r} failed: "
            f"{done.stderr.strip() or done.returncode}"
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_postgres_of(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is a postgres process working in `data_dir` (its cwd: postgres chdirs there)."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
            return False
    except OSError:
        return True  # cannot tell: assume the worst, postgres would refuse to start anyway
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir
    except OSError:
        return True


@attrs.define(eq=False)
class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, run as our child on a unix socket only.

    As root, PostgreSQL (which refuses to run as root) runs as the owner of an existing data
    directory, or else as the system user "pgserver", created on first use like pgserver does.
    """

    data_dir: Path = attrs.field(converter=lambda p: Path(p).expanduser().resolve())
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    port: int = 5432  # only names the socket file; nothing listens on TCP
    settings: dict[str, str] = attrs.field(factory=dict)  # extra `-c name=value` server settings
    bin_dir: Path = attrs.field(factory=postgres_bin_dir)
    _child: ChildProcess | None = attrs.field(init=False, default=None)
    _socket_dir: Path | None = attrs.field(init=False, default=None)
    _ready: bool = attrs.field(init=False, default=False)
    _prepared_user: str | None = attrs.field(init=False, default=None)

    @property
    def running(self) -> bool:
        """Started, answered a connection, and not exited since."""
        return self._ready and self._child is not None and self._child.returncode is None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None and self._child.returncode is None else None

    @property
    def child(self) -> ChildProcess | None:
        return self._child

    @property
    def socket_dir(self) -> Path | None:
        return self._socket_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log"

    @property
    def dsn(self) -> str:
        if self._socket_dir is None:
            raise PostgresUnavailable(f"the embedded PostgreSQL for {self.data_dir} is not started")
        return f"host={self._socket_dir} port={self.port} dbname=postgres user=postgres"

    async def start(self) -> float:
        """Init the data dir if new, start postgres, wait until it accepts a connection; returns seconds."""
        if self.running:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.startup_timeout
        await self._stop_child()  # a dead previous child: reap it and forget it
        user = await self._init(deadline)
        await asyncio.to_thread(self._check_stale_pid)
        socket_dir = await asyncio.to_thread(self._make_socket_dir, user)
        argv = [
            str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-k", str(socket_dir), "-h", "",
            "-p", str(self.port), "-c", "listen_addresses=",
        ]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        try:
            self._child = await ChildProcess.spawn(
                "postgres", argv, log_path=self.log_path, user=user, cwd=Path("/")
            )
            await self._child.wait_ready(self._probe, timeout=max(0.1, deadline - loop.time()))
        except BaseException as exc:
            await self._stop_child()
            if isinstance(exc, SpawnError):
                raise PostgresUnavailable(f"the embedded PostgreSQL did not start: {exc}") from None
            raise
        self._ready = True
        seconds = loop.time() - started
        log.info("embedded PostgreSQL pid %s ready in %.2f s (data %s)", self.pid, seconds, self.data_dir)
        return seconds

    async def init(self) -> None:
        """Create the data directory with initdb unless it has one; bounded by startup_timeout."""
        await self._init(asyncio.get_running_loop().time() + self.startup_timeout)

    async def _init(self, deadline: float) -> str | None:
        user = await asyncio.to_thread(self._prepare)
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb(user, deadline)
        return user

    async def stop(self) -> None:
        """Fast shutdown (SIGINT: abort sessions, checkpoint, exit), SIGKILL if it takes too long."""
        await self._stop_child()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    async def _stop_child(self) -> None:
        child, self._child, self._ready = self._child, None, False
        if child is None or child.returncode is not None:
            return
        child.signal(signal.SIGINT)
        try:
            await asyncio.wait_for(asyncio.shield(child.process.wait()), self.stop_timeout)
        except TimeoutError:
            log.warning("embedded PostgreSQL pid %s ignored fast shutdown; killing it", child.pid)
            await child.stop(grace=0.5)

    async def _probe(self) -> bool:
        if self._socket_dir is None or not (self._socket_dir / f".s.PGSQL.{self.port}").exists():
            return False
        try:
            conn = await aiopg.connect(
                self.dsn, timeout=1.0, enable_json=False, enable_hstore=False, enable_uuid=False
            )
        except psycopg2.Error:  # "the database system is starting up"
            return False
        await conn.close()
        return True

    def _prepare(self) -> str | None:
        """Blocking file work before a start: dirs, and as root the user and permissions."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return None
        if self._prepared_user is None:
            user = None
            with contextlib.suppress(OSError, KeyError):
                owner = (self.data_dir / "PG_VERSION").stat().st_uid
                user = pwd.getpwuid(owner).pw_name if owner != 0 else None
            user = user or _ensure_system_user(_SYSTEM_USER).pw_name
            _open_for_others(self.bin_dir.parent)
            self._prepared_user = user
        for parent in (self.data_dir.parent, *self.data_dir.parent.parents):
            _add_mode(parent, _TRAVERSE)  # the postgres user must be able to reach its data dir
        return self._prepared_user

    async def _initdb(self, user: str | None, deadline: float) -> None:
        """initdb into a fresh sibling dir, then rename: a killed initdb never leaves a half data dir."""
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PostgresUnavailable(
                f"postgres.data_dir {self.data_dir} is not empty but is not a PostgreSQL data directory "
                "(no PG_VERSION); empty it or choose another directory"
            )
        work = Path(tempfile.mkdtemp(prefix=f".{self.data_dir.name}.initdb-", dir=self.data_dir.parent))
        try:
            if user is not None:
                entry = pwd.getpwnam(user)
                os.chown(work, entry.pw_uid, entry.pw_gid)
            target = work / "pgdata"
            argv = [
                str(self.bin_dir / "initdb"), "-D", str(target), "--auth=trust", "--auth-local=trust",
                "--encoding=utf8", "--locale=C", "-U", "postgres",
            ]
            initdb_log = work / "initdb.log"
            child = await ChildProcess.spawn("initdb", argv, log_path=initdb_log, user=user, cwd=Path("/"))
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(child.process.wait(), max(0.1, deadline - loop.time()))
            except BaseException:
                await child.stop(grace=0.5)
                raise
            if child.returncode != 0:
                raise PostgresUnavailable(f"initdb for the embedded PostgreSQL failed: {child.describe_exit()}")
            shutil.move(initdb_log, target / "initdb.log")
            with contextlib.suppress(FileNotFoundError):
                self.data_dir.rmdir()  # an empty dir made by someone else; rename needs it gone
            try:
                target.rename(self.data_dir)
            except OSError:
                if not (self.data_dir / "PG_VERSION").exists():  # else a concurrent initdb won: fine
                    raise
            log.info("initialized PostgreSQL data directory %s", self.data_dir)
        except TimeoutError:
            raise PostgresUnavailable(
                f"initdb for {self.data_dir} did not finish within postgres.startup_timeout "
                f"({self.startup_timeout:g} s)"
            ) from None
        except OSError as exc:
            raise PostgresUnavailable(f"cannot initialize {self.data_dir}: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _check_stale_pid(self) -> None:
        """A dead postmaster.pid is postgres's business; a live one is a clear error (or a reused PID)."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if not _pid_alive(pid):
            return
        if _is_postgres_of(pid, self.data_dir):
            raise PostgresUnavailable(
                f"a PostgreSQL server (pid {pid}) is already running on {self.data_dir}, probably started "
                f"by another ondemand process that is still alive; stop it (kill -INT {pid}) or use "
                "another postgres.data_dir"
            )
        # The PID was reused by an unrelated process: postgres would refuse to start because of it.
        log.warning("removing stale %s (pid %s now belongs to another process)", pid_file, pid)
        pid_file.unlink(missing_ok=True)

    def _make_socket_dir(self, user: str | None) -> Path:
        """A private dir under /tmp, short enough for a socket path (about 108 bytes at most)."""
        if self._socket_dir is not None and self._socket_dir.is_dir():
            # Reused so that the DSN stays stable across restarts; no server of ours uses it now.
            for stale in self._socket_dir.glob(".s.PGSQL.*"):
                stale.unlink(missing_ok=True)
        else:
            base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
            self._socket_dir = Path(tempfile.mkdtemp(prefix="ondemand-pg-", dir=base))  # mode 0700
        socket_path = self._socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path).encode()) > 100:
            raise PostgresUnavailable(f"unix socket path {socket_path} is too long; set TMPDIR to a short directory")
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self._socket_dir, entry.pw_uid, entry.pw_gid)
        return self._socket_dir


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
    events: Events | None = None
    name: str = "postgres"
    embedded: EmbeddedPostgres | None = attrs.field(init=False, default=None)
    _pool: aiopg.Pool | None = attrs.field(init=False, default=None)
    _connecting: asyncio.Task[aiopg.Pool] | None = attrs.field(init=False, default=None)
    _purge_task: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _background: set[asyncio.Task[Any]] = attrs.field(init=False, factory=set)
    _closed: bool = attrs.field(init=False, default=False)
    _state: str = attrs.field(init=False, default="starting")
    _since: float = attrs.field(init=False, factory=time.time)
    _since_monotonic: float = attrs.field(init=False, factory=time.monotonic)
    _last_error: str | None = attrs.field(init=False, default=None)
    _last_error_at: float | None = attrs.field(init=False, default=None)
    _ops: int = attrs.field(init=False, default=0)
    _errors: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.config.dsn == "embedded":
            self.embedded = EmbeddedPostgres(self.config.data_dir, startup_timeout=self.config.startup_timeout)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Never fails, never waits. An external server is connected to in the background at once
        (so status shows early whether it is there); the embedded one starts on first use, like
        Redis: starting the app spawns nothing."""
        self._closed = False
        if self.embedded is None:
            self._start_connecting()
        else:
            self._state = "stopped"
        if self._purge_task is None or self._purge_task.done():
            self._purge_task = asyncio.create_task(self._purge_loop(), name="ondemand-postgres-purge")

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._purge_task, self._connecting) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.startup_timeout)
        self._purge_task = self._connecting = None
        if self._pool is not None:
            self._drop_pool(self._pool)
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.config.statement_timeout + 2.0)
        if self.embedded is not None:
            await self.embedded.stop()

    # -- the Storage operations --------------------------------------------------------------------

    async def get(self, ns: Namespace, item_id: str) -> bytes | None:
        async def work(cur: aiopg.Cursor) -> bytes | None:
            await cur.execute(_SQL_GET, (ns.name, item_id))
            row = await cur.fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._run("get", work)

    async def get_entry(self, ns: Namespace, item_id: str) -> tuple[bytes, float | None] | None:
        """The value and its remaining lifetime in seconds (None: no expiry), or None when absent."""

        async def work(cur: aiopg.Cursor) -> tuple[bytes, float | None] | None:
            await cur.execute(_SQL_GET_ENTRY, (ns.name, item_id))
            row = await cur.fetchone()
            return (bytes(row[0]), row[1]) if row is not None else None

        return await self._run("get", work)

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []

        async def work(cur: aiopg.Cursor) -> list[bytes | None]:
            await cur.execute(_SQL_GET_MANY, (ns.name, list(ids)))
            found = {row[0]: bytes(row[1]) for row in await cur.fetchall()}
            return [found.get(item_id) for item_id in ids]

        return await self._run("get_many", work)

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> None:
        async def work(cur: aiopg.Cursor) -> None:
            await cur.execute(_SQL_SET, (ns.name, item_id, value, ttl))

        await self._run("set", work)

    async def set_many(self, entries: Sequence[Entry]) -> None:
        """One statement: atomic, one round trip. Later duplicates win (ON CONFLICT cannot touch a row twice)."""
        latest = {(e.namespace.name, e.id): e for e in entries}
        if not latest:
            return
        columns = (
            [ns for ns, _ in latest],
            [item_id for _, item_id in latest],
            [e.value for e in latest.values()],
            [e.ttl for e in latest.values()],
        )

        async def work(cur: aiopg.Cursor) -> None:
            await cur.execute(_SQL_SET_MANY, columns)

        await self._run("set_many", work)

    async def delete(self, ns: Namespace, ids: Sequence[str]) -> int:
        if not ids:
            return 0

        async def work(cur: aiopg.Cursor) -> int:
            await cur.execute(_SQL_DELETE, (ns.name, list(ids)))
            row = await cur.fetchone()
            return int(row[0])

        return await self._run("delete", work)

    async def expire(self, ns: Namespace, item_id: str, ttl: float) -> bool:
        async def work(cur: aiopg.Cursor) -> bool:
            await cur.execute(_SQL_EXPIRE, (ttl, ns.name, item_id))
            return cur.rowcount > 0

        return await self._run("expire", work)

    async def purge_expired(self) -> int:
        """Delete expired rows in short batches; returns how many went."""
        async def work(cur: aiopg.Cursor) -> int:
            await cur.execute(_SQL_PURGE)
            return cur.rowcount

        total = 0
        for _ in range(_PURGE_MAX_BATCHES):
            deleted = await self._run("purge", work)
            total += deleted
            if deleted < _PURGE_BATCH:
                break
        return total

    def status(self) -> dict[str, Any]:
        pool = self._pool
        return {
            "name": self.name,
            "state": self._state,
            "since": self._since,
            "embedded": self.embedded is not None,
            "dsn": self._where(),
            "pid": self.embedded.pid if self.embedded is not None else None,
            "data_dir": str(self.embedded.data_dir) if self.embedded is not None else None,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
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
                except BaseException:
                    self._drop_pool(pool)
                    raise
        except PostgresUnavailable as exc:
            self._record_failure(str(exc))
            raise
        except (psycopg2.Error, OSError, TimeoutError) as exc:
            what = "did not answer in time" if isinstance(exc, TimeoutError) else _first_line(exc)
            message = f"cannot connect to PostgreSQL at {self._where()}: {what}"
            self._record_failure(message)
            raise PostgresUnavailable(message) from None
        self._pool = pool
        self._record_success()
        return pool

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
        try:
            pool = await self._ready_pool()
            timeout = self._op_timeout()
            try:
                async with asyncio.timeout(timeout), pool.acquire() as conn, conn.cursor(timeout=timeout) as cur:
                    result = await work(cur)
            except asyncio.CancelledError as exc:
                if not _is_statement_cancel(exc):
                    raise
                raise PostgresUnavailable(
                    f"PostgreSQL {what} exceeded statement_timeout ({self.config.statement_timeout:g} s)"
                ) from None
            except TimeoutError:
                raise PostgresUnavailable(f"PostgreSQL {what} did not complete within {timeout:g} s") from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError, OSError) as exc:
                self._drop_pool(pool)  # the connection broke: a new pool is made by the next op
                raise PostgresUnavailable(f"PostgreSQL {what} failed: {_first_line(exc)}") from None
            except psycopg2.Error as exc:
                raise PostgresUnavailable(f"PostgreSQL {what} failed: {_first_line(exc)}") from None
        except PostgresUnavailable as exc:
            self._errors += 1
            self._record_failure(str(exc))
            raise
        self._record_success()
        return result

    def _set_state(self, state: str) -> float:
        """Switch state; returns how long the previous state lasted."""
        now = time.monotonic()
        lasted = now - self._since_monotonic
        self._state, self._since, self._since_monotonic = state, time.time(), now
        return lasted

    def _record_failure(self, message: str) -> None:
        self._last_error, self._last_error_at = message, time.time()
        if self._state != "down":
            self._set_state("down")
            log.warning("PostgreSQL storage degraded: %s", message)
            if self.events is not None:
                self.events.emit("ondemand_degraded", component="postgres", reason=message)

    def _record_success(self) -> None:
        if self._state == "up":
            return
        previous = self._state
        lasted = self._set_state("up")
        if previous == "down":
            log.info("PostgreSQL storage recovered after %.1f s", lasted)
            if self.events is not None:
                self.events.emit("ondemand_recovered", component="postgres", down_seconds=round(lasted, 3))

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

