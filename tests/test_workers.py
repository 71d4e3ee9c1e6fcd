"""Several worker processes on one host share one on-demand Redis; a dead worker costs one respawn."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_subprocess import default_runtime_dir
from tests.support import ROOT, pid_gone, redis_children, redis_servers_under, wait_until_serving


async def test_four_workers_share_one_redis_and_survive_the_owner_dying(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    env["ONDEMAND_STORAGE__DURABLE"] = '""'  # Redis only: this test is about the shared Redis
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "--port", str(port), "--workers", "4"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_serving(session, base, proc, log_path)
            workers = psutil.Process(proc.pid).children()
            assert len(workers) == 4

            async def session_round_trip(i: int) -> dict:
                body = {"session_id": f"s{i}", "data": {"i": i}}
                async with session.post(f"{base}/api/cache/session/test", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    return await resp.json()

            results = await asyncio.gather(*(session_round_trip(i) for i in range(200)))
            assert all(r["ok"] and r["session"] == {"i": r["session"]["i"]} for r in results)
            servers = redis_servers_under(proc.pid)
            assert len(servers) == 1, [s.pid for s in servers]
            async with session.get(f"{base}/api/cache/status") as resp:
                # Shared through the project's default runtime directory, as any process started here would.
                assert (await resp.json())["redis"]["runtime_dir"] == str(default_runtime_dir(tmp_path))

            # Kill the worker that started Redis: its server dies with it (PDEATHSIG), the others go on.
            owner = servers[0].parent()
            owner.kill()
            deadline = time.monotonic() + 10
            ok_after = 0
            while ok_after < 50:
                assert time.monotonic() < deadline, "service did not recover after the owner died"
                results = await asyncio.gather(*(session_round_trip(i) for i in range(10)), return_exceptions=True)
                ok_after += sum(1 for r in results if isinstance(r, dict) and r["ok"])
            assert pid_gone(servers[0].pid)
            # The supervisor restarts the dead worker (after its restart delay, and an import that
            # takes a while on a loaded machine); at no moment is there more than one server.
            deadline = time.monotonic() + 15
            while True:
                respawned = redis_servers_under(proc.pid)
                assert len(respawned) <= 1, "two servers at once"
                if len(respawned) == 1 and len(psutil.Process(proc.pid).children()) == 4:
                    break
                assert time.monotonic() < deadline, "the dead worker was not restarted"
                await asyncio.sleep(0.1)
            # Any worker may answer; the respawned one has not needed Redis yet ("stopped" until its first
            # cache request adopts the shared server), the others run on it. None is failing.
            states = set()
            for _ in range(20):
                async with session.get(f"{base}/api/cache/status") as resp:
                    states.add((await resp.json())["redis"]["state"])
            assert "running" in states and states <= {"running", "stopped"}, states
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()[-2000:]
        assert pid_gone(respawned[0].pid), "redis-server survived the shutdown"
        assert all(pid_gone(w.pid) for w in workers), "a worker survived the shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_shared_runtime_dir_one_server_shared_idle_and_adoption(make_config, tmp_path: Path) -> None:
    """Two runtimes sharing a runtime dir behave like two workers: one server, adopted by the other;
    the owner does not stop it while the other is busy; when it stops, the other notices at once."""
    from ondemand import Runtime

    config = make_config({"lifecycle": {"runtime_dir": str(tmp_path / "run"), "idle_timeout": 0.5}})
    async with Runtime(config) as owner, Runtime(config) as sibling:
        await owner.cache.cache_profile("p", {"from": "owner"})
        assert await sibling.cache.get_profile("p") == {"from": "owner"}
        assert len(redis_children()) == 1
        assert sibling.status()["redis"]["owner"] == "sibling"
        server_pid = owner.on_demand.lifecycle.pid()
        assert sibling.on_demand.lifecycle.pid() == server_pid

        # Only the sibling is busy, for three idle periods: the owner must keep the server.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert await sibling.cache.get_profile("p") == {"from": "owner"}
            await asyncio.sleep(0.05)
        assert owner.on_demand.state == "running" and owner.on_demand.counters.idle_stops == 0

        # Everyone idle: the owner stops it, the sibling learns through the pidfd, no failure.
        deadline = time.monotonic() + 5
        while sibling.on_demand.state == "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert pid_gone(server_pid)
        assert sibling.on_demand.state == "stopped" and sibling.on_demand.counters.unexpected_exits == 0
        # The next operation starts a server again; exactly one.
        await sibling.cache.cache_profile("q", {"v": 1})
        assert await owner.cache.get_profile("q") == {"v": 1}
        assert len(redis_children()) == 1


async def test_workers_with_a_private_runtime_dir_still_share_one_server(tmp_path: Path) -> None:
    """lifecycle.runtime_dir = "private": private to this run of run.py, shared by its workers (the supervisor
    makes one directory for them); nothing lands in the project directory, and it is removed at the end."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    env |= {"ONDEMAND_STORAGE__DURABLE": '""', "ONDEMAND_LIFECYCLE__RUNTIME_DIR": '"private"'}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--port", str(port), "--workers", "2"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # A new connection per request: the kernel spreads them over both workers, so a worker with a
        # server of its own would miss what the other wrote.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await wait_until_serving(session, base, proc, log_path)
            for i in range(40):
                async with session.put(f"{base}/api/users/u{i}/profile", json={"i": i}) as resp:
                    assert resp.status == 200
            for i in range(40):
                async with session.get(f"{base}/api/users/u{i}/profile") as resp:
                    assert (await resp.json())["profile"] == {"i": i}
            assert len(redis_servers_under(proc.pid)) == 1
            async with session.get(f"{base}/api/cache/status") as resp:
                runtime_dir = Path((await resp.json())["redis"]["runtime_dir"])
        assert runtime_dir.name.startswith("ondemand-") and not (tmp_path / ".ondemand").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()[-2000:]
        assert not runtime_dir.exists(), "the run's private directory was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
