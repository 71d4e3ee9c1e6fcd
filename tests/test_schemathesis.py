"""Property-based API tests: schemathesis generates requests from the OpenAPI document.

The real server (`run.py`, Redis only: `storage.durable = ""`, with a namespace `weather` of its own
besides the built-in ones, and the example plugin's route) runs on a free loopback port, once
without an API token (the default) and once with one, each for its own class of tests. Every operation
of the document that server serves is exercised with a few generated inputs, valid and invalid
(schemathesis' examples, coverage and fuzzing phases), and every response must be:

- no 5xx (`not_a_server_error`),
- a documented status code (`status_code_conformance`) with a body matching the documented schema
  (`response_schema_conformance`); without a token no 401/403 is documented, so a server asking for
  one fails here,
- a rejection when the request violates the document (`negative_data_rejection`),
- a 401/403 without or with a wrong token on every operation the document secures (`ignored_auth`):
  with a token, every /api/ path; without one, none.

Not checked: `positive_data_acceptance`, because the document cannot express two rules the server
enforces (ids are limited in UTF-8 bytes, JSON Schema counts characters; values are nested at most
32 levels), so a schema-valid request can rightly be refused.

`MAX_EXAMPLES` keeps the file to seconds per configuration; `st run` with more examples is the deep
search (see README).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ondemand.config.load import load_config
from ondemand.host.net import free_port
from ondemand.web import create_app
from ondemand.web.openapi import document_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "schemathesis-t0ken"
MAX_EXAMPLES = 10
WEATHER_TTL = 60
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, negative_data_rejection,
          ignored_auth]


def start_server(workdir: Path, token: str | None) -> tuple[subprocess.Popen[bytes], str, Path]:
    """run.py on a free loopback port, answering /healthz; with `server.api_token = token` unless None.
    A port can be taken by someone else between free_port() and the server's bind; a server that exits
    while starting is retried on another port."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"} and not k.startswith("ONDEMAND_")}
    env.update({"ONDEMAND_STORAGE__DURABLE": '""', "ONDEMAND_LIFECYCLE__IDLE_TIMEOUT": "60",
                # a namespace of the config's own, besides the built-in ones: served at /api/ns/weather/{id}
                "ONDEMAND_NAMESPACES__WEATHER__TTL": str(WEATHER_TTL)})
    if token is not None:
        env["ONDEMAND_SERVER__API_TOKEN"] = f'"{token}"'
    for attempt in range(3):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = workdir / f"server-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "--host", "127.0.0.1", "--port", str(port)],
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                    return proc, base, log_path
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise AssertionError(f"server did not answer within 30 s: {log_path.read_text()}") from None
                time.sleep(0.05)
    raise AssertionError(f"server exited while starting, three times; last log: {log_path.read_text()}")


@pytest.fixture(scope="class")
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server for the whole class, with the class's `token`; stopped with SIGINT, its redis-server
    with it (one server at a time: the next class starts its own)."""
    proc, base, log_path = start_server(tmp_path_factory.mktemp("schemathesis"), request.cls.token)
    alive: list[psutil.Process] = []
    try:
        yield base
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
    log = log_path.read_text()
    assert "Traceback" not in log, log  # every error became a JSON answer; none was logged as a crash
    assert not alive, f"the server left children running: {alive}"


@pytest.fixture(autouse=True)
def no_leftover_servers() -> None:
    """Overrides conftest's check: each class's server keeps its redis-server between tests on purpose
    (`served` checks at the end that it stopped with the server)."""


def served_document(token: str | None) -> dict[str, Any]:
    """What GET /api/openapi.json answers with the default config and `server.api_token = token`
    (built here: nothing starts)."""
    overrides: dict[str, Any] = {"storage": {"durable": ""}, "namespaces": {"weather": {"ttl": WEATHER_TTL}}}
    if token is not None:
        overrides["server"] = {"api_token": token}
    return document_for(create_app(load_config(None, overrides=overrides, environ={})))


def schema_for(token: str | None) -> Any:
    """The document as schemathesis' schema. Built at collection time so that each operation is its own
    test (schemathesis.pytest.from_fixture, which would read the live URL, fails under pytest 9: it
    assigns Function._nodeid); each class's first test proves the live document is this one."""
    schema = schemathesis.openapi.from_dict(served_document(token))
    # Unknown query parameters are ignored by design (as most HTTP APIs do: cache busters, tracing
    # tags), so an extra parameter is not "invalid data" that must be rejected.
    schema.config.generation.update(allow_extra_parameters=False)
    return schema


def get(url: str, token: str | None) -> tuple[int, bytes]:
    """GET `url`, with `Authorization: Bearer <token>` unless None: the status and body, errors too."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def call_and_validate(case: schemathesis.Case, served: str, token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    case.call_and_validate(base_url=served, headers=headers, checks=CHECKS, timeout=10)


SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
OPEN_SCHEMA = schema_for(None)
TOKEN_SCHEMA = schema_for(TOKEN)


class TestWithoutToken:
    """The default: no `server.api_token`, so every path is open and the document declares no security."""

    token = None

    def test_the_served_document_is_the_tested_one(self, served: str) -> None:
        status, body = get(f"{served}/api/openapi.json", None)
        assert status == 200
        document = json.loads(body)
        assert document == served_document(None)
        assert "security" not in document and "securitySchemes" not in document["components"]
        # Every namespace of the config, its own and the built-in ones, and the example plugin's route.
        assert {"/api/ns/weather/{id}", "/api/ns/session/{id}", "/api/ns/messages/{id}", "/api/ns/profile/{id}",
                "/api/example/greet/{name}"} <= set(document["paths"])
        for path, item in document["paths"].items():
            for method, op in item.items():
                assert "security" not in op, (method, path)
                assert not {"401", "403"} & set(op["responses"]), (method, path)

    @OPEN_SCHEMA.parametrize()
    @SETTINGS
    def test_api_matches_its_openapi_document(self, case: schemathesis.Case, served: str) -> None:
        call_and_validate(case, served, None)


class TestWithToken:
    """`server.api_token` set: bearer security on every /api/ path, none on the open probes and page."""

    token = TOKEN

    def test_the_served_document_is_the_tested_one(self, served: str) -> None:
        status, body = get(f"{served}/api/openapi.json", TOKEN)
        assert status == 200
        assert json.loads(body) == served_document(TOKEN)

    def test_security_is_declared_where_the_server_asks_for_it(self, served: str) -> None:
        """Every GET without path parameters, asked without a token: a 401 exactly where the document
        declares security (the document-wide bearer requirement, unless the operation lifts it)."""
        document = served_document(TOKEN)
        assert document["security"] == [{"bearer": []}]
        asked = set()
        for path, item in document["paths"].items():
            if "get" in item and "{" not in path:
                secured = item["get"].get("security", document["security"]) != []
                assert secured == path.startswith("/api/"), path
                status, _ = get(f"{served}{path}", None)
                assert status == (401 if secured else 200), path
                asked.add(path)
        assert {"/healthz", "/readyz", "/metrics", "/", "/api/cache/status", "/api/openapi.json"} <= asked

    @TOKEN_SCHEMA.parametrize()
    @SETTINGS
    def test_api_matches_its_openapi_document(self, case: schemathesis.Case, served: str) -> None:
        call_and_validate(case, served, TOKEN)
