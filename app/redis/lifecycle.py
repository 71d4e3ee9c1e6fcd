"""What a lifecycle is: the protocol for plugins that provide a Redis endpoint.

A lifecycle only starts and stops the thing. The state machine around it (single start under
concurrency, idle stop, restart backoff, events) is OnDemandRedis's, in app/ondemand.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import attrs
import hiredis
import redis.asyncio as aioredis

from ondemand.config import Config
from ondemand.errors import ConfigError, SpawnError
from ondemand.events import Events


@attrs.frozen
class RedisEndpoint:
    """Where Redis listens: a unix socket, or host and port; password never shown."""

    unix_socket: str | None = None
    host: str | None = None
    port: int | None = None
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    db: int = 0
    cluster: bool = False  # a node of a Redis Cluster: commands are routed by slot (app/cluster.py)

    def describe(self) -> str:
        """A URL for status and logs, with the password redacted."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        if self.unix_socket:
            return f"unix://{auth}{self.unix_socket}?db={self.db}"
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream connection to the server (unbounded: callers wrap it in their own timeout)."""
        if self.unix_socket:
            return await asyncio.open_unix_connection(self.unix_socket)
        return await asyncio.open_connection(self.host, self.port)

    async def create_connection(self, protocol: asyncio.Protocol) -> None:
        """Connect `protocol` to the server (callers bound the wait)."""
        loop = asyncio.get_running_loop()
        if self.unix_socket:
            await loop.create_unix_connection(lambda: protocol, self.unix_socket)
        else:
            await loop.create_connection(lambda: protocol, self.host, self.port)

    def client_options(self) -> dict[str, Any]:
        """Where and how a redis.asyncio connection pool connects: address, credentials, database."""
        where: dict[str, Any] = (
            {"connection_class": aioredis.UnixDomainSocketConnection, "path": self.unix_socket}
            if self.unix_socket else {"host": self.host, "port": self.port}
        )
        return {**where, "password": self.password, "username": self.username, "db": self.db}

    @classmethod
    def from_url(cls, url: str) -> RedisEndpoint:
        """Parse redis://[user:pass@]host[:port][/db] or unix:///path[?db=N]; ConfigError when malformed."""
        parts = urlsplit(url)
        password = unquote(parts.password) if parts.password is not None else None
        username = unquote(parts.username) if parts.username else None
        try:
            if parts.scheme == "unix":
                query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
                return cls(unix_socket=parts.path, password=password, username=username,
                           db=int(query.get("db", 0)))
            if parts.scheme == "redis":
                db = int(parts.path.lstrip("/") or 0)
                return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                           password=password, username=username, db=db)
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {cls(unix_socket='?').describe()!r}: {exc}",
                              key="lifecycle.redis_url") from None
        raise ConfigError(
            f"unsupported Redis URL scheme {parts.scheme!r}; expected redis://host:port/db or unix:///path",
            key="lifecycle.redis_url",
        )


class Lifecycle(Protocol):
    """Provides a Redis endpoint. Calls into it are serialized by OnDemandRedis."""

    name: str
    provides_redis: bool  # False for `noop`: reads miss, writes are dropped
    manages_process: bool  # True when `stop` frees a server (idle shutdown applies)
    # True when every server `start` gives is a fresh, empty one (ours, persistence off): another server
    # behind the endpoint then never holds copies older than what we wrote. False for a server someone
    # else runs (an external Redis, a Sentinel master after a failover): see errors.CacheReplaced.
    starts_empty: bool

    async def start(self) -> RedisEndpoint:
        """Make Redis available and return where it listens; raise RedisUnavailable or SpawnError."""

    async def stop(self) -> None:
        """Stop what `start` started (nothing for an external Redis); bounded in time."""

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        """Register a callback for an exit of the server we did not ask for: (description, failure).
        `failure` is False when the server was a sibling process's and went away normally."""

    def note_activity(self) -> None:
        """Record that this process used Redis recently (for idle accounting shared across processes)."""

    def shared_idle_seconds(self) -> float | None:
        """Seconds since any process sharing this server was active, or None when not shared."""

    def forget_after_fork(self) -> None:
        """In a forked child: drop every reference to the parent's server, stopping nothing."""

    def connection_lost(self, reason: str) -> None:
        """A connection to the endpoint failed (lost, timed out, or answered READONLY: a replica now). A
        lifecycle that can find the server elsewhere (Sentinel) ends its use of the endpoint through the
        exit callback (failure=False); the others ignore it. Called off the hot path, on failures only."""

    def pid(self) -> int | None:
        """The server's PID when we own its process."""

    def status(self) -> dict[str, Any]:
        """Plugin-specific status fields, JSON-serializable, no secrets."""


class WithoutProcess:
    """Defaults for lifecycles that own no server process (external, noop, third-party ones)."""

    manages_process = False
    starts_empty = False

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        """No process of ours can exit; a lost server shows up as lost connections."""

    def note_activity(self) -> None:
        """Nothing is shared between processes."""

    def shared_idle_seconds(self) -> float | None:
        return None

    def forget_after_fork(self) -> None:
        """Nothing of a parent's to forget."""

    def connection_lost(self, reason: str) -> None:
        """The endpoint is where it was: the next command reconnects to it."""

    def pid(self) -> int | None:
        return None

    async def stop(self) -> None:
        """Nothing of ours to stop."""


@attrs.frozen
class LifecycleContext:
    """What a lifecycle factory gets: the config (its own section through `config.section(...)`) and
    the events to emit."""

    config: Config
    events: Events


@attrs.frozen
class ServerReport:
    """What a lifecycle that runs its own server says about it before any start (`check_server`, an optional
    method: `async def check_server(self) -> ServerReport`, which raises ConfigError when the server it is
    configured to run cannot serve, since every start would fail). Only `--version` may run to find it."""

    lifecycle: str
    binary: str | None = None  # the path of the server a start would run; None: none found
    flavour: str | None = None  # "Redis" or "Valkey"
    version: str | None = None
    found_as: str | None = None  # how it was found: "lifecycle.redis_binary = ...", "valkey-server on PATH"
    warnings: tuple[str, ...] = ()  # reasons to act: a known flaw our use reaches, no server found
    notes: tuple[str, ...] = ()  # the rest: candidates passed over and why, flaws out of reach

    def describe(self) -> str:
        if self.binary is None:
            return f"server: none usable (lifecycle {self.lifecycle!r})"
        return f"server: {self.flavour} {self.version} at {self.binary} ({self.found_as})"


class LifecycleFactory(Protocol):
    def __call__(self, context: LifecycleContext) -> Lifecycle: ...


def resolve_lifecycle_name(plugin: str, *, docker: bool, skip_in_docker: bool) -> str:
    """`auto` is `external` in Docker (DOCKER_ENV set) when skip_in_docker is on, else `subprocess`."""
    if plugin != "auto":
        return plugin
    return "external" if docker and skip_in_docker else "subprocess"


async def probe(endpoint: RedisEndpoint, expected_pid: int | None) -> bool:
    """PING, and check INFO's process_id is our child's; SpawnError if a foreign server answers."""
    reader, writer = await endpoint.open_connection()
    try:
        commands = [("PING",), ("INFO", "server")]
        if endpoint.password is not None:
            commands.insert(0, ("AUTH", endpoint.password))
        writer.write(b"".join(hiredis.pack_command(c) for c in commands))
        parser = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < len(commands):
            data = await reader.read(65536)
            if not data:
                raise EOFError
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        replies = replies[-2:]
        if isinstance(replies[0], hiredis.ReplyError) or replies[0] != b"PONG":
            return False  # LOADING, or not yet accepting commands
        found = re.search(rb"process_id:(\d+)", replies[1] if isinstance(replies[1], bytes) else b"")
        if expected_pid is not None and (found is None or int(found.group(1)) != expected_pid):
            raise SpawnError(
                f"a server we did not start answers at {endpoint.describe()} "
                f"(process_id {found.group(1).decode() if found else '?'}, our child is {expected_pid}); "
                "refusing to use it"
            )
        return True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
