"""Automatic pipelining: one multiplexed Redis connection that coalesces concurrent commands.

Commands issued in one loop tick are written as one batch; replies are routed back in order to their
callers' futures by the protocol (not by the callers, so a cancelled caller cannot desynchronise the
stream). A lone caller pays no latency: the flush runs on the next loop iteration. An error reply goes to
its own caller only. One timer watches the oldest unanswered batch: past `op_timeout` every waiter fails
with RedisTimeout and the connection is aborted (the next command opens a new one).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

import hiredis

from ondemand.errors import RedisCommandError, RedisTimeout, RedisUnavailable, permission_refused
from ondemand.redis.connection import Command, FailureCallback
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.tls import TlsFailure
from ondemand.redis.tls import reason as tls_reason

log = logging.getLogger("ondemand.redis")
_RUN_ID = re.compile(rb"run_id:([0-9a-f]+)")
# Valkey reports redis_version 7.2.4 (what it is compatible with) and its own valkey_version.
_VERSION = re.compile(rb"(redis|valkey)_version:([0-9][0-9A-Za-z.\-]*)")


async def _value_of(record: Awaitable[Any]) -> Any:
    """The value of a versioned read's [value, version] reply."""
    return (await record)[0]


class _RedisProtocol(asyncio.Protocol):
    """Feeds bytes to hiredis and hands each reply to the oldest waiter."""

    def __init__(self, owner: PipelinedConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._owner._waiters
        readonly = False
        try:
            reply = reader.gets()
            while reply is not False:
                self._owner._answered += 1
                fut = waiters.popleft()
                if isinstance(reply, hiredis.ReplyError):
                    error = self._owner._error_reply(reply)
                    readonly = readonly or error.kind == "readonly"
                    if not fut.done():
                        fut.set_exception(error)
                elif not fut.done():  # a cancelled or timed-out caller no longer waits
                    fut.set_result(reply)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:
            self._owner._fail(RedisUnavailable(f"Redis protocol error: {exc!r}"))
            return
        if readonly:
            # We are talking to a replica (a failover happened behind our address): the commands still
            # in flight would meet it too. Close; the next command reconnects, to the master if the
            # address now leads there (or to where the lifecycle rediscovers it).
            self._owner._fail(RedisUnavailable("Redis answered READONLY: the server is a replica now; reconnecting"))

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {tls_reason(exc)}" if isinstance(exc, ssl.SSLError) else f": {exc}" if exc else ""
        self._owner._fail(RedisUnavailable(f"connection to {self._owner.where} lost{why}"))


class PipelinedConnection:
    """One Redis connection shared by many concurrent callers (a CacheConnection); see the module docstring."""

    def __init__(self, *, op_timeout: float, max_batch: int, loop: asyncio.AbstractEventLoop,
                 on_failure: FailureCallback | None = None) -> None:
        self._loop = loop
        self._on_failure = on_failure  # told (error, number of commands) whenever commands fail with the connection
        self._op_timeout = op_timeout
        self._max_batch = max_batch
        self._protocol = _RedisProtocol(self)
        self._buffer: list[bytes] = []
        self._buffer_futs: list[asyncio.Future[Any]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._sent = 0  # commands written
        self._answered = 0  # replies read
        self._batches: deque[tuple[int, float]] = deque()  # (sent count at end of batch, deadline)
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed_reason: RedisUnavailable | None = None
        self.batches_written = 0
        self.commands_written = 0
        self.server_id: str | None = None  # INFO's run_id: one per server process
        self.where = "Redis"  # the endpoint, as errors name it (set by connect)
        self._refusals: set[str] = set()  # NOPERM replies logged on this connection
        self.server_version: str | None = None  # "Valkey 8.1.8", "Redis 7.4.2": for status

    @classmethod
    async def connect(cls, endpoint: RedisEndpoint, *, op_timeout: float, connect_timeout: float,
                      max_batch: int, on_failure: FailureCallback | None = None,
                      ) -> PipelinedConnection:
        loop = asyncio.get_running_loop()
        conn = cls(op_timeout=op_timeout, max_batch=max_batch, loop=loop, on_failure=on_failure)
        await conn._attach(endpoint, connect_timeout)
        try:
            # One round trip: AUTH, SELECT, and INFO for the server's run_id (which process answers: a
            # new one after a restart or a failover, see OnDemandRedis._connect_mux).
            setup = []
            if endpoint.password is not None:
                setup.append(conn.execute("AUTH", *endpoint.credentials()))
            if endpoint.db:
                setup.append(conn.execute("SELECT", endpoint.db))
            info = conn.execute("INFO", "server")
            info.add_done_callback(lambda f: f.cancelled() or f.exception())
            for step in setup:
                await step
            reply = await info or b""
            found = _RUN_ID.search(reply)
            conn.server_id = found.group(1).decode() if found else None
            versions = {name.decode(): version.decode() for name, version in _VERSION.findall(reply)}
            if versions:
                conn.server_version = (f"Valkey {versions['valkey']}" if "valkey" in versions
                                       else f"Redis {versions['redis']}")
            conn.batches_written = conn.commands_written = 0  # the counters are of callers' traffic, not setup
        except RedisCommandError as exc:
            conn.close()
            why = str(exc).replace(f"({conn.where}; ", "(")  # (a NOPERM names the endpoint: once is enough)
            raise RedisUnavailable(f"{conn.where} refused the connection: {why}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def _attach(self, endpoint: RedisEndpoint, connect_timeout: float) -> None:
        """Open the socket (TLS included) within `connect_timeout`; RedisUnavailable or RedisTimeout saying why."""
        self.where = f"Redis at {endpoint.describe()}"
        try:
            async with asyncio.timeout(connect_timeout):
                await endpoint.create_connection(self._protocol)
        except TimeoutError:
            self.close()
            raise RedisTimeout(f"connecting to {endpoint.describe()} took over {connect_timeout:g} s") from None
        except TlsFailure as exc:
            self.close()
            raise RedisUnavailable(f"cannot connect to {endpoint.describe()}: {exc.reason}") from None
        except OSError as exc:
            self.close()
            raise RedisUnavailable(f"cannot connect to {endpoint.describe()}: {exc.strerror or exc}") from None

    def _error_reply(self, reply: hiredis.ReplyError) -> RedisCommandError:
        text = str(reply)
        if permission_refused(text):
            text = self._refused(text)
        return RedisCommandError(text)

    def _refused(self, text: str) -> str:
        """An ACL refusal (NOPERM): the user lacks a permission our commands need. Named with the endpoint (the
        reply names the user and the command), logged once per connection and message: a configuration to fix,
        not a fault that passes."""
        text = f"{text} ({self.where}; README: ACL users lists the permissions ondemand needs)"
        if text not in self._refusals and len(self._refusals) < 16:
            self._refusals.add(text)
            log.error("%s", text)
        return text

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def busy(self) -> bool:
        """True while any command is buffered or awaiting its reply."""
        return bool(self._buffer or self._waiters)

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves to its reply."""
        packed = hiredis.pack_command(args)
        fut = asyncio.Future(loop=self._loop)  # not loop.create_future(): a Python frame less per command
        if self.closed_reason is not None:
            fut.set_exception(self.closed_reason)
            self._failed(self.closed_reason, 1)
            return fut
        self._buffer.append(packed)
        self._buffer_futs.append(fut)
        if len(self._buffer) >= self._max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        return fut

    def execute_many(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Queue several commands to be written together; one future each, in order."""
        return [self.execute(*cmd) for cmd in commands]

    def read_tracked(self, key: str, command: Command, versioned: bool) -> Awaitable[Any]:
        """A near-cached namespace's read where the connection does not track (see ondemand.redis.tracking):
        the read alone, nothing kept. `versioned`: the reply is [value, version]; the value is returned."""
        reply = self.execute(*command)
        return _value_of(reply) if versioned else reply

    def write_tracked(self, key: str, write: Command, command: Command, versioned: bool) -> Awaitable[Any]:
        """A near-cached namespace's write where the connection does not track: the write alone."""
        return self.execute(*write)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buffer or self.closed_reason is not None:
            return
        transport = self._protocol.transport
        buffer, futs = self._buffer, self._buffer_futs
        self._buffer, self._buffer_futs = [], []
        self._waiters.extend(futs)
        self._sent += len(futs)
        self.batches_written += 1
        self.commands_written += len(futs)
        self._batches.append((self._sent, self._loop.time() + self._op_timeout))
        assert transport is not None
        transport.write(b"".join(buffer))
        if self._watchdog is None:
            self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        batches = self._batches
        while batches and batches[0][0] <= self._answered:
            batches.popleft()
        if not batches:
            self._watchdog = None
            return
        self._watchdog = self._loop.call_at(batches[0][1], self._check_stalled)

    def _check_stalled(self) -> None:
        self._watchdog = None
        batches = self._batches
        while batches and batches[0][0] <= self._answered:
            batches.popleft()
        if batches and batches[0][1] <= self._loop.time():
            self._fail(RedisTimeout(f"Redis did not answer within {self._op_timeout:g} s"))
            return
        self._arm_watchdog()

    def _failed(self, exc: RedisUnavailable, commands: int) -> None:
        if self._on_failure is not None and commands:
            self._on_failure(exc, commands)

    def _fail(self, exc: RedisUnavailable) -> None:
        """Close for good: every queued and in-flight command fails with `exc`."""
        if self.closed_reason is None:
            self.closed_reason = exc
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending = [*self._waiters, *self._buffer_futs]
        self._waiters.clear()
        self._buffer.clear()
        self._buffer_futs.clear()
        self._batches.clear()
        failed = 0
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
                # The caller may have given up already; don't let an unretrieved error be logged.
                fut.exception()
                failed += 1
        self._failed(exc, failed)
        transport = self._protocol.transport
        if transport is not None:
            transport.abort()

    def close(self, reason: str = "connection closed") -> None:
        self._fail(RedisUnavailable(reason))

    def status(self) -> dict[str, Any]:
        return {}
