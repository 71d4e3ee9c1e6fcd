"""Preflight: what `serve` checks before it listens, in one place; `check-config` reports the same.

`check` loads the config (`ondemand.config.load.load`), builds what a Runtime is made of with the plugins'
factories (`ondemand.runtime.build_parts`: plugin names, URLs, DSNs, sections; nothing is opened or
started), and asks the lifecycle about the server it would run (`Lifecycle.check_server`: only
`--version` runs). The `Report` holds:

- errors: serve refuses to start with these lines (exit 2); check-config prints the same lines and exits 2;
- warnings: settings that are ignored (an `ONDEMAND_` variable that names no key, a variable such as
  `REDIS_URL` that only a lifecycle or storage not in use reads), a server with known flaws or none found,
  what a factory logs as a warning while it is built (TLS verification turned off); serve logs them once,
  check-config prints them;
- what the lifecycle's server discovery found.

A Runtime built in code (create_app, `Runtime(config)`) runs `build_parts` too, but not this: a configured
server that cannot run is then met by the first operation that needs Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from ondemand.config import Config, redact
from ondemand.config.build import Origins
from ondemand.config.load import CONFIG_VARIABLE, ConfigWarning, Loaded, load
from ondemand.errors import ConfigError, OndemandError, PluginError
from ondemand.redis.lifecycle import ServerReport, resolve_lifecycle_name
from ondemand.registry import CORE
from ondemand.runtime import Parts, build_parts
from ondemand.web.routes import check_namespaces


@attrs.frozen
class Report:
    source: str | None  # the config file, None for the built-in defaults
    config: Config | None  # None when it could not be loaded
    lifecycle: str | None = None  # `lifecycle.plugin` resolved
    errors: tuple[OndemandError, ...] = ()
    warnings: tuple[ConfigWarning, ...] = ()
    server: ServerReport | None = None  # None: the lifecycle runs no server of ours (or was not built)

    @property
    def valid(self) -> bool:
        return not self.errors

    def error_lines(self) -> list[str]:
        """What serve prints when it refuses to start, and check-config when the config is invalid."""
        return [f"{'configuration' if isinstance(e, ConfigError) else 'startup'} error: {e}" for e in self.errors]

    def to_json(self) -> dict[str, Any]:
        """check-config --json: everything, secrets redacted."""
        return {
            "valid": self.valid,
            "source": self.source,
            "config": redact(self.config) if self.config is not None else None,
            "lifecycle": self.lifecycle,
            "warnings": [{"message": str(w), "source": w.source, "key": w.key} for w in self.warnings],
            "errors": [{"message": line.split(": ", 1)[1], "kind": line.split(" ", 1)[0],
                        "source": getattr(e, "source", None), "key": getattr(e, "key", None)}
                       for e, line in zip(self.errors, self.error_lines(), strict=True)],
            "server": attrs.asdict(self.server) if self.server else None,
        }


async def check(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[object] = (),
) -> Report:
    """Everything serve checks before it listens (see the module docstring); never raises for a bad config."""
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else environ.get(CONFIG_VARIABLE) or None
    plugins = tuple(plugins)
    try:
        loaded = load(path, overrides, environ=environ, plugins=plugins)
    except (ConfigError, PluginError) as exc:
        return Report(source, None, errors=(exc,))
    config, warnings = loaded.config, list(loaded.warnings)
    try:
        with _warnings_logged(warnings):
            parts = build_parts(config, plugins)
    except OndemandError as exc:  # a factory's own refusal too (the embedded PostgreSQL's binaries missing)
        lifecycle = resolve_lifecycle_name(config.lifecycle.plugin, docker=config.environment.docker,
                                           skip_in_docker=config.lifecycle.skip_in_docker)
        return Report(source, config, lifecycle, errors=(_located(exc, loaded.origins),), warnings=tuple(warnings))
    errors: list[OndemandError] = []
    warnings += unread_variables(loaded, parts)
    server: ServerReport | None = None
    try:
        server = await parts.lifecycle.check_server()  # None: a lifecycle that runs no server of ours
    except OndemandError as exc:
        errors.append(_located(exc, loaded.origins))
    else:
        warnings += [ConfigWarning(warning) for warning in server.warnings] if server else []
    # The checks of other layers, one call each, so that serve and check-config meet them alike: the web
    # layer's check of the namespaces its routes need.
    try:
        check_namespaces(parts.config)
    except ConfigError as exc:
        errors.append(_located(exc, loaded.origins))
    return Report(source, parts.config, parts.lifecycle_name, errors=tuple(errors), warnings=tuple(warnings),
                  server=server)


@contextlib.contextmanager
def _warnings_logged(into: list[ConfigWarning]) -> Iterator[None]:
    """What the factories log as warnings while they are built (TLS verification turned off) becomes a
    warning of the report: printed by check-config, logged once by serve, instead of a bare line on stderr
    before logging is configured."""
    logger = logging.getLogger("ondemand")
    handler = _Collect(into)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _Collect(logging.Handler):
    def __init__(self, into: list[ConfigWarning]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(ConfigWarning(record.getMessage()))


def _located(exc: OndemandError, origins: Origins) -> OndemandError:
    """A factory's error names the key at fault but not where its value came from: add it (the file, the
    environment variable) as a load error would."""
    if isinstance(exc, ConfigError | PluginError) and exc.key and exc.source is None:
        return type(exc)(exc.message, source=origins.of(exc.key), key=exc.key)
    return exc


def unread_variables(loaded: Loaded, parts: Parts) -> list[ConfigWarning]:
    """Variables a plugin's section maps (`REDIS_URL`, `DATABASE_URL`) that are set while nothing of that
    plugin is in use: its section is read only by the lifecycles and storages it registers. (A plugin that
    registers neither may read its section anywhere: it is not judged.)"""
    config = parts.config
    in_use = {parts.lifecycle_name, config.storage.cache, config.storage.durable}
    declared_by = {variable: section.plugin for section in parts.plugins.config_sections().sections
                   for variable in section.env}
    warnings = []
    for variable, key in sorted(loaded.mapped_variables.items()):
        plugin = declared_by.get(variable) or declared_by.get(variable.removesuffix("_FILE"), CORE)  # (REDIS_URL_FILE)
        provided = [(kind, name) for kind, registry in (("lifecycle", parts.lifecycles), ("storage", parts.storages))
                    for name in registry.names() if registry.owner(name) == plugin]
        if plugin == CORE or not provided or any(name in in_use for _, name in provided):
            continue
        readers = " and ".join(f"the {kind} {name!r}" for kind, name in provided)
        in_use_text = "; ".join(_in_use(parts, kind) for kind in dict.fromkeys(kind for kind, _ in provided))
        warnings.append(ConfigWarning(f"is ignored: only {readers} reads it, and {in_use_text}",
                                      source=f"environment variable {variable}", key=key))
    return warnings


def _in_use(parts: Parts, kind: str) -> str:
    config = parts.config
    if kind == "storage":
        durable = f"{config.storage.durable!r} (durable)" if config.storage.durable else "no durable one"
        return f"the storages in use are {config.storage.cache!r} (cache) and {durable}"
    why = ""
    if config.lifecycle.plugin == "auto":
        if not config.environment.docker:
            why = ' (lifecycle.plugin = "auto" without DOCKER_ENV)'
        elif not config.lifecycle.skip_in_docker:
            why = ' (lifecycle.plugin = "auto" with lifecycle.skip_in_docker = false)'
    return f"the lifecycle in use is {parts.lifecycle_name!r}{why}"
