"""Configuration: frozen attrs classes, TOML files, environment overrides, one clear error per problem.

`load_config(path, overrides)` reads a TOML file (or only defaults), merges `overrides` and the
environment, and structures the result with cattrs into `Config`. An unknown key, a wrong type or a
bad value raises ConfigError naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs

from app.errors import ConfigError

ENV_PREFIX = "ONDEMAND_"
_MAX_SECONDS_OR_COUNT = 10 * 365 * 24 * 3600
_SIZE = re.compile(r"^\d+(b|kb|mb|gb)?$", re.IGNORECASE)


class FieldError(ValueError):
    """A validator's complaint about one field; the loader adds the field to the dotted key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _positive(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    # inf passes `> 0` but overflows every int(seconds * 1000) downstream; nan fails every comparison.
    if value is not None and not (value > 0 and math.isfinite(value) and value <= _MAX_SECONDS_OR_COUNT):
        raise FieldError(attribute.name, f"expected a finite number greater than 0 (at most ten years), got {value!r}")


def _between(low: int, high: int) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
        if not low <= value <= high:
            raise FieldError(attribute.name, f"expected an integer from {low} to {high}, got {value!r}")

    return check


def _matches(pattern: str, meaning: str) -> Any:
    compiled = re.compile(pattern)

    def check(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if not compiled.fullmatch(value):
            raise FieldError(attribute.name, f"expected {meaning}, got {value!r}")

    return check


def _token(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not re.fullmatch(r"[\x21-\x7e]+", value):
        raise FieldError(attribute.name, "expected a non-empty token of printable ASCII without spaces")


def _memory_size(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not _SIZE.match(value):
        raise FieldError(attribute.name, f"expected a size like '256mb' or '0' (no limit), got {value!r}")


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080, validator=_between(0, 65535))
    test_endpoints: bool = True
    max_body_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    shutdown_timeout: float = attrs.field(default=10.0, validator=_positive)
    workers: int = attrs.field(default=1, validator=_between(1, 64))
    log_format: Literal["text", "json"] = "text"
    api_token: str | None = attrs.field(default=None, validator=_token)


@attrs.frozen
class LifecycleConfig:
    plugin: str = "auto"
    skip_in_docker: bool = True
    idle_timeout: float = attrs.field(default=300.0, validator=_positive)
    startup_timeout: float = attrs.field(default=5.0, validator=_positive)
    shutdown_grace: float = attrs.field(default=2.0, validator=_positive)
    restart_backoff: float = attrs.field(default=0.1, validator=_positive)
    restart_backoff_max: float = attrs.field(default=5.0, validator=_positive)
    redis_binary: str | None = None
    redis_url: str | None = None
    runtime_dir: str | None = None
    tcp: bool = False
    tcp_port: int = attrs.field(default=0, validator=_between(0, 65535))
    maxmemory: str = attrs.field(default="256mb", validator=_memory_size)
    maxmemory_policy: Literal[
        "noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random",
        "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
    ] = "allkeys-lru"
    redis_options: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class RedisConfig:
    op_timeout: float = attrs.field(default=0.25, validator=_positive)
    connect_timeout: float = attrs.field(default=1.0, validator=_positive)
    key_prefix: str = attrs.field(
        default="ondemand", validator=_matches(r"[A-Za-z0-9_.\-]{1,64}", "1 to 64 letters, digits, '_', '.' or '-'")
    )
    max_batch: int = attrs.field(default=512, validator=_between(1, 100_000))


@attrs.frozen
class PoolConfig:
    max_connections: int = attrs.field(default=16, validator=_between(1, 10_000))
    keep_alive: float = attrs.field(default=300.0, validator=_positive)


@attrs.frozen
class NamespaceConfig:
    ttl: float | None = attrs.field(default=3600.0, validator=_positive)
    durable: bool = False
    connection_id: str = "default"


@attrs.frozen
class StorageConfig:
    cache: str = "redis"
    durable: str = "postgres"


@attrs.frozen
class PostgresConfig:
    dsn: str = "embedded"
    data_dir: str = ".ondemand/pgdata"
    connect_timeout: float = attrs.field(default=2.0, validator=_positive)
    statement_timeout: float = attrs.field(default=2.0, validator=_positive)
    startup_timeout: float = attrs.field(default=30.0, validator=_positive)
    pool_min: int = attrs.field(default=1, validator=_between(0, 1000))
    pool_max: int = attrs.field(default=10, validator=_between(1, 1000))
    purge_interval: float = attrs.field(default=60.0, validator=_positive)


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


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    redis: RedisConfig = RedisConfig()
    pools: dict[str, PoolConfig] = attrs.field(factory=lambda: {"default": PoolConfig()})
    namespaces: dict[str, NamespaceConfig] = attrs.field(factory=_default_namespaces)
    storage: StorageConfig = StorageConfig()
    postgres: PostgresConfig = PostgresConfig()
    plugins: PluginsConfig = PluginsConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    source: str | None = None

    def pool(self, connection_id: str) -> PoolConfig:
        """The pool settings for `connection_id`, falling back to `[pools.default]`."""
        return self.pools.get(connection_id) or self.pools.get("default") or PoolConfig()


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


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_value(text: str) -> Any:
    """Environment values are TOML literals when they parse as one (5, true, "x"), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in environ.items():
        # ONDEMAND_LIFECYCLE__IDLE_TIMEOUT=5 -> lifecycle.idle_timeout = 5
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = name[len(ENV_PREFIX):].lower().split("__")
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{name} sets a key below {part!r}, which another variable sets to a value",
                                      source="environment", key=".".join(path))
            if isinstance(node.get(path[-1]), dict):
                raise ConfigError(f"{name} sets {path[-1]!r}, which other variables use as a table",
                                  source="environment", key=".".join(path))
            node[path[-1]] = _env_value(text)
    if environ.get("REDIS_URL"):
        out = _merge(out, {"lifecycle": {"redis_url": environ["REDIS_URL"]}})
    if environ.get("DATABASE_URL"):
        out = _merge(out, {"postgres": {"dsn": environ["DATABASE_URL"]}})
    return out


def _describe(exc: Exception) -> tuple[str, str | None]:
    """Turn a cattrs error into ('message', 'dotted.key')."""
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
    key = where.removeprefix("$").lstrip(".").replace("['", ".").replace("']", "")
    field, sep, text = message.partition("\x00")
    if sep:
        key, message = (f"{key}.{field}" if key else field), text
    return message, key or None


def config_from_dict(data: Mapping[str, Any], *, source: str | None = None) -> Config:
    """Validate a plain dict (as read from TOML) into Config; raises ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table at the top level, got {type(data).__name__}", source=source)
    try:
        config = _CONVERTER.structure(dict(data), Config)
    except Exception as exc:
        message, key = _describe(exc)
        raise ConfigError(message, source=source, key=key) from None
    return attrs.evolve(config, source=source)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read `path` (or $ONDEMAND_CONFIG, or only defaults), apply overrides and the environment.

    Precedence, lowest first: defaults, the file, the environment, `overrides`.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get("ONDEMAND_CONFIG"):
        path = environ["ONDEMAND_CONFIG"]
    data: dict[str, Any] = {}
    source = None
    if path is not None:
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
    data = _merge(data, _environment_overrides(environ))
    if overrides:
        data = _merge(data, overrides)
    data["environment"] = {"docker": bool(environ.get("DOCKER_ENV"))}
    return config_from_dict(data, source=source)


def unstructure(config: Config) -> dict[str, Any]:
    """The config as plain data; `config_from_dict` turns it back into an equal Config."""
    return _CONVERTER.unstructure(config)


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/db` -> `scheme://user:***@host/db`; also hides `password=` params."""
    # The last '@' before the path ends the credentials, as urlsplit reads it.
    url = re.sub(r"(://[^:/@?#]*:)[^/?#]*@", r"\1***@", url)
    # libpq key=value DSNs allow spaces around '=' and quoted values with spaces.
    return re.sub(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", r"\1***", url)


def redact(config: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced, for status output and check-config."""
    data = _CONVERTER.unstructure(config)
    lifecycle = data["lifecycle"]
    if lifecycle.get("redis_url"):
        lifecycle["redis_url"] = redact_url(lifecycle["redis_url"])
    data["postgres"]["dsn"] = redact_url(data["postgres"]["dsn"])
    if data["server"].get("api_token"):
        data["server"]["api_token"] = "***"
    return data
