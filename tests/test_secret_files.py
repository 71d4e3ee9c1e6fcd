"""Secrets from files: `<key>_file` in TOML, `ONDEMAND_<SECTION>__<KEY>_FILE`, and `REDIS_URL_FILE`,
`REDIS_PASSWORD_FILE`, `DATABASE_URL_FILE`, as orchestrators mount them. Read once at load, never shown; a file
that cannot be read or trusted is a ConfigError naming its path and what named it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondemand import Runtime
from ondemand.config import redact
from ondemand.config.load import load, load_config
from ondemand.errors import ConfigError
from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_external import ExternalConfig
from ondemand.plugins.storage_postgres import PostgresConfig
from tests.support import ROOT, plain_server


def secret(directory: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


def toml(directory: Path, text: str) -> Path:
    path = directory / "app.toml"
    path.write_text(text)
    return path


def test_every_secret_key_from_a_file_named_in_toml(tmp_path: Path) -> None:
    files = {name: secret(tmp_path, name, value + "\n") for name, value in (
        ("token", "t0ken-from-file"), ("url", "redis://:urlpw@10.0.0.1:6379/0"), ("rpw", "redis-pw"),
        ("spw", "sentinel-pw"), ("dsn", "postgresql://app:pgpw@db/app"))}
    config = load_config(toml(tmp_path, f"""
[server]
api_token_file = "{files['token']}"
[lifecycle]
redis_url_file = "{files['url']}"
redis_password_file = "{files['rpw']}"
sentinel_password_file = "{files['spw']}"
[postgres]
dsn_file = "{files['dsn']}"
"""), environ={})
    external, postgres = config.section(ExternalConfig), config.section(PostgresConfig)
    assert config.server.api_token == "t0ken-from-file"  # one trailing line break stripped
    assert (external.redis_url, external.redis_password, external.sentinel_password) == (
        "redis://:urlpw@10.0.0.1:6379/0", "redis-pw", "sentinel-pw")
    assert postgres.dsn == "postgresql://app:pgpw@db/app"
    shown = json.dumps(redact(config))
    for value in ("t0ken-from-file", "urlpw", "redis-pw", "sentinel-pw", "pgpw"):
        assert value not in shown
    for key in ("api_token_file", "redis_url_file", "redis_password_file", "sentinel_password_file", "dsn_file"):
        assert key not in shown  # resolved: what remains is an ordinary secret


def test_the_file_variables_and_their_precedence(tmp_path: Path) -> None:
    pw, url, dsn, token = (secret(tmp_path, "pw", "from-file\r\n"), secret(tmp_path, "url", "redis://r:6379/0"),
                           secret(tmp_path, "dsn", "postgresql://app:pgpw@db/app"), secret(tmp_path, "tok", "abc"))
    environ = {"REDIS_PASSWORD_FILE": str(pw), "REDIS_URL_FILE": str(url), "DATABASE_URL_FILE": str(dsn),
               "ONDEMAND_SERVER__API_TOKEN_FILE": str(token)}
    loaded = load(None, environ=environ)
    external = loaded.config.section(ExternalConfig)
    assert (external.redis_password, external.redis_url) == ("from-file", "redis://r:6379/0")
    assert loaded.config.section(PostgresConfig).dsn == "postgresql://app:pgpw@db/app"
    assert loaded.config.server.api_token == "abc"
    assert loaded.mapped_variables == {"REDIS_PASSWORD_FILE": "lifecycle.redis_password",
                                       "REDIS_URL_FILE": "lifecycle.redis_url", "DATABASE_URL_FILE": "postgres.dsn"}
    assert loaded.origins.of("lifecycle.redis_password") == (
        f"secret file {pw} (named by environment variable REDIS_PASSWORD_FILE)")

    # A later layer wins over an earlier one, whichever of them names a file.
    path = toml(tmp_path, f'[server]\napi_token_file = "{token}"\n')
    assert load_config(path, environ={"ONDEMAND_SERVER__API_TOKEN": '"env-token"'}).server.api_token == "env-token"
    path = toml(tmp_path, '[server]\napi_token = "toml-token"\n')
    assert load_config(path, environ={"ONDEMAND_SERVER__API_TOKEN_FILE": str(token)}).server.api_token == "abc"
    assert load_config(path, {"server": {"api_token_file": str(token)}}, environ={}).server.api_token == "abc"


def test_a_secret_file_with_the_password_of_a_real_server(tmp_path: Path) -> None:
    async def run() -> None:
        async with plain_server(tmp_path / "redis") as server:
            pw = secret(tmp_path, "redis_password", server.password + "\n")
            environ = {"REDIS_URL": f"redis://127.0.0.1:{server.port}/0", "REDIS_PASSWORD_FILE": str(pw),
                       "ONDEMAND_LIFECYCLE__PLUGIN": "external", "ONDEMAND_STORAGE__DURABLE": '""'}
            async with Runtime(load_config(None, environ=environ)) as rt:
                await rt.cache.cache_profile("p", 1)
                assert await rt.cache.get_profile("p") == 1
                assert server.password not in json.dumps(rt.status(), default=str)

    import asyncio
    asyncio.run(run())


@pytest.mark.parametrize("case", ["missing", "directory", "fifo", "empty", "not utf-8", "group-writable",
                                  "through an open directory", "too big"])
def test_a_file_that_cannot_be_used_is_an_error_naming_it(case: str, tmp_path: Path) -> None:
    path = tmp_path / "pw"
    if case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path, 0o600)  # a read would block the start for ever: refused without reading
    elif case == "empty":
        secret(tmp_path, "pw", "\n")
    elif case == "not utf-8":
        path.write_bytes(b"\xff\xfe")
    elif case == "group-writable":
        secret(tmp_path, "pw", "x", 0o620)
    elif case == "through an open directory":
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        secret(shared, "pw", "x")
        path.symlink_to(shared / "pw")
    elif case == "too big":
        secret(tmp_path, "pw", "x" * 70_000)
    with pytest.raises(ConfigError) as refused:
        load_config(None, environ={"REDIS_PASSWORD_FILE": str(path)})
    error = refused.value
    assert (error.source, error.key) == ("environment variable REDIS_PASSWORD_FILE", "lifecycle.redis_password")
    assert error.message == {
        "missing": f"cannot read the secret file {path}: No such file or directory",
        "directory": f"the secret file {path} is not used: it is a directory, not a regular file",
        "fifo": f"the secret file {path} is not used: it is a FIFO, not a regular file",
        "empty": f"the secret file {path} is empty",
        "not utf-8": f"the secret file {path} is not UTF-8 text",
        "group-writable": f"the secret file {path} is not used: it is writable by group or others (mode 0620): "
                          "whoever can write it chooses what we read",
        "through an open directory": f"the secret file {tmp_path / 'shared'} is not used: it is writable by group "
                                     "or others (mode 0777, not sticky)",
        "too big": f"the secret file {path} is not used: it is 70000 bytes, more than the 65536 expected",
    }[case]


def test_a_key_and_its_file_in_one_place_and_other_mistakes(tmp_path: Path) -> None:
    pw = secret(tmp_path, "pw", "x")
    with pytest.raises(ConfigError) as both:
        load_config(toml(tmp_path, f'[lifecycle]\nredis_password = "y"\nredis_password_file = "{pw}"\n'), environ={})
    assert both.value.key == "lifecycle.redis_password_file"
    assert both.value.message == "lifecycle.redis_password is given too; give the secret or its file, not both"
    with pytest.raises(ConfigError, match="REDIS_PASSWORD is set too; set the value or its file, not both"):
        load_config(None, environ={"REDIS_PASSWORD": "y", "REDIS_PASSWORD_FILE": str(pw)})
    # Only secrets come from files: another key's `_file` is an unknown key, listed as such.
    with pytest.raises(ConfigError, match="unknown key 'idle_timeout_file' in \\[lifecycle\\]"):
        load_config(toml(tmp_path, f'[lifecycle]\nidle_timeout_file = "{pw}"\n'), environ={})
    # A value from a file that its key refuses: the file is named, the value is not shown.
    bad = secret(tmp_path, "token", "has a space")
    with pytest.raises(ConfigError) as refused:
        load_config(None, environ={"ONDEMAND_SERVER__API_TOKEN_FILE": str(bad)})
    assert str(refused.value) == (f"secret file {bad} (named by environment variable ONDEMAND_SERVER__API_TOKEN_FILE): "
                                  "server.api_token: expected a non-empty token of printable ASCII without spaces")


def test_check_config_shows_no_secret_and_warns_like_for_any_variable(tmp_path: Path) -> None:
    pw, token = secret(tmp_path, "pw", "s3cret-pw"), secret(tmp_path, "tok", "s3cret-token")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONDEMAND_") and k not in ("DOCKER_ENV",)}
    env |= {"REDIS_PASSWORD_FILE": str(pw), "ONDEMAND_SERVER__API_TOKEN_FILE": str(token),
            "ONDEMAND_SERVER_API_TOKEN_FILE": str(token)}
    checked = subprocess.run([sys.executable, str(ROOT / "run.py"), "check-config", "--json"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "s3cret" not in checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["config"]["server"]["api_token"] == "***" and report["config"]["lifecycle"]["redis_password"] == "***"
    messages = [w["message"] for w in report["warnings"]]
    assert ("environment variable REDIS_PASSWORD_FILE: lifecycle.redis_password: is ignored: only the lifecycle "
            "'external' reads it, and the lifecycle in use is 'subprocess' (lifecycle.plugin = \"auto\" without "
            "DOCKER_ENV)") in messages
    assert ("environment variable ONDEMAND_SERVER_API_TOKEN_FILE: matches no config key and is ignored; did you mean "
            "ONDEMAND_SERVER__API_TOKEN_FILE?") in messages


def test_serve_with_workers_and_status_take_the_token_from_a_file(tmp_path: Path) -> None:
    # serve reads the file once; its workers get the resolved config (they never see the file).
    token = secret(tmp_path, "api_token", "t0ken-in-a-file\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    env |= {"ONDEMAND_STORAGE__DURABLE": '""', "ONDEMAND_SERVER__API_TOKEN_FILE": str(token)}
    server = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--port", str(port), "--workers", "2"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "run.py", "status", "--url", f"http://127.0.0.1:{port}", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=30,
                              env={k: v for k, v in os.environ.items() if not k.startswith("ONDEMAND_")})

    try:
        deadline = time.monotonic() + 30
        while (shown := status("--token-file", str(token))).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert shown.returncode == 0, shown.stderr
        assert "redis        subprocess" in shown.stdout
        refused = status()
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        missing = status("--token-file", str(tmp_path / "nope"))
        assert missing.returncode == 2 and f"cannot read the secret file {tmp_path / 'nope'}" in missing.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
