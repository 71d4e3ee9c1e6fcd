"""load_config: a TOML file, the environment and overrides, validated against every plugin's sections.

Precedence, lowest first: defaults, the file, `ONDEMAND_<TABLE>__<KEY>` variables, the variables a
section maps (`REDIS_URL`, `DATABASE_URL`), `overrides`. The plugins asked for their sections are the
ones a Runtime would load: built-ins and entry points, less `plugins.disable`, plus `plugins=`.
An error names where the bad value came from: the file, the environment variable, or the overrides.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ondemand.config import Config, Origins, PluginsConfig, build_config, structure
from ondemand.errors import ConfigError
from ondemand.plugin_manager import Plugins

ENV_PREFIX = "ONDEMAND_"


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


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[object] = (),
) -> Config:
    """Read `path` (or $ONDEMAND_CONFIG, or only defaults), apply the environment and `overrides`."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("ONDEMAND_CONFIG"):
        path = environ["ONDEMAND_CONFIG"]
    source = None if path is None else str(path)
    origins = Origins(source)
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(path)
        origins.record(data, source)  # type: ignore[arg-type]
    data = merge(data, _prefixed_variables(environ, origins))
    overrides = dict(overrides or {})
    disable = _disabled(merge(data, overrides), origins)
    sections = Plugins(disable, plugins).config_sections()
    for variable, (table, key) in sorted(sections.env_aliases().items()):
        if environ.get(variable):
            data = merge(data, {table: {key: environ[variable]}})
            origins.record({table: {key: environ[variable]}}, _variable(variable))
    data = merge(data, overrides)
    origins.record(overrides, "overrides")
    data["environment"] = {"docker": bool(environ.get("DOCKER_ENV"))}
    return build_config(data, sections, source=source, origins=origins)


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
    return build_config(data, sections, source=source, origins=origins)
