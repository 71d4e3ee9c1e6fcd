"""One-shot RESP connections: one command at a time, for what is not the hot path.

The lifecycles' readiness probes and adoption checks, a shutdown, forming a local cluster, and talking to
sentinels all use this one small client; the cache's own traffic goes through the pipelined connection
(ondemand.redis.pipeline). Every wait is bounded by the caller (`asyncio.timeout` around the calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Callable
from typing import Any

import hiredis

from ondemand.errors import RedisUnavailable, SpawnError
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.tls import TlsFailure
from ondemand.redis.tls import reason as tls_reason

_PROCESS_ID = re.compile(rb"process_id:(\d+)")


class RespConnection:
    """One RESP connection to `what` (a server, a node, a sentinel). An error reply to `call` is raised as
    `error` naming the command (AUTH's arguments never shown); the connection closing early is EOFError."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, what: str,
                 error: Callable[[str], Exception] = RedisUnavailable) -> None:
        self.reader, self.writer, self.what, self.error = reader, writer, what, error
        self.parser = hiredis.Reader()

    @classmethod
    async def connect(cls, endpoint: RedisEndpoint, *, what: str | None = None,
                      error: Callable[[str], Exception] = RedisUnavailable) -> RespConnection:
        """A connection that has sent nothing yet; OSError when the server cannot be reached."""
        reader, writer = await endpoint.open_connection()
        return cls(reader, writer, what=what or endpoint.describe(), error=error)

    @classmethod
    async def open(cls, endpoint: RedisEndpoint, *, what: str | None = None,
                   error: Callable[[str], Exception] = RedisUnavailable) -> RespConnection:
        """A connection that has authenticated (AUTH alone, first: a server that refuses it gets nothing
        else). An unreachable server or a refused AUTH is `error`."""
        what = what or endpoint.describe()
        try:
            conn = await cls.connect(endpoint, what=what, error=error)
        except TlsFailure as exc:
            raise error(f"{what}: {exc.reason}") from None
        except OSError as exc:
            raise error(f"{what} is unreachable: {exc.strerror or exc}") from None
        try:
            if endpoint.password is not None:
                await conn.call("AUTH", *endpoint.credentials())
        except EOFError:
            conn.close()
            raise error(f"{what} closed the connection at AUTH{tls_hint(endpoint)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def send(self, *command: Any) -> None:
        self.writer.write(hiredis.pack_command(command))

    async def reply(self) -> Any:
        """The next reply, a hiredis.ReplyError included (not raised)."""
        while (reply := self.parser.gets()) is False:
            try:
                data = await self.reader.read(65536)
            except ssl.SSLError as exc:  # an alert after the handshake: a client certificate it requires
                raise TlsFailure(self.what, tls_reason(exc)) from None
            if not data:
                raise EOFError(f"{self.what} closed the connection")
            self.parser.feed(data)
        return reply

    async def call(self, *command: Any) -> Any:
        self.send(*command)
        try:
            reply = await self.reply()
        except TlsFailure as exc:
            raise self.error(f"{self.what}: {exc.reason}") from None
        if isinstance(reply, hiredis.ReplyError):
            shown = "AUTH" if command[0] == "AUTH" else " ".join(map(str, command))
            raise self.error(f"{self.what} refused {shown}: {reply}")
        return reply

    async def until_closed(self) -> None:
        """Wait for the server to close the connection (after SHUTDOWN)."""
        await self.writer.drain()
        while await self.reader.read(65536):
            pass

    def close(self) -> None:
        self.writer.close()

    async def __aenter__(self) -> RespConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def tls_hint(endpoint: RedisEndpoint, does: str = "does that") -> str:
    """After "closed the connection": what a server that wants TLS does to a plain client at its first bytes."""
    return "" if endpoint.tls or endpoint.unix_socket else f" (a server that expects TLS {does}: use rediss://)"


def process_id(info: Any) -> int | None:
    """The server's PID from an INFO reply."""
    found = _PROCESS_ID.search(info if isinstance(info, bytes) else b"")
    return int(found.group(1)) if found else None


async def probe(endpoint: RedisEndpoint, expected_pid: int | None) -> bool:
    """Whether the server answers PING (False while it is loading); with `expected_pid`, SpawnError when
    INFO's process_id is not that PID (a server we did not start answers there)."""
    async with await RespConnection.connect(endpoint) as conn:
        commands: list[tuple[str, ...]] = [("PING",), ("INFO", "server")]
        if endpoint.password is not None:
            commands.insert(0, ("AUTH", *endpoint.credentials()))
        for command in commands:
            conn.send(*command)
        replies = [await conn.reply() for _ in commands][-2:]
        if isinstance(replies[0], hiredis.ReplyError) or replies[0] != b"PONG":
            return False  # LOADING, or not yet accepting commands
        pid = process_id(replies[1])
        if expected_pid is not None and pid != expected_pid:
            raise SpawnError(f"a server we did not start answers at {endpoint.describe()} (process_id "
                             f"{pid if pid is not None else '?'}, our child is {expected_pid}); refusing to use it")
        return True


async def proves_ours(endpoint: RedisEndpoint, pid: int) -> bool:
    """Whether the server at `endpoint` accepts the password we recorded with it and is process `pid`.
    AUTH goes alone, first: a server that does not accept it gets no other command."""
    if not endpoint.password:
        return False  # every server we start has one
    async with await RespConnection.connect(endpoint) as conn:
        conn.send("AUTH", *endpoint.credentials())
        if await conn.reply() != b"OK":
            return False
        return process_id(await conn.call("INFO", "server")) == pid


async def shutdown(endpoint: RedisEndpoint) -> None:
    """SHUTDOWN NOSAVE: the server exits at once, without a reply."""
    async with await RespConnection.open(endpoint) as conn:
        conn.send("SHUTDOWN", "NOSAVE")
        await conn.until_closed()
