"""A local Redis (Valkey) Cluster of our own children, for `lifecycle.topology = "cluster"` with the
subprocess lifecycle, the cluster tests and a developer trying a cluster on one machine (README, "A local
cluster on demand"). A library of the plugin, not a plugin: it has no hooks.

Formed without valkey-cli: MYID and SET-CONFIG-EPOCH on every node, ADDSLOTSRANGE on each master (an even
split), MEET between every pair, REPLICATE on the replicas; ready when every node agrees on every role,
reports `cluster_state:ok` and every replica is linked. Every wait is bounded by `startup_timeout`; a
failure stops every node and removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import random
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs

from ondemand.errors import SpawnError
from ondemand.events import Events
from ondemand.host.process import ChildProcess, ProcessError
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.resp import RespConnection, probe

log = logging.getLogger("ondemand.redis")

SLOTS = 16384
BUS_OFFSET = 10000  # the cluster bus port is the node's port + 10000
MAX_PORT = 65535 - BUS_OFFSET  # 55535
PORT_RANGE = (20000, MAX_PORT)  # where free ports are looked for (below is often taken by services)
DIR_PREFIX = "ondemand-cluster-"  # our directory's name in `parent`: a fresh one per start
_PORT_ATTEMPTS = 5  # starts of one node on fresh ports when another process took the ones we picked
# Known flaws in features a cluster enables and a standalone server never does (plugins.lifecycle_subprocess
# files them as "feature", unreachable there): the cluster bus and replication.
CLUSTER_REACHED: frozenset[str] = frozenset({"CVE-2026-21863", "CVE-2026-23631"})

Role = Literal["master", "replica"]


class ServerBinary(Protocol):
    """A checked server binary: plugins.lifecycle_subprocess.RedisBinary (not imported at module level: that
    lifecycle imports this module to run a cluster)."""

    path: str
    flavour: str
    version: tuple[int, int, int]

    def describe(self) -> str: ...

    def advisories(self) -> list[Any]: ...


def even_slots(masters: int) -> list[tuple[int, int]]:
    """The inclusive slot range of each of `masters` masters: 16384 slots split as evenly as they go."""
    bounds = [i * SLOTS // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: Iterable[int] = (), *, rng: random.Random | None = None) -> int:
    """A port in PORT_RANGE such that it and its cluster bus port (+10000) are both free on 127.0.0.1 now
    and neither is in `taken`. Another process may bind them before the node does: the caller retries."""
    rng = rng or random.SystemRandom()
    avoid = set(taken)
    avoid |= {p + BUS_OFFSET for p in avoid} | {p - BUS_OFFSET for p in avoid}
    for _ in range(1000):
        port = rng.randint(*PORT_RANGE)
        if port not in avoid and _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise SpawnError(f"no free pair of ports (port and port + {BUS_OFFSET}) found in {PORT_RANGE} on 127.0.0.1")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run them at once; on the first failure cancel the others and wait for them, then raise it (unlike
    gather, nothing is left running behind the caller's cleanup)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def _open(node: ClusterNode) -> RespConnection:
    """An authenticated connection to a node of ours; an error reply or an unreachable node is SpawnError."""
    return await RespConnection.open(node.endpoint, what=node.name, error=SpawnError)


def _fields(text: bytes) -> dict[str, str]:
    """`key:value` lines (INFO, CLUSTER INFO) as a dict."""
    out = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


@attrs.frozen
class NodeView:
    """One line of CLUSTER NODES: what a node believes about a node."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[str, ...]

    @property
    def role(self) -> Role:
        return "master" if "master" in self.flags else "replica"


def parse_cluster_nodes(text: bytes) -> dict[str, NodeView]:
    views = {}
    for line in text.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0].split(",", 1)[0]
        port = address.rsplit(":", 1)[-1]
        views[parts[0]] = NodeView(node_id=parts[0], port=int(port) if port.isdigit() else 0,
                                   flags=frozenset(parts[2].split(",")),
                                   master_id=None if parts[3] == "-" else parts[3], slots=tuple(parts[8:]))
    return views


@attrs.define(eq=False)
class ClusterNode:
    """A node of the cluster: its place (index, the master it was started to replicate), its child, and the
    role it had when last looked at (`LocalCluster.refresh`)."""

    index: int
    directory: Path
    role: Role
    master_index: int | None = None  # a replica: the index of its master
    port: int = 0
    child: ChildProcess | None = None
    node_id: str | None = None
    slots: tuple[int, int] | None = None  # a master: the range it was given at formation
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.returncode is None

    @property
    def endpoint(self) -> RedisEndpoint:
        return RedisEndpoint(host="127.0.0.1", port=self.port, password=self.password)

    @property
    def name(self) -> str:
        return f"cluster node {self.index} (port {self.port})"

    def status(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "port": self.port, "role": self.role if self.alive else "down",
                "node_id": self.node_id, "alive": self.alive,
                "slots": f"{self.slots[0]}-{self.slots[1]}" if self.slots else None,
                "endpoint": self.endpoint.describe()}


@attrs.define(eq=False)
class LocalCluster:
    """`masters` x (1 + `replicas`) nodes of our own, formed into one cluster by `start()`, gone after `stop()`.

    `binary`: a RedisBinary already checked, a configured path (checked, and used with warnings like
    lifecycle.redis_binary), or None for the subprocess lifecycle's discovery (its find_binary). `parent`:
    where our directory is created (default: the temp dir). `ports`: fixed ports, one per node (masters
    first); by default free ones are picked. `password`: the nodes' password (default: a random one).
    """

    binary: ServerBinary | str | None = None
    parent: Path | None = None
    masters: int = 3
    replicas: int = 1
    maxmemory: str = "256mb"
    maxmemory_policy: str = "allkeys-lru"
    node_timeout_ms: int = 1000
    startup_timeout: float = 10.0
    shutdown_grace: float = 1.0
    events: Events = attrs.field(factory=Events)
    ports: Sequence[int] | None = None
    options: dict[str, str] = attrs.field(factory=dict)  # more server options, for every node
    exclusive: bool = False  # one cluster at a time in `parent`: another process's start is refused meanwhile
    lifecycle: str = "subprocess"  # the name events carry
    server: ServerBinary | None = None  # the binary in use, once started
    path: Path | None = None  # our directory while we run
    nodes: list[ClusterNode] = attrs.field(factory=list)
    timings: dict[str, float] = attrs.field(factory=dict)  # seconds: binary, spawn, form, total
    _password: str = attrs.field(factory=lambda: secrets.token_urlsafe(24), repr=False)
    _watchers: list[asyncio.Task[None]] = attrs.field(factory=list, init=False)
    _on_exit: Callable[[str, bool], None] | None = attrs.field(default=None, init=False)
    _waiting: str = attrs.field(default="", init=False)
    _lock_fd: int | None = attrs.field(default=None, init=False)  # what start() awaits now: named by its timeout error

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.masters <= 16:
            raise ValueError(f"masters must be between 1 and 16, not {self.masters}")
        if not 0 <= self.replicas <= 4:
            raise ValueError(f"replicas must be between 0 and 4, not {self.replicas}")
        if self.ports is not None and len(self.ports) != self.size:
            raise ValueError(f"{len(self.ports)} ports given for {self.size} nodes")
        if self.ports is not None and any(not 0 < p <= MAX_PORT for p in self.ports):
            raise ValueError(f"a cluster node's port must be 1..{MAX_PORT} (its bus listens on port + {BUS_OFFSET})")

    @property
    def size(self) -> int:
        return self.masters * (1 + self.replicas)

    @property
    def password(self) -> str:
        return self._password

    def master_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "master"]

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        """Called when a node exits without our asking, with its exit description and whether its shard is
        lost (`shard_lost`): a lost replica or a failed-over master is the cluster's own business."""
        self._on_exit = callback

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.alive and n.pid is not None]

    def status(self) -> dict[str, Any]:
        return {"masters": self.masters, "replicas_per_master": self.replicas,
                "directory": str(self.path) if self.path else None,
                "binary": self.server.describe() if self.server else None,
                "startup_seconds": self.timings.get("total"),
                "nodes": [n.status() for n in self.nodes]}

    # -- start ------------------------------------------------------------------------------------------

    async def start(self) -> list[RedisEndpoint]:
        """Spawn every node in parallel, form the cluster, wait until it serves every slot; the masters'
        endpoints (with the password). SpawnError (every node stopped, the directory removed) otherwise."""
        await self.stop()
        began = time.monotonic()
        deadline = began + self.startup_timeout
        self._waiting = "the server binary's --version"
        try:
            async with asyncio.timeout(self.startup_timeout):
                await self._resolve_binary()
                self.timings = {"binary": time.monotonic() - began}
                self._lock_parent()
                self._layout()
                self._waiting = "every node answers PING"
                await _all(self._spawn_node(node, deadline) for node in self.nodes)
                spawned = time.monotonic()
                self.timings["spawn"] = spawned - began
                await self._form()
                self.timings["form"] = time.monotonic() - spawned
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise SpawnError(f"the local cluster was not formed within {self.startup_timeout:g} s "
                                 f"(lifecycle.startup_timeout): still waiting until {self._waiting}") from None
            raise
        self.timings["total"] = time.monotonic() - began
        log.info("local cluster of %d masters x %d replicas ready in %.3f s (spawn %.3f s, form %.3f s) in %s",
                 self.masters, self.replicas, self.timings["total"], self.timings["spawn"], self.timings["form"],
                 self.path)
        self._watchers = [asyncio.ensure_future(self._watch(node)) for node in self.nodes]
        return [node.endpoint for node in self.master_nodes()]

    async def _resolve_binary(self) -> None:
        if self.binary is not None and not isinstance(self.binary, str):
            self.server = self.binary
        else:
            from ondemand.plugins.lifecycle_subprocess import find_binary  # (a module-level import would be a cycle)

            self.server = await find_binary(self.binary, tcp=True)  # TCP: the preauth flaws are reachable
        if self.server.flavour == "Redis" and self.server.version < (7, 0, 0):
            raise SpawnError(f"{self.server.describe()}: a local cluster needs Redis 7.0 or later "
                             "(CLUSTER ADDSLOTSRANGE); any Valkey will do")
        flaws = [a for a in self.server.advisories() if CLUSTER_REACHED & set(a.ids.split(", "))]
        for advisory in flaws:
            message = (f"{self.server.describe()} lacks the fix for {advisory.ids} ({advisory.what}), which a "
                       "cluster reaches (cluster bus, replication)")
            if self.binary is None:
                raise SpawnError(f"{message}; upgrade it, or set lifecycle.redis_binary to use it all the same")
            log.warning("%s; upgrade it (README: Supported servers)", message)

    def _lock_parent(self) -> None:
        """With `exclusive`: an flock on parent/cluster.lock for as long as the cluster runs (the kernel drops it
        when we die), so that two processes sharing a runtime directory never run two clusters that each
        believes is the one (a cache written in one and read in the other would be stale). Holding it, we
        remove what a killed owner left there (its nodes died with it: PDEATHSIG)."""
        if not self.exclusive or self.parent is None:
            return
        fd = os.open(self.parent / "cluster.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise SpawnError(
                f"another process (pid {holder}) runs a local cluster in {self.parent}; a local cluster is not shared "
                "between processes: run one process per runtime directory (lifecycle.runtime_dir), or point "
                "every process at one cluster (the external lifecycle with lifecycle.redis_url)") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        # Under the lock no other cluster runs here: a directory of a cluster whose owner was killed is stale.
        for entry in self.parent.glob(f"{DIR_PREFIX}*"):
            st = os.lstat(entry)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():  # never a symlink, never another's
                shutil.rmtree(entry, ignore_errors=True)

    def _layout(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=self.parent))  # created 0700
        ranges = even_slots(self.masters)
        nodes = [ClusterNode(index=i, directory=self.path / f"node{i}", role="master", slots=ranges[i],
                             password=self._password) for i in range(self.masters)]
        for r in range(self.replicas):
            for m in range(self.masters):
                i = self.masters * (1 + r) + m
                nodes.append(ClusterNode(index=i, directory=self.path / f"node{i}", role="replica",
                                         master_index=m, password=self._password))
        for node in nodes:
            node.directory.mkdir(mode=0o700)
        self.nodes = nodes

    def _write_config(self, node: ClusterNode) -> Path:
        options: dict[str, str] = {
            "daemonize": "no",
            "port": str(node.port),
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "dir": str(node.directory),
            "logfile": "",  # stdout, which ChildProcess writes to server.log
            "requirepass": self._password,
            "masterauth": self._password,
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(self.node_timeout_ms),
            # A master that fails takes only its own slots down: the others go on serving theirs meanwhile.
            "cluster-require-full-coverage": "no",
            "save": "",
            "appendonly": "no",
            "repl-diskless-sync-delay": "0",  # a master sends its data to a new replica at once, not after 5 s
            "repl-diskless-load": "on-empty-db",  # a replica loads its master's data without a file
            "shutdown-timeout": "0",  # a master does not wait for its replicas when told to stop
            "maxmemory": self.maxmemory,
            "maxmemory-policy": self.maxmemory_policy,
            **self.options,
        }
        conf = node.directory / "server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{key} {_quote(value)}\n" for key, value in options.items())
        return conf

    def _taken_ports(self, node: ClusterNode) -> set[int]:
        return {n.port for n in self.nodes if n is not node and n.port}

    async def _spawn_node(self, node: ClusterNode, deadline: float) -> None:
        assert self.server is not None
        fixed = self.ports is not None
        for attempt in range(1 if fixed else _PORT_ATTEMPTS):
            node.port = self.ports[node.index] if self.ports is not None else free_cluster_port(self._taken_ports(node))
            for leftover in ("nodes.conf", "server.log"):  # of an attempt that lost its ports
                with contextlib.suppress(FileNotFoundError):
                    (node.directory / leftover).unlink()
            conf = self._write_config(node)
            try:
                child = await ChildProcess.spawn(self.server.path.rsplit("/", 1)[-1],
                                                 [self.server.path, str(conf)], log_path=node.directory / "server.log")
            except ProcessError as exc:
                raise SpawnError(f"{node.name}: {exc}") from None
            node.child = child
            self.events.redis_spawned(lifecycle=self.lifecycle, pid=child.pid, endpoint=node.endpoint.describe())
            ready = functools.partial(probe, node.endpoint, child.pid)
            try:
                await child.wait_ready(ready, timeout=max(0.001, deadline - time.monotonic()))
                return
            except (ProcessError, SpawnError) as exc:
                lost_race = "already in use" in str(exc) or "did not start" in str(exc)
                if fixed or not lost_race or attempt == _PORT_ATTEMPTS - 1:
                    hint = (f"; port {node.port} or its cluster bus port {node.port + BUS_OFFSET} is taken"
                            if "already in use" in str(exc) else "")
                    raise SpawnError(f"{node.name} could not start{hint}: {exc}") from None
                log.info("%s lost its ports to another process; starting it on others", node.name)
                await child.stop(grace=self.shutdown_grace)
                node.child = None

    async def _form(self) -> None:
        nodes = self.nodes
        opened = await asyncio.gather(*(_open(n) for n in nodes), return_exceptions=True)
        conns = [c for c in opened if isinstance(c, RespConnection)]
        try:
            for result in opened:
                if isinstance(result, BaseException):
                    raise result
            ids = await asyncio.gather(*(c.call("CLUSTER", "MYID") for c in conns))
            for node, node_id in zip(nodes, ids, strict=True):
                node.node_id = node_id.decode()
            # Distinct epochs before the nodes meet: no collision to resolve, and one owner for every slot.
            await asyncio.gather(*(c.call("CLUSTER", "SET-CONFIG-EPOCH", n.index + 1)
                                   for n, c in zip(nodes, conns, strict=True)))
            await asyncio.gather(*(c.call("CLUSTER", "ADDSLOTSRANGE", *n.slots)
                                   for n, c in zip(nodes, conns, strict=True) if n.slots is not None))
            # Each pair meets once, directly (gossip alone takes most of a second to spread the news).
            async def meet_earlier(i: int) -> None:
                for earlier in nodes[:i]:
                    await conns[i].call("CLUSTER", "MEET", "127.0.0.1", earlier.port)

            await asyncio.gather(*(meet_earlier(i) for i in range(1, len(nodes))))
            await self._until(conns, self._everyone_met, "every node knows every other")
            await asyncio.gather(*(c.call("CLUSTER", "REPLICATE", nodes[n.master_index].node_id)
                                   for n, c in zip(nodes, conns, strict=True) if n.master_index is not None))
            await self._until(conns, self._formed, "every node reports cluster_state:ok with every role agreed")
        finally:
            for conn in conns:
                conn.close()

    async def _until(self, conns: Sequence[RespConnection], check: Callable[[list[RespConnection]], Any],
                     what: str) -> None:
        """Poll `check` (which returns None when satisfied, else why not) until it is; bounded by the start's
        own timeout, whose error says what was awaited and what was missing. A node that exits meanwhile is
        reported at once, with its log."""
        interval = 0.005
        self._waiting = what
        while True:
            for node in self.nodes:
                if not node.alive and node.child is not None:
                    raise SpawnError(f"{node.name} exited while the cluster formed: {node.child.describe_exit()}")
            missing = await check(list(conns))
            if missing is None:
                return
            self._waiting = f"{what} ({missing})"
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 0.05)

    async def _everyone_met(self, conns: list[RespConnection]) -> str | None:
        views = await asyncio.gather(*(c.call("CLUSTER", "NODES") for c in conns))
        ids = {n.node_id for n in self.nodes}
        for node, text in zip(self.nodes, views, strict=True):
            known = {v.node_id for v in parse_cluster_nodes(text).values()
                     if not v.flags & {"handshake", "noaddr", "fail", "fail?"}}
            if not ids <= known:
                return f"{node.name} knows {len(known & ids)} of {len(ids)} nodes"
        return None

    async def _formed(self, conns: list[RespConnection]) -> str | None:
        async def ask(conn: RespConnection) -> tuple[bytes, bytes, bytes]:  # one command at a time on a connection
            return (await conn.call("CLUSTER", "INFO"), await conn.call("CLUSTER", "NODES"),
                    await conn.call("INFO", "replication"))

        answers = await asyncio.gather(*(ask(c) for c in conns))
        for node, (info, text, repl) in zip(self.nodes, answers, strict=True):
            fields = _fields(info)
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != str(SLOTS):
                return (f"{node.name}: cluster_state:{fields.get('cluster_state')}, "
                        f"cluster_slots_ok:{fields.get('cluster_slots_ok')}")
            seen = parse_cluster_nodes(text)
            for other in self.nodes:
                view = seen.get(other.node_id or "")
                master = self.nodes[other.master_index].node_id if other.master_index is not None else None
                if view is None or view.role != other.role or view.master_id != master:
                    return f"{node.name} does not see {other.name} as a {other.role} yet"
            if node.master_index is not None and _fields(repl).get("master_link_status") != "up":
                return f"{node.name}: its link to its master is not up yet"
        return None

    async def _watch(self, node: ClusterNode) -> None:
        child = node.child
        if child is None:
            return
        await child.process.wait()
        if node.child is not child or node not in self.nodes:  # a stop we asked for
            return
        description, lost = child.describe_exit(), self.shard_lost(node)
        log.warning("%s of the local cluster: %s", description.split(";", 1)[0],
                    "no node of its shard is left: the cluster cannot heal itself" if lost
                    else "the cluster fails over to a replica (or goes on without this one)")
        if self._on_exit is not None:
            self._on_exit(description, lost)

    def shard_lost(self, node: ClusterNode) -> bool:
        """Whether every node started for `node`'s shard (its master and that master's replicas) is gone:
        that shard's slots are then served by no one until the cluster is started again."""
        shard = node.index if node.master_index is None else node.master_index
        return not any(n.alive for n in self.nodes if shard in (n.index, n.master_index))

    # -- status -----------------------------------------------------------------------------------------

    async def refresh(self, timeout: float = 1.0) -> list[ClusterNode]:
        """Ask each live node its role now (a replica may have been promoted); the nodes, updated."""

        async def ask(node: ClusterNode) -> None:
            with contextlib.suppress(OSError, EOFError, TimeoutError, SpawnError):
                async with asyncio.timeout(timeout):
                    async with await _open(node) as conn:
                        role = _fields(await conn.call("INFO", "replication")).get("role")
                    node.role = "master" if role == "master" else "replica"

        await asyncio.gather(*(ask(n) for n in self.nodes if n.alive))
        return self.nodes

    # -- stop -------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """SHUTDOWN NOSAVE NOW to every node, then SIGTERM and SIGKILL by its ChildProcess, all nodes at
        once and bounded; then our directory is removed. Safe to call at any time, any number of times."""
        for task in self._watchers:
            task.cancel()
        self._watchers = []
        nodes, self.nodes = self.nodes, []
        await asyncio.gather(*(self._stop_node(n) for n in nodes))
        path, self.path = self.path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        if self._lock_fd is not None:  # released only once every node is gone
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _stop_node(self, node: ClusterNode) -> None:
        child = node.child
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                async with await _open(node) as conn:
                    conn.send("SHUTDOWN", "NOSAVE", "NOW")
                    await conn.until_closed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.process.wait(), self.shutdown_grace)
        await child.stop(grace=self.shutdown_grace)
