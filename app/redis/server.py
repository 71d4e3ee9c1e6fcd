"""OnDemandRedis: Redis that starts on first use, pools its connections and stops when idle.

The seed's OnDemandRedisService. It owns one lifecycle plugin (which only starts and stops the
server) and adds the product around it:
- one start for any number of concurrent first operations, shielded from callers' cancellation;
- restart of a server that died, with exponential backoff, never in a storm;
- named pools by `connection_id`, each a multiplexed pipelined connection for cache commands plus a
  redis.asyncio pool for `with_connection`, closed after `keep_alive` seconds unused;
- idle shutdown after `lifecycle.idle_timeout` seconds without an operation; an operation that
  races the stop waits for it and starts a fresh server.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

import attrs
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from ondemand.config import Config
from ondemand.errors import (
    BackendUnavailable,
    CacheReplaced,
    RedisCommandError,
    RedisDisabled,
    RedisTimeout,
    RedisUnavailable,
    error_text,
    first_line,
)
from ondemand.events import Events
from ondemand.health import OutageTracker
from ondemand.redis.cluster import ClusterConnection, NodeRecovery, NodeRecoveryCallback
from ondemand.redis.connection import Command
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.lifecycle import Lifecycle
from ondemand.redis.pipeline import PipelinedConnection
from ondemand.redis.pools import NamedPool, client_pool, cluster_client
from ondemand.redis.tracking import connect_for_near
from ondemand.store.near import NearCache
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.redis")
T = TypeVar("T")



class RedisState(StrEnum):
    STOPPED = "stopped"  # not started yet, or stopped for idleness: the next operation starts it
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"  # would not start, or died: the next start waits out the backoff
    DISABLED = "disabled"  # the lifecycle provides no Redis (`noop`)


STOPPED, STARTING, RUNNING, STOPPING, FAILED, DISABLED = RedisState
# The cause under which this state machine reports to the Redis outage tracker (the breaker is another).
_SERVER_CAUSE = "server"
# A server that dies sooner than this after starting does not reset the restart backoff.
_STABLE_UPTIME = 30.0


@attrs.define
class RedisCounters:
    spawns: int = 0  # start attempts (for the subprocess lifecycle: children spawned)
    ready: int = 0
    start_failures: int = 0
    unexpected_exits: int = 0
    idle_stops: int = 0
    commands: int = 0
    errors: int = 0
    timeouts: int = 0


class _Lent:
    """A shared cluster client as `with_connection` lends it: `aclose` is ours to call, not the borrower's."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def aclose(self) -> None:
        """The pool's client stays open for the next lease."""


class OnDemandRedis:
    """See the module docstring. One per Runtime; reach it as `rt.on_demand`."""

    def __init__(self, lifecycle: Lifecycle, config: Config, events: Events, health: OutageTracker) -> None:
        self.lifecycle = lifecycle
        self.config = config
        self.events = events
        self.health = health
        self.counters = RedisCounters()
        self.pools: dict[str, NamedPool] = {}
        self.state = STOPPED if lifecycle.provides_redis else DISABLED
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()  # serializes lifecycle.start and lifecycle.stop
        self._start_task: asyncio.Task[RedisEndpoint] | None = None
        self._endpoint: RedisEndpoint | None = None
        self._running_since: float | None = None
        self._last_error: BackendUnavailable | None = None
        self._retry_at = 0.0
        self._backoff = config.lifecycle.restart_backoff
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False
        self.last_used = time.monotonic()
        self.server_id: str | None = None  # the run_id of the server process last connected to
        # A cluster's masters' run_ids as last seen, shared by every pool's ClusterConnection: a master that turns
        # out to be another server is held until brought up to date, by `node_recovery` (the dispatcher's).
        self.node_ids: dict[tuple[str, int], str] = {}
        self.node_recovery: NodeRecoveryCallback | None = None
        # The near cache (the runtime's, when a namespace keeps one): its pools' connections track what they read.
        self.near: NearCache | None = None
        self.server_version: str | None = None  # what that server said it is (INFO), for status
        self._pid = os.getpid()
        # Lifecycle.connection_lost (a lifecycle that can find the server elsewhere, Sentinel, acts on it) is
        # told about failed connections to the current endpoint, on failures only. `_current` holds the
        # pipelined connections opened since the last start, so that one closed by our own stop is not reported.
        self._current: weakref.WeakSet[Any] = weakref.WeakSet()
        lifecycle.set_exit_callback(self._on_server_exit)
        # A forked copy of this process must neither use our connections nor stop our server.
        after_fork = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (method := after_fork()) and method())

    def _after_fork_in_child(self) -> None:
        """Runs in a forked child: the server, its connections and the event loop stay the parent's.

        The child forgets them (no close, no SHUTDOWN, no signal) and starts its own server, in its
        own event loop, if it uses the cache.
        """
        self.pools = {}
        self.server_id = None
        self.node_ids = {}
        self._janitor = self._start_task = None
        self._endpoint = self._running_since = None
        self.state = STOPPED if self.lifecycle.provides_redis else DISABLED
        if self.near is not None:
            self.near.forget_after_fork()
        self.lifecycle.forget_after_fork()

    def _rebind_after_fork(self) -> None:
        """On the slow path only: a forked child gets loop-bound objects of its own loop."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._loop = asyncio.get_running_loop()
            self._lock = asyncio.Lock()

    # -- the hot path -------------------------------------------------------------------------

    def execute(self, *args: Any, connection_id: str = "default") -> Awaitable[Any]:
        """Run one command on the named pool's pipelined connection; concurrent calls coalesce.

        Returns the awaitable reply: with a connection open, the pipeline's future itself, so a
        command costs its caller no coroutine frame of ours (a cached HTTP GET awaits through a
        handful of them, and each is resumed when the reply arrives). Failures are counted by the
        connection (`on_failure`)."""
        pool = self.pools.get(connection_id) or self._new_pool(connection_id, None)
        self.last_used = pool.last_used = time.monotonic()
        conn = pool.mux
        if conn is None or conn.closed_reason is not None:
            return self._connect_and_execute(pool, args)
        self.counters.commands += 1
        return conn.execute(*args)

    async def _connect_and_execute(self, pool: NamedPool, args: tuple[Any, ...]) -> Any:
        conn = await self._connect_mux(pool)
        self.counters.commands += 1
        return await conn.execute(*args)

    def read_tracked(self, key: str, command: Command, versioned: bool, *, connection_id: str = "default"
                     ) -> Awaitable[Any]:
        """A near-cached namespace's read of `key` (`execute` otherwise): its reply is kept in the near cache by the
        connection that answers it, if that connection tracks (ondemand.redis.tracking). `versioned`: `command`
        answers [value, version]; the value is returned."""
        pool = self.pools.get(connection_id) or self._new_pool(connection_id, None)
        self.last_used = pool.last_used = time.monotonic()
        conn = pool.mux
        if conn is None or conn.closed_reason is not None:
            return self._connect_and_read(pool, key, command, versioned)
        self.counters.commands += 1
        return conn.read_tracked(key, command, versioned)

    async def _connect_and_read(self, pool: NamedPool, key: str, command: Command, versioned: bool) -> Any:
        conn = await self._connect_mux(pool)
        self.counters.commands += 1
        return await conn.read_tracked(key, command, versioned)

    def write_tracked(self, key: str, write: Command, command: Command, versioned: bool, *,
                      connection_id: str = "default") -> Awaitable[Any]:
        """A near-cached namespace's write of `key`, with a tracked read of it right behind it on the same
        connection (see TrackingConnection.write_tracked); the write's reply."""
        pool = self.pools.get(connection_id) or self._new_pool(connection_id, None)
        self.last_used = pool.last_used = time.monotonic()
        conn = pool.mux
        if conn is None or conn.closed_reason is not None:
            return self._connect_and_write(pool, key, write, command, versioned)
        self.counters.commands += 1
        return conn.write_tracked(key, write, command, versioned)

    async def _connect_and_write(self, pool: NamedPool, key: str, write: Command, command: Command,
                                 versioned: bool) -> Any:
        conn = await self._connect_mux(pool)
        self.counters.commands += 1
        return await conn.write_tracked(key, write, command, versioned)

    async def execute_grouped(self, groups: Mapping[str, Sequence[Command]]) -> list[Any]:
        """Run each pool's commands as one batch, all pools in the same loop turn; replies in order.

        No task or gather per call (they cost more than the commands): the replies are awaited one
        after the other, and all arrive in the same round trip. Raises the first error after every
        reply is in, so none is left unretrieved.
        """
        now = time.monotonic()
        futures: list[asyncio.Future[Any]] = []
        for connection_id, commands in groups.items():
            pool = self.pools.get(connection_id) or self._new_pool(connection_id, None)
            self.last_used = pool.last_used = now
            conn = pool.mux
            if conn is None or conn.closed_reason is not None:
                conn = await self._connect_mux(pool)
            futures += conn.execute_many(commands)
        self.counters.commands += len(futures)
        results: list[Any] = []
        error: BaseException | None = None
        for fut in futures:
            try:
                results.append(await fut)
            except (RedisUnavailable, RedisCommandError) as exc:
                if error is None:
                    error = exc
                results.append(exc)
        if error is not None:
            raise error
        return results

    def _count_failures(self, exc: RedisUnavailable, commands: int) -> None:
        """A pipelined connection failed `commands` commands with `exc` (its `on_failure`)."""
        self.counters.errors += commands
        if isinstance(exc, RedisTimeout):
            self.counters.timeouts += commands
        self._report_lost(exc)

    def _report_lost(self, exc: BaseException) -> None:
        """Tell the lifecycle (if it listens) that a connection to the running endpoint failed."""
        if self.state == RUNNING:
            self.lifecycle.connection_lost(first_line(str(exc)))

    async def _connect_mux(self, pool: NamedPool) -> PipelinedConnection:
        self._rebind_after_fork()
        # Concurrent callers on a fresh pool share one connect.
        if pool.mux_connecting is None:
            old = pool.mux
            if old is not None and old.closed_reason is not None and old in self._current:
                self._current.discard(old)
                self._report_lost(old.closed_reason)  # lost with nothing in flight (or a lone READONLY)
            pool.mux_connecting = self._loop.create_future()
            try:
                endpoint = await self.ensure()
                redis_config = self.config.redis
                options = {"op_timeout": redis_config.op_timeout, "connect_timeout": redis_config.connect_timeout,
                           "max_batch": redis_config.max_batch, "on_failure": self._count_failures}
                near = self.near if self.near is not None and pool.name in self.near.prefixes else None
                conn: PipelinedConnection | ClusterConnection
                if endpoint.cluster:
                    conn = await ClusterConnection.connect(endpoint, **options, recover=self._recover_node,
                                                           known_ids=self.node_ids, near=near, pool=pool.name)
                elif near is not None:
                    conn = await connect_for_near(endpoint, near=near, pool=pool.name, **options)
                else:
                    conn = await PipelinedConnection.connect(endpoint, **options)
            except BaseException as exc:
                pool.mux_connecting.set_exception(exc)
                pool.mux_connecting.exception()  # retrieved: waiters (if any) re-raise it
                raise
            finally:
                waiting, pool.mux_connecting = pool.mux_connecting, None
            if self.state != RUNNING or self._endpoint != endpoint:  # stopped while we connected
                conn.close("Redis stopped while connecting")
            else:
                self._current.add(conn)
            pool.mux = conn
            pool.opens += 1
            previous, self.server_id = self.server_id, conn.server_id or self.server_id
            self.server_version = getattr(conn, "server_version", None) or self.server_version
            # (A cluster tells master by master, and holds only the replaced ones: see ClusterConnection.)
            if (not self.lifecycle.starts_empty and not endpoint.cluster and previous is not None
                    and conn.server_id is not None and conn.server_id != previous):
                # Not the server we wrote to: it may lack acknowledged writes (async replication) or hold
                # older copies. The commands waiting for this connection fail over; the next ones use it.
                replaced = CacheReplaced(f"Redis answers from another server process (run_id {conn.server_id}, "
                                         f"was {previous}): durable values are read from the durable store "
                                         "until their cached copies are cleared")
                waiting.set_exception(replaced)
                waiting.exception()
                raise replaced
            waiting.set_result(conn)
            return conn
        return await asyncio.shield(pool.mux_connecting)

    # -- with_connection ----------------------------------------------------------------------

    async def with_connection(
        self,
        fn: Callable[[aioredis.Redis], Awaitable[T] | T],
        *,
        connection_id: str = "default",
        keep_alive: float | None = None,
    ) -> T:
        """Ensure the server, lend `fn` a client bound to one pooled connection, return fn's result.

        The connection goes back to the named pool afterwards, even when the caller is cancelled;
        a connection interrupted mid-command is disconnected, never reused dirty. `keep_alive`
        (seconds) sets how long the pool may stay unused before it is closed.
        """
        if keep_alive is not None and not keep_alive > 0:
            raise ValueError(f"keep_alive must be greater than 0 seconds, got {keep_alive!r}")
        self._rebind_after_fork()
        pool = self.pools.get(connection_id) or self._new_pool(connection_id, keep_alive)
        if keep_alive is not None:
            pool.keep_alive = keep_alive
        pool.leases += 1
        self.last_used = pool.last_used = time.monotonic()
        try:
            endpoint = await self.ensure()
            if pool.client_pool is None:
                make = cluster_client if endpoint.cluster else client_pool
                pool.client_pool = make(endpoint, self.config.redis, pool.max_connections)
                pool.opens += 1
            if isinstance(pool.client_pool, RedisCluster):  # a cluster client is shared, never closed per lease
                client: Any = _Lent(pool.client_pool)
            else:
                client = aioredis.Redis(connection_pool=pool.client_pool, single_connection_client=True)
            try:
                result = fn(client)
                if inspect.isawaitable(result):
                    result = await result
                return result  # type: ignore[return-value]
            except redis.exceptions.TimeoutError as exc:
                self.counters.timeouts += 1
                self._report_lost(exc)
                raise RedisTimeout(f"Redis did not answer within {self.config.redis.op_timeout:g} s") from exc
            except redis.exceptions.ConnectionError as exc:
                self.counters.errors += 1
                self._report_lost(exc)
                raise RedisUnavailable(f"Redis connection failed: {exc}") from exc
            except redis.exceptions.ReadOnlyError as exc:  # a replica now: the lifecycle may find the master
                self._report_lost(exc)
                raise
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
        finally:
            pool.leases -= 1
            self.last_used = pool.last_used = time.monotonic()

    async def _recover_node(self, node: NodeRecovery) -> None:
        if self.node_recovery is not None:
            await self.node_recovery(node)

    @property
    def cluster(self) -> bool:
        """The server in use is a Redis Cluster."""
        return self._endpoint is not None and self._endpoint.cluster

    async def per_master(self, connection_id: str = "default") -> list[Callable[..., Awaitable[Any]]]:
        """One `execute` per server: the server's, or each reachable master's of a cluster (for SCAN and the
        UNLINK of what it found: commands for that master, even while it is held)."""
        pool = self.pools.get(connection_id) or self._new_pool(connection_id, None)
        conn = pool.mux
        if conn is None or conn.closed_reason is not None:
            conn = await self._connect_mux(pool)
        if isinstance(conn, ClusterConnection):
            return [lambda *args, address=address: conn.execute_on(address, *args)
                    for address in conn.reachable_masters()]  # an unreachable one's keys are cleared when back
        return [conn.execute]

    def _new_pool(self, connection_id: str, keep_alive: float | None) -> NamedPool:
        pool_config = self.config.pool(connection_id)
        pool = NamedPool(
            name=connection_id,
            max_connections=pool_config.max_connections,
            keep_alive=keep_alive or pool_config.keep_alive,
            last_used=time.monotonic(),
        )
        self.pools[connection_id] = pool
        self._ensure_janitor()
        return pool

    # -- the lifecycle state machine ----------------------------------------------------------

    @property
    def disabled(self) -> bool:
        return self.state == DISABLED

    async def ensure(self) -> RedisEndpoint:
        """Return the running server's endpoint, starting it if needed (one start for all callers)."""
        if self.state == RUNNING and self._endpoint is not None:
            return self._endpoint
        if self.state == DISABLED:
            raise RedisDisabled(f"lifecycle {self.lifecycle.name!r} provides no Redis")
        if self._closed:
            raise RedisUnavailable("the runtime is closed")
        if self._start_task is None:
            now = time.monotonic()
            if self.state == FAILED and now < self._retry_at and self._last_error is not None:
                # Backoff: fail fast with the last error instead of spawning again.
                raise type(self._last_error)(
                    f"{self._last_error} (next attempt in {self._retry_at - now:.2f} s)"
                )
            self._start_task = asyncio.ensure_future(self._start())
        # Shielded: a caller that gives up does not abort a start that others wait for.
        return await asyncio.shield(self._start_task)

    async def _start(self) -> RedisEndpoint:
        try:
            async with self._lock:
                if self.state == RUNNING and self._endpoint is not None:
                    return self._endpoint
                self.state = STARTING
                self.counters.spawns += 1
                began = time.monotonic()
                try:
                    endpoint = await self.lifecycle.start()
                except BackendUnavailable as exc:
                    self._mark_failed(exc)
                    raise
                except BaseException:
                    self.state = STOPPED
                    raise
                self._endpoint = endpoint
                if self.lifecycle.starts_empty:  # a new, empty server of ours: none of its masters is to distrust
                    self.node_ids.clear()
                self._current = weakref.WeakSet()
                self._running_since = time.monotonic()
                self.state = RUNNING
                self.counters.ready += 1
                self.last_used = time.monotonic()
                self._ensure_janitor()
                seconds = time.monotonic() - began
                self.events.redis_ready(lifecycle=self.lifecycle.name, pid=self.lifecycle.pid(),
                                        endpoint=endpoint.describe(), seconds=round(seconds, 4))
                self.health.up(cause=_SERVER_CAUSE)
                self._last_error = None
                return endpoint
        finally:
            self._start_task = None

    def _mark_failed(self, exc: BackendUnavailable) -> None:
        now = time.monotonic()
        self.state = FAILED
        self.counters.start_failures += 1
        self._last_error = exc
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.config.lifecycle.restart_backoff_max)
        self.health.down(exc, cause=_SERVER_CAUSE)
        log.warning("redis unavailable: %s", exc)

    def _on_server_exit(self, description: str, failure: bool = True) -> None:
        """The server went away without our asking: fail in-flight work, plan a restart.

        `failure` is False for a sibling's shared server that its owner stopped, or a server that is no
        longer the one to use (Sentinel: a failover): then the next operation simply starts (or adopts, or
        discovers) a server, with no backoff, even after a failed start.
        """
        if not failure and self.state == FAILED:
            self.state = STOPPED
            self._retry_at = 0.0
            return
        if self.state != RUNNING:
            return
        if not failure:
            self._endpoint = None
            self._running_since = None
            self.state = STOPPED
            self._close_connections(description)
            return
        uptime = time.monotonic() - (self._running_since or time.monotonic())
        if uptime >= _STABLE_UPTIME:
            self._backoff = self.config.lifecycle.restart_backoff
        self.counters.unexpected_exits += 1
        self._endpoint = None
        self._close_connections(f"Redis server exited: {error_text(description)}")
        self._mark_failed(RedisUnavailable(description))

    def _close_connections(self, reason: str) -> None:
        for pool in self.pools.values():
            pool.close_soon(reason)

    def _last_use(self) -> float:
        """When an operation last used the server: a command, or a hit its near cache served (kept coherent by it)."""
        return self.last_used if self.near is None else max(self.last_used, self.near.last_used)

    def _is_idle(self, now: float) -> bool:
        idle_timeout = self.config.lifecycle.idle_timeout
        shared_idle = self.lifecycle.shared_idle_seconds()  # siblings' activity, when the server is shared
        return (
            now - self._last_use() >= idle_timeout
            and (shared_idle is None or shared_idle >= idle_timeout)
            and not any(pool.leases for pool in self.pools.values())
            and not any(pool.busy for pool in self.pools.values())
        )

    async def stop_if_idle(self) -> bool:
        """Stop the server if nothing used it for idle_timeout seconds; True if it was stopped."""
        if self.state != RUNNING or not self.lifecycle.manages_process or not self._is_idle(time.monotonic()):
            return False
        async with self._lock:
            now = time.monotonic()
            # Re-checked under the lock, and the state flips with no await in between, so an
            # operation either saw RUNNING and made the pool busy, or it waits for a fresh start.
            if self.state != RUNNING or not self._is_idle(now):
                return False
            idle_for = now - self._last_use()
            pid = self.lifecycle.pid()
            self.state = STOPPING
            self._endpoint = None
            self._close_connections("Redis stopped after the idle timeout")
            try:
                await self.lifecycle.stop()
            finally:
                self.state = STOPPED
                self._running_since = None
            self.counters.idle_stops += 1
            self.events.redis_idle_stopped(lifecycle=self.lifecycle.name, pid=pid, idle_seconds=round(idle_for, 3))
            return True

    def _ensure_janitor(self) -> None:
        if self._janitor is None and not self._closed:
            self._janitor = asyncio.ensure_future(self._janitor_loop())

    def _janitor_tick(self) -> float:
        periods = [self.config.lifecycle.idle_timeout, *(p.keep_alive for p in self.pools.values())]
        return min(1.0, max(0.02, min(periods) / 4))

    async def _janitor_loop(self) -> None:
        """Closes pools unused for keep_alive seconds and stops an idle server."""
        noted = self._last_use()
        while True:
            await asyncio.sleep(self._janitor_tick())
            try:
                now = time.monotonic()
                last_use = self._last_use()
                if last_use != noted and self.state == RUNNING:
                    noted = last_use
                    self.lifecycle.note_activity()  # off the hot path: at most once a tick
                near_pools = self.near.prefixes if self.near is not None else {}
                for pool in list(self.pools.values()):
                    used = max(pool.last_used, last_use) if pool.name in near_pools else pool.last_used
                    if pool.is_open and not pool.busy and now - used >= pool.keep_alive:
                        pool.idle_closes += 1
                        await pool.close(f"pool {pool.name!r} closed after keep_alive")
                await self.stop_if_idle()
            except Exception:
                log.exception("janitor failed; retrying on the next tick")

    # -- status and shutdown ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        idle_timeout = self.config.lifecycle.idle_timeout
        running = self.state == RUNNING
        retry_in = max(0.0, self._retry_at - now) if self.state == FAILED else None
        return {
            "lifecycle": self.lifecycle.name,
            "topology": self.config.lifecycle.topology,
            "state": self.state,
            "pid": self.lifecycle.pid(),
            "endpoint": self._endpoint.describe() if self._endpoint else None,
            "server_version": self.server_version,
            "uptime_seconds": round(now - self._running_since, 3) if self._running_since else None,
            "idle_timeout": idle_timeout,
            "idle_deadline_in": (
                round(max(0.0, idle_timeout - (now - self._last_use())), 3)
                if running and self.lifecycle.manages_process else None
            ),
            "last_error": error_text(self._last_error) if self._last_error else None,
            "retry_in": round(retry_in, 3) if retry_in is not None else None,
            "degraded_since": self.health.down_since,
            "pools": {name: pool.stats(now) for name, pool in sorted(self.pools.items())},
            "counters": attrs.asdict(self.counters),
            **self.lifecycle.status(),
        }

    async def close(self) -> None:
        """Close pools and stop the server; bounded by the lifecycle's own stop timeouts."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():  # a forked copy that never used Redis: nothing here is ours
            return
        if self._janitor is not None:
            await stop_tasks(self._janitor)
            self._janitor = None
        if self._start_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._start_task),
                                       self.config.lifecycle.startup_timeout + 1)
        async with self._lock:
            pid = self.lifecycle.pid()
            self.state = STOPPING if self.state != DISABLED else DISABLED
            self._endpoint = None
            for pool in self.pools.values():
                await pool.close("runtime closed")
            try:
                await self.lifecycle.stop()
            finally:
                if self.state != DISABLED:
                    self.state = STOPPED
            self.events.shutdown(lifecycle=self.lifecycle.name, pid=pid)
