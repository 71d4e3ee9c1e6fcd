"""Typed errors. Each carries a stable `code` and the HTTP status the web layer answers with."""

from __future__ import annotations


class OndemandError(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"
    http_status = 500


class ConfigError(OndemandError):
    """The configuration is invalid: names the source, the key and what was expected."""

    code = "config_error"

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(OndemandError):
    """A plugin problem found at startup: duplicate or unknown names, a broken plugin."""

    code = "plugin_error"


class InvalidInput(OndemandError, ValueError):
    """A caller passed an id, ttl or value we refuse; the message names the rule."""

    code = "invalid_input"
    http_status = 400


class Conflict(OndemandError):
    """The stored value has a shape the operation cannot work with (appending to something not a list)."""

    code = "conflict"
    http_status = 409


class BackendUnavailable(OndemandError):
    """A store could not serve the operation in time."""

    code = "backend_unavailable"
    http_status = 503


class RedisUnavailable(BackendUnavailable):
    """Redis could not be reached (connection refused or lost, server not running)."""

    code = "redis_unavailable"


class RedisTimeout(RedisUnavailable):
    """A Redis operation did not complete within `redis.op_timeout`."""

    code = "redis_timeout"


class RedisDisabled(RedisUnavailable):
    """The `noop` lifecycle is configured: there is no Redis to talk to."""

    code = "redis_disabled"


class SpawnError(RedisUnavailable):
    """redis-server could not be started; the message carries what was tried and the tail of its log."""

    code = "redis_spawn_failed"


class RedisCommandError(OndemandError):
    """Redis answered a command with an error reply (for example WRONGTYPE)."""

    code = "redis_command_error"
    http_status = 502


class PostgresUnavailable(BackendUnavailable):
    """PostgreSQL could not be reached or did not answer in time."""

    code = "postgres_unavailable"


class StorageUnavailable(BackendUnavailable):
    """No store could serve the operation: every configured backend is down."""

    code = "storage_unavailable"


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (the rest is often a log tail), or its type's name."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return "" if isinstance(error, str) else type(error).__name__
