"""Helpers shared by the test modules: the checkout's root, process checks, polling, HTTP, PostgreSQL, a local cluster.

Test modules import helpers from here (conftest too), never from one another. A free TCP port comes
from the product's own `app.net.free_port`.

PostgreSQL: initdb takes about a second, starting a server from an existing data dir about 0.2 s. So
a test session makes one template data dir (`make_template`) and each test starts its own server on
a copy of it (`embedded_postgres(template=...)`): isolated, fast, and owned by the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import aiopg
import psutil

from plugins.postgres_server import EmbeddedPostgres
from plugins.redis_cluster import ClusterNode, LocalCluster

ROOT = Path(__file__).resolve().parent.parent

REDIS_NAMES = frozenset({"redis-server", "valkey-server"})
SERVER_NAMES = REDIS_NAMES | {"postgres"}


# -- processes ---------------------------------------------------------------------------------------


def _live_descendants(root: psutil.Process, names: Iterable[str]) -> list[psutil.Process]:
    """`root`'s live (non-zombie) descendants whose process name is one of `names`."""
    wanted = set(names)
    found = []
    for child in root.children(recursive=True):
        try:
            if child.name() in wanted and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def server_children() -> list[psutil.Process]:
    """Our live (non-zombie) redis/valkey/postgres descendants."""
    return _live_descendants(psutil.Process(), SERVER_NAMES)


def redis_children() -> list[psutil.Process]:
    """Our live redis-server/valkey-server descendants."""
    return _live_descendants(psutil.Process(), REDIS_NAMES)


def redis_servers_under(pid: int) -> list[psutil.Process]:
    """The live redis-server/valkey-server descendants of process `pid` (a server we started)."""
    return _live_descendants(psutil.Process(pid), REDIS_NAMES)


def pid_gone(pid: int) -> bool:
    """The process has exited (or is a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_alive(pid: int) -> bool:
    return not pid_gone(pid)


def process_tree(pid: int) -> set[int]:
    """`pid` and all its live descendants (the postmaster and its backends)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


async def wait_gone(pids: Iterable[int], *, timeout: float) -> list[int]:
    """Wait until none of `pids` is alive; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


# -- polling and HTTP ----------------------------------------------------------------------------------


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll `predicate` until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET `url` and decode its JSON body (blocking: for servers running in another process)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


async def wait_until_serving(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll `base`/api/cache/status until it answers 200; fail with the server's log if it exits first."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.get(f"{base}/api/cache/status") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "workers did not come up"
        await asyncio.sleep(0.1)


# -- PostgreSQL --------------------------------------------------------------------------------------


# Tests need no durability against an OS crash. Commits still reach the OS before they return, so a
# killed server loses nothing (synchronous_commit stays on for that reason).
TEST_SETTINGS = {"fsync": "off"}


def _base_dir() -> str:
    """tmpfs when it is roomy (copying a 40 MB data dir to disk can take a second), else /tmp.

    Docker's default /dev/shm is only 64 MB, hence the free-space check.
    """
    with contextlib.suppress(OSError):
        if shutil.disk_usage("/dev/shm").free > 1 << 30:
            return "/dev/shm"
    return "/tmp"


def new_temp_dir(prefix: str = "ondemand-pgtest-") -> Path:
    """A fresh directory for data dirs (short paths; pytest's tmp dirs are 0700 and deep)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_base_dir()))


def remove_temp_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_template(startup_timeout: float = 60.0) -> Path:
    """Synchronously initdb a data dir once; returns its path (inside a temp dir to remove later).

    Call it outside a running event loop, e.g. from a session-scoped sync fixture.
    """
    data_dir = new_temp_dir("ondemand-pgtemplate-") / "pgdata"
    asyncio.run(EmbeddedPostgres(data_dir, startup_timeout=startup_timeout).init())
    return data_dir


def clone_data_dir(template: Path) -> Path:
    """Copy a template data dir into a fresh temp dir, keeping owners and modes (postgres checks both)."""
    data_dir = new_temp_dir() / "pgdata"
    subprocess.run(["cp", "-a", str(template), str(data_dir)], check=True, timeout=60)
    return data_dir


@contextlib.asynccontextmanager
async def embedded_postgres(
    data_dir: Path | None = None,
    *,
    template: Path | None = None,
    startup_timeout: float = 60.0,
) -> AsyncIterator[EmbeddedPostgres]:
    """Start an embedded PostgreSQL and stop it afterwards, with whatever it left behind.

    Without `data_dir`, a temp one is used (a copy of `template` if given, else a new initdb) and
    removed at the end.
    """
    owned: Path | None = None
    if data_dir is None:
        data_dir = clone_data_dir(template) if template is not None else new_temp_dir() / "pgdata"
        owned = data_dir.parent
    pg = EmbeddedPostgres(data_dir, startup_timeout=startup_timeout, stop_timeout=5.0, settings=TEST_SETTINGS)
    try:
        await pg.start()
        yield pg
    finally:
        pid = pg.pid
        tree = process_tree(pid) if pid else set()
        await pg.stop()
        await wait_gone(tree, timeout=5.0)
        if owned is not None:
            remove_temp_dir(owned)


async def query(dsn: str, sql: str, params: tuple[object, ...] | None = None) -> list[tuple[object, ...]]:
    """Run one statement on a fresh connection; returns its rows (empty for statements without rows)."""
    async with aiopg.connect(dsn, timeout=5.0, enable_hstore=False) as conn, conn.cursor() as cur:
        await cur.execute(sql, params)
        return list(await cur.fetchall()) if cur.description is not None else []


# -- a local Redis Cluster ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def local_cluster(parent: Path | None = None, **options: Any) -> AsyncIterator[LocalCluster]:
    """A started LocalCluster (3 masters x 1 replica unless told), stopped afterwards whatever happens. Its
    server is the suite's (ONDEMAND_TEST_REDIS_BINARY, else discovery's), its bounds roomy for a loaded CI
    runner: Valkey alone holds a master back 2 s before it reports cluster_state:ok."""
    binary = os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None
    cluster = LocalCluster(**{"binary": binary, "parent": parent, "startup_timeout": 20.0, **options})
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


def kill_node(node: ClusterNode) -> int:
    """SIGKILL a node of a LocalCluster by its ChildProcess (tests only: the product never kills a node);
    returns its PID."""
    assert node.child is not None and node.pid is not None
    node.child.signal(signal.SIGKILL)
    return node.pid


def postmasters(data_dir: Path) -> list[int]:
    """The live postmasters working in `data_dir`: postgres processes there whose parent is not one."""
    target = data_dir.stat()
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] != "postgres" or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            here = Path(proc.cwd()).stat()
            if (here.st_dev, here.st_ino) == (target.st_dev, target.st_ino) and proc.parent().name() != "postgres":
                found.append(proc.pid)
        except (psutil.Error, OSError, AttributeError):
            continue
    return found
