"""Cluster-aware automatic pipelining: one pipelined connection per master, commands routed by slot.

A CacheConnection (ondemand.redis.connection) like one PipelinedConnection, so OnDemandRedis uses either
the same way. The commands of one loop tick are coalesced per node and every node's batch is written in
the same tick. MOVED patches the slot map (a storm of them refreshes it), ASK sends ASKING beside the
command, TRYAGAIN and CLUSTERDOWN are retried within the command's budget, multi-key commands are split
by slot. A master that fails makes its commands fail (NodeUnavailable) and the map is refreshed until a
promoted replica takes its slots, without waiting for a command to notice.

Failures stay with their node. A master that answers again after a failure, one that replaced another (a
promoted replica, or another server process at a known address), and one that answers CLUSTERDOWN or is
otherwise unusable past a command's budget, is held while a recovery brings it up to date (`recover`, the
dispatcher's: stale keys invalidated, a replaced node's durable copies cleared, on that node alone): its
commands wait for that within their own budget (NodeUnavailable past it), so that a recovery under load
does not make new stale keys of the writes it holds back. The other masters serve throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from ondemand.errors import BackendUnavailable, NodeUnavailable, RedisCommandError, RedisUnavailable, first_line
from ondemand.redis.connection import Command, FailureCallback
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.pipeline import PipelinedConnection
from ondemand.redis.routing import SLOTS, Address, SlotMap, key_slot, parse_redirect
from ondemand.redis.tracking import TrackingConnection, connect_for_near
from ondemand.store.near import NearCache

log = logging.getLogger("ondemand.cluster")

_MAX_REDIRECTS = 5  # MOVED and ASK replies followed for one command
_BACKOFF_MAX = 0.05  # seconds between two tries after TRYAGAIN or CLUSTERDOWN
_REFRESH_MIN_INTERVAL = 0.1  # seconds between two full refreshes of the slot map
_MOVED_STORM = 16  # MOVED replies within a refresh interval that make us refresh the whole map
_FAILED_REFRESH_MAX = 0.25  # seconds: the longest wait between two refreshes while a master is unreachable
_RECOVER_FIRST, _RECOVER_MAX = 0.05, 1.0  # seconds between two tries to bring a held master up to date, doubling
_NODE_UNUSABLE = frozenset({"clusterdown", "loading", "busy", "masterdown"})  # error replies that hold a master
# The master a task is bringing up to date: its commands go through although the master is held.
_RECOVERING: contextvars.ContextVar[Address | None] = contextvars.ContextVar("ondemand_recovering", default=None)
_SUMMED = frozenset({b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"})
_KEYLESS = frozenset({b"PING", b"SCAN", b"INFO", b"DBSIZE", b"ROLE", b"CLUSTER", b"CONFIG", b"FLUSHALL"})
# Commands whose only key is args[1], spelled as our storages send them: routed without command_keys or a
# set of slots (0.3-0.4 us less per command, on every GET, HGET and SET).
_ONE_KEY = frozenset(name for base in ("GET", "HGET", "SET", "PEXPIRE", "PTTL", "EXPIRE", "TTL")
                     for name in (base, base.encode()))


def _name(args: Sequence[Any]) -> bytes:
    name = args[0]
    return (name if isinstance(name, bytes) else str(name).encode()).upper()


def command_keys(args: Sequence[Any]) -> list[Any]:
    """The keys of a command we send (GET/SET/PEXPIRE..., EVAL's KEYS, multi-key DEL/MGET...)."""
    name = _name(args)
    if name in (b"EVAL", b"EVALSHA"):
        return list(args[3:3 + int(args[2])])
    if name in _KEYLESS or len(args) < 2:
        return []
    if name in _SUMMED or name == b"MGET":
        return list(args[1:])
    return [args[1]]


def scan_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for the keys starting with `prefix`, taken literally."""
    return prefix.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[") + "*"


async def unlink(execute: Callable[..., Awaitable[Any]], keys: Sequence[Any], *, cluster: bool) -> int:
    """UNLINK `keys` through `execute` (one server's, or one master's: then slot by slot, as a cluster node
    refuses a multi-key command across slots)."""
    if not cluster:
        return await execute("UNLINK", *keys)
    by_slot: dict[int, list[Any]] = {}
    for key in keys:
        by_slot.setdefault(key_slot(key), []).append(key)
    return sum(await asyncio.gather(*(execute("UNLINK", *group) for group in by_slot.values())))


@attrs.frozen
class NodeRecovery:
    """A held master to bring up to date, as the recovery callback gets it: commands the callback sends reach
    it although it is held (the callback runs in a task of its own that says so)."""

    address: Address
    replaced: bool  # another server than the one written to (a promoted replica, a restart): may lack writes
    cluster: ClusterConnection

    def owns(self, key: str | bytes) -> bool:
        """Whether `key`'s slot is this master's."""
        return self.cluster.slots.owner(key_slot(key)) == self.address

    async def delete_prefix(self, prefix: str, *, batch: int = 1000) -> int:
        """SCAN and UNLINK every key under `prefix` on this master alone; returns how many went."""
        removed = 0
        cursor: Any = b"0"
        while True:
            cursor, keys = await self.cluster.execute_on(self.address, "SCAN", cursor, "MATCH", scan_pattern(prefix),
                                                         "COUNT", batch)
            if keys:
                removed += await unlink(lambda *args: self.cluster.execute_on(self.address, *args), keys, cluster=True)
            if cursor in (b"0", 0):
                return removed


NodeRecoveryCallback = Callable[[NodeRecovery], Awaitable[None]]


@attrs.define(eq=False)
class ClusterNode:
    address: Address
    endpoint: RedisEndpoint
    connection: PipelinedConnection | None = None
    connecting: asyncio.Future[PipelinedConnection] | None = None
    failures: int = 0


class ClusterConnection:
    """See the module docstring."""

    def __init__(self, seed: RedisEndpoint, *, op_timeout: float, connect_timeout: float, max_batch: int,
                 on_failure: FailureCallback | None = None, recover: NodeRecoveryCallback | None = None,
                 known_ids: dict[Address, str] | None = None, near: NearCache | None = None,
                 pool: str = "default") -> None:
        self._seed = seed
        self._recover = recover
        # The near cache whose entries this pool's node connections keep coherent (each tracks what it read).
        self._near = near
        self._pool = pool
        self._near_prefix = next(iter(near.prefixes.get(pool, ())), "ondemand:") if near is not None else ""
        # Each master's run_id as last seen (shared with the connections before and after this one): a master
        # that answers with another one, or an address that was not a master, is held as replaced.
        self.known_ids: dict[Address, str] = {} if known_ids is None else known_ids
        self._had_known = bool(self.known_ids)
        self._new_ids: dict[Address, str] = {}  # run_ids of replaced masters, known once they are recovered
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        self._max_batch = max_batch
        self._on_failure = on_failure
        self._loop = asyncio.get_running_loop()
        self.slots = SlotMap()
        self.nodes: dict[Address, ClusterNode] = {}
        self.closed_reason: RedisUnavailable | None = None
        self.server_id: str | None = None  # the masters' run_ids when connected
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed: asyncio.Future[None] | None = None  # what wait_refreshed awaits: the next map read
        self._refreshed_at = 0.0
        self._moved_since_refresh = 0
        self._failed: set[Address] = set()  # masters whose connection failed, until they answer or leave the map
        # Masters that answer but must be brought up to date before they serve: address -> replaced (see the
        # module docstring); each has a recovery task, and a generation that tells a recovery it was overtaken.
        self._held: dict[Address, bool] = {}
        self._holds: dict[Address, int] = {}
        self._releases: dict[Address, asyncio.Event] = {}  # set when a held master serves again
        self._recovering: dict[Address, asyncio.Task[None]] = {}
        self.recoveries = 0
        self.redirects = {"moved": 0, "ask": 0, "tryagain": 0, "clusterdown": 0}
        self.refreshes = 0

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, seed: RedisEndpoint, *, op_timeout: float, connect_timeout: float, max_batch: int,
                      on_failure: FailureCallback | None = None, recover: NodeRecoveryCallback | None = None,
                      known_ids: dict[Address, str] | None = None, near: NearCache | None = None,
                      pool: str = "default") -> ClusterConnection:
        """Read the slot map from the seed and connect to every master (in parallel, bounded). A master whose
        run_id is not the one `known_ids` holds for its address is held until recovered (see the docstring).
        With `near`, every master's connection tracks what it reads for the near cache (`pool`'s namespaces)."""
        conn = cls(seed, op_timeout=op_timeout, connect_timeout=connect_timeout, max_batch=max_batch,
                   on_failure=on_failure, recover=recover, known_ids=known_ids, near=near, pool=pool)
        try:
            await conn._refresh_from([seed])
            if not conn.slots.covered():
                raise RedisUnavailable(f"the cluster at {seed.describe()} does not serve every slot")
            connections = await asyncio.gather(*(conn._node_connection(node) for node in list(conn.nodes.values())))
            conn.server_id = ",".join(sorted(str(c.server_id) for c in connections))
        except BaseException:
            conn.close("cluster connect failed")
            raise
        return conn

    def _endpoint(self, address: Address) -> RedisEndpoint:
        return attrs.evolve(self._seed, unix_socket=None, host=address[0], port=address[1])

    def _node(self, address: Address) -> ClusterNode:
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = ClusterNode(address, self._endpoint(address))
        return node

    async def _node_connection(self, node: ClusterNode) -> PipelinedConnection:
        conn = node.connection
        if conn is not None and conn.closed_reason is None:
            return conn
        if self.closed_reason is not None:
            raise self.closed_reason
        if node.connecting is None:
            node.connecting = self._loop.create_future()
            try:
                options = {"op_timeout": self._op_timeout, "connect_timeout": self._connect_timeout,
                           "max_batch": self._max_batch, "on_failure": self._on_failure}
                if self._near is not None:
                    conn = await connect_for_near(node.endpoint, near=self._near, pool=self._pool, **options)
                else:
                    conn = await PipelinedConnection.connect(node.endpoint, **options)
            except BaseException as exc:
                node.connecting.set_exception(exc)
                node.connecting.exception()
                node.failures += 1
                raise
            finally:
                waiting, node.connecting = node.connecting, None
            node.connection = conn
            if isinstance(conn, TrackingConnection):
                conn.keepalive = _probe(self.slots, node.address, self._near_prefix)
                conn.on_keepalive_refused = self._keepalive_refused
            self._seen(node.address, conn.server_id)
            self._back(node.address)
            waiting.set_result(conn)
            return conn
        return await asyncio.shield(node.connecting)

    async def _refresh_from(self, endpoints: Sequence[RedisEndpoint]) -> None:
        errors: list[str] = []
        for endpoint in endpoints:
            try:
                async with asyncio.timeout(self._connect_timeout + self._op_timeout):
                    conn = await PipelinedConnection.connect(
                        endpoint, op_timeout=self._op_timeout, connect_timeout=self._connect_timeout, max_batch=8)
                    try:
                        reply = await conn.execute("CLUSTER", "SLOTS")
                    finally:
                        conn.close("slot map read")
            except (RedisUnavailable, RedisCommandError, TimeoutError) as exc:
                errors.append(f"{endpoint.describe()}: {first_line(exc)}")
                continue
            slots = SlotMap.from_cluster_slots(reply, default_host=endpoint.host or "127.0.0.1")
            # A failover: slots whose owner is no master any more now belong to a promoted replica, which
            # may lack the last writes its master acknowledged: it is held as replaced, and its durable
            # copies are cleared before it serves. (A resharding moves slots between masters that stay
            # masters: the keys moved with them.)
            before, now = self.slots, set(slots.masters())
            self._slots_moved(before.moved_from(slots))
            if before.covered():
                lost = set(before.masters()) - now
                promoted = {slots.owner(slot) for slot in range(SLOTS)
                            if before.owner(slot) in lost and slots.owner(slot) is not None}
                for address in promoted:
                    self._hold(address, replaced=True)  # type: ignore[arg-type]
            self.slots = slots
            for address in slots.masters():
                self._node(address)
            for address in [a for a in self.nodes if a not in slots.masters()]:
                node = self.nodes.pop(address)  # no longer a master (a replica now, or gone)
                if node.connection is not None:
                    node.connection.close("no longer a master of the cluster")
            self._failed &= set(slots.masters())
            self._watch_nodes()
            self._refreshed_at, self._moved_since_refresh = time.monotonic(), 0
            self.refreshes += 1
            return
        raise RedisUnavailable("cannot read the cluster's slot map: " + "; ".join(errors))

    def _watch_nodes(self) -> None:
        """Each tracking node connection's keepalive reads a key of one of the node's slots (see
        TrackingConnection.keepalive): a master the cluster failed over while it still answers us, or one that
        gave the slot away, refuses it, and what it served is dropped."""
        for address, node in self.nodes.items():
            conn = node.connection
            if isinstance(conn, TrackingConnection):
                conn.keepalive = _probe(self.slots, address, self._near_prefix)
                conn.on_keepalive_refused = self._keepalive_refused

    def _keepalive_refused(self, error: RedisCommandError) -> None:
        self.refresh_soon()

    def _slots_moved(self, owners: set[Address]) -> None:
        """Slots left these masters (a resharding, a failover): what the near cache read from them is dropped
        (read again from where the slots are now)."""
        for address in owners:
            node = self.nodes.get(address)
            if node is not None and isinstance(node.connection, TrackingConnection):
                node.connection.flush("slot_change")

    def _seen(self, address: Address, run_id: str | None) -> None:
        """A connection to `address` answered with `run_id`. Another server than the one known there, or a
        master this cluster's earlier connections did not know, is held as replaced; its run_id is known
        from when its recovery succeeded (so that a connection made meanwhile holds it too)."""
        if run_id is None or self.known_ids.get(address) == run_id:
            return
        if address not in self.known_ids and not self._had_known:
            self.known_ids[address] = run_id  # the first connection to this cluster: nothing to distrust
            return
        self._new_ids[address] = run_id
        self._hold(address, replaced=True)

    def _back(self, address: Address) -> None:
        if address in self._failed:
            self._failed.discard(address)
            self._hold(address, replaced=False)

    def reachable_masters(self) -> list[Address]:
        return [address for address in self.slots.masters() if address not in self._failed]

    async def _ready(self, address: Address, deadline: float, *, bypass: bool = False) -> None:
        """Before a command to `address`: fail fast while it is unreachable; while it is held, wait for its
        release within the command's budget (unless this task is the one bringing it up to date)."""
        while True:
            if address in self._failed:
                raise NodeUnavailable(f"Redis Cluster master {address[0]}:{address[1]} is unreachable")
            released = self._releases.get(address)
            if released is None or bypass or _RECOVERING.get() == address:
                return
            try:
                async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                    await released.wait()
            except TimeoutError:
                raise NodeUnavailable(f"Redis Cluster master {address[0]}:{address[1]} is being brought up to date "
                                      "(what went stale on it is invalidated) before it serves") from None

    def _hold(self, address: Address, *, replaced: bool) -> None:
        """Keep `address` from serving until a recovery brought it up to date (see the module docstring)."""
        if self.closed_reason is not None:
            return
        node = self.nodes.get(address)
        if node is not None and isinstance(node.connection, TrackingConnection):
            node.connection.flush("node_held")  # (what went stale on it is invalidated before it serves again)
        self._held[address] = self._held.get(address, False) or replaced
        self._holds[address] = self._holds.get(address, 0) + 1
        self._releases.setdefault(address, asyncio.Event())
        if address not in self._recovering:
            self._recovering[address] = asyncio.ensure_future(self._bring_up_to_date(address))

    def _release(self, address: Address) -> None:
        self._held.pop(address, None)
        released = self._releases.pop(address, None)
        if released is not None:
            released.set()

    async def _bring_up_to_date(self, address: Address) -> None:
        """Run the recovery of a held master until it succeeds (bounded backoff between tries), then release it,
        unless it was held again meanwhile (then once more, as held now)."""
        delay = _RECOVER_FIRST
        try:
            while address in self._held and self.closed_reason is None:
                if address not in self.slots.masters():  # no longer a master: nothing to serve
                    self._release(address)  # (its waiting commands go where the map sends them now)
                    return
                if address in self._failed:  # unreachable again: the refresh tries it; we wait for that
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECOVER_MAX)
                    continue
                replaced, generation = self._held[address], self._holds[address]
                token = _RECOVERING.set(address)
                try:
                    if self._recover is not None:
                        await self._recover(NodeRecovery(address, replaced, self))
                except Exception as exc:
                    if isinstance(exc, BackendUnavailable | RedisCommandError):
                        log.debug("bringing %s:%s up to date failed (retrying): %s", *address, first_line(exc))
                    else:
                        log.exception("bringing %s:%s up to date failed; retrying", *address)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECOVER_MAX)
                    continue
                finally:
                    _RECOVERING.reset(token)
                if self._holds.get(address) == generation:  # not held again meanwhile (replaced, failed...)
                    self._release(address)
                    if address in self._new_ids:
                        self.known_ids[address] = self._new_ids.pop(address)
                    self.recoveries += 1
                    log.info("Redis Cluster master %s:%s serves again (%s)", *address,
                             "replaced: its durable copies were cleared" if replaced else "stale keys invalidated")
        finally:
            self._recovering.pop(address, None)

    def node_failed(self, address: Address | None) -> None:
        """A master's connection failed (or could not be made): refresh the map until it answers again or
        the cluster replaced it (a failover)."""
        if address is not None and address in self.nodes:
            self._failed.add(address)
        self.refresh_soon()

    def refresh_soon(self) -> None:
        """Refresh the slot map in the background (once, however many ask), at most every 100 ms; while a
        master in the map is unreachable, keep refreshing (and trying it) with a backoff up to 250 ms."""
        if self._refreshing is not None or self.closed_reason is not None:
            return
        delay = max(0.0, self._refreshed_at + _REFRESH_MIN_INTERVAL - time.monotonic())

        async def refresh() -> None:
            wait = delay
            pause = _REFRESH_MIN_INTERVAL
            try:
                while True:
                    await asyncio.sleep(wait)
                    # Answering nodes first: a dead one costs a refused connect (or a connect timeout) each time.
                    nodes = sorted(self.nodes.values(), key=lambda n: n.address in self._failed)
                    try:
                        await self._refresh_from([n.endpoint for n in nodes] or [self._seed])
                    except RedisUnavailable as exc:
                        log.warning("cluster slot map refresh failed: %s", exc)
                    if self._refreshed is not None and not self._refreshed.done():
                        self._refreshed.set_result(None)  # (wait_refreshed: a map, or none to be had now)
                    for address in list(self._failed):  # still a master: does it answer now?
                        node = self.nodes.get(address)
                        with contextlib.suppress(RedisUnavailable, TimeoutError):
                            if node is not None:
                                await self._node_connection(node)
                            self._back(address)
                    if not self._failed:
                        return
                    wait, pause = pause, min(pause * 2, _FAILED_REFRESH_MAX)
            finally:
                self._refreshing = None

        self._refreshing = asyncio.ensure_future(refresh())

    async def wait_refreshed(self, timeout: float | None = None) -> None:
        """Until the refresh under way has tried to read a map, at most `timeout` seconds (not until a failed
        master is back: the refresh goes on for that)."""
        if self._refreshing is not None:
            if self._refreshed is None or self._refreshed.done():
                self._refreshed = self._loop.create_future()
            with contextlib.suppress(Exception):
                await asyncio.wait([self._refreshed, self._refreshing], timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)

    # -- the CacheConnection interface -------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def busy(self) -> bool:
        return any(node.connection is not None and node.connection.busy for node in self.nodes.values())

    @property
    def batches_written(self) -> int:
        return sum(n.connection.batches_written for n in self.nodes.values() if n.connection is not None)

    @property
    def commands_written(self) -> int:
        return sum(n.connection.commands_written for n in self.nodes.values() if n.connection is not None)

    def execute(self, *args: Any) -> Any:
        """One command, routed by its key's slot; multi-key commands split by slot."""
        if args[0] in _ONE_KEY and len(args) > 1:
            address = self.slots.owner(key_slot(args[1]))
        else:
            keys = command_keys(args)
            if not keys:
                reachable = self.reachable_masters()
                return self._run(reachable[0] if reachable else next(iter(self.slots.masters()), None), args)
            slots = {key_slot(key) for key in keys}
            if len(slots) != 1:
                return self._split(args, keys)
            address = self.slots.owner(slots.pop())
        node = self.nodes.get(address) if address is not None else None
        conn = node.connection if node is not None else None
        if (conn is not None and conn.closed_reason is None and address not in self._held
                and address not in self._failed):
            # Queued now, in this tick, whenever the caller awaits it: commands issued together share
            # their node's batch (execute_grouped awaits one reply after the other).
            return self._finish(conn.execute(*args), address, args)  # type: ignore[arg-type]
        return self._run(address, args)

    def read_tracked(self, key: str, command: Command, versioned: bool) -> Any:
        """A near-cached namespace's read (see OnDemandRedis.read_tracked): tracked by the connection of the master
        that owns the key; a redirected or held read is answered the long way, and nothing of it is kept."""
        address = self.slots.owner(key_slot(key))
        node = self.nodes.get(address) if address is not None else None
        conn = node.connection if node is not None else None
        if (conn is not None and conn.closed_reason is None and address not in self._held
                and address not in self._failed):
            return self._finish(conn.read_tracked(key, command, versioned), address, command,  # type: ignore[arg-type]
                                versioned_read=versioned)
        return self._read_long_way(address, command, versioned)

    async def _read_long_way(self, address: Address | None, command: Command, versioned: bool) -> Any:
        reply = await self._run(address, command)
        return reply[0] if versioned else reply

    def write_tracked(self, key: str, write: Command, command: Command, versioned: bool) -> Any:
        """A near-cached namespace's write with a tracked read of its key behind it, on the connection of the
        master that takes the write (the long way too: a redirect, a held master)."""
        address = self.slots.owner(key_slot(key))
        node = self.nodes.get(address) if address is not None else None
        conn = node.connection if node is not None else None
        track = (key, command, versioned)
        if (conn is not None and conn.closed_reason is None and address not in self._held
                and address not in self._failed):
            return self._finish(conn.write_tracked(key, write, command, versioned), address, write,  # type: ignore[arg-type]
                                track=track)
        return self._run(address, write, track=track)

    def execute_on(self, address: Address, *args: Any) -> Any:
        """A command for one master (SCAN on each, UNLINK of the keys it found), even while it is held."""
        return self._run(address, args, bypass=True)

    def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        return [self.execute(*command) for command in commands]

    async def _split(self, args: Sequence[Any], keys: list[Any]) -> Any:
        name = _name(args)
        if name not in _SUMMED and name != b"MGET":
            raise RedisCommandError(f"CROSSSLOT {name.decode()} with keys in several slots")
        by_slot: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            by_slot.setdefault(key_slot(key), []).append(index)
        parts = [(indexes, self._run(self.slots.owner(slot), (args[0], *(keys[i] for i in indexes))))
                 for slot, indexes in by_slot.items()]
        replies = await asyncio.gather(*(part for _, part in parts))
        if name in _SUMMED:
            return sum(replies)
        merged: list[Any] = [None] * len(keys)
        for (indexes, _), reply in zip(parts, replies, strict=True):
            for index, value in zip(indexes, reply, strict=True):
                merged[index] = value
        return merged

    async def _finish(self, future: asyncio.Future[Any], address: Address, args: Sequence[Any], *,
                      track: tuple[str, Command, bool] | None = None, versioned_read: bool = False) -> Any:
        """The reply of a command already queued; a redirect or a failed node goes the long way (where a
        tracked read of a versioned record, answered with its value alone, comes back as the whole reply)."""
        try:
            return await future
        except (RedisCommandError, RedisUnavailable) as exc:
            if isinstance(exc, RedisUnavailable):
                self.node_failed(address)
                raise _node_unavailable(exc) from exc
            if exc.kind not in ("moved", "ask", "tryagain", "clusterdown"):
                if exc.kind in _NODE_UNUSABLE:
                    raise self._unusable(address, exc) from exc
                raise
            reply = await self._run(address, args, first_error=exc, track=track)
        return reply[0] if versioned_read else reply

    def _unusable(self, address: Address, exc: RedisCommandError) -> NodeUnavailable:
        """A master that cannot serve now (CLUSTERDOWN past the budget, LOADING, BUSY...): its problem alone.
        Held, so that what went stale on it meanwhile is invalidated before it serves again."""
        self._hold(address, replaced=False)
        if exc.kind == "clusterdown":
            self.refresh_soon()
        return NodeUnavailable(f"Redis Cluster master {address[0]}:{address[1]} cannot serve: {first_line(exc)}")

    async def _run(self, address: Address | None, args: Sequence[Any], *,
                   first_error: RedisCommandError | None = None, bypass: bool = False,
                   track: tuple[str, Command, bool] | None = None) -> Any:
        deadline = self._loop.time() + self._op_timeout
        asking = False
        backoff = 0.005
        redirects = 0
        pending_error = first_error
        while True:  # bounded: by the redirect limit for MOVED and ASK, by the deadline for the others
            if pending_error is not None:
                error, pending_error = pending_error, None
                if error.kind in ("moved", "ask"):
                    redirects += 1
                    if redirects > _MAX_REDIRECTS:
                        raise RedisUnavailable(f"more than {_MAX_REDIRECTS} redirects for one command")
                redirect = self._redirect(error, args)
                if redirect is None:
                    raise error
                previous = address
                address, asking = redirect
                if error.kind in ("tryagain", "clusterdown"):
                    # (the slot is being migrated, or the cluster is failing over: it may clear within the budget)
                    if self._loop.time() + backoff >= deadline:
                        if error.kind == "clusterdown" and previous is not None:
                            raise self._unusable(previous, error) from error
                        raise error
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
            if address is None:
                self.refresh_soon()
                await self.wait_refreshed(max(0.001, deadline - self._loop.time()))
                slot = key_slot(command_keys(args)[0]) if command_keys(args) else 0
                address = self.slots.owner(slot)
                if address is None:
                    raise RedisUnavailable("no cluster node serves this key's slot")
            await self._ready(address, deadline, bypass=bypass)
            node = self._node(address)
            try:
                conn = await self._node_connection(node)
                if asking:  # adjacent on the target's connection, so ASKING applies to this command
                    asked = conn.execute("ASKING")
                    asked.add_done_callback(lambda f: f.cancelled() or f.exception())
                future = conn.execute(*args) if track is None else conn.write_tracked(track[0], args, *track[1:])
                async with asyncio.timeout(max(0.001, deadline - self._loop.time())):
                    return await future
            except TimeoutError:
                self.node_failed(address)
                raise NodeUnavailable(f"Redis Cluster master {address[0]}:{address[1]} did not answer within "
                                      f"{self._op_timeout:g} s") from None
            except RedisCommandError as exc:
                if exc.kind not in ("moved", "ask", "tryagain", "clusterdown"):
                    if exc.kind in _NODE_UNUSABLE:
                        raise self._unusable(address, exc) from exc
                    raise
                pending_error = exc
                continue
            except RedisUnavailable as exc:
                self.node_failed(address)  # a master may have failed: learn who took its slots
                raise _node_unavailable(exc) from exc

    def _redirect(self, error: RedisCommandError, args: Sequence[Any]) -> tuple[Address | None, bool] | None:
        """Where to send a command again after `error`, and whether with ASKING; None: give up."""
        kind = error.kind
        if kind in self.redirects:
            self.redirects[kind] += 1
        if kind == "moved":
            slot, address = parse_redirect(str(error))
            previous = self.slots.owner(slot)
            self.slots.move(slot, address)
            if previous is not None and previous != address:
                self._slots_moved({previous})
            self._moved_since_refresh += 1
            if self._moved_since_refresh >= _MOVED_STORM:
                self.refresh_soon()
            return address, False
        if kind == "ask":
            return parse_redirect(str(error))[1], True
        if kind in ("tryagain", "clusterdown"):
            if kind == "clusterdown":
                self.refresh_soon()
            slot = key_slot(keys[0]) if (keys := command_keys(args)) else 0
            return self.slots.owner(slot), False
        return None

    def close(self, reason: str = "connection closed") -> None:
        if self.closed_reason is None:
            self.closed_reason = RedisUnavailable(reason)
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None
        for task in self._recovering.values():
            task.cancel()
        for address in list(self._releases):  # commands waiting for a held master fail on the closed connection
            self._release(address)
        for node in self.nodes.values():
            if node.connection is not None:
                node.connection.close(reason)

    def status(self) -> dict[str, Any]:
        return {
            "nodes": [
                {"address": f"{host}:{port}", "role": "master", "slots": self.slots.slots_of((host, port)),
                 "state": ("unreachable" if (host, port) in self._failed
                           else "recovering" if (host, port) in self._held else "up"),
                 "connected": node.connection is not None and node.connection.closed_reason is None,
                 "batches": node.connection.batches_written if node.connection else 0,
                 "commands": node.connection.commands_written if node.connection else 0,
                 "connect_failures": node.failures}
                for (host, port), node in sorted(self.nodes.items())
            ],
            "redirects": dict(self.redirects),
            "slot_map_refreshes": self.refreshes,
            # masters in the map whose connection failed: the map is refreshed until this is empty again
            "unreachable": [f"{host}:{port}" for host, port in sorted(self._failed)],
            # masters held until brought up to date (stale keys invalidated, a replaced one's durable copies cleared)
            "recovering": [f"{host}:{port}" for host, port in sorted(self._held)],
            "recoveries": self.recoveries,
        }


def _probe(slots: SlotMap, address: Address, prefix: str) -> tuple[Any, ...]:
    """A keepalive for `address`: EXISTS of a key under `prefix` (our keys, as an ACL user may read them) in one of
    its slots; PING for a node that serves none."""
    for n in range(4096):  # (a master of a cluster of up to 16 holds a slot a key among the first few hits)
        key = f"{prefix}near-keepalive-{n}" + ("}" if prefix.endswith("{=") else "")
        if slots.owner(key_slot(key)) == address:
            return ("EXISTS", key)
    return ("PING",)


def _node_unavailable(exc: RedisUnavailable) -> NodeUnavailable:
    return exc if isinstance(exc, NodeUnavailable) else NodeUnavailable(str(exc))
