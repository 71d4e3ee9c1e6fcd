"""Configuration: frozen attrs sections, validated from TOML-shaped data with one clear error per problem.

    @hookimpl
    def ondemand_config_sections(sections):
        sections.add("myplugin", MyPluginConfig, env={"MYPLUGIN_URL": "url"})

`config.section(MyPluginConfig)` hands a plugin its validated instance. The modules: `validators` (for
fields, the core's and plugins'), `sections` (the shape: the core's sections, `Config`, the registry of
sections), `build` (data to Config and back), `load` (`load_config`: a file, the environment, overrides)
and `redact`. This package re-exports what a plugin needs.
"""

from ondemand.config.build import Origins, build_config, structure, unstructure, with_sections
from ondemand.config.redact import redact, redact_url
from ondemand.config.sections import (
    CORE_SECTIONS,
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
)
from ondemand.config.validators import (
    SECRET,
    FieldError,
    between,
    matches,
    memory_size,
    positive,
    seconds_between,
    token,
)

__all__ = [
    "CORE_SECTIONS", "SECRET", "Config", "ConfigSection", "EnvironmentConfig", "FieldError", "LifecycleConfig",
    "NamespaceConfig", "NearCacheConfig", "Origins", "PluginsConfig", "PoolConfig", "RedisConfig",
    "SectionRegistry", "ServerConfig", "StorageConfig", "between", "build_config", "matches", "memory_size",
    "positive", "redact", "redact_url", "seconds_between", "structure", "token", "unstructure", "with_sections",
]
