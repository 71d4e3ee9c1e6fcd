"""ondemand: an aiohttp microframework whose plugins run Redis on demand, with a PostgreSQL fallback."""

from ondemand.cache import CacheService
from ondemand.config import Config
from ondemand.config.load import load_config
from ondemand.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    OndemandError,
    PluginError,
    PostgresUnavailable,
    RedisUnavailable,
    StorageUnavailable,
)
from ondemand.hookspecs import hookimpl
from ondemand.runtime import Runtime

__all__ = [
    "BackendUnavailable",
    "CacheService",
    "Config",
    "ConfigError",
    "InvalidInput",
    "OndemandError",
    "PluginError",
    "PostgresUnavailable",
    "RedisUnavailable",
    "Runtime",
    "StorageUnavailable",
    "hookimpl",
    "load_config",
]
