"""ondemand: an aiohttp microframework whose plugins run Redis on demand, with a durable store behind it.

The application's API is here (`Runtime`, `load_config`, `CacheService`, the errors, `hookimpl`); the
aiohttp extension is `ondemand.web`; a plugin author finds the rest in `ondemand.store` (storages),
`ondemand.redis` (lifecycles), `ondemand.config` (config sections) and `ondemand.testing` (the contract kit).
"""

from ondemand.cache import CacheService
from ondemand.config import Config
from ondemand.config.load import load_config
from ondemand.errors import (
    BackendUnavailable,
    CacheReplaced,
    ConfigError,
    Conflict,
    InvalidInput,
    LoadTimeout,
    NodeUnavailable,
    OndemandError,
    PluginError,
    PostgresUnavailable,
    RedisCommandError,
    RedisDisabled,
    RedisTimeout,
    RedisUnavailable,
    SpawnError,
    StorageUnavailable,
    WriteOutcomeUnknown,
)
from ondemand.hookspecs import hookimpl
from ondemand.runtime import Runtime
from ondemand.store.dispatcher import Lookup

__all__ = [
    "BackendUnavailable",
    "CacheReplaced",
    "CacheService",
    "Config",
    "ConfigError",
    "Conflict",
    "InvalidInput",
    "LoadTimeout",
    "Lookup",
    "NodeUnavailable",
    "OndemandError",
    "PluginError",
    "PostgresUnavailable",
    "RedisCommandError",
    "RedisDisabled",
    "RedisTimeout",
    "RedisUnavailable",
    "Runtime",
    "SpawnError",
    "StorageUnavailable",
    "WriteOutcomeUnknown",
    "hookimpl",
    "load_config",
]
