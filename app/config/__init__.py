"""Configuration: frozen attrs sections, validated from TOML-shaped data with one clear error per problem.

Every table of a config file is a *section*: a frozen attrs class declared by its owner, the core's
own (`server`, `lifecycle`, `redis`, `storage`, `plugins`, and the keyed tables `pools.<id>` and
`namespaces.<name>`) or a plugin's, through the `ondemand_config_sections` hook:

    @hookimpl
    def ondemand_config_sections(sections):
        sections.add("myplugin", MyPluginConfig, env={"MYPLUGIN_URL": "url"})

A plugin may also add keys to a table someone else declared (the subprocess lifecycle adds
`lifecycle.redis_binary`, ...): a table's keys are split among the classes declared for it, and a key
declared twice is a startup error naming both plugins. `config.section(MyPluginConfig)` hands the
plugin its validated instance.

This module only knows sections; `app.configure.load_config` reads files and the environment, asks the
plugins for their sections and calls `build_config`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs

from ondemand.errors import ConfigError, PluginError
from ondemand.registry import Collector

T = TypeVar("T")
_MAX_SECONDS_OR_COUNT = 10 * 365 * 24 * 3600
_SIZE = re.compile(r"^\d+(b|kb|mb|gb)?$", re.IGNORECASE)
_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

# attrs metadata key marking a secret field: "token" hides the whole value, "url" the credentials in it.
SECRET = "ondemand.secret"
# Tables the loader fills itself or that are keyed tables of the core.
_RESERVED_TABLES = frozenset({"environment", "source", "pools", "namespaces"})


# -- validators, for the core's sections and for plugins' -----------------------------------------


class FieldError(ValueError):
    """A validator's complaint about one field; the loader adds the field to the dotted key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def positive(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """A finite number greater than 0, at most ten years (seconds) or as many units (None passes)."""
    # inf passes `> 0` but overflows every int(seconds * 1000) downstream; nan fails every comparison.
    if value is not None and not (value > 0 and math.isfinite(value) and value <= _MAX_SECONDS_OR_COUNT):
        raise FieldError(attribute.name, f"expected a finite number greater than 0 (at most ten years), got {value!r}")


def between(low: int, high: int) -> Any:
    """An integer from `low` to `high`."""
    def check(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
        if not low <= value <= high:
            raise FieldError(attribute.name, f"expected an integer from {low} to {high}, got {value!r}")

    return check


def matches(pattern: str, meaning: str) -> Any:
    """A string matching `pattern` whole; `meaning` says in words what that is."""
    compiled = re.compile(pattern)

    def check(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if not compiled.fullmatch(value):
            raise FieldError(attribute.name, f"expected {meaning}, got {value!r}")

    return check


def _token(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not re.fullmatch(r"[\x21-\x7e]+", value):
        raise FieldError(attribute.name, "expected a non-empty token of printable ASCII without spaces")


def memory_size(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    """A Redis memory size: digits with an optional b, kb, mb or gb."""
    if not _SIZE.match(value):
        raise FieldError(attribute.name, f"expected a size like '256mb' or '0' (no limit), got {value!r}")


# -- the core's sections ---------------------------------------------------------------------------


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080, validator=between(0, 65535))
    test_endpoints: bool = True
    max_body_bytes: int = attrs.field(default=1_048_576, validator=positive)
    shutdown_timeout: float = attrs.field(default=10.0, validator=positive)
    workers: int = attrs.field(default=1, validator=between(1, 64))
    log_format: Literal["text", "json"] = "text"
    api_token: str | None = attrs.field(default=None, validator=_token, metadata={SECRET: "token"})


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
    ttl: float | None = attrs.field(default=3600.0, validator=positive)
    durable: bool = False
    connection_id: str = "default"


@attrs.frozen
class StorageConfig:
    cache: str = "redis"
    durable: str = "postgres"
    # Seconds between checks of the durable store's outbox (keys other processes could not delete from
    # Redis), the backstop of its notifications (PostgreSQL LISTEN/NOTIFY; sqlite has only this poll).
    outbox_poll: float = attrs.field(default=1.0, validator=positive)


@attrs.frozen
class PluginsConfig:
    disable: tuple[str, ...] = ()


@attrs.frozen
class EnvironmentConfig:
    """What the process environment said; filled by load_config, not by files."""

    docker: bool = False


def _default_namespaces() -> dict[str, NamespaceConfig]:
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
    namespaces: dict[str, NamespaceConfig] = attrs.field(factory=_default_namespaces)
    storage: StorageConfig = StorageConfig()
    plugins: PluginsConfig = PluginsConfig()
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


# -- structuring ---------------------------------------------------------------------------------------


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def strict(kind: type) -> None:
        # cattrs would turn "abc" into a str-typed field happily but also 1 -> "1"; be strict on types.
        def structure(value: Any, _t: type) -> Any:
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                # The value itself is not echoed: it may be a token or a password in the wrong type.
                raise ValueError(f"expected {kind.__name__}, got {type(value).__name__}")
            return value

        conv.register_structure_hook(kind, structure)

    def names(value: Any, _t: type) -> tuple[str, ...]:
        # A bare string would otherwise be taken as a sequence of one-letter names.
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"expected a list of strings, got {type(value).__name__}")
        return tuple(value)

    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], names)

    for kind in (str, int, float, bool):
        strict(kind)
    return conv


_CONVERTER = _converter()


def _describe(exc: Exception) -> tuple[str, str | None]:
    """Turn a cattrs error into ('message', 'dotted.key' relative to what was structured)."""
    def describe_leaf(leaf: BaseException, type_: Any) -> str:
        if isinstance(leaf, FieldError):
            return f"{leaf.field}\x00{leaf}"
        if get_origin(type_) is Literal:
            got = str(leaf).split(" not in literal")[0]
            return f"expected one of {', '.join(map(repr, get_args(type_)))}, got {got!r}"
        if get_origin(type_) in (tuple, list, dict):
            return f"expected a {'table' if get_origin(type_) is dict else 'list'}, got {leaf}"
        if isinstance(leaf, ValueError | TypeError) and str(leaf):
            return str(leaf)
        return cattrs.v.format_exception(leaf, type_)

    messages = cattrs.transform_error(exc, path="$", format_exception=describe_leaf)
    first = messages[0] if messages else str(exc)
    message, _, where = first.rpartition(" @ ")
    if not message:
        return first, None
    key = where.removeprefix("$").replace("['", ".").replace("']", "").lstrip(".")
    field, sep, text = message.partition("\x00")
    if sep:
        key, message = (f"{key}.{field}" if key else field), text
    return message, key or None


class Origins:
    """Where each value came from (a file, an environment variable, overrides), for error messages."""

    def __init__(self, default: str | None = None) -> None:
        self.default = default
        self._by_path: dict[tuple[str, ...], str] = {}

    def record(self, data: Mapping[str, Any], label: str, prefix: tuple[str, ...] = ()) -> None:
        for key, value in data.items():
            path = (*prefix, str(key))
            # A later layer replaces what an earlier one said, for this key and everything below it.
            for known in [p for p in self._by_path if p[:len(path)] == path]:
                del self._by_path[known]
            self._by_path[path] = label
            if isinstance(value, Mapping):
                self.record(value, label, path)

    def of(self, dotted_key: str | None) -> str | None:
        if dotted_key:
            path = tuple(dotted_key.split("."))
            for end in range(len(path), 0, -1):
                if path[:end] in self._by_path:
                    return self._by_path[path[:end]]
        return self.default


def _error(message: str, key: str | None, origins: Origins) -> ConfigError:
    return ConfigError(message, source=origins.of(key), key=key)


def structure(data: Any, cls: Any, where: str, origins: Origins) -> Any:
    """Validate `data` into `cls`; a ConfigError names the dotted key below `where` and its origin."""
    try:
        return _CONVERTER.structure(data, cls)
    except Exception as exc:
        message, key = _describe(exc)
        dotted = ".".join(part for part in (where, key) if part) or None
        raise _error(message, dotted, origins) from None


def _structure_table(table: str, data: Any, sections: list[ConfigSection], origins: Origins) -> dict[type, Any]:
    if not isinstance(data, Mapping):
        raise _error(f"expected a table, got {type(data).__name__}", table, origins)
    owner = {f.name: s.cls for s in sections for f in attrs.fields(s.cls)}
    for key in data:
        if key not in owner:
            raise _error(f"unknown key {key!r} in [{table}]; its keys are: {', '.join(sorted(owner))}",
                         f"{table}.{key}", origins)
    return {s.cls: structure({k: v for k, v in data.items() if owner[k] is s.cls}, s.cls, table, origins)
            for s in sections}


def build_config(
    data: Mapping[str, Any], registry: SectionRegistry, *, source: str | None = None, origins: Origins | None = None,
) -> Config:
    """Validate TOML-shaped data (tables merged from file, environment and overrides) into a Config."""
    origins = origins or Origins(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table at the top level, got {type(data).__name__}", source=source)
    tables = registry.tables()
    known = sorted({*tables, "pools", "namespaces"})
    for name in data:
        if name not in tables and name not in ("pools", "namespaces", "environment"):
            raise _error(f"unknown section [{name}]; known sections: {', '.join(known)}", str(name), origins)
    structured: dict[type, Any] = {}
    section_tables: dict[type, str] = {}
    for table, sections in tables.items():
        structured |= _structure_table(table, data.get(table, {}), sections, origins)
        section_tables |= {s.cls: table for s in sections}
    core = {cls: structured.pop(cls) for _, cls in CORE_SECTIONS}
    for cls in core:
        section_tables.pop(cls)
    keyed: dict[str, Any] = {}
    for name, cls in (("pools", PoolConfig), ("namespaces", NamespaceConfig)):
        if name in data:
            keyed[name] = structure(data[name], dict[str, cls], name, origins)
    environment = structure(data.get("environment", {}), EnvironmentConfig, "environment", origins)
    return Config(
        server=core[ServerConfig], lifecycle=core[LifecycleConfig], redis=core[RedisConfig],
        storage=core[StorageConfig], plugins=core[PluginsConfig], environment=environment, source=source,
        sections=structured, section_tables=section_tables, data=dict(data), **keyed,
    )


def with_sections(config: Config, registry: SectionRegistry) -> Config:
    """`config` with every section of `registry` it lacks, validated from the data it was loaded from
    (a plugin registered after loading, or a Config built by hand, whose sections take their defaults)."""
    missing = [s for s in registry.sections if s.table not in dict(CORE_SECTIONS) and s.cls not in config.sections]
    if not missing:
        return config
    origins = Origins(config.source)
    sections, tables = dict(config.sections), dict(config.section_tables)
    for section in missing:
        table = config.data.get(section.table, {})
        if not isinstance(table, Mapping):
            raise _error(f"expected a table, got {type(table).__name__}", section.table, origins)
        fields = {f.name for f in attrs.fields(section.cls)}
        sections |= _structure_table(section.table, {k: v for k, v in table.items() if k in fields}, [section],
                                     origins)
        tables[section.cls] = section.table
    return attrs.evolve(config, sections=sections, section_tables=tables)


# -- back to plain data ----------------------------------------------------------------------------------


def _sections_of(config: Config) -> Iterable[tuple[str, Any]]:
    yield from (("server", config.server), ("lifecycle", config.lifecycle), ("redis", config.redis),
                ("storage", config.storage), ("plugins", config.plugins), ("environment", config.environment))
    for cls, value in config.sections.items():
        yield config.section_tables.get(cls, cls.__name__.lower()), value


def unstructure(config: Config) -> dict[str, Any]:
    """The config as plain data, every plugin section merged into its table; `load_config`'s
    `config_from_dict` turns it back into an equal Config."""
    data: dict[str, Any] = {
        "pools": _CONVERTER.unstructure(config.pools),
        "namespaces": _CONVERTER.unstructure(config.namespaces),
    }
    for table, value in _sections_of(config):
        data.setdefault(table, {}).update(_CONVERTER.unstructure(value))
    if config.source is not None:
        data["source"] = config.source
    return data


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/db` -> `scheme://user:***@host/db`; also hides `password=` params."""
    # The last '@' before the path ends the credentials, as urlsplit reads it.
    url = re.sub(r"(://[^:/@?#]*:)[^/?#]*@", r"\1***@", url)
    # libpq key=value DSNs allow spaces around '=' and quoted values with spaces.
    return re.sub(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", r"\1***", url)


def redact(config: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced (fields marked with SECRET), for status
    output and check-config."""
    data = unstructure(config)
    for table, value in _sections_of(config):
        for field in attrs.fields(type(value)):
            kind = field.metadata.get(SECRET)
            current = data[table].get(field.name)
            if kind is None or current is None:
                continue
            data[table][field.name] = redact_url(current) if kind == "url" else "***"
    return data
