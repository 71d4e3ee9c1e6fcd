"""One host, many processes: every process started with the same config in the same directory shares one Redis.

The default runtime directory is the project's (`.ondemand/redis` in the working directory, or a short
per-user path keyed by it), so `python run.py`, a script using `Runtime(load_config(...))` and any number of
processes racing their first use find the same server. `lifecycle.runtime_dir = "private"` (what the rest of
the suite uses) gives each process a server of its own. Racing processes: tests/faults/test_process_faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_subprocess import MAX_SOCKET_PATH, RuntimeDirError, default_runtime_dir
from tests.support import ROOT, get_json, pid_alive, pid_gone, redis_children, redis_servers_under

SCRIPTS = ROOT / "tests/scripts"
DEFAULT = {"lifecycle": {"runtime_dir": None}}  # make_config's "private" undone: the default directory


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A project directory with the checkout's config/default.toml, as a user's would have; the per-user
    runtime directory it may get (a long path) is removed afterwards."""
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config/default.toml", tmp_path / "config/default.toml")
    yield tmp_path
    if not default_runtime_dir(tmp_path).is_relative_to(tmp_path):
        shutil.rmtree(default_runtime_dir(tmp_path), ignore_errors=True)


@pytest.fixture
def short_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working directory a project whose path is too long for a socket under it, and a temp dir of
    this test's own (short, in the real one) standing in for /tmp."""
    project = tmp_path / ("p" * 40) / ("q" * 40)
    project.mkdir(parents=True)
    monkeypatch.chdir(project)
    temp = Path(tempfile.mkdtemp(prefix="od-"))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield temp
    monkeypatch.undo()
    shutil.rmtree(temp, ignore_errors=True)


def environment() -> dict[str, str]:
    """The user's environment, Redis only (the durable side of sharing is the embedded PostgreSQL's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONDEMAND_") and k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    return {**env, "PYTHONPATH": str(ROOT), "ONDEMAND_STORAGE__DURABLE": '""'}


def put_profile(base: str, user: str, value: Any) -> None:
    request = urllib.request.Request(f"{base}/api/users/{user}/profile", data=json.dumps(value).encode(),
                                     headers={"Content-Type": "application/json"}, method="PUT")
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def serve(project: Path, port: int, log: Path) -> subprocess.Popen:
    """`python run.py --config config/default.toml` in the project directory, once it answers."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", "config/default.toml",
                                 "--port", str(port)], cwd=project, env=environment(), stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            get_json(f"http://127.0.0.1:{port}/healthz")
            return proc
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "run.py did not come up"
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_run_py_then_a_script_in_the_same_directory_share_one_redis(project: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = serve(project, port, project / "server.log")
    try:
        put_profile(base, "alice", {"from": "server"})
        redis = get_json(f"{base}/api/cache/status")["redis"]
        assert redis["owner"] == "self" and redis["runtime_dir"] == str(default_runtime_dir(project))
        assert redis["runtime_dir_kind"] == "default"

        peer = subprocess.run([sys.executable, str(SCRIPTS / "profile_peer.py"), "alice", "bob"], cwd=project,
                              env=environment(), capture_output=True, text=True, timeout=60)
        assert peer.returncode == 0, peer.stderr[-3000:]
        # The script read the server's profile from the server's Redis, which it adopted ...
        assert json.loads(peer.stdout.splitlines()[-1]) == {
            "seen": {"from": "server"}, "owner": "sibling", "pid": redis["pid"], "runtime_dir": redis["runtime_dir"]}
        # ... and the server reads what the script wrote; the script's exit stopped nothing.
        assert get_json(f"{base}/api/users/bob/profile")["profile"] == {"from": "script"}
        assert [p.pid for p in redis_servers_under(server.pid)] == [redis["pid"]]
        assert get_json(f"{base}/api/cache/status")["redis"]["pid"] == redis["pid"]
    finally:
        stop(server)
    assert pid_gone(redis["pid"]), "the server's Redis survived it"


def test_a_script_then_run_py_in_the_same_directory_share_one_redis(project: Path) -> None:
    peer = subprocess.Popen([sys.executable, str(SCRIPTS / "profile_peer.py"), "nobody-yet", "carol", "--hold"],
                            cwd=project, env=environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server = None
    try:
        first = json.loads(peer.stdout.readline())
        assert first["owner"] == "self" and first["seen"] is None
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = serve(project, port, project / "server.log")
        assert get_json(f"{base}/api/users/carol/profile")["profile"] == {"from": "script"}
        put_profile(base, "dave", {"from": "server"})
        redis = get_json(f"{base}/api/cache/status")["redis"]
        assert redis["owner"] == "sibling" and redis["pid"] == first["pid"]
        assert redis_servers_under(server.pid) == [], "run.py started a second server"
        assert [p.pid for p in redis_servers_under(peer.pid)] == [first["pid"]]
    finally:
        if server is not None:
            stop(server)
        peer.stdin.close()
        assert peer.wait(30) == 0
        peer.stdout.close()
    assert pid_gone(first["pid"])


async def test_default_runtime_dir_is_the_projects_created_0700_and_shared(make_config, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "p"
    project.mkdir()
    monkeypatch.chdir(project)
    config = make_config(DEFAULT)
    async with Runtime(config) as first, Runtime(config) as second:
        await first.cache.cache_profile("u", {"v": 1})
        assert await second.cache.get_profile("u") == {"v": 1}
        assert len(redis_children()) == 1 and second.status()["redis"]["owner"] == "sibling"
        rundir = first.on_demand.lifecycle.runtime_dir
        assert rundir == project / ".ondemand/redis"
        for path in (project / ".ondemand", rundir):  # both made by us, 0700
            st = os.lstat(path)
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        state = rundir / "state.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        # Every server has a password, even on the unix socket; it lives in 0600 files only.
        password = first.on_demand.lifecycle.endpoint.password
        assert password and password in state.read_text() and password in (rundir / "redis.conf").read_text()
        assert password not in json.dumps(first.status())
    # Closed: the server's files are gone, the directory (lock, activity, log) stays for the next start.
    assert sorted(p.name for p in rundir.iterdir()) == ["activity", "lock", "redis.log"]


async def test_private_runtime_dirs_give_every_process_its_own_server(make_config) -> None:
    async with Runtime(make_config()) as a, Runtime(make_config()) as b:
        await a.cache.cache_profile("u", {"from": "a"})
        assert await b.cache.get_profile("u") is None
        assert len(redis_children()) == 2
        dirs = [rt.on_demand.lifecycle.runtime_dir for rt in (a, b)]
        assert dirs[0] != dirs[1] and a.status()["redis"]["runtime_dir_kind"] == "private"
    assert not any(d.exists() for d in dirs)


async def test_a_project_path_too_long_for_a_socket_gets_a_short_per_user_directory(make_config, short_temp) -> None:
    project, temp = Path.cwd(), short_temp
    assert len(os.fsencode(project / ".ondemand/redis/redis.sock")) >= MAX_SOCKET_PATH
    config = make_config(DEFAULT)
    async with Runtime(config) as first, Runtime(config) as second:
        await first.cache.cache_profile("u", {"v": 1})
        assert await second.cache.get_profile("u") == {"v": 1}
        rundir = first.on_demand.lifecycle.runtime_dir
        per_user = temp / f"ondemand-{os.geteuid()}"
        assert rundir.parent == per_user and rundir == default_runtime_dir(project)
        assert stat.S_IMODE(per_user.stat().st_mode) == 0o700 and stat.S_IMODE(rundir.stat().st_mode) == 0o700
        assert len(redis_children()) == 1
    assert not (project / ".ondemand").exists()
    # Another project gets another directory under the same per-user parent.
    assert default_runtime_dir(project.parent).parent == per_user != default_runtime_dir(project)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
async def test_a_per_user_parent_someone_else_made_is_refused(make_config, short_temp) -> None:
    short_temp.chmod(0o1777)  # like /tmp: anyone may create ondemand-<our uid> before we do
    planted = short_temp / f"ondemand-{os.geteuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    async with Runtime(make_config(DEFAULT)) as rt:
        with pytest.raises(RuntimeDirError, match=rf"{planted} .*owned by nobody \(uid 65534\)"):
            await rt.on_demand.ensure()
        assert redis_children() == []
    assert list(planted.iterdir()) == [] and planted.stat().st_uid == 65534


def test_after_the_owner_is_sigkilled_the_next_process_starts_a_server_at_once(project: Path) -> None:
    """The owner dies: its server dies with it (PDEATHSIG), the sibling using it is told (pidfd), and the next
    process to start replaces the stale state.json and starts a server, with no error and no wait."""
    owner = subprocess.Popen([sys.executable, str(SCRIPTS / "profile_peer.py"), "x", "a", "--hold"], cwd=project,
                             env=environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs = [owner]
    try:
        first = json.loads(owner.stdout.readline())
        sibling = subprocess.Popen([sys.executable, str(SCRIPTS / "profile_peer.py"), "a", "b", "--hold"],
                                   cwd=project, env=environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        procs.append(sibling)
        second = json.loads(sibling.stdout.readline())
        assert second == {"seen": {"from": "script"}, "owner": "sibling", "pid": first["pid"],
                          "runtime_dir": first["runtime_dir"]}
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 2
        while pid_alive(first["pid"]):
            assert time.monotonic() < deadline, "the dead owner's server lives on"
            time.sleep(0.01)
        third = subprocess.run([sys.executable, str(SCRIPTS / "profile_peer.py"), "a", "c"], cwd=project,
                               env=environment(), capture_output=True, text=True, timeout=60)
        assert third.returncode == 0, third.stderr[-3000:]
        assert json.loads(third.stdout.splitlines()[-1])["owner"] == "self"  # stale state replaced, no error
    finally:
        for proc in procs:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait(30)
            proc.stdout.close()
