"""Structuring: TOML-shaped data validated into a `Config` (cattrs, strict types), and back to plain data.

An error names the dotted key and where its value came from (the file, an environment variable, overrides).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs

from ondemand.config.sections import (
    CORE_SECTIONS,
    NAMESPACE_NAME,
    NAMESPACE_NAME_RULE,
    Config,
    ConfigSection,
    EnvironmentConfig,
    LifecycleConfig,
    NamespaceConfig,
    NearCacheConfig,
    PluginsConfig,
    PoolConfig,
    RedisConfig,
    SectionRegistry,
    ServerConfig,
    StorageConfig,
    default_namespaces,
)
from ondemand.config.validators import FieldError
from ondemand.errors import ConfigError


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
    keyed: dict[str, Any] = {"namespaces": namespaces_of(data.get("namespaces", {}), origins)}
    if "pools" in data:
        keyed["pools"] = structure(data["pools"], dict[str, PoolConfig], "pools", origins)
    environment = structure(data.get("environment", {}), EnvironmentConfig, "environment", origins)
    return Config(
        server=core[ServerConfig], lifecycle=core[LifecycleConfig], redis=core[RedisConfig],
        storage=core[StorageConfig], plugins=core[PluginsConfig], near_cache=core[NearCacheConfig],
        environment=environment, source=source,
        sections=structured, section_tables=section_tables, data=dict(data), **keyed,
    )


def namespaces_of(declared: Any, origins: Origins) -> dict[str, NamespaceConfig]:
    """The built-in namespaces plus the declared ones. A declared built-in keeps the built-in's values for
    the keys it does not set; `enabled = false` removes a namespace (built-in or not)."""
    if not isinstance(declared, Mapping):
        raise _error(f"expected a table, got {type(declared).__name__}", "namespaces", origins)
    tables: dict[str, Any] = {name: _CONVERTER.unstructure(ns) for name, ns in default_namespaces().items()}
    for name, table in declared.items():
        if not isinstance(name, str) or not NAMESPACE_NAME.fullmatch(name):
            raise _error(f"a namespace name is {NAMESPACE_NAME_RULE}, got {name!r}", f"namespaces.{name}", origins)
        if not isinstance(table, Mapping):
            raise _error(f"expected a table, got {type(table).__name__}", f"namespaces.{name}", origins)
        tables[name] = {**tables.get(name, {}), **table}
    namespaces = structure(tables, dict[str, NamespaceConfig], "namespaces", origins)
    return {name: ns for name, ns in namespaces.items() if ns.enabled}


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


def sections_of(config: Config) -> Iterable[tuple[str, Any]]:
    yield from (("server", config.server), ("lifecycle", config.lifecycle), ("redis", config.redis),
                ("storage", config.storage), ("plugins", config.plugins), ("environment", config.environment))
    for cls, value in config.sections.items():
        yield config.section_tables.get(cls, cls.__name__.lower()), value


def unstructure(config: Config) -> dict[str, Any]:
    """The config as plain data, every plugin section merged into its table; `load_config`'s
    `config_from_dict` turns it back into an equal Config."""
    removed = {name: {"enabled": False} for name in default_namespaces() if name not in config.namespaces}
    data: dict[str, Any] = {
        "pools": _CONVERTER.unstructure(config.pools),
        "namespaces": {**_CONVERTER.unstructure(config.namespaces), **removed},
    }
    for table, value in sections_of(config):
        data.setdefault(table, {}).update(_CONVERTER.unstructure(value))
    if config.source is not None:
        data["source"] = config.source
    return data

