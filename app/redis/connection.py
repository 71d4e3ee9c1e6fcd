"""The connection the cache's commands go through, as OnDemandRedis and the pools use it.

Two implementations: `PipelinedConnection` (one multiplexed connection to one server) and
`ClusterConnection` (one of those per master, commands routed by slot). Both are made by an async
`connect(endpoint, *, op_timeout, connect_timeout, max_batch, on_failure)`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ondemand.errors import RedisUnavailable

Command = Sequence[Any]
# Told (error, number of commands) whenever commands fail with the connection.
FailureCallback = Callable[[RedisUnavailable, int], None]


@runtime_checkable
class CacheConnection(Protocol):
    @property
    def closed_reason(self) -> RedisUnavailable | None:
        """Why it closed for good (every later command fails with it); None while usable."""

    @property
    def server_id(self) -> str | None:
        """Which server process answers (INFO's run_id; a cluster's masters' together): another one after
        a restart or a failover."""

    @property
    def closed(self) -> bool: ...

    @property
    def busy(self) -> bool:
        """A command is buffered or awaiting its reply."""

    @property
    def batches_written(self) -> int: ...

    @property
    def commands_written(self) -> int: ...

    def execute(self, *args: Any) -> Awaitable[Any]:
        """Queue one command; concurrent commands of one loop tick are written together. The reply, an
        error reply as RedisCommandError, or RedisUnavailable/RedisTimeout (bounded by op_timeout)."""

    def execute_many(self, commands: Sequence[Command]) -> list[Awaitable[Any]]:
        """Several commands written together; one awaitable each, in order."""

    def close(self, reason: str = "connection closed") -> None:
        """Close for good: queued and in-flight commands fail with RedisUnavailable(reason)."""

    def status(self) -> dict[str, Any]:
        """What status and metrics show of it, JSON-serializable."""
