"""Config loading: files, environment, overrides, and one clear error per problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from ondemand_example import ExampleConfig

from ondemand.config import CORE_SECTIONS, SECRET, Config, redact
from ondemand.config.load import load_config
from ondemand.errors import ConfigError
from ondemand.plugins.lifecycle_external import ExternalConfig
from tests.support import ROOT


def test_shipped_configs_load() -> None:
    default = load_config(ROOT / "config/default.toml", environ={})
    assert default.lifecycle.plugin == "auto" and default.namespaces["session"].durable
    docker = load_config(ROOT / "config/docker.toml", environ={})
    assert docker.server.test_endpoints is False


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config == Config(environment=config.environment, sections=config.sections)
    assert all(value == type(value)() for value in config.sections.values())  # every plugin section: defaults
    assert config.redis.op_timeout == 0.25


def test_overrides_and_environment_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[lifecycle]\nidle_timeout = 10\n")
    environ = {"ONDEMAND_LIFECYCLE__IDLE_TIMEOUT": "20", "REDIS_URL": "redis://r:6379/0", "DOCKER_ENV": "1"}
    config = load_config(path, environ=environ)
    assert config.lifecycle.idle_timeout == 20.0
    assert config.section(ExternalConfig).redis_url == "redis://r:6379/0"
    assert config.environment.docker is True
    config = load_config(path, overrides={"lifecycle": {"idle_timeout": 5}}, environ=environ)
    assert config.lifecycle.idle_timeout == 5.0


def test_ondemand_config_env_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9999\n")
    assert load_config(None, environ={"ONDEMAND_CONFIG": str(path)}).server.port == 9999


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ("[lifecycle]\nidle_timout = 5\n", "lifecycle", "idle_timout"),
        ("[lifecycle]\nidle_timeout = 'soon'\n", "lifecycle.idle_timeout", "expected float"),
        ("[lifecycle]\nidle_timeout = -1\n", "lifecycle.idle_timeout", "greater than 0"),
        ("[server]\nport = 70000\n", "server.port", "65535"),
        ("[lifecycle]\nmaxmemory_policy = 'sometimes'\n", "lifecycle.maxmemory_policy", "sometimes"),
        ("[namespaces.session]\nttl = 'x'\n", "namespaces.session.ttl", "expected float"),
        ("[bogus]\nx = 1\n", "", "bogus"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, toml: str, key: str, words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert words in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\nport = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml", environ={})


def test_redact_hides_secrets() -> None:
    config = load_config(None, environ={"REDIS_URL": "redis://:hunter2@r:6379/0",
                                        "DATABASE_URL": "postgresql://u:s3cret@db/x"})
    text = str(redact(config))
    assert "hunter2" not in text and "s3cret" not in text and "***" in text


def test_run_py_exits_2_naming_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[lifecycle]\nidle_timeout = 'never'\n")
    proc = subprocess.run([sys.executable, "run.py", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "lifecycle.idle_timeout" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_redact_hides_every_secret_field_of_every_section_plugins_included() -> None:
    secret = "https://user:T0P-S3CRET@host.example/x"
    loaded = load_config(None, environ={})
    tables = {**{cls: table for table, cls in CORE_SECTIONS}, **loaded.section_tables}
    marked = {(table, f.name): f.metadata[SECRET] for cls, table in tables.items() for f in attrs.fields(cls)
              if SECRET in f.metadata}
    # The core's token, the built-in plugins' URLs and the example plugin's token and URL at least.
    assert {("server", "api_token"), ("lifecycle", "redis_url"), ("postgres", "dsn"), ("example", "api_key"),
            ("example", "upstream")} <= set(marked)
    overrides: dict[str, dict[str, str]] = {}
    for table, key in marked:
        overrides.setdefault(table, {})[key] = secret
    config = load_config(None, overrides=overrides, environ={})
    data = redact(config)
    assert "T0P-S3CRET" not in json.dumps(data)
    for (table, key), kind in marked.items():
        assert data[table][key] == ("https://user:***@host.example/x" if kind == "url" else "***"), (table, key)
    assert config.section(ExampleConfig).api_key == secret, "only the output is redacted, not the config"


def test_check_config_prints_a_plugin_section_with_its_secrets_redacted() -> None:
    env = {**os.environ, "ONDEMAND_EXAMPLE__API_KEY": "ex-k3y-9f9f", "EXAMPLE_GREETING": "bonjour",
           "ONDEMAND_EXAMPLE__UPSTREAM": "https://bot:pa55w0rd@hooks.example/in"}
    proc = subprocess.run([sys.executable, "run.py", "check-config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "ex-k3y-9f9f" not in proc.stdout + proc.stderr and "pa55w0rd" not in proc.stdout + proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["example"] == {"greeting": "bonjour", "level": 1, "api_key": "***",
                                  "upstream": "https://bot:***@hooks.example/in"}


async def test_sentinel_topology_with_the_subprocess_lifecycle_is_a_config_error(make_config) -> None:
    from ondemand import Runtime

    config = make_config({"lifecycle": {"plugin": "subprocess", "topology": "sentinel"}})
    with pytest.raises(ConfigError, match=r"lifecycle\.topology.*external lifecycle"):
        async with Runtime(config):
            pass
