"""The on-demand Redis lifecycle against a real redis-server/valkey-server child."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondemand import Runtime
from ondemand.errors import RedisUnavailable, SpawnError
from tests.support import ROOT, pid_gone, redis_children, wait_for


async def test_runtime_start_spawns_nothing(runtime: Runtime) -> None:
    assert runtime.on_demand.state == "stopped"
    assert redis_children() == []
    assert runtime.status()["redis"]["pid"] is None


async def test_hundred_concurrent_first_calls_start_exactly_one_server(runtime: Runtime) -> None:
    results = await asyncio.gather(*(runtime.cache.get_profile(f"user-{i}") for i in range(100)))
    assert results == [None] * 100
    assert runtime.on_demand.counters.spawns == 1
    children = redis_children()
    assert len(children) == 1
    assert children[0].pid == runtime.on_demand.lifecycle.pid()


async def test_values_round_trip_and_keys_are_namespaced(runtime: Runtime) -> None:
    await runtime.cache.cache_session("s1", {"user": 1}, ttl=60)
    await runtime.cache.cache_messages("u1", [{"text": "hi"}])
    await runtime.cache.cache_profile("u1", {"name": "Ada"})
    assert await runtime.cache.get_session("s1") == {"user": 1}
    assert await runtime.cache.get_messages("u1") == [{"text": "hi"}]
    assert await runtime.cache.get_profile("u1") == {"name": "Ada"}
    keys = await runtime.on_demand.with_connection(lambda r: r.keys("*"))
    assert sorted(keys) == [b"ondemand:messages:u1", b"ondemand:profile:u1", b"ondemand:session:s1"]
    ttl = await runtime.on_demand.with_connection(lambda r: r.ttl("ondemand:session:s1"))
    assert 55 <= ttl <= 60
    assert await runtime.cache.delete_session("s1") is True
    assert await runtime.cache.get_session("s1") is None


async def test_warmup_is_one_round_trip(runtime: Runtime) -> None:
    await runtime.cache.get_profile("prime")  # start the server and open the default pool
    pool = runtime.on_demand.pools["default"]
    batches_before = pool.mux.batches_written
    written = await runtime.cache.warmup_user_cache(
        "u9", session={"s": 1}, messages=[{"m": 1}], profile={"p": 1}
    )
    assert written == ["session", "messages", "profile"]
    session_pool = runtime.on_demand.pools["session"]
    # messages and profile share the default pool: one batch there; the session pool has its own.
    assert pool.mux.batches_written == batches_before + 1
    assert session_pool.mux.batches_written == 1
    assert await runtime.cache.get_messages("u9") == [{"m": 1}]


async def test_with_connection_returns_result_and_releases(runtime: Runtime) -> None:
    await runtime.cache.cache_profile("a", {"v": 1})
    size = await runtime.on_demand.with_connection(lambda r: r.dbsize(), connection_id="session", keep_alive=30)
    assert size == 1
    assert runtime.on_demand.pools["session"].leases == 0


async def test_cancelled_with_connection_leaves_no_dirty_connection(runtime: Runtime) -> None:
    async def blocked(r):
        await r.execute_command("BLPOP", "never", 5)  # would block for 5 s

    task = asyncio.ensure_future(runtime.on_demand.with_connection(blocked, connection_id="c1"))
    await asyncio.sleep(0.1)  # mid-command: before redis.op_timeout (0.25 s) would end it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runtime.on_demand.pools["c1"].leases == 0
    # The pool hands out a clean connection: a PING gets PONG, not BLPOP's late reply.
    assert await runtime.on_demand.with_connection(lambda r: r.ping(), connection_id="c1") is True


async def test_idle_shutdown_then_transparent_restart(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"idle_timeout": 0.3}})) as rt:
        await rt.cache.cache_profile("u1", {"v": 1})
        first_pid = rt.on_demand.lifecycle.pid()
        runtime_dir = rt.on_demand.lifecycle.runtime_dir
        await wait_for(lambda: rt.on_demand.state == "stopped", timeout=3)
        assert rt.on_demand.counters.idle_stops == 1
        assert pid_gone(first_pid)
        assert not runtime_dir.exists(), "the temp runtime dir is removed with the server"
        # A spawned Redis is a cache: after the stop the value is gone, and the next call restarts it.
        assert await rt.cache.get_profile("u1") is None
        assert rt.on_demand.state == "running"
        assert rt.on_demand.lifecycle.pid() != first_pid
        assert rt.on_demand.counters.spawns == 2


async def test_operations_racing_the_idle_stop_all_succeed(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"idle_timeout": 0.05}})) as rt:
        for round_no in range(16):
            # Hover around the idle boundary (0.05 s, janitor tick 0.02 s): some rounds start just
            # before the stop, some while it runs, some after it.
            await asyncio.sleep(0.03 + (round_no % 8) * 0.01)
            await asyncio.gather(*(rt.cache.cache_profile(f"u{i}", {"r": round_no}) for i in range(20)))
            values = await asyncio.gather(*(rt.cache.get_profile(f"u{i}") for i in range(20)))
            assert values == [{"r": round_no}] * 20
        assert rt.on_demand.counters.idle_stops >= 1


async def test_keep_alive_closes_an_idle_pool(runtime: Runtime) -> None:
    await runtime.on_demand.with_connection(lambda r: r.ping(), connection_id="short", keep_alive=0.2)
    pool = runtime.on_demand.pools["short"]
    assert pool.is_open
    await wait_for(lambda: not pool.is_open, timeout=2)
    assert pool.idle_closes == 1
    assert runtime.on_demand.state == "running", "closing a pool does not stop the server"
    assert await runtime.on_demand.with_connection(lambda r: r.ping(), connection_id="short") is True
    assert pool.opens == 2


async def test_missing_binary_gives_one_clear_error(make_config) -> None:
    config = make_config({"lifecycle": {"redis_binary": "/nonexistent/redis-server"}})
    async with Runtime(config) as rt:
        with pytest.raises(SpawnError) as info:
            await rt.on_demand.with_connection(lambda r: r.ping())
        message = str(info.value)
        assert "/nonexistent/redis-server" in message and "not found" in message
        assert "lifecycle.redis_binary" in message
        # Cache-only reads degrade to misses; status carries the error.
        assert await rt.cache.get_profile("u1") is None
        status = rt.status()["redis"]
        assert status["state"] == "failed" and "not found" in status["last_error"]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("#!/bin/sh\necho 'Redis server v=6.0.9 sha=0 malloc=libc bits=64'\n", "older than the 6.2"),
        ("#!/bin/sh\necho 'hello, I am not redis'\n", "not a Redis or Valkey server"),
    ],
)
async def test_wrong_or_old_binary_is_refused(make_config, tmp_path: Path, script: str, expected: str) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text(script)
    fake.chmod(0o755)
    async with Runtime(make_config({"lifecycle": {"redis_binary": str(fake)}})) as rt:
        with pytest.raises(SpawnError, match=expected):
            await rt.on_demand.ensure()


async def test_not_executable_binary_is_refused(make_config, tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o644)
    async with Runtime(make_config({"lifecycle": {"redis_binary": str(fake)}})) as rt:
        with pytest.raises(SpawnError, match="not executable"):
            await rt.on_demand.ensure()


async def test_failed_start_backs_off_instead_of_respawning(make_config) -> None:
    config = make_config({"lifecycle": {"redis_binary": "/nonexistent/redis-server", "restart_backoff": 0.5}})
    async with Runtime(config) as rt:
        for _ in range(20):
            with pytest.raises(RedisUnavailable):
                await rt.on_demand.ensure()
        assert rt.on_demand.counters.start_failures == 1, "retries inside the backoff window fail fast"


async def test_invalid_redis_option_reports_the_log_tail(make_config) -> None:
    config = make_config({"lifecycle": {"redis_options": {"maxmemory-policy": "not-a-policy"}}})
    async with Runtime(config) as rt:
        with pytest.raises(SpawnError) as info:
            await rt.on_demand.ensure()
        assert "maxmemory-policy" in str(info.value) or "not-a-policy" in str(info.value)


async def test_runtime_dir_and_socket_are_private(make_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    async with Runtime(make_config({"lifecycle": {"runtime_dir": str(run_dir)}})) as rt:
        await rt.on_demand.ensure()
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        sock = run_dir / "redis.sock"
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
    assert not sock.exists()


async def test_socket_path_over_the_limit_is_refused_before_spawning(make_config, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    async with Runtime(make_config({"lifecycle": {"runtime_dir": str(deep)}})) as rt:
        with pytest.raises(SpawnError, match="the limit is"):
            await rt.on_demand.ensure()
        assert rt.on_demand.counters.ready == 0
        assert redis_children() == []


async def test_tcp_mode_binds_loopback_with_a_password(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as rt:
        endpoint = await rt.on_demand.ensure()
        assert endpoint.host == "127.0.0.1" and endpoint.password
        assert endpoint.password not in str(rt.status())
        await rt.cache.cache_profile("u", {"ok": True})
        assert await rt.cache.get_profile("u") == {"ok": True}
        # Without the password the server refuses us.
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        assert (await reader.readline()).startswith(b"-NOAUTH")
        writer.close()


async def test_killed_server_is_restarted_on_next_use(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"restart_backoff": 0.05}})) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        pid = rt.on_demand.lifecycle.pid()
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: rt.on_demand.state == "failed", timeout=2)
        await asyncio.sleep(0.1)
        assert await rt.cache.get_profile("u") is None  # the new server is empty
        assert rt.on_demand.state == "running" and rt.on_demand.lifecycle.pid() != pid
        assert rt.on_demand.counters.unexpected_exits == 1


def test_child_dies_within_one_second_of_parent_sigkill(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/scripts/parent_holds_redis.py")],
        stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        line = parent.stdout.readline().split()
        redis_pid = int(line[0])
        assert not pid_gone(redis_pid)
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 1.0
        while not pid_gone(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid_gone(redis_pid), "redis-server outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        if len(line) > 1:
            subprocess.run(["rm", "-rf", line[1]], check=False)


async def test_docker_env_chooses_external_redis(make_config, tmp_path: Path) -> None:
    # The "Docker" Redis is one our own subprocess lifecycle serves over TCP, started by this test.
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as server_rt:
        endpoint = await server_rt.on_demand.ensure()
        url = f"redis://:{endpoint.password}@127.0.0.1:{endpoint.port}/0"
        config = make_config(environ={"DOCKER_ENV": "1", "REDIS_URL": url})
        async with Runtime(config) as rt:
            children_before = {p.pid for p in redis_children()}
            await rt.cache.cache_profile("docker", {"ok": 1})
            assert await rt.cache.get_profile("docker") == {"ok": 1}
            status = rt.status()["redis"]
            assert status["lifecycle"] == "external" and status["pid"] is None
            assert endpoint.password not in str(status)
            assert {p.pid for p in redis_children()} == children_before, "external spawns nothing"
        # The value is in the server the test started.
        assert await server_rt.on_demand.with_connection(lambda r: r.exists("ondemand:profile:docker")) == 1


async def test_skip_in_docker_false_keeps_subprocess(make_config) -> None:
    config = make_config({"lifecycle": {"skip_in_docker": False}}, environ={"DOCKER_ENV": "1"})
    async with Runtime(config) as rt:
        assert rt.lifecycle.name == "subprocess"


async def test_noop_lifecycle_misses_and_drops(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"plugin": "noop"}})) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        assert await rt.cache.get_profile("u") is None
        status = rt.status()
        assert status["redis"]["state"] == "disabled"
        assert "noop" in status["redis"]["note"]
        assert redis_children() == []


async def test_stale_files_in_runtime_dir_are_cleaned_and_unrelated_pid_never_signalled(make_config, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    # A previous run was SIGKILLed: its socket file is left, and its pidfile now names a PID that
    # belongs to an unrelated live process.
    bystander = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
    try:
        (run_dir / "redis.pid").write_text(f"{bystander.pid}\n")
        (run_dir / "redis.sock").write_text("stale")
        async with Runtime(make_config({"lifecycle": {"runtime_dir": str(run_dir)}})) as rt:
            await rt.cache.cache_profile("u", {"v": 1})
            assert await rt.cache.get_profile("u") == {"v": 1}
            assert int((run_dir / "redis.pid").read_text()) == rt.on_demand.lifecycle.pid()
        assert bystander.returncode is None, "an unrelated process was signalled"
    finally:
        bystander.kill()
        await bystander.wait()
