"""The embedded PostgreSQL: pgserver's bundled binaries on a unix socket only, one server per data
directory, started by the first process that needs it and adopted by every other (README, "One host").

Beside the data directory, in its parent: `<name>.lock` (an flock for a start or a withdrawal, freed by
the kernel when its holder dies), `<name>.state.json` (which server serves, and who owns it),
`<name>.activity` (its mtime: the last use by any process, for the owner's idle stop) and `<name>.log`.
An adopter checks that the server is the one recorded, through /proc and over a connection, and never
signals it; an owner's server dies with it (PR_SET_PDEATHSIG). The paths follow ondemand.host.files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiopg
import attrs
import psycopg2

from ondemand.errors import PostgresUnavailable
from ondemand.host import files
from ondemand.host.process import ChildProcess, ProcessError

log = logging.getLogger("ondemand.postgres")

_SYSTEM_USER = "pgserver"  # the same non-root user pgserver itself uses when run as root
_LOCK_POLL = 0.005  # seconds between two tries of the start lock
_OLD_SERVER_POLL = 0.01  # seconds between two looks for an old server's processes
# The start time as epoch seconds: the same text whatever the session's time zone.
_IDENTIFY_SQL = ("SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())::text,"
                 " current_setting('data_directory')")


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
    for root, dirs, names in os.walk(install_dir):
        for name in dirs:
            _add_mode(Path(root, name), _READ | _TRAVERSE)
        for name in names:
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


# -- processes, seen through /proc ---------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    return fields is None or fields[0] != "Z"


def _pid_exists(pid: int) -> bool:
    """The PID names a process, a zombie included (PostgreSQL's own test for a postmaster.pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _ppid(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields is not None else None


def _proc_uid(pid: int) -> int | None:
    """The real uid of `pid` (/proc/<pid>/status; the directory's owner is root for a non-dumpable one)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _works_in(pid: int, directory: os.stat_result) -> bool:
    """`pid` is a live process whose working directory is `directory` (postgres chdirs to its data dir)."""
    try:
        return _same_file(os.stat(f"/proc/{pid}/cwd"), directory)
    except OSError:  # gone, a zombie (no cwd), or another user's process we may not look into
        return False


# -- files we trust ----------------------------------------------------------------------------------


_DIR_RULE = ("postgres.data_dir and its parent must be ours: real directories (not symbolic links), owned by "
             "our user (as root: the parent by root, the data directory by the user PostgreSQL runs as, "
             "pgserver), writable by no one else; one someone else prepared is never used. Fix or remove it, "
             "or set postgres.data_dir to another path")


def _os_error(what: str, path: Path, exc: OSError) -> PostgresUnavailable:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ELOOP:
        reason = "it is a symbolic link"
    return PostgresUnavailable(f"cannot {what} {path}: {reason}")


def _make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each 0700 from the start (never chmodded afterwards)."""
    try:
        files.make_private_dirs(path)
    except OSError as exc:
        raise _os_error("create the directory", Path(exc.filename or path), exc) from None


def _open_private(path: Path, flags: int) -> int:
    """Open (creating it 0600 if missing) a file of ours, never through a symlink; refuses anything else."""
    try:
        return files.open_private(path, flags | os.O_CREAT)
    except files.Untrusted as exc:
        raise PostgresUnavailable(f"refusing {path}: it {exc.reason}; remove it (it must be a file of ours)") from None
    except OSError as exc:
        raise _os_error("open", path, exc) from None


def _refusal(st: os.stat_result, owners: set[int]) -> str | None:
    return files.refusal(st, directory=True, owners=owners)


@attrs.frozen
class ServerState:
    """`<name>.state.json`: the server that serves a data directory, and who owns it."""

    pid: int  # the postmaster
    owner_pid: int  # the process that started it: its parent
    socket_dir: str
    port: int
    started: str  # pg_postmaster_start_time() in epoch seconds, as text: this server's life, not the next one's
    uid: int  # the user it runs as

    def dumps(self) -> bytes:
        return json.dumps(attrs.asdict(self)).encode()

    @classmethod
    def loads(cls, data: bytes) -> ServerState | None:
        try:
            raw = json.loads(data)
            return cls(pid=int(raw["pid"]), owner_pid=int(raw["owner_pid"]), socket_dir=str(raw["socket_dir"]),
                       port=int(raw["port"]), started=str(raw["started"]), uid=int(raw["uid"]))
        except (ValueError, KeyError, TypeError):
            return None


@attrs.define(eq=False)
class EmbeddedPostgres:
    """The PostgreSQL server of `data_dir`: started as our child on a unix socket only, or adopted
    when another process (or another instance in this one) already runs it. See the module docstring."""

    # Absolute, but never resolved: a symbolic link in its place is refused, not followed.
    data_dir: Path = attrs.field(converter=lambda p: Path(os.path.abspath(os.path.expanduser(p))))
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    port: int = 5432  # only names the socket file; nothing listens on TCP
    settings: dict[str, str] = attrs.field(factory=dict)  # extra `-c name=value` server settings
    bin_dir: Path = attrs.field(factory=postgres_bin_dir)
    activity_interval: float = 1.0  # seconds between two touches of the activity file
    _child: ChildProcess | None = attrs.field(init=False, default=None)
    _socket_dir: Path | None = attrs.field(init=False, default=None)  # our own server's
    _started: str | None = attrs.field(init=False, default=None)
    _ready: bool = attrs.field(init=False, default=False)
    _prepared_user: str | None = attrs.field(init=False, default=None)
    _adopted: ServerState | None = attrs.field(init=False, default=None)  # a sibling's server we use
    _pidfd: int | None = attrs.field(init=False, default=None)
    _on_exit: Callable[[str], None] | None = attrs.field(init=False, default=None)
    _last_used: float = attrs.field(init=False, factory=time.monotonic)
    _noted: float = attrs.field(init=False, default=-1e9)

    # -- what it is ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Ours started and answered and has not exited since, or the sibling's we adopted is alive."""
        if self._adopted is not None:
            if self._pidfd is None and not _pid_alive(self._adopted.pid):
                self._forget_adopted()
                return False
            return True
        return self._ready and self._child is not None and self._child.returncode is None

    @property
    def owner(self) -> str | None:
        """"self" (our child), "sibling" (another process's, or another instance's, adopted) or None."""
        if self._adopted is not None:
            return "sibling"
        return "self" if self._child is not None and self._child.returncode is None else None

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted.pid
        return self._child.pid if self._child is not None and self._child.returncode is None else None

    @property
    def child(self) -> ChildProcess | None:
        return self._child

    @property
    def socket_dir(self) -> Path | None:
        return Path(self._adopted.socket_dir) if self._adopted is not None else self._socket_dir

    def _beside(self, suffix: str) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}{suffix}"

    @property
    def log_path(self) -> Path:
        return self._beside(".log")

    @property
    def lock_path(self) -> Path:
        return self._beside(".lock")

    @property
    def state_path(self) -> Path:
        return self._beside(".state.json")

    @property
    def activity_path(self) -> Path:
        return self._beside(".activity")

    @property
    def dsn(self) -> str:
        socket_dir = self.socket_dir
        if socket_dir is None:
            raise PostgresUnavailable(f"the embedded PostgreSQL for {self.data_dir} is not started")
        port = self._adopted.port if self._adopted is not None else self.port
        return f"host={socket_dir} port={port} dbname=postgres user=postgres"

    def set_exit_callback(self, callback: Callable[[str], None]) -> None:
        """Called (from the event loop) when an adopted server exits: its owner stopped it or died."""
        self._on_exit = callback

    # -- activity (idle accounting shared by every process using the server) --------------------------

    def note_activity(self, *, force: bool = False) -> None:
        """A use: remembered here, and in the activity file's mtime at most every activity_interval (only
        while we use a server: never a file in a directory not checked yet)."""
        now = time.monotonic()
        self._last_used = now
        if self.owner is None or (not force and now - self._noted < self.activity_interval):
            return
        self._noted = now
        with contextlib.suppress(OSError, PostgresUnavailable):  # (not prepared yet: nothing to account)
            fd = _open_private(self.activity_path, os.O_WRONLY)
            try:
                os.utime(fd)
            finally:
                os.close(fd)

    def idle_seconds(self) -> float:
        """Seconds since this process or any other noted a use of the server."""
        local = time.monotonic() - self._last_used
        try:
            shared = max(0.0, time.time() - os.lstat(self.activity_path).st_mtime)
        except OSError:
            return local
        return min(local, shared)

    async def stop_if_idle(self, idle_timeout: float, before_stop: Callable[[], None] | None = None) -> bool:
        """Stop our server if every process was idle for `idle_timeout` (checked again under the lock,
        so no process adopts it meanwhile); True if it was stopped. An adopter never stops one."""
        if self.owner != "self" or not self.running or self.idle_seconds() < idle_timeout:
            return False
        try:
            async with self._locked(asyncio.get_running_loop().time() + self.stop_timeout, "an idle stop"):
                if self.idle_seconds() < idle_timeout:
                    return False
                await asyncio.to_thread(self._withdraw_state)
        except PostgresUnavailable:
            return False  # the lock is busy: someone is starting to use it
        if before_stop is not None:
            before_stop()
        await self._stop_own()
        return True

    # -- start ---------------------------------------------------------------------------------------

    async def start(self) -> float:
        """Adopt the data directory's server, or else start it (initdb first if new); returns seconds."""
        if self.running:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.startup_timeout
        await self._stop_child()  # a dead previous child: reap it and forget it
        self._forget_adopted()
        user = await asyncio.to_thread(self._prepare)
        async with self._locked(deadline, "a start"):
            state = await asyncio.to_thread(self._read_state)
            if state is not None and await self._verify_sibling(state, user, deadline):
                self._adopt(state)
                self.note_activity(force=True)
                seconds = loop.time() - started
                log.info("adopted the embedded PostgreSQL pid %s of process %s (data %s)", state.pid,
                         state.owner_pid, self.data_dir)
                return seconds
            await self._wait_for_old_server(deadline, state)
            if state is not None:
                await asyncio.to_thread(self._remove_old_socket_dir, state, self._server_uid(user))
            if not await asyncio.to_thread(self._has_cluster):
                await self._initdb(user, deadline)
            await self._spawn(user, deadline)
            assert self._child is not None and self._socket_dir is not None and self._started is not None
            record = ServerState(pid=self._child.pid, owner_pid=os.getpid(), socket_dir=str(self._socket_dir),
                                 port=self.port, started=self._started, uid=self._server_uid(user))
            try:
                await asyncio.to_thread(self._write_state, record)
            except BaseException:
                await self._stop_own()  # a server no other process can find must not run
                raise
        self.note_activity(force=True)
        seconds = loop.time() - started
        log.info("embedded PostgreSQL pid %s ready in %.2f s (data %s)", self.pid, seconds, self.data_dir)
        return seconds

    async def init(self) -> None:
        """Create the data directory with initdb unless it has one; bounded by startup_timeout."""
        deadline = asyncio.get_running_loop().time() + self.startup_timeout
        user = await asyncio.to_thread(self._prepare)
        async with self._locked(deadline, "an initdb"):
            if not await asyncio.to_thread(self._has_cluster):
                await self._initdb(user, deadline)

    def _has_cluster(self) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.data_dir / "PG_VERSION").st_mode)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _os_error("read", self.data_dir, exc) from None

    @contextlib.asynccontextmanager
    async def _locked(self, deadline: float, what: str) -> AsyncIterator[None]:
        """The exclusive flock on `<name>.lock`, waited for until `deadline`."""
        fd = await asyncio.to_thread(_open_private, self.lock_path, os.O_RDWR)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if loop.time() >= deadline:
                        raise PostgresUnavailable(
                            f"another process held {self.lock_path} too long for {what} of the embedded "
                            f"PostgreSQL (postgres.startup_timeout is {self.startup_timeout:g} s)"
                        ) from None
                    await asyncio.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _server_uid(self, user: str | None) -> int:
        return pwd.getpwnam(user).pw_uid if user is not None else os.geteuid()

    def _prepare(self) -> str | None:
        """Blocking checks and file work before a start: the parent and the data directory must be ours
        (created 0700 if missing); as root, the user PostgreSQL runs as, and its access to the binaries."""
        parent = self.data_dir.parent
        _make_dirs(parent)
        me = os.geteuid()
        try:
            reason = _refusal(os.lstat(parent), {me, 0})
        except OSError as exc:
            raise _os_error("look at", parent, exc) from None
        if reason is not None:
            raise PostgresUnavailable(f"refusing the parent {parent} of postgres.data_dir: it {reason}. {_DIR_RULE}")
        user = None
        if me == 0:
            if self._prepared_user is None:
                self._prepared_user = _ensure_system_user(_SYSTEM_USER).pw_name
                _open_for_others(self.bin_dir.parent)
            user = self._prepared_user
            for directory in (parent, *parent.parents):
                _add_mode(directory, _TRAVERSE)  # the postgres user must be able to reach its data dir
        try:
            st = os.lstat(self.data_dir)
        except FileNotFoundError:
            return user
        except OSError as exc:
            raise _os_error("look at", self.data_dir, exc) from None
        owners = {me} if user is None else {pwd.getpwnam(user).pw_uid, 0}  # root's: only an empty one, replaced
        reason = _refusal(st, owners)
        if reason is None and user is not None and st.st_uid == 0 and self._has_cluster():
            reason = f"belongs to root, and PostgreSQL cannot run as root (chown -R {user} {self.data_dir})"
        if reason is not None:
            raise PostgresUnavailable(f"refusing postgres.data_dir {self.data_dir}: it {reason}. {_DIR_RULE}")
        return user

    # -- adopting a sibling's server ---------------------------------------------------------------

    def _read_state(self) -> ServerState | None:
        """The state file, if it is ours (a regular file owned by us, mode 0600, not a symlink)."""
        try:
            fd = files.open_private(self.state_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except (OSError, files.Untrusted) as exc:
            log.warning("ignoring %s: %s", self.state_path, getattr(exc, "strerror", None) or exc)
            return None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                log.warning("ignoring %s: others may read it (%s, ours are 0600)", self.state_path, files.mode(st))
                return None
            return ServerState.loads(os.read(fd, 65536))
        finally:
            os.close(fd)

    def _write_state(self, state: ServerState) -> None:
        """Write the state file to a fresh name (O_EXCL, never through a symlink), then rename it."""
        try:
            files.replace_private(self.state_path, state.dumps(), refuse_planted=False)
        except OSError as exc:
            raise _os_error("write", self.state_path, exc) from None

    def _withdraw_state(self) -> None:
        """Remove the state file if it records our child (so that no one adopts a server that stops)."""
        state = self._read_state()
        if state is not None and self._child is not None and state.pid == self._child.pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path)

    def _sibling_refusal(self, state: ServerState, uid: int) -> str | None:
        """Why the recorded server cannot be adopted (None: it passes the checks made without talking
        to it). Blocking: /proc and lstat only."""
        if not _pid_alive(state.pid):
            return "it is gone"
        if _ppid(state.pid) != state.owner_pid or not _pid_alive(state.owner_pid):
            return f"its owner (pid {state.owner_pid}) is gone, so it is going too"
        try:
            data_dir = os.stat(self.data_dir)
        except OSError as exc:
            return f"the data directory cannot be inspected: {exc.strerror or exc}"
        if _comm(state.pid) != "postgres" or not _works_in(state.pid, data_dir):
            return "that pid is not a postgres working in our data directory"
        proc_uid = _proc_uid(state.pid)
        if proc_uid != uid or state.uid != uid:
            return f"it runs as {files.user_name(proc_uid) if proc_uid is not None else 'an unknown user'}, not as " \
                   f"{files.user_name(uid)}"
        try:
            st = os.lstat(state.socket_dir)
        except OSError as exc:
            return f"its socket directory {state.socket_dir} cannot be inspected: {exc.strerror or exc}"
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            return f"its socket directory {state.socket_dir} is not a private directory of {files.user_name(uid)}"
        return None

    async def _verify_sibling(self, state: ServerState, user: str | None, deadline: float) -> bool:
        """True when the recorded server is the one the state file names (see the module docstring).
        False when it is gone or going; PostgresUnavailable when it is ours but does not answer in time."""
        uid = self._server_uid(user)
        reason = await asyncio.to_thread(self._sibling_refusal, state, uid)
        if reason is not None:
            log.info("not adopting the embedded PostgreSQL pid %s recorded in %s: %s", state.pid, self.state_path,
                     reason)
            return False
        dsn = f"host={state.socket_dir} port={state.port} dbname=postgres user=postgres"
        loop = asyncio.get_running_loop()
        problem = ""
        while True:
            try:
                async with asyncio.timeout(max(0.05, min(2.0, deadline - loop.time()))):
                    postmaster, started, data_directory = await _identify(dsn)
                break
            except (psycopg2.Error, OSError, TimeoutError) as exc:
                problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if loop.time() >= deadline:
                raise PostgresUnavailable(
                    f"the embedded PostgreSQL (pid {state.pid}) that process {state.owner_pid} runs on "
                    f"{self.data_dir} did not answer within postgres.startup_timeout ({self.startup_timeout:g} s): "
                    f"{problem}"
                )
            await asyncio.sleep(0.05)
        same_dir = False
        with contextlib.suppress(OSError):
            same_dir = _same_file(os.stat(data_directory), os.stat(self.data_dir))
        if started != state.started or not same_dir or postmaster != state.pid:
            log.warning("not adopting the server on %s recorded in %s: it is not the one recorded (start time %s, "
                        "data directory %s, postmaster %s)", state.socket_dir, self.state_path, started,
                        data_directory, postmaster)
            return False
        return True

    def _adopt(self, state: ServerState) -> None:
        self._adopted = state
        try:  # told when it exits, without polling: pidfd (Linux 5.3+)
            self._pidfd = os.pidfd_open(state.pid)
            asyncio.get_running_loop().add_reader(self._pidfd, self._adopted_exited, state.pid)
        except OSError:
            self._pidfd = None  # `running` checks the pid instead

    def _adopted_exited(self, pid: int) -> None:
        if self._adopted is None or self._adopted.pid != pid:
            return
        self._forget_adopted()
        log.info("the embedded PostgreSQL pid %s of another process exited; the next operation starts one", pid)
        if self._on_exit is not None:
            self._on_exit(f"the embedded PostgreSQL (pid {pid}) of another process exited")

    def _forget_adopted(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None
        self._adopted = None

    # -- starting our own ----------------------------------------------------------------------------

    def _postgres_in_data_dir(self) -> list[int]:
        """Live postgres processes working in the data directory: a postmaster and its backends."""
        try:
            target = os.stat(self.data_dir)
            names = os.listdir("/proc")
        except OSError:
            return []
        found = []
        for name in names:
            if name.isdigit() and _works_in(int(name), target) and _comm(int(name)) == "postgres":
                found.append(int(name))
        return found

    def _old_server(self) -> list[int]:
        """The processes of a previous server still in the data directory (none after a clean stop,
        which removes postmaster.pid). A postmaster.pid left by a dead one is removed when its pid
        still exists (a zombie its new parent has not reaped yet, or a reused pid): PostgreSQL itself
        would take that pid for a live postmaster and refuse to start."""
        pid_file = self.data_dir / "postmaster.pid"
        recorded = files.read_pid_file(pid_file)
        if recorded is None:
            return []
        lingering = self._postgres_in_data_dir()
        if lingering:
            return lingering
        if not _pid_exists(recorded):
            return []  # PostgreSQL copes with the file of a pid that is gone
        if _pid_alive(recorded):
            with contextlib.suppress(OSError):
                if _comm(recorded) == "postgres" and _works_in(recorded, os.stat(self.data_dir)):
                    return [recorded]  # (started since the look above)
            how = "now another process"
        else:
            how = "a zombie its new parent has not reaped yet"
        log.info("removing %s of the dead postmaster pid %s, which is %s", pid_file, recorded, how)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
        return []

    async def _wait_for_old_server(self, deadline: float, state: ServerState | None) -> None:
        """Wait (until `deadline`) for a previous server's processes to leave the data directory: after a
        crash, its backends and its unreaped postmaster hold it for a moment."""
        loop = asyncio.get_running_loop()
        waited = False
        while lingering := await asyncio.to_thread(self._old_server):
            if loop.time() >= deadline:
                recorded = state is not None and state.pid in lingering
                raise PostgresUnavailable(
                    f"a PostgreSQL server (pids {', '.join(map(str, sorted(lingering)[:5]))}) still runs on "
                    f"{self.data_dir} after postgres.startup_timeout ({self.startup_timeout:g} s)"
                    + ("" if recorded else f", and it is not one an ondemand process recorded in {self.state_path}")
                    + f"; stop it (kill -INT {min(lingering)}) or use another postgres.data_dir"
                )
            if not waited:
                log.info("waiting for the previous PostgreSQL server's processes %s to leave %s", lingering,
                         self.data_dir)
                waited = True
            await asyncio.sleep(_OLD_SERVER_POLL)

    def _remove_old_socket_dir(self, state: ServerState, uid: int) -> None:
        """The socket directory a dead owner's server left in /tmp (a clean stop removes its own): removed
        only if it is one of ours (made by _make_socket_dir, the server user's, 0700, only sockets in it)."""
        path = Path(state.socket_dir)
        if path == self._socket_dir or not path.name.startswith("ondemand-pg-") or _pid_alive(state.pid):
            return
        try:
            st = os.lstat(path)
            if (stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077
                    or any(not name.startswith(".s.PGSQL.") for name in os.listdir(path))):
                return
        except OSError:
            return
        shutil.rmtree(path, ignore_errors=True)  # (never follows a symlink)

    async def _spawn(self, user: str | None, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        socket_dir = await asyncio.to_thread(self._make_socket_dir, user)
        await asyncio.to_thread(lambda: os.close(_open_private(self.log_path, os.O_WRONLY | os.O_APPEND)))
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
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                _, self._started, _ = await _identify(self.dsn)
        except BaseException as exc:
            await self._stop_child()
            if isinstance(exc, ProcessError):
                raise PostgresUnavailable(f"the embedded PostgreSQL did not start: {exc}") from None
            if isinstance(exc, psycopg2.Error | TimeoutError):
                raise PostgresUnavailable(f"the embedded PostgreSQL started but did not answer: {exc}") from None
            raise
        self._ready = True

    # -- stop ----------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Our server: withdraw its state (under the lock, so no one adopts it now), then a fast shutdown.
        A sibling's server: only forget it (never signalled)."""
        if self._adopted is not None:
            self._forget_adopted()
            return
        child = self._child
        if child is not None and child.returncode is None:
            loop = asyncio.get_running_loop()
            try:
                async with self._locked(loop.time() + min(self.stop_timeout, 5.0), "a stop"):
                    await asyncio.to_thread(self._withdraw_state)
            except PostgresUnavailable:
                await asyncio.to_thread(self._withdraw_state)  # stop all the same; never hang a shutdown
        await self._stop_own()

    async def _stop_own(self) -> None:
        await self._stop_child()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)  # (never follows a symlink)
            self._socket_dir = None

    async def _stop_child(self) -> None:
        """Fast shutdown (SIGINT: abort sessions, checkpoint, exit), SIGKILL if it takes too long."""
        child, self._child, self._ready, self._started = self._child, None, False, None
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

    async def _initdb(self, user: str | None, deadline: float) -> None:
        """initdb into a fresh sibling dir, then rename: a killed initdb never leaves a half data dir.
        The work dir stays ours (root's); only the data directory inside it belongs to the server's user."""
        try:
            entries = os.listdir(self.data_dir)
        except FileNotFoundError:
            entries = []
        except OSError as exc:
            raise _os_error("read", self.data_dir, exc) from None
        if entries:
            raise PostgresUnavailable(
                f"postgres.data_dir {self.data_dir} is not empty but is not a PostgreSQL data directory "
                "(no PG_VERSION); empty it or choose another directory"
            )
        try:
            work = Path(tempfile.mkdtemp(prefix=f".{self.data_dir.name}.initdb-", dir=self.data_dir.parent))
        except OSError as exc:
            raise _os_error("create a directory in", self.data_dir.parent, exc) from None
        try:
            target = work / "pgdata"
            os.mkdir(target, 0o700)
            if user is not None:
                entry = pwd.getpwnam(user)
                os.chown(target, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
                _add_mode(work, _TRAVERSE)
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
            os.replace(initdb_log, target / "initdb.log")
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self.data_dir)  # an empty one (checked to be ours): rename needs it gone
            target.rename(self.data_dir)
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

    def _make_socket_dir(self, user: str | None) -> Path:
        """A private dir under /tmp (short enough for a socket path, about 108 bytes at most), made with
        mkdtemp (0700, a fresh name). Reused across restarts of this instance, so its DSN stays valid,
        but only while it is still ours."""
        uid = self._server_uid(user)
        if self._socket_dir is not None:
            try:
                st = os.lstat(self._socket_dir)
                ours = (stat.S_ISDIR(st.st_mode) and st.st_uid in (uid, os.geteuid())
                        and not st.st_mode & 0o077)
            except OSError:
                ours = False
            if ours:
                for stale in self._socket_dir.glob(".s.PGSQL.*"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(stale)  # (an unlink never follows a symlink)
            else:
                self._socket_dir = None  # not ours any more: left alone, a new one is made
        if self._socket_dir is None:
            base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
            self._socket_dir = Path(tempfile.mkdtemp(prefix="ondemand-pg-", dir=base))
        socket_path = self._socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path).encode()) > 100:
            raise PostgresUnavailable(f"unix socket path {socket_path} is too long; set TMPDIR to a short directory")
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self._socket_dir, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        return self._socket_dir


async def _identify(dsn: str) -> tuple[int | None, str, str]:
    """Of the server at `dsn`: (the parent of the backend serving us, so its postmaster; the postmaster's
    start time; the data directory). The parent is read while the connection, and so the backend, lives."""
    conn = await aiopg.connect(dsn, timeout=2.0, enable_json=False, enable_hstore=False, enable_uuid=False)
    try:
        async with conn.cursor() as cur:
            await cur.execute(_IDENTIFY_SQL)
            backend, started, data_directory = await cur.fetchone()
            postmaster = _ppid(int(backend))
    finally:
        await conn.close()
    return postmaster, str(started), str(data_directory)
