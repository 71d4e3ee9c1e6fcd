"""Helpers shared by the test modules: the checkout's root, process checks, polling, HTTP, PostgreSQL, a local cluster,
a Sentinel group.

Test modules import helpers from here (conftest too), never from one another. A free TCP port comes
from the product's own `app.net.free_port`.

PostgreSQL: initdb takes about a second, starting a server from an existing data dir about 0.2 s. So
a test session makes one template data dir (`make_template`) and each test starts its own server on
a copy of it (`embedded_postgres(template=...)`): isolated, fast, and owned by the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import aiopg
import attrs
import hiredis
import psutil
import redis

from ondemand.host.net import free_port
from ondemand.host.process import ChildProcess, log_tail
from ondemand.plugins.lifecycle_subprocess.local_cluster import ClusterNode, LocalCluster
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.resp import probe

ROOT = Path(__file__).resolve().parent.parent

REDIS_NAMES = frozenset({"redis-server", "valkey-server"})
SERVER_NAMES = REDIS_NAMES | {"postgres"}


# -- processes ---------------------------------------------------------------------------------------


def _live_descendants(root: psutil.Process, names: Iterable[str]) -> list[psutil.Process]:
    """`root`'s live (non-zombie) descendants whose process name is one of `names`."""
    wanted = set(names)
    found = []
    for child in root.children(recursive=True):
        try:
            if child.name() in wanted and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def server_children() -> list[psutil.Process]:
    """Our live (non-zombie) redis/valkey/postgres descendants."""
    return _live_descendants(psutil.Process(), SERVER_NAMES)


def redis_children() -> list[psutil.Process]:
    """Our live redis-server/valkey-server descendants."""
    return _live_descendants(psutil.Process(), REDIS_NAMES)


def redis_servers_under(pid: int) -> list[psutil.Process]:
    """The live redis-server/valkey-server descendants of process `pid` (a server we started)."""
    return _live_descendants(psutil.Process(pid), REDIS_NAMES)


def pid_gone(pid: int) -> bool:
    """The process has exited (or is a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_alive(pid: int) -> bool:
    return not pid_gone(pid)


def process_tree(pid: int) -> set[int]:
    """`pid` and all its live descendants (the postmaster and its backends)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


async def wait_gone(pids: Iterable[int], *, timeout: float) -> list[int]:
    """Wait until none of `pids` is alive; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


# -- polling and HTTP ----------------------------------------------------------------------------------


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll `predicate` until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET `url` and decode its JSON body (blocking: for servers running in another process)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


async def wait_until_serving(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll `base`/api/cache/status until it answers 200; fail with the server's log if it exits first."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.get(f"{base}/api/cache/status") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "workers did not come up"
        await asyncio.sleep(0.1)


# -- app processes ("hosts") -------------------------------------------------------------------------


class App:
    """One app process (a "host") and its base URL."""

    def __init__(self, name: str, child: ChildProcess, base: str) -> None:
        self.name, self.child, self.base = name, child, base

    def failure(self, what: str) -> str:
        return f"{what}\n--- log of {self.name} ({self.child.log_path}):\n{log_tail(self.child.log_path, 30)}"


async def start_app(name: str, workdir: Path, redis_url: str, dsn: str, env: dict[str, str] | None = None,
                    args: Sequence[str] = ()) -> App:
    """`run.py --config config/docker.toml` as compose runs it (a "host"): Redis at `redis_url`, PostgreSQL at
    `dsn`, `env` more settings (ONDEMAND_...), `args` more options of `run.py`; healthy before it returns."""
    workdir.mkdir()
    port = free_port()
    overrides = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONDEMAND_")}
    env |= {"DOCKER_ENV": "1", "REDIS_URL": redis_url, "DATABASE_URL": dsn,
            "ONDEMAND_LIFECYCLE__RUNTIME_DIR": f'"{workdir / "runtime"}"', **overrides}
    child = await ChildProcess.spawn(
        name, [sys.executable, str(ROOT / "run.py"), "--config", str(ROOT / "config/docker.toml"),
               "--host", "127.0.0.1", "--port", str(port), *args],
        log_path=workdir / "app.log", env=env, cwd=workdir)
    app = App(name, child, f"http://127.0.0.1:{port}")

    async def healthy() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{app.base}/healthz") as resp:
            return resp.status == 200

    try:
        await child.wait_ready(healthy, timeout=30, interval=0.05, max_interval=0.2)
    except BaseException:
        await child.stop(grace=5)
        raise
    return app


async def call(http: aiohttp.ClientSession, app: App, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, app.base + path, json=body) as resp:
        data = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, data


async def session(http: aiohttp.ClientSession, app: App, sid: str) -> tuple[int, Any, str | None]:
    """GET a session: (status, value, source)."""
    status, data = await call(http, app, "GET", f"/api/sessions/{sid}")
    assert status in (200, 404), app.failure(f"GET session {sid} on {app.name}: {status} {data}")
    return (status, data["value"], data["source"]) if status == 200 else (status, None, None)


async def put(http: aiohttp.ClientSession, app: App, sid: str, value: Any) -> None:
    status, data = await call(http, app, "PUT", f"/api/sessions/{sid}", value)
    assert status == 200, app.failure(f"PUT session {sid} on {app.name}: {status} {data}")



# -- PostgreSQL --------------------------------------------------------------------------------------


# Tests need no durability against an OS crash. Commits still reach the OS before they return, so a
# killed server loses nothing (synchronous_commit stays on for that reason).
TEST_SETTINGS = {"fsync": "off"}


def _base_dir() -> str:
    """tmpfs when it is roomy (copying a 40 MB data dir to disk can take a second), else /tmp.

    Docker's default /dev/shm is only 64 MB, hence the free-space check.
    """
    with contextlib.suppress(OSError):
        if shutil.disk_usage("/dev/shm").free > 1 << 30:
            return "/dev/shm"
    return "/tmp"


def new_temp_dir(prefix: str = "ondemand-pgtest-") -> Path:
    """A fresh directory for data dirs (short paths; pytest's tmp dirs are 0700 and deep)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_base_dir()))


def remove_temp_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_template(startup_timeout: float = 60.0) -> Path:
    """Synchronously initdb a data dir once; returns its path (inside a temp dir to remove later).

    Call it outside a running event loop, e.g. from a session-scoped sync fixture.
    """
    data_dir = new_temp_dir("ondemand-pgtemplate-") / "pgdata"
    asyncio.run(EmbeddedPostgres(data_dir, startup_timeout=startup_timeout).init())
    return data_dir


def clone_data_dir(template: Path) -> Path:
    """Copy a template data dir into a fresh temp dir, keeping owners and modes (postgres checks both)."""
    data_dir = new_temp_dir() / "pgdata"
    subprocess.run(["cp", "-a", str(template), str(data_dir)], check=True, timeout=60)
    return data_dir


@contextlib.asynccontextmanager
async def embedded_postgres(
    data_dir: Path | None = None,
    *,
    template: Path | None = None,
    startup_timeout: float = 60.0,
    tcp_port: int | None = None,
) -> AsyncIterator[EmbeddedPostgres]:
    """Start an embedded PostgreSQL and stop it afterwards, with whatever it left behind.

    Without `data_dir`, a temp one is used (a copy of `template` if given, else a new initdb) and
    removed at the end. With `tcp_port` it also listens on 127.0.0.1 at that port (`tcp_dsn`), for a test
    that puts a TCP proxy between a client and it.
    """
    owned: Path | None = None
    if data_dir is None:
        data_dir = clone_data_dir(template) if template is not None else new_temp_dir() / "pgdata"
        owned = data_dir.parent
    settings = TEST_SETTINGS if tcp_port is None else {**TEST_SETTINGS, "listen_addresses": "127.0.0.1"}
    pg = EmbeddedPostgres(data_dir, startup_timeout=startup_timeout, stop_timeout=5.0, settings=settings,
                          **({} if tcp_port is None else {"port": tcp_port}))
    try:
        await pg.start()
        yield pg
    finally:
        pid = pg.pid
        tree = process_tree(pid) if pid else set()
        await pg.stop()
        await wait_gone(tree, timeout=5.0)
        if owned is not None:
            remove_temp_dir(owned)


def tcp_dsn(port: int) -> str:
    """The DSN of an embedded PostgreSQL started with `tcp_port` (or of a proxy in front of it)."""
    return f"host=127.0.0.1 port={port} dbname=postgres user=postgres"


async def query(dsn: str, sql: str, params: tuple[object, ...] | None = None) -> list[tuple[object, ...]]:
    """Run one statement on a fresh connection; returns its rows (empty for statements without rows)."""
    async with aiopg.connect(dsn, timeout=5.0, enable_hstore=False) as conn, conn.cursor() as cur:
        await cur.execute(sql, params)
        return list(await cur.fetchall()) if cur.description is not None else []


# -- a local Redis Cluster ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def local_cluster(parent: Path | None = None, **options: Any) -> AsyncIterator[LocalCluster]:
    """A started LocalCluster (3 masters x 1 replica unless told), stopped afterwards whatever happens. Its
    server is the suite's (ONDEMAND_TEST_REDIS_BINARY, else discovery's), its bounds roomy for a loaded CI
    runner: Valkey alone holds a master back 2 s before it reports cluster_state:ok."""
    binary = os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None
    cluster = LocalCluster(**{"binary": binary, "parent": parent, "startup_timeout": 20.0, **options})
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


def kill_node(node: ClusterNode) -> int:
    """SIGKILL a node of a LocalCluster by its ChildProcess (tests only: the product never kills a node);
    returns its PID."""
    assert node.child is not None and node.pid is not None
    node.child.signal(signal.SIGKILL)
    return node.pid


async def migrate_slot(cluster: LocalCluster, source: ClusterNode, target: ClusterNode, slot: int, *,
                       pause: float, first_batch_moved: Callable[[], Awaitable[None]] | None = None) -> int:
    """Move `slot` from `source` to `target` the way redis-cli --cluster reshard does: IMPORTING on the target,
    MIGRATING on the source, the keys one MIGRATE (with AUTH) at a time with traffic in between, then the new
    owner on every master (target first). Returns how many keys moved.

    Run in a thread of its own with blocking clients, like the separate tool it stands for: the test's event
    loop is saturated by the load, and a migration starved by it would hold a slot half-moved (TRYAGAIN for
    a key and its tombstone) for longer than any op budget."""
    loop = asyncio.get_running_loop()

    def migrate() -> int:
        clients = {n.port: redis.Redis(host="127.0.0.1", port=n.port, password=cluster.password, socket_timeout=5.0)
                   for n in cluster.master_nodes()}
        try:
            src, dst = clients[source.port], clients[target.port]
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            moved = 0
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                reply = src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                            "AUTH", cluster.password, "KEYS", *keys)
                assert reply in (b"OK", "OK"), reply
                if moved == 0 and first_batch_moved is not None:
                    asyncio.run_coroutine_threadsafe(first_batch_moved(), loop).result(timeout=10.0)
                moved += len(keys)
                time.sleep(pause)
            others = [n for n in cluster.master_nodes() if n is not source and n is not target]
            for node in (target, source, *others):
                clients[node.port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            return moved
        finally:
            for client in clients.values():
                client.close()

    return await asyncio.to_thread(migrate)


def postmasters(data_dir: Path) -> list[int]:
    """The live postmasters working in `data_dir`: postgres processes there whose parent is not one."""
    target = data_dir.stat()
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] != "postgres" or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            here = Path(proc.cwd()).stat()
            if (here.st_dev, here.st_ino) == (target.st_dev, target.st_ino) and proc.parent().name() != "postgres":
                found.append(proc.pid)
        except (psutil.Error, OSError, AttributeError):
            continue
    return found


# -- a plain server, not ours to manage -------------------------------------------------------------------


@attrs.define(eq=False)
class PlainServer:
    """A server of the bundled binary on 127.0.0.1 behind a fixed address, as a provider's would be: the
    default user's password, and ACL users if asked (`user <name> <rules>` lines of its config)."""

    port: int
    password: str
    child: ChildProcess

    @property
    def endpoint(self) -> RedisEndpoint:
        return RedisEndpoint(host="127.0.0.1", port=self.port, password=self.password)

    async def call(self, *command: str | int, timeout: float = 2.0) -> Any:
        """One command as the default user; an error reply is returned."""
        from ondemand.redis.resp import RespConnection

        async with asyncio.timeout(timeout), await RespConnection.open(self.endpoint) as conn:
            conn.send(*command)
            return await conn.reply()


@contextlib.asynccontextmanager
async def plain_server(directory: Path, *, users: Iterable[str] = (), port: int | None = None,
                       options: Iterable[str] = ()) -> AsyncIterator[PlainServer]:
    """A started PlainServer in `directory` (created 0700), SIGKILLed and reaped afterwards. `options`: more lines
    of its config file (`rename-command CLIENT ""`)."""
    from ondemand.plugins.lifecycle_subprocess import find_binary

    binary = (await find_binary(os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None, tcp=True)).path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    port = port or free_port()
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {_resp_quote(str(directory))}", 'save ""', "appendonly no",
             f"requirepass {_resp_quote(password)}", *(f"user {rule}" for rule in users), *options]
    conf = directory / "server.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    child = await ChildProcess.spawn("redis-server", [binary, str(conf)], log_path=directory / "server.log")
    server = PlainServer(port, password, child)
    try:
        await child.wait_ready(lambda: probe(server.endpoint, child.pid), timeout=10.0)
        yield server
    finally:
        if child.returncode is None:
            child.signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.process.wait(), 5.0)


# -- a Redis Sentinel group ---------------------------------------------------------------------------


@attrs.define(eq=False)
class GroupNode:
    """A data node or a sentinel of a SentinelGroup: its config file, its port, its ChildProcess."""

    name: str
    directory: Path
    port: int
    sentinel: bool = False
    child: ChildProcess | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.returncode is None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _resp_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


PROBE_NAME = "ondemand-test-probe"  # the client name of SentinelGroup.call's connections


@attrs.define(eq=False)
class SentinelGroup:
    """1 master, `replicas` replicas and `sentinels` sentinels of the bundled server (`valkey-server <conf>
    --sentinel` for a sentinel), each a ChildProcess (PDEATHSIG) on 127.0.0.1 with a password (one for the
    data nodes, one for the sentinels), persistence off, `down-after-milliseconds` small. Tests only."""

    replicas: int = 1
    sentinels: int = 3
    master_name: str = "themaster"
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    password: str = attrs.field(factory=lambda: secrets.token_urlsafe(16))
    sentinel_password: str = attrs.field(factory=lambda: secrets.token_urlsafe(16))
    binary: str | None = None
    path: Path | None = None
    data: list[GroupNode] = attrs.field(factory=list)
    watchers: list[GroupNode] = attrs.field(factory=list)
    # Called once every node has its port, before any is spawned: it may set `announce` (a data node's name ->
    # the port it announces, where a proxy in front of it listens), which sentinels and replicas then use.
    before_spawn: Callable[[SentinelGroup], Awaitable[None]] | None = None
    announce: dict[str, int] = attrs.field(factory=dict)
    # ACL users (`user <name> <rules>` lines) of the data nodes and of the sentinels, beside the default user
    # the group itself (and the sentinels, among themselves and towards the data nodes) keeps using.
    data_users: tuple[str, ...] = ()
    sentinel_users: tuple[str, ...] = ()

    def announced(self, node: GroupNode) -> str:
        """The address the group knows `node` by: its own, or the one it announces."""
        return f"127.0.0.1:{self.announce.get(node.name, node.port)}"

    @property
    def nodes(self) -> list[GroupNode]:
        return [*self.data, *self.watchers]

    def sentinel_addresses(self) -> list[str]:
        return [n.address for n in self.watchers]

    def config(self) -> dict[str, Any]:
        """The [lifecycle] and [redis] overrides that point the external lifecycle at this group."""
        return {"lifecycle": {"plugin": "external", "topology": "sentinel", "sentinels": self.sentinel_addresses(),
                              "sentinel_master": self.master_name, "sentinel_password": self.sentinel_password,
                              "redis_password": self.password}}

    async def start(self, timeout: float = 30.0) -> None:
        from ondemand.plugins.lifecycle_subprocess import find_binary

        self.binary = self.binary or (await find_binary(os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None,
                                                        tcp=True)).path
        self.path = Path(tempfile.mkdtemp(prefix="ondemand-sentinel-"))
        ports: list[int] = []
        for _ in range(1 + self.replicas + self.sentinels):
            port = free_port()
            while port in ports:
                port = free_port()
            ports.append(port)
        self.data = [GroupNode(f"data{i}", self.path / f"data{i}", ports[i]) for i in range(1 + self.replicas)]
        self.watchers = [GroupNode(f"sentinel{i}", self.path / f"sentinel{i}", ports[1 + self.replicas + i], True)
                         for i in range(self.sentinels)]
        try:
            async with asyncio.timeout(timeout):
                if self.before_spawn is not None:
                    await self.before_spawn(self)
                master_port = int(self.announced(self.data[0]).rsplit(":", 1)[1])
                for node in self.data:
                    node.directory.mkdir(mode=0o700)
                    await self.spawn(node, replica_of=None if node is self.data[0] else master_port)
                for node in self.watchers:
                    node.directory.mkdir(mode=0o700)
                    await self.spawn(node)
                await self.wait_settled()
        except BaseException:
            await self.stop()
            raise

    def _write_config(self, node: GroupNode, replica_of: int | None) -> Path:
        common = {"port": str(node.port), "bind": "127.0.0.1", "dir": str(node.directory), "logfile": "",
                  "daemonize": "no", "protected-mode": "yes"}
        if node.sentinel:
            lines = [f"{k} {_resp_quote(v)}" for k, v in common.items()]
            lines += [f"requirepass {_resp_quote(self.sentinel_password)}",
                      f"sentinel sentinel-pass {_resp_quote(self.sentinel_password)}",
                      f"sentinel monitor {self.master_name} {self.announced(self.data[0]).replace(':', ' ')} 2",
                      f"sentinel auth-pass {self.master_name} {_resp_quote(self.password)}",
                      f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                      f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                      f"sentinel parallel-syncs {self.master_name} 1", *(f"user {u}" for u in self.sentinel_users)]
        else:
            options = {**common, "requirepass": self.password, "masterauth": self.password, "save": "",
                       "appendonly": "no", "repl-diskless-sync-delay": "0", "repl-diskless-load": "on-empty-db",
                       "maxmemory": "64mb", "maxmemory-policy": "allkeys-lru"}
            if node.name in self.announce:
                options |= {"replica-announce-ip": "127.0.0.1", "replica-announce-port": str(self.announce[node.name])}
            lines = [f"{k} {_resp_quote(v)}" for k, v in options.items()] + [f"user {u}" for u in self.data_users]
            if replica_of is not None:
                lines.append(f"replicaof 127.0.0.1 {replica_of}")
        conf = node.directory / ("sentinel.conf" if node.sentinel else "server.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return conf

    async def spawn(self, node: GroupNode, replica_of: int | None = None, *, rewrite: bool = True) -> None:
        """Start `node` (again): a sentinel keeps the config file it rewrote unless `rewrite`; a data node
        restarted without `replica_of` comes back as a master, as a crashed master does."""
        assert self.binary is not None
        conf = node.directory / ("sentinel.conf" if node.sentinel else "server.conf")
        if rewrite or not conf.exists():
            conf = self._write_config(node, replica_of)
        argv = [self.binary, str(conf), *(["--sentinel"] if node.sentinel else [])]
        node.child = await ChildProcess.spawn(node.name, argv, log_path=node.directory / "server.log")
        password = self.sentinel_password if node.sentinel else self.password
        endpoint = RedisEndpoint(host="127.0.0.1", port=node.port, password=password)
        await node.child.wait_ready(lambda: probe(endpoint, node.child.pid), timeout=10.0)

    async def call(self, node: GroupNode | str, *command: str | int, timeout: float = 2.0) -> Any:
        """One command to a node (or "host:port" of one of ours), authenticated, on a connection named
        PROBE_NAME (so a test tells its own connections from the app's); error replies are returned."""
        if isinstance(node, str):
            node = next(n for n in self.nodes if n.address == node)
        password = self.sentinel_password if node.sentinel else self.password
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            try:
                parser = hiredis.Reader()
                writer.write(hiredis.pack_command(("AUTH", password))
                             + hiredis.pack_command(("CLIENT", "SETNAME", PROBE_NAME))
                             + hiredis.pack_command(tuple(map(str, command))))
                replies: list[Any] = []
                while len(replies) < 3:
                    data = await reader.read(65536)
                    if not data:
                        raise EOFError(f"{node.name} closed the connection")
                    parser.feed(data)
                    while (reply := parser.gets()) is not False:
                        replies.append(reply)
                return replies[2]
            finally:
                writer.close()

    async def info(self, node: GroupNode, section: str) -> dict[str, str]:
        text = await self.call(node, "INFO", section)
        return dict(line.split(":", 1) for line in text.decode().splitlines() if ":" in line)

    async def role(self, node: GroupNode) -> str | None:
        try:
            reply = await self.call(node, "ROLE")
        except (OSError, EOFError, TimeoutError):
            return None
        return reply[0].decode() if isinstance(reply, list) else None

    async def master(self) -> GroupNode | None:
        """The data node that the live sentinels agree is the master and that says so itself."""
        named = set()
        for sentinel in self.watchers:
            if not sentinel.alive:
                continue
            reply = await self.call(sentinel, "SENTINEL", "get-master-addr-by-name", self.master_name)
            named.add(f"{reply[0].decode()}:{int(reply[1])}")
        if len(named) != 1:
            return None
        node = next(n for n in self.data if self.announced(n) in named)
        return node if node.alive and await self.role(node) == "master" else None

    async def wait_settled(self, timeout: float = 30.0, *, master: GroupNode | None = None) -> GroupNode:
        """Until every live sentinel names one master (`master` if given) that says it is one, every live
        sentinel knows the others and every live replica's link to it is up; returns the master."""
        deadline = time.monotonic() + timeout
        while True:
            found = None
            with contextlib.suppress(OSError, EOFError, TimeoutError, StopIteration):
                found = await self.master()
            if found is not None and (master is None or found is master):
                ok = True
                for sentinel in (s for s in self.watchers if s.alive):
                    state = await self.call(sentinel, "SENTINEL", "master", self.master_name)
                    fields = dict(zip(state[::2], state[1::2], strict=True))
                    live = sum(1 for s in self.watchers if s.alive) - 1
                    replicas = sum(1 for n in self.data if n.alive) - 1
                    if (int(fields[b"num-other-sentinels"]) < live or int(fields[b"num-slaves"]) < replicas
                            or b"s_down" in fields[b"flags"] or b"o_down" in fields[b"flags"]):
                        ok = False
                for node in (n for n in self.data if n.alive and n is not found):
                    with contextlib.suppress(OSError, EOFError, TimeoutError):
                        fields = await self.info(node, "replication")
                        if fields.get("role") != "slave" or fields.get("master_link_status") != "up" \
                                or f"127.0.0.1:{fields.get('master_port')}" != self.announced(found):
                            ok = False
                if ok:
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(f"the sentinel group did not settle in {timeout:g} s (master: {found})")
            await asyncio.sleep(0.1)

    def kill(self, node: GroupNode) -> int:
        """SIGKILL a node by its ChildProcess; returns its PID."""
        assert node.child is not None and node.pid is not None
        node.child.signal(signal.SIGKILL)
        return node.pid

    async def stop(self) -> None:
        """Every node SIGKILLed by PID (nothing of theirs is worth keeping) and reaped; the directory removed."""
        for node in self.nodes:
            if node.alive:
                node.child.signal(signal.SIGKILL)  # type: ignore[union-attr]
        for node in self.nodes:
            if node.child is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(node.child.process.wait(), 5.0)
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


@contextlib.asynccontextmanager
async def sentinel_group(**options: Any) -> AsyncIterator[SentinelGroup]:
    """A started SentinelGroup (1 master, 1 replica, 3 sentinels unless told), stopped afterwards whatever happens."""
    group = SentinelGroup(**options)
    try:
        await group.start()
        yield group
    finally:
        await group.stop()
