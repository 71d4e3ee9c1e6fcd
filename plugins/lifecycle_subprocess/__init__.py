"""The `subprocess` lifecycle plugin: Redis as our own child process, or a local cluster of them.

Modules: `binary` (which server: discovery and advisories), `rundir` (the runtime directory and its
trust rules), `lifecycle` (the lifecycle itself), `local_cluster` (topology "cluster"). This module is
the plugin: its config keys, its host service and its factory.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs

from ondemand.config import Config, SectionRegistry
from ondemand.errors import ConfigError
from ondemand.hookspecs import hookimpl
from ondemand.plugins.lifecycle_subprocess.binary import (
    ADVISORIES,
    MIN_VERSION,
    Advisory,
    RedisBinary,
    bundled_binaries,
    bundled_binary,
    check_binary,
    describe_discovery,
    discover,
    find_binary,
)
from ondemand.plugins.lifecycle_subprocess.lifecycle import SubprocessConfig, SubprocessLifecycle
from ondemand.plugins.lifecycle_subprocess.rundir import (
    MAX_SOCKET_PATH,
    PRIVATE,
    SOCKET_NAME,
    RuntimeDirError,
    SharedState,
    default_runtime_dir,
)
from ondemand.redis.lifecycle import LifecycleContext, LifecycleFactory
from ondemand.registry import Registry

__all__ = [
    "ADVISORIES", "MAX_SOCKET_PATH", "MIN_VERSION", "PRIVATE", "SOCKET_NAME", "Advisory", "RedisBinary",
    "RuntimeDirError", "SharedRuntimeDir", "SharedState", "SubprocessConfig", "SubprocessLifecycle",
    "bundled_binaries", "bundled_binary", "check_binary", "default_runtime_dir", "describe_discovery", "discover",
    "find_binary", "make_lifecycle",
]


@hookimpl
def ondemand_config_sections(sections: SectionRegistry) -> None:
    sections.add("lifecycle", SubprocessConfig)

@attrs.define(eq=False)
class SharedRuntimeDir:
    """A host service for `--workers N` with `lifecycle.runtime_dir = "private"`: one private directory
    for all the workers (private to this run, shared by its workers), so that they share one server;
    removed after the last worker is gone. Any other setting is shared by the workers already."""

    name: str = "shared Redis runtime directory"
    path: Path | None = None

    async def start(self) -> dict[str, Any]:
        self.path = Path(tempfile.mkdtemp(prefix="ondemand-"))  # created 0700
        return {"lifecycle": {"runtime_dir": str(self.path)}}

    async def stop(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


@hookimpl
def ondemand_host_services(config: Config) -> SharedRuntimeDir | None:
    if config.section(SubprocessConfig).runtime_dir != PRIVATE:  # the default directory, or one configured
        return None
    return SharedRuntimeDir()


def make_lifecycle(context: LifecycleContext) -> SubprocessLifecycle:
    config = context.config
    if config.lifecycle.topology == "sentinel":
        raise ConfigError("topology 'sentinel' follows a Sentinel group someone else runs: use the external "
                          "lifecycle (lifecycle.plugin = \"external\") with lifecycle.sentinels; the subprocess "
                          "lifecycle runs a standalone server or a local cluster", source=config.source,
                          key="lifecycle.topology")
    return SubprocessLifecycle(config.lifecycle, config.section(SubprocessConfig), context.events)




@hookimpl
def ondemand_register_lifecycles(registry: Registry[LifecycleFactory]) -> None:
    registry.add("subprocess", make_lifecycle)
