"""The embedded PostgreSQL server: pgserver's bundled binaries run as our child, on a unix socket only.

Used by the `postgres` storage plugin when `postgres.dsn = "embedded"`: one `postgres` child per data
directory, data in `postgres.data_dir`, listening only on a unix socket in a private directory. As root
(PostgreSQL refuses to run as root) it runs as the owner of an existing data directory, or else as the
system user "pgserver", created on first use like pgserver does. This module owns the file work that
needs: users, modes, initdb, pid files and sockets.
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
from pathlib import Path

import aiopg
import attrs
import psycopg2

from app.errors import PostgresUnavailable
from app.process import ChildProcess, ProcessError

log = logging.getLogger("ondemand.postgres")

_SYSTEM_USER = "pgserver"  # the same non-root user pgserver itself uses when run as root


def postgres_bin_dir() -> Path:
    """pgserver's bundled PostgreSQL binaries, found without importing pgserver (its import has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable("the 'pgserver' package, which bundles the PostgreSQL binaries, is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


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
            if isinstance(exc, ProcessError):
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
            try:
                child = await ChildProcess.spawn("initdb", argv, log_path=initdb_log, user=user, cwd=Path("/"))
            except ProcessError as exc:
                raise PostgresUnavailable(f"initdb for the embedded PostgreSQL could not run: {exc}") from None
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
