"""Where a Redis server listens (a unix socket, or host and port) and how to reach it; never shows the password."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import redis.asyncio as aioredis

from ondemand.config.redact import redact_url
from ondemand.errors import ConfigError


@attrs.frozen
class RedisEndpoint:
    """Where Redis listens: a unix socket, or host and port; password never shown."""

    unix_socket: str | None = None
    host: str | None = None
    port: int | None = None
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    db: int = 0
    cluster: bool = False  # a node of a Redis Cluster: commands are routed by slot (ondemand.redis.cluster)

    def credentials(self) -> tuple[str, ...]:
        """AUTH's arguments: the password, after the ACL user's name when there is one."""
        if self.password is None:
            raise ValueError("no password to authenticate with")
        return (self.username, self.password) if self.username else (self.password,)

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
        except ValueError as exc:  # a port or database that is not a number: quote what was written
            raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {exc}", key="lifecycle.redis_url") from None
        raise ConfigError(
            f"unsupported Redis URL scheme {parts.scheme!r}; expected redis://host:port/db or unix:///path",
            key="lifecycle.redis_url",
        )
