"""Real process faults: kill -9, racing processes, addresses taken, fork, shutdown under way."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from ondemand import Runtime
from ondemand.errors import OndemandError, PostgresUnavailable, SpawnError
from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_subprocess import default_runtime_dir
from tests.support import ROOT, get_json, pid_gone, redis_children, wait_for

SCRIPTS = ROOT / "tests/scripts"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_repeated_sigkill_under_load_is_bounded_and_leaks_no_fds(durable_config) -> None:
    # A fixed-size PostgreSQL pool: growth of a pool under load is not a leak, and must not look like one.
    config = durable_config({"lifecycle": {"restart_backoff": 0.05}, "redis": {"op_timeout": 0.1},
                             "postgres": {"pool_min": 4, "pool_max": 4}})
    async with Runtime(config) as rt:
        await rt.cache.cache_session("warm", {"v": 0})
        await rt.cache.cache_profile("warm", {"v": 0})
        fds_before = 0
        slowest = 0.0
        for cycle in range(4):
            if cycle == 1:  # after one cycle the pools have their working size; from here, no growth
                await asyncio.sleep(0.2)
                fds_before = open_fds()
            failures: list[BaseException] = []

            async def worker(n: int, cycle: int = cycle, failures: list = failures) -> None:
                nonlocal slowest
                for i in range(25):
                    t0 = time.monotonic()
                    try:
                        await rt.cache.cache_session(f"s{n}", {"c": cycle, "i": i})
                        await rt.cache.get_session(f"s{n}")
                        await rt.cache.cache_profile(f"p{n}", {"i": i})
                        await rt.cache.get_profile(f"p{n}")
                    except OndemandError as exc:  # typed errors are allowed; anything else is a bug
                        failures.append(exc)
                    slowest = max(slowest, time.monotonic() - t0)

            async def kill() -> None:
                await asyncio.sleep(0.05)
                os.kill(rt.on_demand.lifecycle.pid(), signal.SIGKILL)

            await asyncio.gather(kill(), *(worker(n) for n in range(20)))
            assert failures == [], failures[:3]
            await wait_for(lambda: rt.dispatcher.breaker.closed and rt.on_demand.state == "running", timeout=5)
        assert slowest < 1.0, f"an operation took {slowest:.3f} s"
        assert rt.on_demand.counters.unexpected_exits == 4
        assert await rt.cache.get_session("s0") == {"c": 3, "i": 24}
        await asyncio.sleep(0.2)
        assert open_fds() <= fds_before + 1, (fds_before, open_fds())


def test_app_sigkilled_child_gone_and_next_start_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONDEMAND_LIFECYCLE__RUNTIME_DIR": json.dumps(str(run_dir))}
    parent = subprocess.Popen([sys.executable, str(SCRIPTS / "parent_holds_redis.py")],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        redis_pid = int(parent.stdout.readline().split()[0])
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 1.0
        while not pid_gone(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid_gone(redis_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
    # Stale state, pidfile and socket are left behind; the next start must clean them and work.
    assert (run_dir / "state.json").exists() and (run_dir / "redis.sock").exists()
    overrides = {"storage": {"durable": ""}, "lifecycle": {"runtime_dir": str(run_dir)}}
    proc = subprocess.run(
        [sys.executable, "-c",
         "import asyncio\n"
         "from ondemand import Runtime, load_config\n"
         "async def main():\n"
         f"    c = load_config(None, overrides={overrides!r}, environ={{}})\n"
         "    async with Runtime(c) as rt:\n"
         "        await rt.cache.cache_profile('x', {'ok': 1})\n"
         "        assert await rt.cache.get_profile('x') == {'ok': 1}\n"
         "asyncio.run(main())\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (run_dir / "state.json").exists() and not (run_dir / "redis.sock").exists()


@pytest.mark.parametrize("runtime_dir", ["configured", "default"])
def test_several_processes_racing_first_use_start_exactly_one_server(tmp_path: Path, runtime_dir: str) -> None:
    # "default": no lifecycle.runtime_dir at all, four processes started in one project directory.
    run_dir, go = tmp_path / "run", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "ONDEMAND_LIFECYCLE__RUNTIME_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    if runtime_dir == "configured":
        env["ONDEMAND_LIFECYCLE__RUNTIME_DIR"] = json.dumps(str(run_dir))
    else:
        run_dir = default_runtime_dir(tmp_path)
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "race_first_use.py"), str(go)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for _ in range(4)]
    try:
        time.sleep(1.5)  # let every process import and build its Runtime
        go.touch()
        pids = {int(p.stdout.readline()) for p in procs}
        assert len(pids) == 1, f"processes used different servers: {pids}"
        servers = [c for p in procs for c in psutil.Process(p.pid).children()
                   if c.name() in {"redis-server", "valkey-server"}]
        assert [s.pid for s in servers] == list(pids), "exactly one redis-server among all processes"
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            assert p.wait(30) == 0
            p.stdout.close()
    assert all(pid_gone(pid) for pid in pids), "none orphaned"
    assert not (run_dir / "state.json").exists() and not (run_dir / "redis.sock").exists()
    if not run_dir.is_relative_to(tmp_path):  # the per-user directory of a long project path
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_foreign_listener_on_the_tcp_port_is_noticed_at_once(make_config) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = make_config({"lifecycle": {"tcp": True, "tcp_port": port, "startup_timeout": 5.0}})
        async with Runtime(config) as rt:
            t0 = time.monotonic()
            with pytest.raises(SpawnError) as info:
                await rt.on_demand.ensure()
            assert time.monotonic() - t0 < 2.0, "the early exit was waited out, not noticed"
            assert "exited" in str(info.value) and "Address already in use" in str(info.value)


async def test_live_foreign_server_at_the_socket_path_is_never_used(make_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = make_config({"lifecycle": {"runtime_dir": str(run_dir)}})
    async with Runtime(config) as foreign:
        await foreign.cache.cache_profile("secret", {"foreign": True})
        foreign_pid = foreign.on_demand.lifecycle.pid()
        (run_dir / "state.json").unlink()  # nothing says this server is one we may use
        async with Runtime(config) as rt:
            assert await rt.cache.get_profile("secret") is None, "we talked to a server we did not start"
            assert rt.on_demand.lifecycle.pid() not in {None, foreign_pid}
            assert not pid_gone(foreign_pid), "the foreign server was signalled"


async def test_socket_path_under_a_deep_tmpdir_is_refused_before_spawning(make_config, monkeypatch) -> None:
    deep = Path(tempfile.mkdtemp(prefix="ondemand-deep-")) / ("x" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    try:
        async with Runtime(make_config()) as rt:
            with pytest.raises(SpawnError, match="bytes; the limit is"):
                await rt.on_demand.ensure()
            assert redis_children() == []
    finally:
        monkeypatch.undo()
        import shutil

        shutil.rmtree(deep.parent, ignore_errors=True)


async def test_postgres_that_cannot_initialize_gives_bounded_errors(make_config, tmp_path: Path) -> None:
    not_a_cluster = tmp_path / "pgdata"
    not_a_cluster.mkdir()
    (not_a_cluster / "somebody-elses-file").write_text("x")
    config = make_config({"storage": {"durable": "postgres"},
                          "postgres": {"dsn": "embedded", "data_dir": str(not_a_cluster), "startup_timeout": 5}})
    async with Runtime(config) as rt:
        t0 = time.monotonic()
        with pytest.raises(PostgresUnavailable) as info:
            await rt.cache.cache_session("s", {"v": 1})
        assert time.monotonic() - t0 < 6
        assert str(not_a_cluster) in str(info.value)
        await rt.cache.cache_profile("p", {"v": 1})  # the cache still serves
        assert await rt.cache.get_profile("p") == {"v": 1}
        assert rt.status()["storages"]["durable"]["state"] != "up"


async def test_fork_after_first_use_neither_reuses_connections_nor_stops_the_server(runtime: Runtime) -> None:
    await runtime.cache.cache_profile("p", {"v": 1})
    server_pid = runtime.on_demand.lifecycle.pid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the forked child: use the copied runtime naively, then close it
        code = 1
        try:
            asyncio.events._set_running_loop(None)  # what asyncio itself does at fork from 3.12 on

            async def use_copy() -> list:
                value = await runtime.cache.get_profile("p")
                own = runtime.on_demand.lifecycle.pid()
                await runtime.close()
                return [value, own]

            os.write(write_end, json.dumps(asyncio.run(use_copy())).encode())
            code = 0
        except BaseException as exc:
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(child, 0)  # noqa: ASYNC222 - the forked child is a plain process
    output = os.read(read_end, 65536).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0, output
    value, child_server = json.loads(output)
    assert value is None, "the child read through the parent's server"
    assert child_server not in {None, server_pid} and pid_gone(child_server)
    assert not pid_gone(server_pid), "the child stopped the parent's server"
    assert await runtime.cache.get_profile("p") == {"v": 1}, "the parent's connections still work"


def test_sigterm_during_spawn_and_load_cleans_up_and_second_signal_forces_exit(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    env["ONDEMAND_STORAGE__DURABLE"] = '""'
    env["ONDEMAND_LIFECYCLE__RUNTIME_DIR"] = json.dumps(str(tmp_path / "run"))

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                get_json(f"{base}/healthz")
                return proc
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    # 1. SIGTERM while the first requests are starting Redis: exit 0, nothing left behind.
    proc = start()
    loaders = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", f"{base}/api/cache/test"]) for _ in range(20)]
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    for loader in loaders:
        loader.wait(15)
    assert not (tmp_path / "run/redis.sock").exists() and not (tmp_path / "run/state.json").exists()
    assert not [p for p in psutil.Process().children(recursive=True) if p.name() in {"redis-server", "valkey-server"}]

    # 2. A shutdown that hangs (its Redis frozen) ends at once on a second signal; Redis dies with it.
    proc = start()
    get_json(f"{base}/api/cache/test", timeout=30)
    redis_pid = get_json(f"{base}/api/cache/status")["redis"]["pid"]
    os.kill(redis_pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None, "shutdown should still be waiting for the frozen Redis"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(5)
    assert time.monotonic() - t0 < 2.0
    deadline = time.monotonic() + 2
    while not pid_gone(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid_gone(redis_pid)
