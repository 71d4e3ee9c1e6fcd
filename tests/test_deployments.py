"""Config-driven deployments: compose.yaml agrees with docker.toml, and the Docker scenario runs
without Docker, against stand-ins for the compose services that this test starts itself."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import attrs
import pytest
import yaml

from ondemand import Runtime, load_config
from ondemand.config import Config
from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_external import ExternalConfig, SentinelLifecycle
from ondemand.plugins.storage_postgres import PostgresConfig
from ondemand.web import create_app
from tests.support import ROOT, redis_children, redis_servers_under, wait_until_serving

COMPOSE = ROOT / "compose/compose.yaml"
DOCKERFILE = ROOT / "compose/Dockerfile"


def compose_app_env() -> dict[str, str]:
    return {k: str(v) for k, v in yaml.safe_load(COMPOSE.read_text())["services"]["app"]["environment"].items()}


def test_compose_services_agree_with_docker_toml() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} has no health check"
    # Without a profile: the app, Redis and PostgreSQL; every other service is the Sentinel profile's.
    services = {name: s for name, s in compose["services"].items() if "profiles" not in s}
    assert set(services) == {"app", "redis", "postgres"}
    assert all(s["profiles"] == ["sentinel"] for s in compose["services"].values() if "profiles" in s)
    app = services["app"]
    env = compose_app_env()
    assert env["DOCKER_ENV"] and env["REDIS_URL"] and env["DATABASE_URL"]
    assert app["depends_on"] == {"redis": {"condition": "service_healthy"},
                                 "postgres": {"condition": "service_healthy"}}
    assert env["ONDEMAND_CONFIG"] == "/app/config/docker.toml"
    # Named volume for PostgreSQL's data.
    assert "pgdata" in compose["volumes"]
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])

    docker = load_config(ROOT / "config/docker.toml", environ=env)
    assert docker.lifecycle.plugin == "auto" and docker.lifecycle.skip_in_docker
    assert docker.environment.docker
    assert docker.server.test_endpoints is False
    # The app's published port is the one docker.toml serves on, and it listens on all interfaces
    # inside its container.
    assert any(p.endswith(f":{docker.server.port}") for p in app["ports"])
    assert docker.server.host == "0.0.0.0"
    # Redis URL: the compose service name, the port Redis listens on; the file's default agrees with compose.
    redis_url = urlsplit(env["REDIS_URL"])
    assert redis_url.hostname == "redis" and (redis_url.port or 6379) == 6379
    docker_url = load_config(ROOT / "config/docker.toml", environ={}).section(ExternalConfig).redis_url
    assert urlsplit(docker_url).hostname == "redis"
    # DATABASE_URL names the user, password and database the postgres service creates.
    db_url = urlsplit(env["DATABASE_URL"])
    pg_env = services["postgres"]["environment"]
    assert db_url.hostname == "postgres" and db_url.port == 5432
    assert (db_url.username, db_url.password, db_url.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    assert docker.section(PostgresConfig).dsn == env["DATABASE_URL"]


def test_compose_sentinel_profile_agrees_with_the_sentinel_settings() -> None:
    """The "sentinel" profile: the master (`redis`), its replica and three sentinels monitoring it under the
    name `app-sentinel` asks them for, at the addresses it is given; the same database as `app`."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    profiled = {name for name, s in services.items() if s.get("profiles") == ["sentinel"]}
    sentinels = sorted(name for name in profiled if name.startswith("sentinel-"))
    assert profiled == {"redis-replica", "app-sentinel", *sentinels} and len(sentinels) >= 3
    env = {k: str(v) for k, v in services["app-sentinel"]["environment"].items()}
    assert "REDIS_URL" not in env and env["DATABASE_URL"] == compose_app_env()["DATABASE_URL"]
    config = load_config(ROOT / "config/docker.toml", environ=env)
    assert config.environment.docker and config.lifecycle.plugin == "auto" and config.lifecycle.skip_in_docker
    assert config.lifecycle.topology == "sentinel"
    section = config.section(ExternalConfig)
    lifecycle = SentinelLifecycle(config)  # what the app builds from it: valid, and names every sentinel
    assert sorted((s.host, s.port) for s in lifecycle.sentinels) == [(name, 26379) for name in sentinels]
    for name in sentinels:
        service = services[name]
        script = service["command"][-1]
        assert "port 26379" in script and "--sentinel" in script, name
        monitor = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", script)
        assert monitor, name
        master_name, host, port, quorum = monitor.groups()
        assert master_name == section.sentinel_master and (host, int(port)) == ("redis", 6379)
        assert len(sentinels) // 2 < int(quorum) <= len(sentinels)  # a majority, and reachable with one down
        assert "resolve-hostnames yes" in script and "announce-hostnames yes" in script
        assert service["healthcheck"]["test"][-1] == section.sentinel_master
        assert "26379" in service["healthcheck"]["test"]
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    assert replica[replica.index("--replica-announce-ip") + 1] == "redis-replica"
    assert services["redis"]["command"][services["redis"]["command"].index("--replica-announce-ip") + 1] == "redis"
    assert set(services["app-sentinel"]["depends_on"]) == {"redis-replica", "postgres", *sentinels}
    assert all(d == {"condition": "service_healthy"} for d in services["app-sentinel"]["depends_on"].values())
    assert services["app-sentinel"]["build"] == services["app"]["build"]


def test_dockerfile_is_slim_non_root_cached_and_health_checked() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.1\d-slim", text, re.M)
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    # The dependencies (pyproject.toml's, no `embedded` extra) are installed before the code is copied: a
    # cached dependency layer; wheels only (every one exists for amd64 and arm64: README, Docker Compose).
    install = text.index("pip install --only-binary=:all: -r")
    assert text.index("COPY pyproject.toml") < install < text.index("COPY app")
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "embedded" not in commands
    # The health check asks for readiness (503 when no store can take a write), not liveness.
    assert healthcheck_code(text.split("HEALTHCHECK", 1)[1]).endswith("/readyz', timeout=3)")
    assert 'CMD ["ondemand", "serve"]' in text


def healthcheck_code(text: str) -> str:
    """The Python one-liner a health check runs (Dockerfile or compose.yaml)."""
    return re.search(r"python\S*\s+-c\s+\"?(import urllib\.request; [^\"]+\))", text)[1]


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".ondemand", ".git", "**/__pycache__", "*.egg-info"} <= ignored
    # ...and nothing the image copies.
    copied = re.findall(r"^COPY (\S+)", DOCKERFILE.read_text(), re.M)
    assert copied == ["pyproject.toml", "README.md", "app", "plugins", "config"]
    assert not ignored & set(copied)


async def test_the_health_checks_fail_while_no_store_can_take_a_write(aiohttp_server, make_config) -> None:
    """The command compose.yaml and the Dockerfile run: exit 0 against a ready app, non-zero against one
    whose /readyz is 503 (no Redis, no durable store), although its /healthz is 200."""
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    checks = [healthcheck_code(DOCKERFILE.read_text().split("HEALTHCHECK", 1)[1])]
    checks += [healthcheck_code(" ".join(compose[name]["healthcheck"]["test"])) for name in ("app", "app-sentinel")]
    ready = await aiohttp_server(create_app(make_config()))
    down = await aiohttp_server(create_app(make_config({"lifecycle": {"plugin": "noop"}})))
    for code in checks:
        for server, status in ((ready, 0), (down, 1)):
            probe = code.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}")
            result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", probe], capture_output=True,
                                             timeout=30)
            assert result.returncode == status, (code, result.stderr[-300:])


async def test_docker_scenario_with_stand_ins(tmp_path: Path, make_config, pg) -> None:
    redis_port = free_port()
    # Stand-in for the compose "redis" service: a server our own subprocess lifecycle runs on TCP.
    standin = make_config({"lifecycle": {"tcp": True, "tcp_port": redis_port, "restart_backoff": 0.05}})
    async with Runtime(standin) as redis_service:
        endpoint = await redis_service.on_demand.ensure()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONDEMAND_")}
        env |= compose_app_env()
        env |= {"REDIS_URL": f"redis://:{endpoint.password}@127.0.0.1:{redis_port}/0", "DATABASE_URL": pg.dsn}
        env.pop("ONDEMAND_CONFIG")
        app_port = free_port()
        base = f"http://127.0.0.1:{app_port}"
        log_path = tmp_path / "app.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "--config", str(ROOT / "config/docker.toml"),
                 "--host", "127.0.0.1", "--port", str(app_port)],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            async with aiohttp.ClientSession() as http:
                await wait_until_serving(http, base, proc, log_path)
                await exercise_every_endpoint(http, base)
                assert redis_servers_under(proc.pid) == [], "the app spawned a Redis under DOCKER_ENV"
                async with http.get(f"{base}/api/cache/status") as resp:
                    status = await resp.json()
                assert status["redis"]["lifecycle"] == "external" and status["redis"]["pid"] is None
                assert endpoint.password not in str(status)

                # The stand-in Redis restarts (same port and password, empty): the app reconnects.
                os.kill(redis_service.on_demand.lifecycle.pid(), signal.SIGKILL)
                await asyncio.sleep(0.1)
                await redis_service.on_demand.ensure()
                deadline = time.monotonic() + 10
                while True:
                    async with http.put(f"{base}/api/sessions/after", json={"v": 2}) as resp:
                        assert resp.status == 200, await resp.text()
                    async with http.get(f"{base}/api/sessions/after") as resp:
                        body = await resp.json()
                    assert body["value"] == {"v": 2}
                    if body["source"] == "redis":
                        break
                    assert time.monotonic() < deadline, "the app did not reconnect to the restarted Redis"
                    await asyncio.sleep(0.1)
                assert await redis_service.on_demand.with_connection(
                    lambda r: r.exists("ondemand:session:after")) == 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert redis_children() == []


async def exercise_every_endpoint(http: aiohttp.ClientSession, base: str) -> None:
    async def call(method: str, path: str, status: int, **kwargs) -> dict | None:
        async with http.request(method, base + path, **kwargs) as resp:
            assert resp.status == status, f"{method} {path}: {resp.status} {await resp.text()}"
            return await resp.json() if resp.content_type == "application/json" else None

    await call("GET", "/healthz", 200)
    await call("GET", "/readyz", 200)
    await call("PUT", "/api/sessions/s1", 200, json={"user": 1})
    assert (await call("GET", "/api/sessions/s1", 200))["value"] == {"user": 1}
    await call("DELETE", "/api/sessions/s1", 204)
    await call("PUT", "/api/users/u1/messages", 200, json=[{"t": 1}])
    await call("POST", "/api/users/u1/messages", 200, json={"t": 2})
    assert (await call("GET", "/api/users/u1/messages", 200))["messages"] == [{"t": 1}, {"t": 2}]
    await call("PUT", "/api/users/u1/profile", 200, json={"name": "Ada"})
    assert (await call("GET", "/api/users/u1/profile", 200))["profile"] == {"name": "Ada"}
    await call("POST", "/api/users/u2/warmup", 200, json={"session": {"s": 1}, "profile": {"p": 1}})
    await call("GET", "/api/cache/status", 200)
    await call("GET", "/api/openapi.json", 200)
    async with http.get(base + "/metrics") as resp:
        assert resp.status == 200 and "ondemand" in await resp.text()
    await call("GET", "/api/cache/test", 404)  # test endpoints are off in docker.toml


def _config_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        if field.name in {"environment", "source", "sections", "section_tables", "data"}:
            continue
        name = f"{prefix}{field.name}"
        if attrs.has(field.type if isinstance(field.type, type) else type(None)):
            keys += _config_keys(field.type, name + ".")
        elif field.name == "pools":
            keys += [f"pools.<id>.{f.name}" for f in attrs.fields(type(Config().pool("default")))]
        elif field.name == "namespaces":
            keys += [f"namespaces.<name>.{f.name}" for f in attrs.fields(type(Config().namespaces["session"]))]
        else:
            keys.append(name)
    return keys


def test_readme_documents_every_config_key() -> None:
    readme = (ROOT / "README.md").read_text()
    config = load_config(None, environ={})
    built_in = [cls for cls in config.sections if cls.__module__.startswith("ondemand.plugins.")]  # not the example's
    keys = _config_keys(Config, "") + [f"{config.section_tables[cls]}.{field.name}"
                                       for cls in built_in for field in attrs.fields(cls)]
    assert len(keys) > 30
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert not missing, f"config keys missing from README.md: {missing}"


@pytest.mark.parametrize("args", [["check-config", "--help"], ["status", "--help"], ["serve", "--help"], ["--help"]])
def test_cli_help(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_check_config_prints_redacted_config_and_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_URL": "redis://:topsecret@r:6379/0"}
    proc = subprocess.run([sys.executable, "run.py", "check-config", "--config", "config/docker.toml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "topsecret" not in proc.stdout and "ondemand:ondemand@" not in proc.stdout and "***" in proc.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[redis]\nop_timeout = 'fast'\n")
    proc = subprocess.run([sys.executable, "run.py", "check-config", "--config", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "redis.op_timeout" in proc.stderr


def test_status_command_prints_a_running_server(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    env["ONDEMAND_STORAGE__DURABLE"] = '""'
    server = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            proc = subprocess.run([sys.executable, "run.py", "status", "--url", f"http://127.0.0.1:{port}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=30)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert proc.returncode == 0, proc.stderr
        assert "redis        subprocess: stopped" in proc.stdout
        assert "plugins" in proc.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    proc = subprocess.run([sys.executable, "run.py", "status", "--url", f"http://127.0.0.1:{port}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot fetch status" in proc.stderr


def test_json_log_lines_carry_event_fields() -> None:
    code = (
        "import asyncio, logging\n"
        "from ondemand.logs import configure_logging\n"
        "from ondemand import Runtime, load_config\n"
        "configure_logging('INFO', 'json')\n"
        "async def main():\n"
        "    cfg = load_config(None, overrides={'storage': {'durable': ''}}, environ={})\n"
        "    async with Runtime(cfg) as rt:\n"
        "        await rt.cache.get_profile('x')\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    import json

    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    ready = [e for e in events if e.get("event") == "redis_ready"]
    assert ready and ready[0]["pid"] > 0 and ready[0]["lifecycle"] == "subprocess"
    assert any(e.get("event") == "shutdown" for e in events)
