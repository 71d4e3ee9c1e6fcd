"""Security properties: network exposure, untrusted cached bytes, bounded HTTP input, the API token, secrets.

Covered elsewhere and not repeated here:
- the runtime directory is 0700 and the socket has no group/other bits:
  tests/test_ondemand.py::test_runtime_dir_and_socket_are_private;
- TCP mode refuses a client without the password (NOAUTH):
  tests/test_ondemand.py::test_tcp_mode_binds_loopback_with_a_password;
- 413 over `server.max_body_bytes`, 400 for long ids / control characters / ttl -1, 0, abc, nan, 1e12,
  33-level session and warm-up bodies, 415 for text/plain: tests/test_api.py;
- 401/403 on /api/ paths and open probes with a token: tests/test_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import redis.asyncio as aioredis
import redis.exceptions
import yarl

from ondemand import Runtime
from ondemand.config import redact_url
from ondemand.logs import JsonFormatter
from ondemand.plugins.lifecycle_external import ExternalConfig
from ondemand.plugins.lifecycle_subprocess import RuntimeDirError, find_binary
from ondemand.web import RUNTIME, create_app
from tests.support import ROOT, redis_children


def nested(depth: int, container: str = "list") -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if container == "list" else {"k": value}
    return value


async def error_of(resp: Any, status: int, code: str | None = None) -> str:
    assert resp.status == status, (resp.status, await resp.text())
    body = await resp.json()
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def listening(pid: int) -> list[Any]:
    return [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


# -- network exposure of the spawned Redis ------------------------------------------------------


async def test_default_redis_has_no_tcp_listener(runtime: Runtime) -> None:
    await runtime.cache.cache_profile("u", {"ok": True})
    assert await runtime.on_demand.with_connection(lambda r: r.config_get("port")) == {"port": "0"}
    pid = runtime.on_demand.lifecycle.pid()
    assert pid is not None
    assert listening(pid) == []
    assert runtime.status()["redis"]["endpoint"].startswith("unix://")


async def test_tcp_mode_listens_on_loopback_only_and_wants_the_password(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as rt:
        endpoint = await rt.on_demand.ensure()
        pid = rt.on_demand.lifecycle.pid()
        sockets = listening(pid)
        assert sockets, "TCP mode should listen"
        assert {(c.laddr.ip, c.laddr.port) for c in sockets} == {("127.0.0.1", endpoint.port)}
        # The password is in a 0600 config file, never on the command line (visible to every user in ps).
        assert not any(endpoint.password in arg for arg in psutil.Process(pid).cmdline())
        conf = Path(rt.status()["redis"]["runtime_dir"]) / "redis.conf"
        assert endpoint.password in conf.read_text() and stat.S_IMODE(conf.stat().st_mode) & 0o077 == 0
        # NOAUTH without a password is tested in test_ondemand; a wrong one is refused too.
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n*1\r\n$4\r\nPING\r\n")
        replies = [await reader.readline(), await reader.readline()]
        writer.close()
        assert replies[0].startswith(b"-WRONGPASS") or replies[0].startswith(b"-ERR"), replies
        assert replies[1].startswith(b"-NOAUTH"), replies


# -- cached values are JSON only ----------------------------------------------------------------


class Evil:
    """Unpickling this creates the marker file: proof that something unpickled our bytes."""

    marker = ""

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def garbage(marker: Path) -> dict[str, bytes]:
    Evil.marker = str(marker)
    return {
        **{f"pickle-{proto}": pickle.dumps(Evil(), protocol=proto) for proto in (0, 2, pickle.HIGHEST_PROTOCOL)},
        "pickle-header": b"\x80\x05garbage",
        "bad-utf8": b"\xff\xfe\x00\x01",
        "empty": b"",
        "truncated": b'{"a": ',
        "nan": b"NaN",
        "infinity": b"[Infinity]",
        "python": f"__import__('os').system('touch {marker}')".encode(),
        "yaml": f'!!python/object/apply:os.system ["touch {marker}"]'.encode(),
        "too-deep-to-parse": b"[" * 5000 + b"]" * 5000,
    }


@pytest.mark.parametrize("namespace", ["profile", "messages", "session"])
async def test_garbage_in_redis_is_never_evaluated_and_reads_as_a_miss(aiohttp_client, make_config, tmp_path,
                                                                       namespace) -> None:
    marker = tmp_path / "unpickled"
    client = await aiohttp_client(create_app(make_config()))
    rt = client.app[RUNTIME]
    payloads = garbage(marker)
    await rt.on_demand.with_connection(lambda r: r.mset({f"ondemand:{namespace}:{k}": v for k, v in payloads.items()}))
    read = {"profile": rt.cache.get_profile, "messages": rt.cache.get_messages, "session": rt.cache.get_session}
    url = {"profile": "/api/users/{}/profile", "messages": "/api/users/{}/messages", "session": "/api/sessions/{}"}
    for name in payloads:
        assert await read[namespace](name) is None, name
        await error_of(await client.get(url[namespace].format(name)), 404, "not_found")
    assert rt.dispatcher.stats[namespace].corrupt_values == 2 * len(payloads)
    # An append over a corrupt list starts a new one instead of failing.
    if namespace == "messages":
        resp = await client.post(url[namespace].format("pickle-2"), json={"n": 1})
        assert resp.status == 200 and (await resp.json())["count"] == 1
    assert not marker.exists()


async def test_redis_value_of_another_type_reads_as_absent_never_a_5xx(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config()))
    rt = client.app[RUNTIME]
    await rt.on_demand.with_connection(lambda r: r.hset("ondemand:profile:h", "a", "b"))
    # Not a value of ours: read as absent (counted), never a 5xx; a durable namespace reads through.
    await error_of(await client.get("/api/users/h/profile"), 404, "not_found")
    assert rt.dispatcher.error_replies["wrongtype"] == 1
    await rt.on_demand.with_connection(lambda r: r.hset("ondemand:session:h", "a", "b"))
    await error_of(await client.get("/api/sessions/h"), 404, "not_found")
    # a write replaces it
    assert (await client.put("/api/users/h/profile", json={"ok": 1})).status == 200
    assert (await (await client.get("/api/users/h/profile")).json())["profile"] == {"ok": 1}


@pytest.mark.parametrize("depth", [255, 1000])
async def test_stored_json_too_deep_to_answer_is_not_a_500(aiohttp_client, make_config, depth) -> None:
    # Valid JSON another client stored, nested deeper than orjson will encode (254 levels) in a response.
    client = await aiohttp_client(create_app(make_config()))
    rt = client.app[RUNTIME]
    raw = b"[" * depth + b"1" + b"]" * depth
    for namespace in ("profile", "messages", "session"):
        await rt.on_demand.with_connection(lambda r, ns=namespace: r.set(f"ondemand:{ns}:deep", raw))
    assert await rt.cache.get_profile("deep") is not None  # the Python API hands it over as it is
    for path in ("/api/users/deep/profile", "/api/users/deep/messages", "/api/sessions/deep"):
        await error_of(await client.get(path), 409, "conflict")


async def test_corrupt_redis_value_does_not_hide_the_durable_one(aiohttp_client, durable_config, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    client = await aiohttp_client(create_app(durable_config()))
    rt = client.app[RUNTIME]
    assert (await client.put("/api/sessions/s1", json={"user": 1})).status == 200
    evil = garbage(marker)["pickle-2"]
    await rt.on_demand.with_connection(lambda r: r.set("ondemand:session:s1", evil))
    assert await (await client.get("/api/sessions/s1")).json() == {
        "session_id": "s1", "value": {"user": 1}, "source": "postgres"}
    assert await rt.cache.get_session("s1") == {"user": 1}
    assert not marker.exists()


# -- bounded, validated HTTP input (what tests/test_api.py does not cover) ----------------------


WRITES = [("put", "/api/sessions/x", {"a": 1}), ("put", "/api/users/x/profile", {"a": 1}),
          ("put", "/api/users/x/messages", [{"a": 1}]), ("post", "/api/users/x/messages", {"a": 1}),
          ("post", "/api/users/x/warmup", {"profile": {"a": 1}})]


@pytest.fixture
async def client(aiohttp_client, make_config):
    return await aiohttp_client(create_app(make_config({"server": {"max_body_bytes": 65536}})))


@pytest.mark.parametrize("ttl", ["inf", "Infinity", "-inf", "1e309", "NaN", "-0", "1e-400", "", "0x10", "1,5",
                                 "315360001"])
async def test_every_write_refuses_a_bad_ttl(client, ttl) -> None:
    for method, path, body in WRITES:
        resp = await getattr(client, method)(path, params={"ttl": ttl}, json=body)
        assert "ttl" in await error_of(resp, 400, "invalid_input"), (method, path)


async def test_ttl_bounds_are_inclusive_of_ten_years(client) -> None:
    for method, path, body in WRITES:
        assert (await getattr(client, method)(path, params={"ttl": "315360000"}, json=body)).status == 200
        assert (await getattr(client, method)(path, params={"ttl": "0.001"}, json=body)).status == 200


@pytest.mark.parametrize("container", ["list", "dict"])
async def test_every_write_refuses_json_nested_deeper_than_32(client, container) -> None:
    deep, ok = nested(33, container), nested(32, container)
    for method, path, _ in WRITES:
        body: Any = [deep] if path.endswith("messages") else deep
        good: Any = [nested(31, container)] if path.endswith("messages") else ok
        if path.endswith("warmup"):
            body, good = {"profile": deep}, {"profile": ok}
        assert "32 levels" in await error_of(await getattr(client, method)(path, json=body), 400, "invalid_input")
        assert (await getattr(client, method)(path, json=good)).status == 200, (method, path)


async def test_json_too_deep_to_parse_is_400_not_a_crash(client) -> None:
    body = b"[" * 60000  # within the body cap, far past any parser's depth
    for method, path, _ in WRITES:
        resp = await getattr(client, method)(path, data=body, headers={"Content-Type": "application/json"})
        assert "JSON" in await error_of(resp, 400, "invalid_input")


async def test_chunked_body_over_the_cap_is_413(client) -> None:
    async def chunks():
        for _ in range(100):
            yield b'"' + b"x" * 1024 + b'",'

    resp = await client.put("/api/sessions/big", data=chunks(), headers={"Content-Type": "application/json"})
    await error_of(resp, 413, "payload_too_large")
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("application/json; charset=utf-8", 200), ("text/json", 415), ("application/x-www-form-urlencoded", 415),
     (None, 415), ("multipart/form-data; boundary=x", 415)],
)
async def test_content_type(client, content_type, status) -> None:
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    resp = await client.put("/api/users/ct/profile", data=b'{"a": 1}', headers=headers)
    assert resp.status == status, await resp.text()


@pytest.mark.parametrize(
    ("raw_id", "status"),
    [("%C3%A9" * 128, 200), ("%C3%A9" * 129, 400), ("%F0%9D%84%9E" * 64, 200), ("%F0%9D%84%9E" * 65, 400),
     ("a%7Fb", 400), ("a%00b", 400), ("%09", 400), ("a%1Bb", 400)],
)
async def test_ids_are_bounded_in_utf8_bytes_and_free_of_controls(client, raw_id, status) -> None:
    url = yarl.URL(f"/api/users/{raw_id}/profile", encoded=True)
    resp = await client.put(url, json={"a": 1})
    assert resp.status == status, await resp.text()


async def test_oversized_request_line_is_refused(client) -> None:
    resp = await client.get(yarl.URL("/api/sessions/" + "a" * 9000, encoded=True))
    assert resp.status in (400, 414)


# -- the API token --------------------------------------------------------------------------------

TOKEN = "tok-" + "9f" * 12


@pytest.mark.parametrize(
    "path",
    ["/api/cache/status/", "/api/cache/status?token=" + TOKEN, "/healthz/../api/cache/status",
     "/%61pi/cache/status", "/api/cache/%73tatus", "/readyz/../api/sessions/s", "/metrics%2F..%2Fapi%2Fcache%2Fstatus",
     "/healthz%00", "/HEALTHZ"],
)
async def test_token_cannot_be_bypassed_by_path_tricks(aiohttp_client, make_config, path) -> None:
    client = await aiohttp_client(create_app(make_config({"server": {"api_token": TOKEN}})))
    resp = await client.get(yarl.URL(path, encoded=True), headers={"X-Api-Token": TOKEN, "Cookie": f"token={TOKEN}"})
    assert resp.status in (400, 401), (path, resp.status, await resp.text())
    assert "redis" not in await resp.text()


# -- secrets never show ---------------------------------------------------------------------------


def leaks(texts: dict[str, str], secret_values: dict[str, str]) -> list[tuple[str, str]]:
    return [(where, name) for where, text in texts.items() for name, value in secret_values.items() if value in text]


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as the text and the JSON formatter write it: messages, exceptions and event fields."""
    formatter = JsonFormatter()
    return "\n".join([caplog.text, *(formatter.format(r) for r in caplog.records)])


async def run_cli(*args: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return f"exit {proc.returncode}\n{out.decode()}\n{err.decode()}"


def clean_environ(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONDEMAND_")
           and k not in ("REDIS_URL", "DATABASE_URL", "DOCKER_ENV")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


async def collect_http(client: Any, token: str) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {token}"}
    texts: dict[str, str] = {}
    calls = [
        ("put", "/api/sessions/sec", {"json": {"v": 1}}), ("get", "/api/sessions/sec", {}),
        ("put", "/api/users/sec/profile", {"json": {"v": 1}}), ("get", "/api/users/sec/profile", {}),
        ("post", "/api/users/sec/warmup", {"json": {"session": {"v": 2}}}), ("get", "/api/cache/test", {}),
        ("get", "/api/cache/status", {}), ("get", "/api/openapi.json", {}), ("get", "/api/nope", {}),
        ("put", "/api/sessions/sec?ttl=nan", {"json": {}}), ("delete", "/api/sessions/sec", {}),
    ]
    for method, path, kwargs in calls:
        resp = await getattr(client, method)(path, headers=auth, **kwargs)
        assert resp.status != 500, (path, await resp.text())
        texts[f"{method} {path}"] = f"{resp.status} {dict(resp.headers)} {await resp.text()}"
    for path in ("/healthz", "/readyz", "/metrics", "/api/cache/status"):  # the last one: 401 without a token
        resp = await client.get(path)
        texts[f"anonymous {path}"] = f"{resp.status} {dict(resp.headers)} {await resp.text()}"
    resp = await client.get("/api/cache/status", headers={"Authorization": "Bearer wrong"})
    texts["wrong token"] = f"{resp.status} {await resp.text()}"
    return texts


async def test_secrets_never_appear_in_logs_status_or_errors(aiohttp_client, make_config, pg, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = "apitoken-" + os.urandom(12).hex()
    pg_password = "pgpass-" + os.urandom(12).hex()
    bad_pg_password = "badpgpass-" + os.urandom(12).hex()
    bad_redis_password = "badredispass-" + os.urandom(12).hex()
    socket_dir, port = pg.socket_dir, pg.port
    texts: dict[str, str] = {}

    # A TCP Redis with its random password, used as the external Redis of the app under test.
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as redis_owner:
        endpoint = await redis_owner.on_demand.ensure()
        secret_values = {"tcp redis password": endpoint.password, "api token": token, "pg password": pg_password,
                         "bad pg password": bad_pg_password, "bad redis password": bad_redis_password}
        texts["tcp redis owner status"] = orjson.dumps(redis_owner.status()).decode()
        good_env = {
            "REDIS_URL": f"redis://:{endpoint.password}@127.0.0.1:{endpoint.port}/0",
            # trust authentication on the socket: the password is sent, and ignored
            "DATABASE_URL": f"postgresql://postgres:{pg_password}@/postgres?host={socket_dir}&port={port}",
            "ONDEMAND_SERVER__API_TOKEN": f'"{token}"',
            "ONDEMAND_LIFECYCLE__PLUGIN": '"external"',
        }
        durable = {"storage": {"durable": "postgres"}, "postgres": {"connect_timeout": 0.5, "statement_timeout": 0.5}}
        config = make_config(durable, environ=good_env)
        assert config.server.api_token == token and config.section(ExternalConfig).redis_url == good_env["REDIS_URL"]
        client = await aiohttp_client(create_app(config))
        texts |= {f"good: {k}": v for k, v in (await collect_http(client, token)).items()}
        assert texts["good: get /api/sessions/sec"].startswith("200"), texts["good: get /api/sessions/sec"]
        assert "ready" in texts["good: anonymous /readyz"]
        cli_env = clean_environ(good_env)
        base_url = str(client.make_url("/"))
        outputs = await asyncio.gather(
            run_cli("check-config", env=cli_env),
            run_cli("status", "--url", base_url, "--token", token, env=cli_env),
            run_cli("status", "--url", base_url, "--token", token, "--json", env=cli_env),
            run_cli("status", "--url", base_url, "--token", "wrong", env=cli_env),
            run_cli("status", "--url", base_url, env={**cli_env, "ONDEMAND_SERVER__API_TOKEN": token}),
        )
        texts |= {f"cli {i}": out for i, out in enumerate(outputs)}
        assert outputs[0].startswith("exit 0") and outputs[1].startswith("exit 0"), outputs[:2]
        assert "external" in outputs[1]
        await client.close()

    # Both stores unreachable, with passwords in their URLs.
    bad_env = {
        "REDIS_URL": f"redis://app:{bad_redis_password}@127.0.0.1:1/0",
        "DATABASE_URL": f"postgresql://ondemand:{bad_pg_password}@127.0.0.1:1/none",
        "ONDEMAND_SERVER__API_TOKEN": f'"{token}"',
        "ONDEMAND_LIFECYCLE__PLUGIN": '"external"',
    }
    client = await aiohttp_client(create_app(make_config(durable, environ=bad_env)))
    texts |= {f"bad: {k}": v for k, v in (await collect_http(client, token)).items()}
    assert texts["bad: get /api/sessions/sec"].startswith("503"), texts["bad: get /api/sessions/sec"]
    assert texts["bad: anonymous /readyz"].startswith("503")
    rt = client.app[RUNTIME]
    for call in (lambda: rt.cache.cache_session("s", {}), lambda: rt.cache.get_session("s"),
                 lambda: rt.on_demand.ensure()):
        try:
            await call()
        except Exception as exc:
            texts[f"exception {type(exc).__name__}"] = f"{exc!s} {exc!r}"
        else:
            raise AssertionError("expected the stores to be unreachable")
    texts["bad: status"] = orjson.dumps(rt.status()).decode()
    texts["bad: cli check-config"] = await run_cli("check-config", env=clean_environ(bad_env))
    await client.close()

    texts["logs"] = log_text(caplog)
    assert "redis" in texts["logs"] and "PostgreSQL" in texts["logs"]  # we did capture the failures
    assert leaks(texts, secret_values) == []


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://u:hunter2@h/db", "hunter2"),
        ("postgresql://u@h/db?password=hunter2&sslmode=disable", "hunter2"),
        ("host=h user=u password=hunter2 dbname=db", "hunter2"),
        ("redis://:hunter2@h:6379/0", "hunter2"),
        ("unix://:hunter2@/tmp/r.sock?db=1", "hunter2"),
        ("host=h password = hunter2", "hunter2"),  # libpq allows spaces around "="
        ("host=h password='hunter2 and more' user=u", "and more"),  # quoted, with spaces
        ("redis://:hunter@2@h:6379/0", "2@h"),  # urlsplit takes the last "@"
    ],
)
def test_redact_url_hides_the_password(dsn, secret) -> None:
    assert secret not in redact_url(dsn)


async def test_check_config_error_does_not_print_a_numeric_token() -> None:
    out = await run_cli("check-config", env=clean_environ({"ONDEMAND_SERVER__API_TOKEN": "9876543210"}))
    assert out.startswith("exit 2")
    assert "9876543210" not in out


# -- the runtime directory: used only if ours, nothing in it followed, no foreign server adopted ---------

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files needs root (CI runs as root)")


def sqlite_config(make_config: Any, tmp_path: Path, runtime_dir: Path | str) -> Any:
    """Redis in `runtime_dir`, sessions durable in a sqlite file of the test's."""
    return make_config({"lifecycle": {"runtime_dir": str(runtime_dir)}, "storage": {"durable": "sqlite"},
                        "sqlite": {"path": str(tmp_path / "durable.sqlite3")}})


def snapshot(path: Path) -> Any:
    """What a refused path is, to show it was left as it was: type, owner, mode, contents."""
    st = os.lstat(path)
    contents: Any = None
    if stat.S_ISDIR(st.st_mode):
        contents = sorted(os.listdir(path))
    elif stat.S_ISREG(st.st_mode):
        contents = path.read_bytes()
    elif stat.S_ISLNK(st.st_mode):
        contents = os.readlink(path)
    return (stat.S_IFMT(st.st_mode), st.st_uid, stat.S_IMODE(st.st_mode), contents)


async def served_without_redis(client: Any, path: Path | str) -> None:
    """With Redis refused: no 500; cache-only reads miss and writes are dropped (and say so), durable sessions
    are served from the durable store, the cache test fails with its 503; readiness is degraded and names the
    path."""
    for method, url, body, outcome in [("put", "/api/users/u/profile", {"v": 1}, "dropped"),
                                       ("post", "/api/users/u/messages", {"v": 1}, "dropped"),
                                       ("put", "/api/sessions/s", {"v": 1}, "durable-only")]:
        resp = await getattr(client, method)(url, json=body)
        assert resp.status == 200, (url, resp.status, await resp.text())
        assert resp.headers["Ondemand-Write"] == outcome, url
    await error_of(await client.get("/api/cache/test"), 503, "cache_test_failed")
    await error_of(await client.get("/api/users/u/profile"), 404, "not_found")
    assert await (await client.get("/api/sessions/s")).json() == {"session_id": "s", "value": {"v": 1},
                                                                  "source": "sqlite"}
    ready = await client.get("/readyz")
    body = await ready.json()
    assert ready.status == 200 and body["status"] == "degraded", body
    assert str(path) in body["redis"]["last_error"]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


@pytest.mark.parametrize("case", ["another user's 0777 dir", "another user's 0700 dir", "our own 0777 dir",
                                  "a symlink to a dir of ours", "under a parent others can write", "a regular file"])
async def test_a_runtime_dir_someone_else_prepared_is_refused_and_left_as_it_was(aiohttp_client, make_config, tmp_path,
                                                                                caplog, case) -> None:
    if "another user" in case and os.geteuid() != 0:
        pytest.skip("making another user's directory needs root")
    rundir = tmp_path / "run"
    refused, reason = rundir, {
        "another user's 0777 dir": f"owned by nobody (uid {NOBODY})",
        "another user's 0700 dir": f"owned by nobody (uid {NOBODY})",
        "our own 0777 dir": "writable by group or others (mode 0777)",
        "a symlink to a dir of ours": "is a symbolic link",
        "under a parent others can write": "writable by group or others (mode 0777, not sticky)",
        "a regular file": "is a regular file, not a directory"}[case]
    if case == "a regular file":
        rundir.write_bytes(b"not a directory\n")
    elif case == "a symlink to a dir of ours":
        (tmp_path / "ours").mkdir(mode=0o700)
        rundir.symlink_to(tmp_path / "ours")
    elif case == "under a parent others can write":
        refused = tmp_path / "shared"
        refused.mkdir()
        refused.chmod(0o777)
        rundir = refused / "run"
    else:
        rundir.mkdir()
        rundir.chmod(0o777 if "0777" in case else 0o700)
        if "another user" in case:
            os.chown(rundir, NOBODY, NOBODY)
    before = snapshot(refused)
    caplog.set_level(logging.INFO)
    client = await aiohttp_client(create_app(sqlite_config(make_config, tmp_path, rundir)))
    with pytest.raises(RuntimeDirError) as info:
        await client.app[RUNTIME].on_demand.ensure()
    assert info.value.code == "redis_runtime_dir_unusable" and info.value.http_status == 503
    assert f"{refused} " in str(info.value) and reason in str(info.value), str(info.value)
    await served_without_redis(client, refused)
    assert snapshot(refused) == before, "a refused path was changed (chmodded, written to or created in)"
    if case == "under a parent others can write":
        assert not rundir.exists(), "created under a parent others can write"
    if case == "a symlink to a dir of ours":
        assert os.listdir(tmp_path / "ours") == []
    assert redis_children() == []
    no_tracebacks(caplog)


PLANTED = [("symlink", name) for name in ("redis.conf", "redis.log", "state.json", "lock", "activity", "redis.pid",
                                          "redis.sock")]
PLANTED += [("hard link", name) for name in ("redis.conf", "redis.log", "state.json", "activity")]
PLANTED += [("fifo", "redis.log"), ("directory", "redis.conf")]


@pytest.mark.parametrize(("kind", "name"), PLANTED)
async def test_a_planted_entry_in_the_runtime_dir_is_refused_and_its_target_untouched(make_config, tmp_path, kind,
                                                                                      name) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"the victim's own bytes\n")
    victim.chmod(0o644)
    planted = rundir / name
    {"symlink": lambda: planted.symlink_to(victim), "hard link": lambda: os.link(victim, planted),
     "fifo": lambda: os.mkfifo(planted), "directory": lambda: planted.mkdir()}[kind]()
    victim_before, planted_before = snapshot(victim), snapshot(planted)
    mtime = victim.stat().st_mtime_ns
    async with Runtime(make_config({"lifecycle": {"runtime_dir": str(rundir)}})) as rt:
        with pytest.raises(RuntimeDirError) as info:
            await asyncio.wait_for(rt.on_demand.ensure(), 10)  # (a FIFO must not block the start)
        assert f"{planted} " in str(info.value), str(info.value)
        assert redis_children() == [], "a server was started beside a planted entry"
    assert snapshot(victim) == victim_before and victim.stat().st_mtime_ns == mtime, "the victim was touched"
    assert snapshot(planted) == planted_before, "the planted entry was reused or removed"


@contextlib.asynccontextmanager
async def foreign_server(rundir: Path, sock: Path, password: str | None) -> Any:
    """A redis-server that is not ours, working in `rundir` (its cwd and `dir`), listening on `sock`."""
    binary = await find_binary(os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None)
    conf = rundir.parent / "foreign.conf"
    lines = ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700", f'dir "{rundir}"', 'save ""', "appendonly no"]
    conf.write_text("\n".join(lines + ([f"requirepass {password}"] if password else [])) + "\n")
    proc = await asyncio.create_subprocess_exec(binary.path, str(conf), cwd=rundir, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    client = aioredis.Redis(unix_socket_path=str(sock), password=password)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.ping()
                break
            except (redis.exceptions.ConnectionError, FileNotFoundError):
                assert proc.returncode is None and time.monotonic() < deadline, "the foreign server did not start"
                await asyncio.sleep(0.01)
        yield proc, client
    finally:
        await client.aclose()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def commands_run(client: Any) -> dict[str, int]:
    """How many times the server ran each command (INFO commandstats)."""
    return {name: value["calls"] for name, value in (await client.info("commandstats")).items()}


@pytest.mark.parametrize("planted", ["a password it does not know", "no password", "state.json mode 0644",
                                     "state.json owned by another user", "a socket of its own"])
async def test_a_planted_state_json_never_gets_a_foreign_server_used_written_to_or_signalled(
        aiohttp_client, make_config, tmp_path, caplog, planted) -> None:
    if "another user" in planted and os.geteuid() != 0:
        pytest.skip("chown needs root")
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    # "a socket of its own": it even knows the password recorded, but does not listen where ours would.
    sock = rundir / ("elsewhere.sock" if planted == "a socket of its own" else "redis.sock")
    password = "known-to-both" if planted == "a socket of its own" else None
    async with foreign_server(rundir, sock, password) as (proc, foreign):
        await foreign.set("theirs", "untouched")
        recorded = {"unix_socket": str(sock), "password": None if planted == "no password" else "known-to-both"}
        state = rundir / "state.json"
        state.write_text(json.dumps({"pid": proc.pid, "owner_pid": proc.pid, "endpoint": recorded}))
        state.chmod(0o644 if planted == "state.json mode 0644" else 0o600)
        if planted == "state.json owned by another user":
            os.chown(state, NOBODY, NOBODY)
        state_before = snapshot(state)
        connections = (await foreign.info("stats"))["total_connections_received"]
        calls_before = await commands_run(foreign)

        caplog.set_level(logging.INFO)
        client = await aiohttp_client(create_app(sqlite_config(make_config, tmp_path, rundir)))
        with pytest.raises(RuntimeDirError) as info:
            await client.app[RUNTIME].on_demand.ensure()
        assert str(state) in str(info.value), str(info.value)
        await served_without_redis(client, state)
        await client.close()

        assert proc.returncode is None, "the foreign server was signalled"
        calls = await commands_run(foreign)
        ran = {name for name in calls if calls[name] != calls_before.get(name, 0)}
        assert ran <= {"cmdstat_info", "cmdstat_auth"}, f"the foreign server was sent {ran}"  # (INFO: the test's)
        assert await foreign.dbsize() == 1 and await foreign.get("theirs") == b"untouched"
        if planted != "a password it does not know":  # refused before connecting at all
            assert (await foreign.info("stats"))["total_connections_received"] == connections
        assert snapshot(state) == state_before and stat.S_ISSOCK(os.lstat(sock).st_mode), "its files were touched"
        assert [p.pid for p in redis_children()] == [proc.pid], "a server of ours was started beside it"
    no_tracebacks(caplog)


def read_only_bind(path: Path) -> list[str]:
    """A command prefix that runs the rest with `path` bind-mounted read-only, in a mount namespace of its own."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(path)]


WITHOUT_DAC_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]  # root obeys modes then


@as_root
@pytest.mark.parametrize("fault", ["read-only file system", "read-only file system, to create", "unreadable"])
def test_a_read_only_or_unreadable_runtime_dir_is_a_typed_error_and_no_500(tmp_path, fault) -> None:
    """Real faults, in a child process: a read-only bind mount (its own mount namespace: nobody else sees it),
    and a 0000 directory of ours for a root without CAP_DAC_OVERRIDE."""
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    runtime_dir = target / "run" if fault.endswith("to create") else target
    if fault == "unreadable":
        target.chmod(0o000)
        prefix, expected = WITHOUT_DAC_OVERRIDE, "Permission denied"
    else:
        prefix, expected = read_only_bind(target), "Read-only file system"
    check = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    if check.returncode != 0:
        pytest.skip(f"{prefix[0]} is not permitted here: {check.stderr.decode().strip()}")
    try:
        proc = subprocess.run([*prefix, sys.executable, str(ROOT / "tests/scripts/runtime_dir_probe.py"),
                               str(runtime_dir), str(tmp_path / "durable.sqlite3")],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        target.chmod(0o700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    error = result["error"]
    assert (error["type"], error["code"], error["status"]) == ("RuntimeDirError", "redis_runtime_dir_unusable", 503)
    assert str(runtime_dir) in error["message"] and expected in error["message"], error["message"]
    responses = result["responses"]
    assert all(status != 500 for status, _ in responses.values()), responses
    assert responses["GET /api/sessions/s"] == [200, {"session_id": "s", "value": {"v": 1}, "source": "sqlite"}]
    assert responses["GET /api/users/u/profile"][0] == 404
    status, ready = responses["GET /readyz"]
    assert status == 200 and ready["status"] == "degraded" and expected in ready["redis"]["last_error"]
    assert result["tracebacks"] == 0, result["warnings"]
    assert not (target / "run").exists() and os.listdir(target) == []


async def test_the_spawned_server_has_no_restore_command(runtime: Runtime) -> None:
    # RESTORE loads a serialized payload: a command we never send, disabled so that its flaws stay out of reach.
    await runtime.cache.cache_profile("u", {"ok": True})
    import redis.exceptions

    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        await runtime.on_demand.with_connection(lambda r: r.execute_command("RESTORE", "k", 0, b"x"))
    assert await runtime.cache.get_profile("u") == {"ok": True}
