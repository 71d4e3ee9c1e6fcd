"""Where a Redis server listens (a unix socket, or host and port) and how to reach it (credentials, TLS);
never shows the password. Every kind of connection to Redis starts here, so TLS is decided in one place."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import redis.asyncio as aioredis

from ondemand.config.redact import redact_url
from ondemand.errors import ConfigError
from ondemand.redis import tls as tls_
from ondemand.redis.tls import TlsConnection, TlsOptions, TlsSettings

_SCHEMES = "redis://host:port/db, rediss://host:port/db (TLS) or unix:///path?db=N"


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
    tls: TlsSettings | None = None  # TLS to host:port; nodes derived with attrs.evolve share its context

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
        elif self.username:
            auth = f"{self.username}@"
        if self.unix_socket:
            return f"unix://{auth}{self.unix_socket}?db={self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/{self.db}"

    def _tls_failure(self, exc: ssl.SSLError) -> tls_.TlsFailure:
        return tls_.failure(exc, self.describe(), self.tls, self.host)

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream connection to the server, TLS included (unbounded: callers wrap it in their own timeout).
        A failed TLS handshake is a TlsFailure (an OSError) saying why."""
        if self.unix_socket:
            return await asyncio.open_unix_connection(self.unix_socket)
        if self.tls is None:
            return await asyncio.open_connection(self.host, self.port)
        try:
            return await asyncio.open_connection(self.host, self.port, ssl=self.tls.context,
                                                 server_hostname=self.tls.server_hostname(self.host))
        except ssl.SSLError as exc:
            raise self._tls_failure(exc) from None

    async def create_connection(self, protocol: asyncio.Protocol) -> None:
        """Connect `protocol` to the server, TLS included (callers bound the wait)."""
        loop = asyncio.get_running_loop()
        if self.unix_socket:
            await loop.create_unix_connection(lambda: protocol, self.unix_socket)
        elif self.tls is None:
            await loop.create_connection(lambda: protocol, self.host, self.port)
        else:
            try:
                await loop.create_connection(lambda: protocol, self.host, self.port, ssl=self.tls.context,
                                             server_hostname=self.tls.server_hostname(self.host))
            except ssl.SSLError as exc:
                raise self._tls_failure(exc) from None

    def client_options(self) -> dict[str, Any]:
        """Where and how a redis.asyncio connection pool connects: address, credentials, database, TLS."""
        where: dict[str, Any]
        if self.unix_socket:
            where = {"connection_class": aioredis.UnixDomainSocketConnection, "path": self.unix_socket}
        elif self.tls is not None:
            where = {"connection_class": TlsConnection, "tls": self.tls, "host": self.host, "port": self.port}
        else:
            where = {"host": self.host, "port": self.port}
        return {**where, "password": self.password, "username": self.username, "db": self.db}

    @classmethod
    def from_url(cls, url: str, *, tls: TlsOptions | None = None, key: str = "lifecycle.redis_url") -> RedisEndpoint:
        """Parse redis://[user:pass@]host[:port][/db], rediss://... (TLS, with redis-py's ssl_* query
        parameters) or unix:///path[?db=N]. `tls`: the TLS settings configured elsewhere (keys), merged with the
        URL's. ConfigError (naming `key`) when malformed, for an unknown query parameter, or a TLS setting
        given twice differently."""
        parts = urlsplit(url)
        shown = repr(redact_url(url))  # what the user wrote, credentials hidden
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"unsupported Redis URL scheme {parts.scheme!r}; expected {_SCHEMES}", key=key)
        password = unquote(parts.password) if parts.password is not None else None
        username = unquote(parts.username) if parts.username else None
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        accepted = {"db"} | (set(tls_.URL_OPTIONS) if parts.scheme == "rediss" else set())
        unknown = sorted(set(query) - accepted)
        if unknown:
            hint = " (the ssl_* parameters need a rediss:// URL)" if any(n in tls_.URL_OPTIONS for n in unknown) else ""
            raise ConfigError(f"Redis URL {shown} has unknown query parameter(s) {', '.join(unknown)}{hint}; "
                              f"accepted: {', '.join(sorted(accepted))}", key=key)
        path_db = parts.path.lstrip("/") if parts.scheme != "unix" else ""
        if path_db and query.get("db", path_db) != path_db:
            raise ConfigError(f"Redis URL {shown} names database {path_db} in its path and {query['db']} in its "
                              "query; name it once", key=key)
        try:
            db = int(path_db or query.get("db") or 0)
            port = parts.port or 6379
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {shown}: {exc}", key=key) from None
        options = tls if tls is not None else TlsOptions()
        if parts.scheme == "unix":
            if options.enabled or options.given:
                raise ConfigError(f"TLS is configured, but the Redis URL {shown} is a unix socket (TLS needs "
                                  "rediss://host:port)", key=key)
            return cls(unix_socket=parts.path, password=password, username=username, db=db)
        if parts.scheme == "rediss":
            options = options.merged(tls_.url_options({k: v for k, v in query.items() if k != "db"}, key))
        return cls(host=parts.hostname or "127.0.0.1", port=port, password=password, username=username, db=db,
                   tls=options.build())
