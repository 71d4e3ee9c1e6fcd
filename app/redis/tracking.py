"""Tracking connections: the pipelined connections of the pools whose namespaces keep a near cache.

A TrackingConnection speaks RESP3 (`HELLO 3`, AUTH folded in) with `CLIENT TRACKING ON` on itself, so the
server's invalidations arrive on the very connection the reads are answered on, in stream order, and its
reader applies both (ondemand.store.near holds the entries):
- a tracked read is queued as `CLIENT CACHING YES` (OPTIN), the read, and `PTTL` of its key, adjacent in one
  write; it registers as its key's pending read first, and its reader installs the value when the PTTL reply
  arrives, only if nothing took the key's place meanwhile (an invalidation, our own write, a flush);
- an invalidation push drops the keys (and their reads in flight); the null one of FLUSHALL/FLUSHDB drops
  everything this connection read;
- every reply read pushes the connection's freshness forward to the time its batch was sent plus
  `max_silence`: entries are served only until then, and an idle connection is PINGed four times per bound, so
  a connection that goes silent (half-open, a frozen server) stops serving hits within the bound;
- closing, losing or replacing the connection drops its entries.
Only servers that never send a push inside another reply qualify (Redis >= 7.0, Valkey >= 7.2); an older one,
or one that refuses HELLO 3 or CLIENT TRACKING, gets a plain connection (`connect_for_near`) and the status
says why. OPTIN with NOLOOP off: our own writes are invalidated by the server too (after their reply), on top of
the dispatcher's evictions before and after each write.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from typing import Any

import hiredis

from ondemand.errors import RedisCommandError, RedisUnavailable
from ondemand.redis.connection import Command, FailureCallback
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.pipeline import PipelinedConnection
from ondemand.store.near import NearCache, PendingRead, Tracker

_NOT_ENOUGH = object()  # the RESP3 reader's "no complete reply yet" (False is a reply: RESP3's #f)
_CACHING = hiredis.pack_command(("CLIENT", "CACHING", "YES"))
_RUN_ID = re.compile(rb"run_id:([0-9a-f]+)")
_VERSION = re.compile(rb"(\d+)\.(\d+)")
_CREDENTIALS = ("WRONGPASS", "NOAUTH", "ERR invalid password", "ERR AUTH")  # a wrong password, not a refusal


class TrackingRefused(Exception):
    """The server cannot keep a near cache coherent on this connection: why, in words for the status."""


class _Read(PendingRead):
    """A tracked read in flight: up to three replies (CLIENT CACHING, the read, PTTL), each routed here. Readers
    of the same key that miss while it is its key's pending read join it (`joined`) instead of sending another:
    under a storm of misses one read installs, instead of each newer read superseding the one before."""

    __slots__ = ("conn", "fut", "joined", "key", "ok", "queued", "step", "value", "version", "versioned")

    def __init__(self, conn: TrackingConnection, fut: asyncio.Future[Any] | None, key: str, versioned: bool,
                 step: int, queued: float) -> None:
        self.conn = conn
        self.fut = fut
        self.key = key
        self.versioned = versioned
        self.step = step  # 0: CLIENT CACHING's reply is next; 1: the read's; 2: PTTL's
        self.queued = queued
        self.generation = conn.tracker.generation
        self.ok = True
        self.value: Any = None
        self.version: int | None = None
        self.joined: list[asyncio.Future[Any]] | None = None

    def outdated_by(self, source: object) -> bool:
        # On its own connection, an invalidation that arrives before the read's reply was sent before the server
        # ran the read: it concerns a write the read saw (our own write before the read that follows it, among
        # others). One that arrives after the reply, or on another connection, may concern a write it did not.
        return source is not self.conn or self.step >= 2

    def join(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """A future of this read's value for another reader of the key (one of its own: a caller that gives up
        cancels only its own)."""
        fut: asyncio.Future[Any] = asyncio.Future(loop=loop)
        if self.step >= 2:  # the value is here already (its PTTL is not)
            fut.set_result(self.value)
        elif self.joined is None:
            self.joined = [fut]
        else:
            self.joined.append(fut)
        return fut

    def reply(self, reply: Any) -> None:
        step = self.step
        self.step = step + 1
        if step == 1:
            if self.versioned:
                value = reply[0]
                version = reply[1]
                self.version = int(version) if version is not None else None
            else:
                value = reply
            self.value = value
            fut = self.fut
            if fut is not None and not fut.done():
                fut.set_result(value)
            if self.joined is not None:
                for fut in self.joined:
                    if not fut.done():
                        fut.set_result(value)
        elif step == 2:
            conn = self.conn
            near = conn.near
            value = self.value
            if self.ok and value is not None and reply.__class__ is int and (reply > 0 or reply == -1):
                expires = math.inf if reply == -1 else self.queued + reply / 1000
                near.install(self.key, self, conn.tracker, value, self.version, expires)
            else:
                near.end_read(self.key, self)

    def error(self, error: RedisCommandError) -> None:
        step = self.step
        self.step = step + 1
        self.ok = False  # untracked (CLIENT CACHING refused) or failed: nothing installed
        if step == 1:
            self._fail_all(error)
        elif step == 2:
            self.conn.near.end_read(self.key, self)
        if step != 1 and error.kind == "noperm":  # CLIENT CACHING or PTTL not allowed: no near cache here
            self.conn.untracked(f"it refused {'CLIENT CACHING YES' if step == 0 else 'PTTL'}: {error}")

    def _fail_all(self, exc: BaseException) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(exc)
        if self.joined is not None:
            for fut in self.joined:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # (a joiner that gave up no longer retrieves it)

    # What PipelinedConnection._fail expects of a waiter.
    def done(self) -> bool:
        return self.step > 2

    def set_exception(self, exc: BaseException) -> None:
        self.step = 3
        self.conn.near.end_read(self.key, self)
        self._fail_all(exc)

    def exception(self) -> BaseException | None:
        fut = self.fut
        return fut.exception() if fut is not None and fut.done() and not fut.cancelled() else None


class _Write:
    """One of our writes with a tracked read of its key right behind it (`write_tracked`): an error reply (the
    write did not happen, or not as sent) keeps that read from installing."""

    __slots__ = ("fut", "read")

    def __init__(self, fut: asyncio.Future[Any], read: _Read) -> None:
        self.fut = fut
        self.read = read

    def reply(self, reply: Any) -> None:
        if not self.fut.done():
            self.fut.set_result(reply)

    def error(self, error: RedisCommandError) -> None:
        self.read.ok = False
        if not self.fut.done():
            self.fut.set_exception(error)

    def done(self) -> bool:
        return self.fut.done()

    def set_exception(self, exc: BaseException) -> None:
        self.read.ok = False
        self.fut.set_exception(exc)

    def exception(self) -> BaseException | None:
        return self.fut.exception() if not self.fut.cancelled() else None


class _KeepAlive:
    """The keepalive's reply. A cluster node's keepalive reads a key of one of its slots, which a master the
    cluster has failed (CLUSTERDOWN) or that gave the slot away (MOVED) refuses: then what it served is dropped,
    in the reader, before anything else can be served from it."""

    __slots__ = ("conn", "finished")

    def __init__(self, conn: TrackingConnection) -> None:
        self.conn = conn
        self.finished = False

    def reply(self, reply: Any) -> None:
        self.finished = True

    def error(self, error: RedisCommandError) -> None:
        self.finished = True
        self.conn.keepalive_refused(error)

    def done(self) -> bool:
        return self.finished

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True

    def exception(self) -> BaseException | None:
        return None


_FUTURE = asyncio.Future  # the waiters that are plain futures (the others: a tracked read's or write's steps)


class _TrackingProtocol(asyncio.Protocol):
    """The RESP3 reader: replies to their waiters (futures, or the tracked reads' steps), pushes to the near cache."""

    def __init__(self, owner: TrackingConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        owner = self._owner
        reader = self._reader
        reader.feed(data)
        waiters = owner._waiters
        failure: RedisUnavailable | None = None
        try:
            reply = reader.gets()
            while reply is not _NOT_ENOUGH:
                if reply.__class__ is hiredis.PushNotification:
                    failure = owner._pushed(reply)
                    if failure is not None:
                        break
                else:
                    owner._answered += 1
                    waiter = waiters.popleft()
                    if isinstance(reply, hiredis.ReplyError):
                        error = owner._error_reply(reply)
                        if waiter.__class__ is not _FUTURE:
                            waiter.error(error)
                        elif not waiter.done():
                            waiter.set_exception(error)
                        if error.kind == "readonly":
                            # A replica now (see PipelinedConnection): what it answers is no longer the master's.
                            failure = RedisUnavailable("Redis answered READONLY: the server is a replica now; "
                                                       "reconnecting")
                    elif waiter.__class__ is not _FUTURE:
                        waiter.reply(reply)
                    elif not waiter.done():
                        waiter.set_result(reply)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:
            failure = RedisUnavailable(f"Redis protocol error: {exc!r}")
        # Every invalidation the server sent before it read the last batch answered in full is applied now.
        batches = owner._batches
        answered = owner._answered
        if batches and batches[0][0] <= answered:
            last = batches.popleft()
            while batches and batches[0][0] <= answered:
                last = batches.popleft()
            owner.tracker.fresh_until = last[1] + owner._fresh_after_deadline
        if failure is not None:
            owner._fail(failure)

    def eof_received(self) -> bool:
        # The server closed (CLIENT KILL, a restart): stop serving now, not a loop iteration later at connection_lost.
        self._owner._fail(RedisUnavailable(f"{self._owner.where} closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._fail(RedisUnavailable(f"connection to {self._owner.where} lost{f': {exc}' if exc else ''}"))


class TrackingConnection(PipelinedConnection):
    """A PipelinedConnection that keeps the near cache's entries of what it read coherent; see the module
    docstring. Made by `connect`, which raises TrackingRefused for a server that cannot."""

    def __init__(self, *, op_timeout: float, max_batch: int, loop: asyncio.AbstractEventLoop,
                 on_failure: FailureCallback | None = None, near: NearCache, where: str) -> None:
        super().__init__(op_timeout=op_timeout, max_batch=max_batch, loop=loop, on_failure=on_failure)
        self._protocol = _TrackingProtocol(self)  # type: ignore[assignment]
        self.near = near
        self.tracker = Tracker(where)
        self._optin = near.tracking == "optin"
        self._fresh_after_deadline = near.max_silence - op_timeout  # a batch's deadline is its send time + op_timeout
        self._keepalive_every = near.max_silence / 4
        self._keepalive: asyncio.TimerHandle | None = None
        self._written_seen = -1
        self._pings = 0  # keepalive PINGs queued, not yet written
        # What the keepalive sends: PING, or on a cluster node a read of a key in one of its slots (ClusterConnection
        # sets it), refused once the cluster failed it over or the slot moved (`on_keepalive_refused`).
        self.keepalive: tuple[Any, ...] = ("PING",)
        self.on_keepalive_refused: Any = None
        self._setting_up = True
        self._close_cause = "connection_lost"
        self._untracked = False  # a command tracked reads need was refused: plain reads from then on
        self.server = ""  # "valkey 8.1.8", from HELLO

    @classmethod
    async def connect(cls, endpoint: RedisEndpoint, *, op_timeout: float, connect_timeout: float,  # type: ignore[override]
                      max_batch: int, on_failure: FailureCallback | None = None, near: NearCache,
                      prefixes: Sequence[str] = ()) -> TrackingConnection:
        loop = asyncio.get_running_loop()
        conn = cls(op_timeout=op_timeout, max_batch=max_batch, loop=loop, on_failure=on_failure, near=near,
                   where=endpoint.describe())
        await conn._attach(endpoint, connect_timeout)
        try:
            await conn._set_up(endpoint, prefixes)
        except BaseException:
            conn._close_cause = "set_up"
            conn.close("connection set-up failed")
            raise
        return conn

    async def _set_up(self, endpoint: RedisEndpoint, prefixes: Sequence[str]) -> None:
        """HELLO 3 (with AUTH), SELECT, INFO (run_id) in one round trip; then CLIENT TRACKING."""
        hello: list[Any] = ["HELLO", "3"]
        if endpoint.password is not None:
            hello += ["AUTH", endpoint.username or "default", endpoint.password]
        steps = [self.execute(*hello)]
        if endpoint.db:
            steps.append(self.execute("SELECT", endpoint.db))
        steps.append(self.execute("INFO", "server"))
        results = await asyncio.gather(*steps, return_exceptions=True)
        greeting, info = results[0], results[-1]
        if isinstance(greeting, RedisCommandError):
            if str(greeting).startswith(_CREDENTIALS):
                raise RedisUnavailable(f"{self.where} refused the connection: {greeting}")
            raise TrackingRefused(f"it refused RESP3 (HELLO 3): {greeting}")
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, RedisCommandError):
                    why = str(result).replace(f"({self.where}; ", "(")  # (as PipelinedConnection.connect says it)
                    raise RedisUnavailable(f"{self.where} refused the connection: {why}")
                raise result
        server = greeting.get(b"server", b"redis").decode(errors="replace") if isinstance(greeting, dict) else "?"
        version = greeting.get(b"version", b"") if isinstance(greeting, dict) else b""
        found = _VERSION.match(version or b"")
        self.server = f"{server} {version.decode(errors='replace')}"
        if found is None or (int(found.group(1)), int(found.group(2))) < (7, 0):
            raise TrackingRefused(f"{self.server} may send an invalidation inside another reply; the near cache "
                                  "needs Redis >= 7.0 or Valkey >= 7.2")
        run_id = _RUN_ID.search(info if isinstance(info, bytes) else b"")
        self.server_id = run_id.group(1).decode() if run_id else None
        if self._optin:
            command: list[Any] = ["CLIENT", "TRACKING", "ON", "OPTIN"]
        else:
            command = ["CLIENT", "TRACKING", "ON", "BCAST"]
            for prefix in prefixes:
                command += ["PREFIX", prefix]
        try:
            await self.execute(*command)
        except RedisCommandError as exc:
            raise TrackingRefused(f"it refused {' '.join(command[:4])}: {exc}") from None
        self.batches_written = self.commands_written = 0
        self._setting_up = False
        self.near.register(self.tracker)
        self._keepalive = self._loop.call_later(self._keepalive_every, self._keep_alive)

    def untracked(self, reason: str) -> None:
        """A command every tracked read needs was refused (an ACL without it): this connection's reads go
        untracked, nothing of them is kept, and the near cache's status says why."""
        if not self._untracked:
            self._untracked = True
            self.near.refuse(self.tracker.where, reason)

    def _refused(self, text: str) -> str:
        # HELLO or CLIENT refused while setting up means "no tracking here" (said once by the near cache as a
        # warning), not an error to log; anything else refused is what it is on any connection.
        if self._setting_up and ("'hello'" in text or "'client|" in text):
            return text
        return super()._refused(text)

    # -- tracked reads ---------------------------------------------------------------------------

    def read_tracked(self, key: str, command: Command, versioned: bool) -> asyncio.Future[Any]:
        """Read `key` with `command` and keep the reply in the near cache if nothing invalidates it first; the
        future resolves to the value (`versioned`: the reply is [value, version])."""
        fut: asyncio.Future[Any] = asyncio.Future(loop=self._loop)
        if self.closed_reason is not None:
            fut.set_exception(self.closed_reason)
            self._failed(self.closed_reason, 1)
            return fut
        if self._untracked:
            return super().read_tracked(key, command, versioned)  # type: ignore[return-value]
        near = self.near
        pending = near.pending.get(key)
        if isinstance(pending, _Read) and pending.conn is self and pending.generation == self.tracker.generation:
            return pending.join(self._loop)
        optin = self._optin
        read = _Read(self, fut, key, versioned, 0 if optin else 1, self._loop.time())
        near.begin_read(key, read)
        packed = hiredis.pack_command(command) + hiredis.pack_command(("PTTL", key))
        buffer, futs = self._buffer, self._buffer_futs
        if optin:  # adjacent in one write: CLIENT CACHING YES applies to the next command only
            buffer.append(_CACHING + packed)
            futs += (read, read, read)
        else:
            buffer.append(packed)
            futs += (read, read)
        if len(buffer) >= self._max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        return fut

    def write_tracked(self, key: str, write: Command, command: Command, versioned: bool) -> asyncio.Future[Any]:
        """Our write of `key`, and right behind it a tracked read of it (`command`, as in read_tracked): when the
        write is queued, whatever was held or being read for the key is dropped, and the read that follows it
        (no caller awaits it) installs what Redis holds after it, so that our next read is a hit. The future
        resolves to the write's reply."""
        if self._untracked or self.closed_reason is not None:
            return self.execute(*write)
        near = self.near
        near.evict(key)  # now, as the write is queued: nothing read before it may be served or installed
        loop = self._loop
        optin = self._optin
        read = _Read(self, None, key, versioned, 0 if optin else 1, loop.time())
        near.begin_read(key, read)
        fut: asyncio.Future[Any] = asyncio.Future(loop=loop)
        packed = hiredis.pack_command(write) + (_CACHING if optin else b"") + hiredis.pack_command(command) \
            + hiredis.pack_command(("PTTL", key))
        self._buffer.append(packed)
        self._buffer_futs += (_Write(fut, read), read, read, read) if optin else (_Write(fut, read), read, read)
        if len(self._buffer) >= self._max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return fut

    # -- pushes, freshness, failures --------------------------------------------------------------

    def _pushed(self, push: list[Any]) -> RedisUnavailable | None:
        """An out-of-band message; a reason to close the connection, or None."""
        kind = push[0] if push else None
        if kind == b"invalidate":
            keys = push[1] if len(push) > 1 else None
            if keys is None:  # FLUSHALL / FLUSHDB (or the server dropped its tracking table)
                self.near.flush(self.tracker, "flushall")
            else:
                self.near.invalidate(keys, self)
        elif kind == b"tracking-redir-broken":  # (we never redirect; should it come, trust nothing we hold)
            self._close_cause = "tracking_redir_broken"
            return RedisUnavailable("the server sent tracking-redir-broken")
        return None

    def _keep_alive(self) -> None:
        """Every quarter of `max_silence`: a PING if nothing was written since the last tick, so that an idle
        connection stays fresh while the server answers (and stops serving within the bound when it does not)."""
        if self.closed_reason is not None:
            return
        if self.commands_written == self._written_seen:
            self._buffer.append(hiredis.pack_command(self.keepalive))
            self._buffer_futs.append(_KeepAlive(self))
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
            self._pings += 1
        self._written_seen = self.commands_written
        self._keepalive = self._loop.call_later(self._keepalive_every, self._keep_alive)

    def _flush(self) -> None:
        # The counters are of callers' traffic (as for the set-up): keepalive PINGs are left out.
        pings, self._pings = self._pings, 0
        queued, written = len(self._buffer_futs), self.commands_written
        super()._flush()
        if pings and self.commands_written != written:
            self.commands_written -= pings
            if queued == pings:
                self.batches_written -= 1

    def keepalive_refused(self, error: RedisCommandError) -> None:
        """The keepalive's read was refused (CLUSTERDOWN, MOVED, LOADING...): nothing this connection read is
        trusted any more; whoever watches the node (the cluster's slot map) is told."""
        self.near.flush(self.tracker, f"keepalive_{error.kind}")
        if self.on_keepalive_refused is not None:
            self.on_keepalive_refused(error)

    def _check_stalled(self) -> None:
        self._close_cause = "timeout"
        super()._check_stalled()
        if self.closed_reason is None:
            self._close_cause = "connection_lost"

    def _fail(self, exc: RedisUnavailable) -> None:
        super()._fail(exc)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self.near.close(self.tracker, self._close_cause)

    def close(self, reason: str = "connection closed") -> None:
        if self.closed_reason is None and self._close_cause == "connection_lost":
            self._close_cause = "closed"
        super().close(reason)

    def flush(self, cause: str) -> None:
        """Drop what this connection read (its node's slots moved, or it is held): read again before served."""
        self.near.flush(self.tracker, cause)

    def status(self) -> dict[str, Any]:
        return {"tracking": self.near.tracking, "server": self.server}


async def connect_for_near(endpoint: RedisEndpoint, *, near: NearCache, pool: str, op_timeout: float,
                           connect_timeout: float, max_batch: int, on_failure: FailureCallback | None = None,
                           ) -> PipelinedConnection:
    """A tracking connection for `pool`'s near-cached namespaces, or a plain one where the server cannot track
    (said in the near cache's status; asked again a minute later)."""
    options = {"op_timeout": op_timeout, "connect_timeout": connect_timeout, "max_batch": max_batch,
               "on_failure": on_failure}
    where = endpoint.describe()
    if near.may_track(where):
        try:
            conn = await TrackingConnection.connect(endpoint, near=near, prefixes=near.prefixes.get(pool, ()),
                                                    **options)
        except TrackingRefused as exc:
            near.refuse(where, str(exc))
        else:
            near.tracked(where)
            return conn
    return await PipelinedConnection.connect(endpoint, **options)
