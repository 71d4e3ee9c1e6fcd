"""Named pools: the connections behind one `connection_id`.

Each pool has a pipelined, multiplexed connection for the cache's commands (app/pipeline.py) and a
redis.asyncio pool for `with_connection`, opened on first use and closed by OnDemandRedis's janitor
after `keep_alive` seconds unused.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ondemand.config import RedisConfig
from ondemand.redis.connection import CacheConnection
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.tls import TlsConnection


def cluster_client(endpoint: RedisEndpoint, redis_config: RedisConfig, max_connections: int) -> RedisCluster:
    """What `with_connection` lends on a cluster: a redis.asyncio RedisCluster, bounded like the pool."""
    client = RedisCluster(
        host=endpoint.host, port=endpoint.port, password=endpoint.password, username=endpoint.username,
        max_connections=max_connections, socket_timeout=redis_config.op_timeout,
        socket_connect_timeout=redis_config.connect_timeout, retry=Retry(NoBackoff(), 0),
    )
    if endpoint.tls is not None:
        # RedisCluster takes no connection class or SSL context, only file names (a context per connection,
        # no server name of our own): its nodes' connection arguments, shared with every node it learns
        # later, get our TLS connection and settings instead (tests/test_tls.py checks it on a cluster).
        tls = {"connection_class": TlsConnection, "tls": endpoint.tls}
        client.connection_kwargs.update(tls)
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = TlsConnection
            node.connection_kwargs["tls"] = endpoint.tls
    return client


def client_pool(endpoint: RedisEndpoint, redis_config: RedisConfig, max_connections: int
                ) -> aioredis.BlockingConnectionPool:
    """A redis.asyncio pool whose every wait is bounded by our timeouts."""
    return aioredis.BlockingConnectionPool(
        **endpoint.client_options(),
        max_connections=max_connections,
        timeout=redis_config.connect_timeout,  # bounded wait for a free connection
        socket_timeout=redis_config.op_timeout,
        socket_connect_timeout=redis_config.connect_timeout,
        retry=Retry(NoBackoff(), 0),  # redis-py's default retries would multiply every bound
    )


@attrs.define
class NamedPool:
    """Connections for one `connection_id`: a pipelined connection and a redis.asyncio pool."""

    name: str
    max_connections: int
    keep_alive: float
    last_used: float
    mux: CacheConnection | None = None
    mux_connecting: asyncio.Future[CacheConnection] | None = None
    client_pool: aioredis.BlockingConnectionPool | RedisCluster | None = None
    leases: int = 0
    opens: int = 0
    idle_closes: int = 0

    @property
    def is_open(self) -> bool:
        return (self.mux is not None and not self.mux.closed) or self.client_pool is not None

    @property
    def busy(self) -> bool:
        return self.leases > 0 or self.mux_connecting is not None or (self.mux is not None and self.mux.busy)

    async def close(self, reason: str) -> None:
        mux, client_pool = self.mux, self.client_pool
        self.mux = self.client_pool = None
        if mux is not None:
            mux.close(reason)
        if client_pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await client_pool.aclose()

    def close_soon(self, reason: str) -> None:
        """Like close, from synchronous code: the redis.asyncio pool closes in a task of its own."""
        mux, client_pool = self.mux, self.client_pool
        self.client_pool = None
        if mux is not None:
            mux.close(reason)
        if client_pool is not None:
            task = asyncio.ensure_future(client_pool.aclose())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def stats(self, now: float) -> dict[str, Any]:
        in_use = len(getattr(self.client_pool, "_in_use_connections", ()) or ())
        return {
            "open": self.is_open,
            "max_connections": self.max_connections,
            "keep_alive": self.keep_alive,
            "idle_seconds": round(now - self.last_used, 3),
            "leases": self.leases,
            "client_connections_in_use": in_use,
            "pipeline": None if self.mux is None else {
                "connected": not self.mux.closed,
                "batches": self.mux.batches_written,
                "commands": self.mux.commands_written,
                **self.mux.status(),
            },
            "opens": self.opens,
            "idle_closes": self.idle_closes,
        }


