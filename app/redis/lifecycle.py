"""What a lifecycle is: the protocol of plugins that provide a Redis endpoint.

A lifecycle only starts and stops the thing. The state machine around it (one start under concurrency,
idle stop, restart backoff, events) is OnDemandRedis's (ondemand.redis.server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from ondemand.config import Config
from ondemand.events import Events
from ondemand.redis.endpoint import RedisEndpoint

__all__ = ["Lifecycle", "LifecycleContext", "LifecycleFactory", "RedisEndpoint", "WithoutProcess",
           "resolve_lifecycle_name"]


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

    async def describe_server(self) -> list[str]:
        """For `check-config`: which server `start` would run or reach, in lines of text, found without
        starting or connecting to anything (the subprocess lifecycle runs only `--version`)."""


class WithoutProcess:
    """Defaults for lifecycles that own no server process (external, noop, third-party ones)."""

    name: str

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

    async def describe_server(self) -> list[str]:
        return [f"server: none of ours (lifecycle {self.name!r})"]


@attrs.frozen
class LifecycleContext:
    """What a lifecycle factory gets: the config (its own section through `config.section(...)`) and
    the events to emit."""

    config: Config
    events: Events


class LifecycleFactory(Protocol):
    def __call__(self, context: LifecycleContext) -> Lifecycle: ...


def resolve_lifecycle_name(plugin: str, *, docker: bool, skip_in_docker: bool) -> str:
    """`auto` is `external` in Docker (DOCKER_ENV set) when skip_in_docker is on, else `subprocess`."""
    if plugin != "auto":
        return plugin
    return "external" if docker and skip_in_docker else "subprocess"
