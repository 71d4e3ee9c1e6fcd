"""The config's shape: the core's sections (frozen attrs), `Config`, and the registry of every section.

Every table of a config file is a *section*: a frozen attrs class declared by its owner, the core's own
(`server`, `lifecycle`, `redis`, `storage`, `plugins`, and the keyed tables `pools.<id>` and
`namespaces.<name>`) or a plugin's, through the `ondemand_config_sections` hook. A plugin may add keys to
a table someone else declared; a key declared twice is a startup error naming both plugins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import attrs

from ondemand.config.validators import (
    SECRET,
    between,
    http_tokens,
    matches,
    origins,
    positive,
    seconds_between,
    token,
    ttl_seconds,
)
from ondemand.errors import PluginError
from ondemand.registry import Collector

T = TypeVar("T")
_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Tables the loader fills itself or that are keyed tables of the core.
_RESERVED_TABLES = frozenset({"environment", "source", "pools", "namespaces"})


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080, validator=between(0, 65535))
    test_endpoints: bool = True
    max_body_bytes: int = attrs.field(default=1_048_576, validator=positive)
    shutdown_timeout: float = attrs.field(default=10.0, validator=positive)
    workers: int = attrs.field(default=1, validator=between(1, 64))
    log_format: Literal["text", "json"] = "text"
    api_token: str | None = attrs.field(default=None, validator=token, metadata={SECRET: "token"})
    # Bounded reads (app.web.serving): a request's head, counted from the connection's opening or its
    # previous answer (so also how long an idle keep-alive connection stays open), and its body.
    header_timeout: float = attrs.field(default=5.0, validator=positive)
    body_timeout: float = attrs.field(default=5.0, validator=positive)
    # CORS (app.web.cors): off while no origin is listed.
    cors_origins: tuple[str, ...] = attrs.field(default=(), validator=origins)
    cors_methods: tuple[str, ...] = attrs.field(default=("GET", "HEAD", "PUT", "POST", "DELETE"),
                                                validator=http_tokens)
    cors_headers: tuple[str, ...] = attrs.field(default=("Authorization", "Content-Type"), validator=http_tokens)
    cors_max_age: int = attrs.field(default=600, validator=between(0, 86400))
    # The status history (ondemand.history): one sample every `history_interval` s, the last
    # `history_seconds` s kept.
    history_interval: float = attrs.field(default=5.0, validator=positive)
    history_seconds: float = attrs.field(default=600.0, validator=positive)


@attrs.frozen
class LifecycleConfig:
    """The keys of [lifecycle] the core's state machine reads (OnDemandRedis); lifecycle plugins add theirs."""

    plugin: str = "auto"
    skip_in_docker: bool = True
    idle_timeout: float = attrs.field(default=300.0, validator=positive)
    startup_timeout: float = attrs.field(default=5.0, validator=positive)
    shutdown_grace: float = attrs.field(default=2.0, validator=positive)
    restart_backoff: float = attrs.field(default=0.1, validator=positive)
    restart_backoff_max: float = attrs.field(default=5.0, validator=positive)
    # "cluster": Redis Cluster (commands routed by hash slot, one pipelined connection per master).
    # "sentinel": the master Redis Sentinel names (the external lifecycle; plugins/lifecycle_external.py).
    topology: Literal["standalone", "cluster", "sentinel"] = "standalone"


@attrs.frozen
class RedisConfig:
    op_timeout: float = attrs.field(default=0.25, validator=positive)
    connect_timeout: float = attrs.field(default=1.0, validator=positive)
    key_prefix: str = attrs.field(
        default="ondemand", validator=matches(r"[A-Za-z0-9_.\-]{1,64}", "1 to 64 letters, digits, '_', '.' or '-'")
    )
    max_batch: int = attrs.field(default=512, validator=between(1, 100_000))


@attrs.frozen
class PoolConfig:
    max_connections: int = attrs.field(default=16, validator=between(1, 10_000))
    keep_alive: float = attrs.field(default=300.0, validator=positive)


@attrs.frozen
class NamespaceConfig:
    ttl: float | None = attrs.field(default=3600.0, validator=ttl_seconds)
    durable: bool = False
    connection_id: str = "default"
    # Hot values kept in this process's memory, kept coherent by the server's invalidations ([near_cache]).
    near_cache: bool = False
    # false removes the namespace: the only way to drop a built-in one (a config's namespaces are added
    # to the built-ins, see build.namespaces_of). Config.namespaces never holds a disabled one.
    enabled: bool = True


@attrs.frozen
class StorageConfig:
    cache: str = "redis"
    durable: str = "postgres"
    # Seconds between checks of the durable store's outbox (keys other processes could not delete from
    # Redis), the backstop of its notifications (PostgreSQL LISTEN/NOTIFY; sqlite has only this poll).
    outbox_poll: float = attrs.field(default=1.0, validator=positive)


@attrs.frozen
class NearCacheConfig:
    """The near cache of the namespaces with `near_cache = true` (ondemand.store.near, ondemand.redis.tracking)."""

    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=between(1024, 2**40))
    max_entries: int = attrs.field(default=250_000, validator=between(1, 100_000_000))
    # The staleness bound: a hit is served only while the tracking connection answered a command sent within
    # this many seconds (it is PINGed when idle); a silent connection (half-open, a frozen server) serves none.
    max_silence: float = attrs.field(default=1.0, validator=seconds_between(0.05, 60.0))
    # "optin": the server tracks the keys each connection read (CLIENT CACHING YES with each read); "bcast":
    # every write under the namespaces' prefixes is pushed to every process.
    tracking: Literal["optin", "bcast"] = "optin"


@attrs.frozen
class PluginsConfig:
    disable: tuple[str, ...] = ()


@attrs.frozen
class EnvironmentConfig:
    """What the process environment said; filled by load_config, not by files."""

    docker: bool = False


# A namespace's name is part of its Redis keys (`prefix:name:id`) and of its URL (`/api/ns/{name}/{id}`):
# no ':' (two namespaces could share keys) and nothing a URL path would need escaped.
NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAMESPACE_NAME_RULE = "1 to 64 letters, digits, '_' or '-'"


def default_namespaces() -> dict[str, NamespaceConfig]:
    """The built-in namespaces, the seed's: a config's [namespaces.<name>] tables are added to these."""
    return {
        "session": NamespaceConfig(ttl=86400.0, durable=True, connection_id="session"),
        "messages": NamespaceConfig(ttl=3600.0),
        "profile": NamespaceConfig(ttl=3600.0),
    }


# The core's tables, declared like any plugin's (the keyed tables pools/namespaces are the core's alone).
CORE_SECTIONS: tuple[tuple[str, type], ...] = (
    ("server", ServerConfig),
    ("lifecycle", LifecycleConfig),
    ("redis", RedisConfig),
    ("storage", StorageConfig),
    ("plugins", PluginsConfig),
    ("near_cache", NearCacheConfig),
)


@attrs.frozen
class ConfigSection:
    """One class declared for one table, by one plugin; `env` maps variable names to keys of the table."""

    table: str
    cls: type
    plugin: str
    env: Mapping[str, str] = attrs.field(factory=dict)


class SectionRegistry(Collector):
    """What `ondemand_config_sections` fills: which classes validate which tables."""

    kind = "config section"

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[ConfigSection] = []
        self._key_owner: dict[tuple[str, str], str] = {}
        for table, cls in CORE_SECTIONS:
            self.add(table, cls)

    def add(self, table: str, cls: type, *, env: Mapping[str, str] | None = None) -> None:
        """Declare `cls` (a frozen attrs class with a default for every field) for `[table]`.

        `env` names environment variables that set a key of the table (`{"DATABASE_URL": "dsn"}`),
        applied after the file and the `ONDEMAND_<TABLE>__<KEY>` variables."""
        plugin = self._current_plugin
        if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table) or table in _RESERVED_TABLES:
            raise PluginError(f"plugin {plugin!r} declared a config section named {table!r}; expected lowercase "
                              f"letters, digits and '_', not one of {', '.join(sorted(_RESERVED_TABLES))}")
        if not (isinstance(cls, type) and attrs.has(cls)):
            raise PluginError(f"plugin {plugin!r} declared [{table}] with {cls!r}, which is not an attrs class")
        try:
            cls()
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} declared [{table}] with {cls.__name__}, which cannot be built "
                              f"from its defaults: {exc}") from None
        if any(section.cls is cls for section in self.sections):
            raise PluginError(f"plugin {plugin!r} declared {cls.__name__} a second time")
        fields = {f.name for f in attrs.fields(cls)}
        for name in sorted(fields):
            owner = self._key_owner.get((table, name))
            if owner is not None:
                raise PluginError(f"config key {table}.{name} is declared twice: by plugin {owner!r} and by "
                                  f"plugin {plugin!r}")
        for variable, key in (env or {}).items():
            if key not in fields:
                raise PluginError(f"plugin {plugin!r} maps {variable} to {table}.{key}, which {cls.__name__} "
                                  "does not have")
        for name in fields:
            self._key_owner[(table, name)] = plugin
        self.sections.append(ConfigSection(table=table, cls=cls, plugin=plugin, env=dict(env or {})))

    def tables(self) -> dict[str, list[ConfigSection]]:
        out: dict[str, list[ConfigSection]] = {}
        for section in self.sections:
            out.setdefault(section.table, []).append(section)
        return out

    def env_aliases(self) -> dict[str, tuple[str, str]]:
        """Environment variable -> (table, key)."""
        return {variable: (s.table, key) for s in self.sections for variable, key in s.env.items()}


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    redis: RedisConfig = RedisConfig()
    pools: dict[str, PoolConfig] = attrs.field(factory=lambda: {"default": PoolConfig()})
    namespaces: dict[str, NamespaceConfig] = attrs.field(factory=default_namespaces)
    storage: StorageConfig = StorageConfig()
    plugins: PluginsConfig = PluginsConfig()
    near_cache: NearCacheConfig = NearCacheConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    source: str | None = None
    # Plugins' sections, by class, with the table each came from; `data` is what was loaded (tables as
    # read, merged), kept so that a plugin registered after loading still gets its section validated.
    sections: Mapping[type, Any] = attrs.field(factory=dict)
    section_tables: Mapping[type, str] = attrs.field(factory=dict, eq=False, repr=False)
    data: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    def pool(self, connection_id: str) -> PoolConfig:
        """The pool settings for `connection_id`, falling back to `[pools.default]`."""
        return self.pools.get(connection_id) or self.pools.get("default") or PoolConfig()

    def section(self, cls: type[T]) -> T:
        """A plugin's validated section, by the class it declared."""
        try:
            return self.sections[cls]
        except KeyError:
            raise PluginError(f"no config section {cls.__name__} was declared by a loaded plugin "
                              "(ondemand_config_sections)") from None


