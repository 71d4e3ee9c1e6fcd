"""The embedded PostgreSQL of one data directory is shared by every process that uses it, and only
directories and files that are ours are used. Real servers, real processes, real faults; no mocks.

- Sharing: a second user adopts the running server (state file, identity checks) and never stops it;
  its owner's stop or death is noticed at once and the next start replaces it; a start right after the
  owner was SIGKILLed waits for the old server's processes instead of failing; all processes idle for
  postgres.idle_timeout stop it; run.py (two workers), a script and `run.py status` see one server.
- Hostile paths: a planted state file, symlinked or foreign data directories and files, modes 0777, a
  file where a directory should be, a read-only file system: one PostgresUnavailable (HTTP 503
  postgres_unavailable) naming the path, and nothing outside is touched or signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psutil
import pytest

from ondemand.errors import PostgresUnavailable
from ondemand.host.net import free_port
from ondemand.plugin_manager import Plugins
from ondemand.plugins.storage_postgres import PostgresConfig, PostgresStorage
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres, ServerState
from ondemand.store.protocols import Namespace
from ondemand.web import create_app
from tests.support import (
    ROOT,
    TEST_SETTINGS,
    clone_data_dir,
    new_temp_dir,
    pid_alive,
    pid_gone,
    postmasters,
    process_tree,
    query,
    remove_temp_dir,
    wait_for,
    wait_gone,
    wait_until_serving,
)

SESSION = Namespace("session", 86400.0, True, "session", "ondemand:session:")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to another user (CI runs as root)")


def server_uid() -> int:
    return pwd.getpwnam("pgserver").pw_uid if os.geteuid() == 0 else os.geteuid()


@pytest.fixture
def data_dir(pg_template: Path) -> Iterator[Path]:
    """A copy of the session's template data directory, in a fresh private temp dir."""
    path = clone_data_dir(pg_template)
    yield path
    remove_temp_dir(path.parent)


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., EmbeddedPostgres]]:
    """Make EmbeddedPostgres instances; each is stopped at the end, with its server's processes."""
    made: list[EmbeddedPostgres] = []

    def make(path: Path, **options: Any) -> EmbeddedPostgres:
        pg = EmbeddedPostgres(path, **{"startup_timeout": 20.0, "stop_timeout": 5.0, "settings": TEST_SETTINGS,
                                       **options})
        made.append(pg)
        return pg

    yield make
    for pg in reversed(made):
        tree = process_tree(pg.pid) if pg.owner == "self" and pg.pid else set()
        await pg.stop()
        assert await wait_gone(tree, timeout=5.0) == []


def beside(data_dir: Path, suffix: str) -> Path:
    """A file beside the data directory, named after it (`pgdata.state.json`)."""
    return data_dir.parent / f"{data_dir.name}{suffix}"


def storage_config(data_dir: Path, **overrides: Any) -> PostgresConfig:
    base: dict[str, Any] = {"data_dir": str(data_dir), "connect_timeout": 1.0, "statement_timeout": 1.0,
                            "startup_timeout": 20.0}
    return PostgresConfig(**{**base, **overrides})


def fake_postgres(directory: Path) -> Path:
    """A program named `postgres` that only sleeps: what a foreign process looks like to /proc."""
    directory.chmod(0o755)
    program = directory / "postgres"
    shutil.copy("/bin/sleep", program)
    program.chmod(0o755)
    return program


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL", "ONDEMAND_CONFIG"} and not k.startswith("ONDEMAND_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


# -- sharing one server ----------------------------------------------------------------------------


async def test_a_second_user_adopts_the_server_and_only_its_owner_stops_it(data_dir, servers) -> None:
    a, b = servers(data_dir), servers(data_dir)
    await a.start()
    assert a.owner == "self"
    st = os.lstat(a.state_path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()

    await b.start()
    assert (b.owner, b.pid, b.dsn) == ("sibling", a.pid, a.dsn)
    await query(b.dsn, "CREATE TABLE shared (v int); INSERT INTO shared VALUES (1)")
    assert await query(a.dsn, "SELECT v FROM shared") == [(1,)]
    await b.stop()  # an adopter only lets go
    assert await query(a.dsn, "SELECT v FROM shared") == [(1,)]

    exits: list[str] = []
    b.set_exit_callback(exits.append)
    await b.start()
    assert b.owner == "sibling"
    old, tree = a.pid, process_tree(a.pid)
    await a.stop()
    await wait_for(lambda: exits, timeout=5.0)  # told by a pidfd, at once
    assert not b.running and b.pid is None
    assert not a.state_path.exists()  # withdrawn before the server stopped: no one adopts a stopping server
    assert await wait_gone(tree, timeout=5.0) == []

    await b.start()  # the adopter's next start makes its own
    assert b.owner == "self" and b.pid != old
    await a.start()
    assert (a.owner, a.pid) == ("sibling", b.pid)
    assert await query(a.dsn, "SELECT v FROM shared") == [(1,)]
    assert postmasters(data_dir) == [b.pid]


async def test_racing_first_users_start_one_server(data_dir, servers) -> None:
    users = [servers(data_dir) for _ in range(4)]
    await asyncio.gather(*(u.start() for u in users))
    assert sorted(u.owner for u in users) == ["self", "sibling", "sibling", "sibling"]
    assert len({u.pid for u in users}) == 1 and postmasters(data_dir) == [users[0].pid]


async def test_four_processes_racing_the_first_use_of_a_new_data_dir_run_one_server() -> None:
    base = new_temp_dir()
    data_dir, go = base / "pgdata", base / "go"  # no data directory yet: one initdb, under the lock
    racers = [subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/race_postgres.py"), str(data_dir), str(go)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env())
              for _ in range(4)]
    try:
        assert [await asyncio.to_thread(r.stdout.readline) for r in racers] == ["ready\n"] * 4
        go.touch()
        results = [json.loads(await asyncio.to_thread(r.stdout.readline)) for r in racers]
        assert sorted(r["owner"] for r in results) == ["self", "sibling", "sibling", "sibling"]
        [pid] = {r["pid"] for r in results}
        assert postmasters(data_dir) == [pid]
        owner = next(racer for racer, result in zip(racers, results, strict=True) if result["owner"] == "self")
        for racer in racers:  # the adopters leave first: the server stays
            if racer is not owner:
                racer.stdin.close()
                assert racer.wait(20) == 0
        assert postmasters(data_dir) == [pid]
        tree = process_tree(pid)
        owner.stdin.close()  # the last one leaves: the server goes with it
        assert owner.wait(20) == 0
        assert await wait_gone(tree, timeout=5.0) == [] and postmasters(data_dir) == []
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
        remove_temp_dir(base)


async def test_a_start_right_after_the_owner_was_killed_waits_for_its_server(data_dir, servers) -> None:
    owner = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/hold_postgres.py"), str(data_dir)],
                             stdout=subprocess.PIPE, text=True, env=clean_env(), start_new_session=True)
    try:
        old = int(owner.stdout.readline())
        tree = process_tree(old)
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the owner and its process group; the server gets PDEATHSIG
        owner.wait()
    lingering = [pid for pid in tree if pid_alive(pid)]
    assert lingering, "the killed owner's server should still hold the data directory for a moment"

    old_state = ServerState.loads(beside(data_dir, ".state.json").read_bytes())
    assert old_state is not None and old_state.pid == old and Path(old_state.socket_dir).is_dir()
    new = servers(data_dir)
    await new.start()  # waits for the old backends (PostgreSQL itself refuses while they live), then starts
    assert new.owner == "self" and new.pid not in tree
    assert [pid for pid in tree if pid_alive(pid)] == []
    assert not Path(old_state.socket_dir).exists()  # the dead owner's socket directory does not pile up in /tmp
    assert await query(new.dsn, "SELECT count(*) FROM held") == [(4,)]


async def test_an_unrecorded_server_on_the_data_dir_is_waited_for_then_a_clear_error(data_dir, servers) -> None:
    a = servers(data_dir)
    await a.start()
    a.state_path.unlink()  # a server no ondemand process records (say, started by hand with pg_ctl)
    b = servers(data_dir, startup_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(PostgresUnavailable, match=rf"\b{a.pid}\b.*still runs on {data_dir}.*not one an ondemand"):
        await b.start()
    assert 0.4 < time.monotonic() - started < 3.0
    assert b.pid is None and a.running and await query(a.dsn, "SELECT 1") == [(1,)]


async def test_stale_postmaster_pid_files_are_cleared_only_when_no_server_lives(data_dir, servers) -> None:
    # A postmaster.pid naming a live process that is not postgres (a reused pid), or a dead one.
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    pg = servers(data_dir)
    for stale_pid in (os.getpid(), dead.pid):
        (data_dir / "postmaster.pid").write_text(f"{stale_pid}\n{data_dir}\n")
        await pg.start()
        assert pg.running and await query(pg.dsn, "SELECT 1") == [(1,)]
        await pg.stop()


# -- state files and servers that are not ours ---------------------------------------------------


@pytest.mark.parametrize("tamper", ["group readable", "symlink", "foreign socket dir", "another server"])
async def test_a_state_file_not_proven_ours_is_never_adopted(tamper, data_dir, servers, pg_template) -> None:
    a = servers(data_dir)
    await a.start()
    state = ServerState.loads(a.state_path.read_bytes())
    assert state is not None and state.pid == a.pid
    scratch = new_temp_dir()
    try:
        if tamper == "group readable":
            a.state_path.chmod(0o640)
        elif tamper == "symlink":  # a link to a file of ours with the right content is refused all the same
            copy = scratch / "state.json"
            shutil.copy(a.state_path, copy)
            copy.chmod(0o600)
            a.state_path.unlink()
            a.state_path.symlink_to(copy)
        elif tamper == "foreign socket dir":  # a directory someone else could listen in
            foreign = scratch / "socket"
            foreign.mkdir(mode=0o777)
            foreign.chmod(0o777)
            a.state_path.write_bytes(attrs.evolve(state, socket_dir=str(foreign)).dumps())
        else:  # a real server of ours, on another data directory, answers at the recorded socket
            other = servers(clone_data_dir(pg_template))
            await other.start()
            a.state_path.write_bytes(attrs.evolve(state, socket_dir=str(other.socket_dir)).dumps())
        b = servers(data_dir, startup_timeout=0.5)
        with pytest.raises(PostgresUnavailable, match="still runs on"):  # not adopted; the server stays a's
            await b.start()
        assert b.pid is None and b.owner is None
        assert a.running and await query(a.dsn, "SELECT 1") == [(1,)]
    finally:
        remove_temp_dir(scratch)


@ROOT_ONLY
async def test_a_planted_state_naming_a_foreign_process_is_neither_adopted_nor_signalled(data_dir, servers) -> None:
    scratch = new_temp_dir()
    # Looks like a postmaster to /proc: named postgres, working in our data dir, a child of ours; but it
    # runs as nobody, not as the server's user.
    foreign = subprocess.Popen([str(fake_postgres(scratch)), "60"], cwd=data_dir, user="nobody")
    try:
        socket_dir = scratch / "sock"
        socket_dir.mkdir(mode=0o700)
        os.chown(socket_dir, server_uid(), -1)
        pg = servers(data_dir)
        pg.data_dir.parent.joinpath(f"{data_dir.name}.state.json").write_bytes(ServerState(
            pid=foreign.pid, owner_pid=os.getpid(), socket_dir=str(socket_dir), port=5432, started="x",
            uid=server_uid()).dumps())
        os.chmod(pg.state_path, 0o600)
        await pg.start()
        assert pg.owner == "self" and pg.pid != foreign.pid
        recorded = ServerState.loads(pg.state_path.read_bytes())
        assert recorded is not None and recorded.pid == pg.pid  # ours replaced the planted record
        await pg.stop()
        assert foreign.poll() is None, "the foreign process was signalled"
    finally:
        foreign.kill()
        foreign.wait()
        remove_temp_dir(scratch)


# -- idleness ------------------------------------------------------------------------------------


async def test_the_server_stops_when_every_user_was_idle_and_starts_again_on_use(data_dir) -> None:
    config = storage_config(data_dir, idle_timeout=0.6)
    a, b = PostgresStorage(config), PostgresStorage(config)
    await a.open()
    await b.open()
    try:
        await a.set(SESSION, "k", b"1", None)
        await b.set(SESSION, "other", b"2", None)
        assert a.status()["owner"] == "self" and b.status()["owner"] == "sibling"
        pid = a.status()["pid"]
        tree = process_tree(pid)
        # b keeps using it: a's own idleness does not stop a server another process uses.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert await b.get(SESSION, "k") == b"1"
            await asyncio.sleep(0.1)
        assert a.status()["pid"] == pid and pid_alive(pid)
        # Now nobody uses it.
        await wait_for(lambda: pid_gone(pid), timeout=5.0)
        assert await wait_gone(tree, timeout=5.0) == []
        await wait_for(lambda: a.status()["state"] == "stopped" and b.status()["state"] == "stopped", timeout=2.0)
        assert a.status()["pid"] is None and b.status()["pid"] is None
        assert not a.embedded.state_path.exists()
        assert await b.get(SESSION, "k") == b"1"  # the next use starts it again, with the data
        assert b.status()["owner"] == "self" and b.status()["pid"] not in (None, pid)
    finally:
        await a.close()
        await b.close()


def test_the_postgres_plugin_offers_no_host_service(make_config) -> None:
    # --workers N share the embedded server by adoption, like any other processes (the hook stays for
    # third parties: tests/test_plugins.py).
    config = make_config({"storage": {"durable": "postgres"}, "postgres": {"dsn": "embedded"}})
    assert [s.name for s in Plugins(()).host_services(config) if "PostgreSQL" in s.name] == []


# -- run.py, its workers, a script and `run.py status`: one server, the same data ----------------------


class Script:
    """tests/scripts/durable_client.py: a Runtime beside run.py, driven one JSON line at a time."""

    def __init__(self, cwd: Path, config: Path) -> None:
        self.log = cwd / "script.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/durable_client.py"), str(config)],
                                         cwd=cwd, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True)
        assert self.read() == {"ok": "ready"}

    def read(self) -> Any:
        line = self.proc.stdout.readline()
        assert line, f"the script exited ({self.proc.poll()}): {self.log.read_text()}"
        return json.loads(line)

    async def __call__(self, *command: Any) -> Any:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return await asyncio.to_thread(self.read)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write('["quit"]\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_run_py(cwd: Path, config: Path, port: int, log_name: str) -> subprocess.Popen:
    with (cwd / log_name).open("w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", str(config), "--port", str(port),
                                 "--workers", "2"], cwd=cwd, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def workers_listening(supervisor: subprocess.Popen, port: int) -> int:
    """How many of run.py's workers accept connections on `port` (the first may serve before the second)."""
    count = 0
    for worker in psutil.Process(supervisor.pid).children():
        with contextlib.suppress(psutil.Error):
            count += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in worker.net_connections("tcp"))
    return count


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def durable_statuses(http: aiohttp.ClientSession, base: str, count: int) -> list[dict[str, Any]]:
    """The durable storage's status from `count` requests (a new connection each: any worker may answer)."""
    found = []
    for _ in range(count):
        async with http.get(f"{base}/api/cache/status") as resp:
            found.append((await resp.json())["storages"]["durable"])
    return found


async def test_run_py_its_workers_a_script_and_status_share_one_server_and_survive_a_kill(tmp_path) -> None:
    config = ROOT / "config/default.toml"
    data_dir = tmp_path / ".ondemand/pgdata"  # the default data_dir, relative to the working directory
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_run_py(tmp_path, config, port, "run-1.log")
    script: Script | None = None
    try:
        # A new connection per request, so that the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            await wait_until_serving(http, base, server, tmp_path / "run-1.log")
            await wait_for(lambda: workers_listening(server, port) == 2, timeout=30.0)
            for i in range(20):  # each PUT writes to PostgreSQL, from whichever worker takes it
                async with http.put(f"{base}/api/sessions/by-server-{i}", json={"from": "server"}) as resp:
                    assert resp.status == 200, await resp.text()
            [postmaster] = postmasters(data_dir)
            statuses = await durable_statuses(http, base, 30)
            assert {s["pid"] for s in statuses} == {postmaster}
            assert {s["owner"] for s in statuses} == {"self", "sibling"}  # one worker started it, the other adopted it

            script = Script(tmp_path, config)
            assert await script("get", "by-server-0") == {"ok": {"from": "server"}}
            assert await script("set", "by-script", {"from": "script"}) == {"ok": None}  # written to PostgreSQL
            status = (await script("status"))["ok"]
            assert (status["owner"], status["pid"], status["data_dir"]) == ("sibling", postmaster, str(data_dir))
            for _ in range(4):
                async with http.get(f"{base}/api/sessions/by-script") as resp:
                    assert resp.status == 200 and (await resp.json())["value"] == {"from": "script"}

            shown = subprocess.run([sys.executable, str(ROOT / "run.py"), "status", "--url", base], cwd=tmp_path,
                                   env=clean_env(), capture_output=True, text=True, timeout=30)
            assert shown.returncode == 0, shown.stderr
            assert f"durable      postgres: up (pid {postmaster})" in shown.stdout, shown.stdout
            assert postmasters(data_dir) == [postmaster]

            # SIGKILL run.py with its process group, start it again at once: no request fails meanwhile.
            tree = process_tree(postmaster)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            server = start_run_py(tmp_path, config, port, "run-2.log")
            await wait_until_serving(http, base, server, tmp_path / "run-2.log")
            await wait_for(lambda: workers_listening(server, port) == 2, timeout=30.0)
            for name, value in (("by-server-0", {"from": "server"}), ("by-script", {"from": "script"})):
                async with http.get(f"{base}/api/sessions/{name}") as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["value"] == value
            for i in range(20):
                async with http.put(f"{base}/api/sessions/after-{i}", json={"i": i}) as resp:
                    assert resp.status == 200, await resp.text()
            assert await script("get", "by-server-1") == {"ok": {"from": "server"}}
            assert await script("set", "by-script-2", {"from": "script"}) == {"ok": None}
            assert await wait_gone(tree, timeout=5.0) == []
            [replaced] = postmasters(data_dir)
            assert replaced != postmaster and (await script("status"))["ok"]["pid"] == replaced
            assert {s["pid"] for s in await durable_statuses(http, base, 10)} == {replaced}
    finally:
        stop(server)
        if script is not None:
            script.close()
    await wait_for(lambda: postmasters(data_dir) == [], timeout=10.0)  # gone with the last process using it


# -- paths that are not ours -----------------------------------------------------------------------


def _plant(kind: str, base: Path, victim: Path, template: Path) -> tuple[Path, Path]:
    """Prepare `kind` of hostile data directory under `base`: (the data_dir to configure, the path the
    error must name)."""
    data_dir = base / "pgdata"
    named = data_dir.parent if "parent" in kind else data_dir
    if kind == "symlinked data dir":
        data_dir.symlink_to(victim, target_is_directory=True)
    elif kind == "symlinked parent":
        (base / "parent").symlink_to(victim, target_is_directory=True)
        data_dir = base / "parent" / "pgdata"
        named = data_dir.parent
    elif kind == "data dir of another user":
        data_dir.mkdir(mode=0o700)
        os.chown(data_dir, pwd.getpwnam("nobody").pw_uid, -1)
    elif kind == "parent of another user":
        os.chown(base, pwd.getpwnam("nobody").pw_uid, -1)
    elif kind == "data dir 0777":
        data_dir.mkdir()
        data_dir.chmod(0o777)
    elif kind == "parent 0777":
        base.chmod(0o777)
    elif kind == "data dir is a file":
        data_dir.write_text("not a directory")
    elif kind == "parent is a file":
        (base / "file").write_text("not a directory")
        data_dir = base / "file" / "pgdata"
        named = data_dir.parent
    elif kind in ("symlinked log", "symlinked lock"):
        subprocess.run(["cp", "-a", str(template), str(data_dir)], check=True)
        named = base / f"pgdata{'.log' if kind == 'symlinked log' else '.lock'}"
        named.symlink_to(victim / "precious")
    return data_dir, named


_REFUSALS = {
    "symlinked data dir": "is a symbolic link",
    "symlinked parent": "is a symbolic link",
    "data dir of another user": "is owned by nobody",
    "parent of another user": "is owned by nobody",
    "data dir 0777": r"writable by group or others \(mode 0777\)",
    "parent 0777": r"writable by group or others \(mode 0777\)",
    "data dir is a file": "is a regular file, not a directory",
    "parent is a file": "is a regular file, not a directory",
    "symlinked log": "it is a symbolic link",
    "symlinked lock": "it is a symbolic link",
}


@pytest.mark.parametrize("kind", list(_REFUSALS))
async def test_a_data_dir_that_is_not_ours_is_refused_and_nothing_outside_is_touched(kind, servers,
                                                                                    pg_template) -> None:
    if "another user" in kind and os.geteuid() != 0:
        pytest.skip("needs root to chown to another user (CI runs as root)")
    base, victim = new_temp_dir(), new_temp_dir("ondemand-victim-")
    try:
        (victim / "precious").write_text("keep me")
        before = sorted(os.listdir(victim)), os.stat(victim / "precious")
        data_dir, named = _plant(kind, base, victim, pg_template)
        pg = servers(data_dir, startup_timeout=5.0)
        with pytest.raises(PostgresUnavailable, match=_REFUSALS[kind]) as info:
            await pg.start()
        assert info.value.code == "postgres_unavailable" and info.value.http_status == 503
        assert f"{named}:" in str(info.value) or f"{named} " in str(info.value), str(info.value)
        assert pg.pid is None
        after = sorted(os.listdir(victim)), os.stat(victim / "precious")
        assert (victim / "precious").read_text() == "keep me"
        assert before[0] == after[0] and before[1].st_mtime_ns == after[1].st_mtime_ns
    finally:
        remove_temp_dir(base)
        remove_temp_dir(victim)


async def test_data_dirs_and_parents_we_create_are_0700_and_planted_state_is_not_followed(servers) -> None:
    base = new_temp_dir()
    victim = new_temp_dir("ondemand-victim-")
    try:
        (victim / "precious").write_text("keep me")
        data_dir = base / "a" / "b" / "pgdata"
        data_dir.parent.parent.mkdir(mode=0o700)
        (data_dir.parent.parent / "b").mkdir(mode=0o700)
        # A symlink where the state file goes: never followed, never written through (replaced by rename).
        (data_dir.parent / "pgdata.state.json").symlink_to(victim / "precious")
        pg = servers(data_dir)
        await pg.start()
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert (victim / "precious").read_text() == "keep me"
        assert not pg.state_path.is_symlink() and stat.S_IMODE(pg.state_path.stat().st_mode) == 0o600
        await pg.stop()

        fresh = base / "new" / "deeper" / "pgdata"
        pg = servers(fresh, startup_timeout=30.0)
        await pg.init()
        for directory in (base / "new", base / "new" / "deeper"):
            mode = stat.S_IMODE(directory.stat().st_mode)
            # 0700 as made; as root the postgres user may traverse (x for group and others), never more.
            assert mode in ((0o711,) if os.geteuid() == 0 else (0o700,)), oct(mode)
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert fresh.stat().st_uid == server_uid()
    finally:
        remove_temp_dir(base)
        remove_temp_dir(victim)


@contextlib.contextmanager
def read_only_mount(where: Path, fill: Callable[[Path], None]) -> Iterator[Path]:
    """A small tmpfs at `where`, filled by `fill`, then remounted read-only (root only)."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fill(where)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


async def test_a_data_dir_on_a_read_only_file_system_is_a_clear_error(pg_template, servers) -> None:
    base = new_temp_dir()
    try:
        def fill(mount: Path) -> None:
            mount.chmod(0o700)
            subprocess.run(["cp", "-a", str(pg_template), str(mount / "pgdata")], check=True)

        with read_only_mount(base / "ro", fill) as mount:
            pg = servers(mount / "pgdata", startup_timeout=5.0)
            with pytest.raises(PostgresUnavailable, match=rf"{mount}/pgdata\.lock: Read-only file system"):
                await pg.start()
            assert pg.pid is None
    finally:
        remove_temp_dir(base)


async def test_requests_needing_a_refused_data_dir_answer_503_never_500(aiohttp_client, make_config) -> None:
    base = new_temp_dir()
    try:
        (base / "pgdata").write_text("a file where the data directory should be")
        config = make_config({"storage": {"durable": "postgres"},
                              "postgres": {"dsn": "embedded", "data_dir": str(base / "pgdata"), "startup_timeout": 5}})
        client = await aiohttp_client(create_app(config))
        for method, body in (("PUT", {"v": 1}), ("GET", None)):
            resp = await client.request(method, "/api/sessions/s1", json=body)
            assert resp.status == 503, await resp.text()
            error = (await resp.json())["error"]
            assert error["code"] == "postgres_unavailable" and str(base / "pgdata") in error["message"]
            assert "not a directory" in error["message"]
        resp = await client.get("/api/users/u/profile")  # what needs only the cache still works
        assert resp.status in (200, 404)
    finally:
        remove_temp_dir(base)
