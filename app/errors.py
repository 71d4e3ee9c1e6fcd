"""Typed errors. Each carries a stable `code` and the HTTP status the web layer answers with."""

from __future__ import annotations

import re


class OndemandError(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"
    http_status = 500


class _Located(OndemandError):
    """An error about a config value: `source` (a file, an environment variable) and `key` (dotted) say
    where it was set; the message starts with them. `message` is the text without them."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.message = message
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(_Located):
    """The configuration is invalid: names the source, the key and what was expected."""

    code = "config_error"


class PluginError(_Located):
    """A plugin problem found at startup: duplicate or unknown names, a broken plugin (with the key that
    names it, when a configured name is unknown or unfit)."""

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
    """A store could not serve the operation in time.

    `outcome_unknown` is set by a store when a write may still take effect (the statement reached a
    server that then stopped answering); False means it surely did not."""

    code = "backend_unavailable"
    http_status = 503
    outcome_unknown = False


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


class LoadTimeout(OndemandError):
    """A `get_or_compute` caller waited its bound for a load another caller started (the load goes on)."""

    code = "load_timeout"
    http_status = 504


class RedisCommandError(OndemandError):
    """Redis answered a command with an error reply; `kind` classifies it (see ERROR_REPLY_KINDS).

    The dispatcher never lets one reach a caller: a refused cache write is handled like a write that
    could not reach Redis (the old copy is invalidated, the write counted), a refused read is a miss.
    Only `with_connection` and direct `on_demand.execute` callers see it (HTTP 502)."""

    code = "redis_command_error"
    http_status = 502

    @property
    def kind(self) -> str:
        return error_reply_kind(str(self))

    @property
    def server_unusable(self) -> bool:
        """The server cannot serve anything now (loading, a busy script, a failed cluster): the breaker
        opens as for a timeout. Others (out of memory, read-only, ...) concern the command alone."""
        return self.kind in _UNUSABLE


# The first word of an error reply -> the kind we count it as. Anything else is "other" (WRONGTYPE...).
ERROR_REPLY_KINDS = {
    "OOM": "oom",  # maxmemory reached with noeviction: writes refused, reads and DEL still served
    "READONLY": "readonly",  # a replica (after a failover): we reconnect
    "MISCONF": "misconf",  # persistence failing with stop-writes-on-bgsave-error: writes refused
    "LOADING": "loading",  # the dataset is being loaded: nothing served yet
    "BUSY": "busy",  # a script runs too long: nothing served until it ends
    "NOSCRIPT": "noscript",
    "MASTERDOWN": "masterdown",
    "CLUSTERDOWN": "clusterdown",
    "TRYAGAIN": "tryagain",
    "MOVED": "moved",
    "ASK": "ask",
    "CROSSSLOT": "crossslot",
    "WRONGTYPE": "wrongtype",  # a value of another type under our key (written by someone else)
    "NOPERM": "noperm",  # the ACL user lacks a permission a command of ours needs (README: ACL users)
}
_UNUSABLE = frozenset({"loading", "busy", "masterdown", "clusterdown"})


_SCRIPT_ERROR = re.compile(r"^ERR Error running script .*?: -?([A-Z]+) ")


def permission_refused(reply: str) -> bool:
    """An ACL refusal: NOPERM, or (Valkey, Redis 7) a script's command the user may not run."""
    return reply.startswith(("NOPERM", "ERR ACL failure"))


def error_reply_kind(reply: str) -> str:
    if reply.startswith("ERR ACL failure"):
        return "noperm"
    kind = ERROR_REPLY_KINDS.get(reply.split(" ", 1)[0])
    if kind is None and (found := _SCRIPT_ERROR.match(reply)):
        # Redis 6 wraps an error raised inside a script: "ERR Error running script (...): @user_script:3:
        # -OOM command not allowed ..."; Redis 7 and Valkey pass the code through as it is.
        kind = ERROR_REPLY_KINDS.get(found.group(1))
    return kind or "other"


class PostgresUnavailable(BackendUnavailable):
    """PostgreSQL could not be reached or did not answer in time."""

    code = "postgres_unavailable"


class NodeUnavailable(RedisUnavailable):
    """One master of a Redis Cluster cannot be reached: only the keys of its slots are affected. The
    dispatcher serves those from the durable store (or misses) and remembers their writes, without
    opening the breaker for the other masters' keys; the first command after the master is back (or its
    replica took over) clears what went stale first."""

    code = "redis_node_unavailable"


class CacheReplaced(RedisUnavailable):
    """The cache answers from another server process than the one we last wrote to (a restart, or a
    failover to a replica that may lack the last acknowledged writes): the dispatcher serves durable
    namespaces from the durable store until it has cleared their cached copies."""

    code = "redis_replaced"


class WriteOutcomeUnknown(BackendUnavailable):
    """A durable write or delete failed in a way that lets it still take effect later. The cached copy
    was invalidated before this was raised, so the next read returns what the durable store holds."""

    code = "write_outcome_unknown"


class StartupError(OndemandError):
    """The server could not start serving (a busy port, an app whose startup failed, workers that keep failing
    to start): serve prints it as one line and exits 2."""

    code = "startup_error"


class StorageUnavailable(BackendUnavailable):
    """No store could serve the operation: every configured backend is down."""

    code = "storage_unavailable"


# The longest error text kept for status, events, /readyz and the CLI: a redis-server log tail or a list of
# every binary tried fits; a runaway message cannot grow a status document without bound.
MAX_ERROR_CHARS = 4000


def error_text(error: BaseException | str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error's whole message, every line of it (a binary search's candidates, a log tail), or its type's
    name when it has none; past `limit` characters its middle is cut, so the start (what failed) and the end
    (the last log lines) both stay."""
    text = str(error).strip()
    if not text:
        return "" if isinstance(error, str) else type(error).__name__
    if len(text) <= limit:
        return text
    head = limit // 3
    marker = f"\n[... cut: {len(text)} characters in all ...]\n"
    tail = max(0, limit - head - len(marker))
    return text[:head] + marker + text[len(text) - tail:]


def one_line(error: BaseException | str) -> str:
    """`error_text` on one line (its lines joined with "; "), for a line on stderr."""
    return "; ".join(line.strip() for line in error_text(error).splitlines() if line.strip())


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message, or its type's name: for a one-line log entry only (what an
    operator reads in status, events, /readyz or the CLI is `error_text`)."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return "" if isinstance(error, str) else type(error).__name__
