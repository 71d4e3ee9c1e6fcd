"""ondemand: an aiohttp microframework whose plugins run Redis on demand, with a PostgreSQL fallback."""

from app.cache import CacheService
from app.config import Config
from app.configure import load_config
from app.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    OndemandError,
    PluginError,
    PostgresUnavailable,
    RedisUnavailable,
    StorageUnavailable,
)
from app.hookspecs import hookimpl
from app.runtime import Runtime

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
