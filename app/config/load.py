"""load_config: a TOML file, the environment and overrides, validated against every plugin's sections.

Precedence, lowest first: defaults, the file, `ONDEMAND_<TABLE>__<KEY>` variables, the variables a
section maps (`REDIS_URL`, `DATABASE_URL`), `overrides`. A secret key may name a file instead, in each of
these places (`<key>_file`, `..._FILE`): read once, here (`ondemand.config.secret_files`). The plugins
asked for their sections are the ones a Runtime would load: built-ins and entry points, less
`plugins.disable`, plus `plugins=`.
An error names where the bad value came from: the file, the environment variable, or the overrides.

`load` is `load_config` that also says where each value came from (`Origins`), which variables a section
maps are in force, and what in the environment is ignored (`ConfigWarning`s: an `ONDEMAND_` variable that
names no key): what `ondemand.preflight` (serve and check-config) needs to report.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ondemand.config import (
    Config,
    NamespaceConfig,
    Origins,
    PluginsConfig,
    PoolConfig,
    SectionRegistry,
    build_config,
    secret_files,
    structure,
)
from ondemand.config.secret_files import SecretKeys
from ondemand.errors import ConfigError
from ondemand.plugin_manager import Plugins

ENV_PREFIX = "ONDEMAND_"
CONFIG_VARIABLE = "ONDEMAND_CONFIG"
# Variables with our prefix that are read, but are no config key: the config file's path, and the resolved
# config a supervisor hands its workers (ondemand.host.workers).
_NOT_KEYS = frozenset({CONFIG_VARIABLE, "ONDEMAND_WORKER_CONFIG"})


@attrs.frozen
class ConfigWarning:
    """A setting that is ignored: not an error (the service runs), but surely not what was meant."""

    message: str
    source: str | None = None  # where it was set: "environment variable ONDEMAND_SERVER_PORT"
    key: str | None = None  # the dotted key it sets, if any

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.key, self.message) if part)


@attrs.frozen
class Loaded:
    """What `load` found: the config, where each of its values came from, the variables that a section maps
    (`REDIS_URL`) and whose value is in force, as {variable: "table.key"}, and what is ignored."""

    config: Config
    origins: Origins
    mapped_variables: Mapping[str, str]
    warnings: tuple[ConfigWarning, ...] = ()


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merged key by key, `extra` winning."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_value(text: str) -> Any:
    """Environment values are TOML literals when they parse as one (5, true, "x"), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _variable(name: str) -> str:
    return f"environment variable {name}"


def _prefixed_variables(environ: Mapping[str, str], origins: Origins) -> dict[str, Any]:
    """ONDEMAND_LIFECYCLE__IDLE_TIMEOUT=5 -> {"lifecycle": {"idle_timeout": 5}}."""
    out: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if not (name.startswith(ENV_PREFIX) and "__" in name):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"sets a key below {part!r}, which another variable sets to a value",
                                  source=_variable(name), key=".".join(path))
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"sets {path[-1]!r}, which other variables use as a table",
                              source=_variable(name), key=".".join(path))
        node[path[-1]] = value = _env_value(text)
        origins.record({path[-1]: value}, _variable(name), tuple(path[:-1]))
    return out


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    if "environment" in data or "source" in data:
        raise ConfigError("'environment' and 'source' are set by the loader, not by files", source=source)
    return data


def _disabled(data: Mapping[str, Any], origins: Origins) -> tuple[str, ...]:
    """plugins.disable, read before any plugin loads (it decides which plugins load)."""
    table = data.get("plugins", {})
    if not isinstance(table, Mapping):
        return ()  # build_config reports it
    return structure(dict(table), PluginsConfig, "plugins", origins).disable


def load(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[object] = (),
) -> Loaded:
    """`load_config`, with where the values came from and what is ignored (see `Loaded`)."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_VARIABLE):
        path = environ[CONFIG_VARIABLE]
    source = None if path is None else str(path)
    origins = Origins(source)
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(path)
        origins.record(data, source)  # type: ignore[arg-type]
    variables = _prefixed_variables(environ, origins)
    overrides = dict(overrides or {})
    disable = _disabled(merge(merge(data, variables), overrides), origins)
    sections = Plugins(disable, plugins).config_sections()
    # Secret files are read layer by layer (see secret_files.resolve), once the sections say what is secret.
    keys = SecretKeys.of(sections)
    data = merge(secret_files.resolve(data, keys, origins), secret_files.resolve(variables, keys, origins))
    applied: dict[str, tuple[str, str]] = {}  # variable -> (table.key, the origin it gave that key)
    for variable, (table, key) in sorted(sections.env_aliases().items()):
        value, origin = _mapped_variable(environ, variable, table, key, keys)
        if value is not None:
            data = merge(data, {table: {key: value}})
            origins.record({key: value}, origin, (table,))  # (the key alone: not every key of its table)
            applied[variable if origin == _variable(variable) else f"{variable}_FILE"] = (f"{table}.{key}", origin)
    origins.record(overrides, "overrides")
    data = merge(data, secret_files.resolve(overrides, keys, origins))
    data["environment"] = {"docker": bool(environ.get("DOCKER_ENV"))}
    config = build_config(data, sections, source=source, origins=origins)
    in_force = {variable: key for variable, (key, origin) in applied.items() if origins.of(key) == origin}
    return Loaded(config, origins, in_force, tuple(unknown_variables(environ, sections, config)))


def _mapped_variable(environ: Mapping[str, str], variable: str, table: str, key: str,
                     keys: SecretKeys) -> tuple[str | None, str]:
    """The value a mapped variable (`REDIS_URL`) gives its key, or its `_FILE` twin for a secret key
    (`DATABASE_URL_FILE`: the file's content), with the origin to record; (None, "") when neither is set."""
    named = environ.get(f"{variable}_FILE") if key in keys.secret.get(table, ()) else None
    if named:
        if environ.get(variable):
            raise ConfigError(f"{variable} is set too; set the value or its file, not both",
                              source=_variable(f"{variable}_FILE"), key=f"{table}.{key}")
        return (secret_files.read_secret(named, source=_variable(f"{variable}_FILE"), key=f"{table}.{key}"),
                secret_files.label(named, _variable(f"{variable}_FILE")))
    return (environ.get(variable) or None), _variable(variable)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[object] = (),
) -> Config:
    """Read `path` (or $ONDEMAND_CONFIG, or only defaults), apply the environment and `overrides`."""
    return load(path, overrides, environ=environ, plugins=plugins).config


def variable_names(sections: SectionRegistry, config: Config) -> set[str]:
    """Every variable that sets a key: `ONDEMAND_<TABLE>__<KEY>` for each key of each declared section, the
    keyed tables with the ids `config` has (`ONDEMAND_NAMESPACES__SESSION__TTL`), and the mapped ones."""
    names = {f"{ENV_PREFIX}{s.table}__{field.name}".upper() for s in sections.sections for field in attrs.fields(s.cls)}
    for table, ids, cls in (("pools", {"default", *config.pools}, PoolConfig),
                            ("namespaces", config.namespaces, NamespaceConfig)):
        names |= {f"{ENV_PREFIX}{table}__{id_}__{field.name}".upper() for id_ in ids for field in attrs.fields(cls)}
    aliases = sections.env_aliases()
    return names | set(aliases) | SecretKeys.of(sections).variables(ENV_PREFIX, aliases) | {CONFIG_VARIABLE}


def unknown_variables(environ: Mapping[str, str], sections: SectionRegistry, config: Config) -> list[ConfigWarning]:
    """`ONDEMAND_` variables that set nothing (no `__` between table and key), with the nearest that would.
    (One with `__` that names no key is an error of `load`: the unknown table or key.)"""
    warnings: list[ConfigWarning] = []
    known: dict[str, str] | None = None  # compared without the prefix all share: "SERVER__PORT" -> the name
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" in name or name in _NOT_KEYS:
            continue
        if known is None:
            known = {v.removeprefix(ENV_PREFIX): v for v in sorted(variable_names(sections, config))}
        nearest = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), known, n=1, cutoff=0.6)
        hint = f"; did you mean {known[nearest[0]]}?" if nearest else f" ({ENV_PREFIX}<TABLE>__<KEY> sets a key)"
        warnings.append(ConfigWarning(f"matches no config key and is ignored{hint}", source=_variable(name)))
    return warnings


def config_from_dict(data: Mapping[str, Any], *, source: str | None = None, plugins: Iterable[object] = ()) -> Config:
    """Validate plain data (as `unstructure` gives, or as read from TOML) into a Config; raises ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table at the top level, got {type(data).__name__}", source=source)
    data = dict(data)
    if isinstance(data.get("source"), str):  # as `unstructure` writes it
        source = source or data["source"]
        del data["source"]
    origins = Origins(source)
    sections = Plugins(_disabled(data, origins), plugins).config_sections()
    data = secret_files.resolve(data, SecretKeys.of(sections), origins)
    return build_config(data, sections, source=source, origins=origins)
