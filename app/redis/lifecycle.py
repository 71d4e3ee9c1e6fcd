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

    async def check_server(self) -> ServerReport | None:
        """For serve and check-config, before anything listens: the server `start` would run, found without
        starting or connecting to anything (only `--version` may run); None for a lifecycle that runs no
        server of its own. Raises ConfigError when the configured server cannot serve (every start would
        fail)."""


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

    async def check_server(self) -> ServerReport | None:
        return None


@attrs.frozen
class LifecycleContext:
    """What a lifecycle factory gets: the config (its own section through `config.section(...)`) and
    the events to emit."""

    config: Config
    events: Events


@attrs.frozen
class ServerReport:
    """What a lifecycle that runs its own server says about it before any start (`Lifecycle.check_server`)."""

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
