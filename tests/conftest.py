"""Shared fixtures. Real servers only: Redis is spawned by our own subprocess lifecycle."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ondemand import Runtime, load_config
from ondemand.config import Config
from ondemand.config.load import merge as _merge
from tests.support import embedded_postgres, make_template, redis_children, remove_temp_dir

# Small, fast bounds for tests; no durable store unless a test asks for one. ONDEMAND_TEST_REDIS_BINARY
# (a path) runs the tests against another server than the one discovery picks (.ci/run's second pass).
# Every test its own Redis: a private runtime directory (the default one is shared by every process
# started in the same directory); a test of sharing names a directory, or runs processes in its tmp_path.
TEST_OVERRIDES: dict[str, Any] = {
    "lifecycle": {"idle_timeout": 30.0, "startup_timeout": 5.0, "shutdown_grace": 1.0, "runtime_dir": "private",
                  **({"redis_binary": os.environ["ONDEMAND_TEST_REDIS_BINARY"]}
                     if os.environ.get("ONDEMAND_TEST_REDIS_BINARY") else {})},
    "redis": {"op_timeout": 0.25, "connect_timeout": 0.5},
    "storage": {"durable": ""},
    # ONDEMAND_TEST_NEAR_CACHE=1 (.ci/run's near-cache pass): every built-in namespace keeps a near cache, so that
    # every test of the suite (its faults included) runs through it too.
    **({"namespaces": {name: {"near_cache": True} for name in ("session", "messages", "profile")}}
       if os.environ.get("ONDEMAND_TEST_NEAR_CACHE") else {}),
}


@pytest.fixture
def make_config(tmp_path: Any) -> Callable[..., Config]:
    def make(overrides: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None) -> Config:
        merged = _merge(TEST_OVERRIDES, {"postgres": {"data_dir": str(tmp_path / "pgdata")}})
        return load_config(None, overrides=_merge(merged, overrides or {}), environ=environ or {})

    return make


@pytest.fixture
async def runtime(make_config: Callable[..., Config]) -> AsyncIterator[Runtime]:
    async with Runtime(make_config()) as rt:
        yield rt


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Any:
    """A test that leaves a redis-server running fails."""
    before = {p.pid for p in redis_children()}
    yield
    left = [p for p in redis_children() if p.pid not in before]
    for p in left:
        p.kill()
    assert not left, f"test left servers running: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture(autouse=True)
def _no_docker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite must behave the same inside a container that sets these.
    for name in ("DOCKER_ENV", "REDIS_URL", "DATABASE_URL", "REDIS_PASSWORD", "ONDEMAND_CONFIG", "REDIS_URL_FILE",
                 "DATABASE_URL_FILE", "REDIS_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    os.environ.pop("ONDEMAND_LIFECYCLE__PLUGIN", None)


@pytest.fixture(scope="session")
def pg_template() -> Any:
    """One initdb per test session; each test's server starts on a copy of it."""
    path = make_template()
    yield path
    remove_temp_dir(path.parent)


@pytest.fixture
async def pg(pg_template: Any) -> AsyncIterator[Any]:
    """A real PostgreSQL (pgserver's binaries) owned by this test; stopped and removed afterwards."""
    async with embedded_postgres(template=pg_template) as server:
        yield server


@pytest.fixture
def durable_config(make_config: Callable[..., Config], pg: Any) -> Callable[..., Config]:
    """Config with PostgreSQL as the durable store, at this test's server."""

    def make(overrides: dict[str, Any] | None = None) -> Config:
        base = {"storage": {"durable": "postgres"},
                "postgres": {"dsn": pg.dsn, "connect_timeout": 0.5, "statement_timeout": 0.5}}
        return make_config(_merge(base, overrides or {}))

    return make
