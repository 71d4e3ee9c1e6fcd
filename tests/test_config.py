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

from ondemand import Runtime
from ondemand.config import CORE_SECTIONS, SECRET, Config, NamespaceConfig, redact, unstructure
from ondemand.config.load import config_from_dict, load_config
from ondemand.errors import ConfigError
from ondemand.plugins.lifecycle_external import ExternalConfig
from ondemand.web import check_namespaces
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


# -- namespaces: the config's are added to the built-in ones --------------------------------------


def test_a_declared_namespace_is_added_to_the_built_in_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[namespaces.weather]\nttl = 60.0\n")
    config = load_config(path, environ={})
    assert list(config.namespaces) == ["session", "messages", "profile", "weather"]
    assert config.namespaces["weather"] == NamespaceConfig(ttl=60.0)
    assert config.namespaces["session"] == Config().namespaces["session"]


def test_a_declared_built_in_keeps_the_built_in_values_it_does_not_set() -> None:
    config = load_config(None, overrides={"namespaces": {"session": {"ttl": 600.0}}}, environ={})
    assert config.namespaces["session"] == NamespaceConfig(ttl=600.0, durable=True, connection_id="session")
    config = load_config(None, environ={"ONDEMAND_NAMESPACES__PROFILE__DURABLE": "true"})
    assert config.namespaces["profile"] == NamespaceConfig(ttl=3600.0, durable=True)


def test_enabled_false_removes_a_namespace_and_round_trips() -> None:
    config = load_config(None, overrides={"namespaces": {"profile": {"enabled": False},
                                                         "weather": {"ttl": 5.0}}}, environ={})
    assert list(config.namespaces) == ["session", "messages", "weather"]
    assert unstructure(config)["namespaces"]["profile"] == {"enabled": False}
    assert config_from_dict(unstructure(config)) == config
    # A namespace of the config's own can be switched off the same way (by a later layer, say).
    assert "weather" not in load_config(None, overrides={"namespaces": {"weather": {"enabled": False}}},
                                        environ={}).namespaces


@pytest.mark.parametrize("name", ["a:b", "a b", "a/b", "a.b", "", "x" * 65, "é"])
def test_a_namespace_name_that_keys_or_urls_cannot_carry_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides={"namespaces": {name: {"ttl": 1.0}}}, environ={})
    assert info.value.key == f"namespaces.{name}" and "letters, digits, '_' or '-'" in str(info.value)


@pytest.mark.parametrize(("namespaces", "key", "words"), [
    ({"session": 5}, "namespaces.session", "expected a table, got int"),
    ({"weather": "x"}, "namespaces.weather", "expected a table, got str"),
    ({"session": {"ttl": "x"}}, "namespaces.session.ttl", "expected float"),
    ({"session": {"enabled": "no"}}, "namespaces.session.enabled", "expected bool"),
    ({"session": {"colour": 1}}, "namespaces.session", "colour"),
])
def test_a_bad_namespace_table_names_its_key(namespaces: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides={"namespaces": namespaces}, environ={})
    assert key in str(info.value) and words in str(info.value)


async def test_the_seed_api_works_with_a_config_declaring_its_own_namespace(make_config) -> None:
    """Declaring [namespaces.weather] used to replace the built-in ones: cache_session then failed."""
    async with Runtime(make_config({"namespaces": {"weather": {"ttl": 60.0}}})) as rt:
        await rt.cache.cache_session("s1", {"user": 1})
        assert await rt.cache.get_session("s1") == {"user": 1}
        await rt.dispatcher.set("weather", "paris", {"c": 21})
        assert await rt.dispatcher.get("weather", "paris") == {"c": 21}


def test_check_namespaces_names_the_key_of_a_removed_namespace_our_routes_need() -> None:
    check_namespaces(load_config(None, overrides={"namespaces": {"weather": {"ttl": 1.0}}}, environ={}))
    for name, route in (("session", "/api/sessions/{session_id}"), ("messages", "/api/users/{user_id}/messages"),
                        ("profile", "/api/users/{user_id}/profile")):
        config = load_config(None, overrides={"namespaces": {name: {"enabled": False}}}, environ={})
        with pytest.raises(ConfigError) as info:
            check_namespaces(config)
        assert info.value.key == f"namespaces.{name}.enabled" and route in str(info.value)
