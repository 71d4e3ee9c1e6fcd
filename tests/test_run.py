"""run.py end to end: serve with config/default.toml, spawn on first use, clean shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from ondemand.host.net import free_port
from ondemand.plugins.lifecycle_subprocess import default_runtime_dir
from tests.support import ROOT, get_json, pid_gone


def test_run_py_serves_then_stops_everything_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--config", str(ROOT / "config/default.toml"), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status = get_json(f"{base}/api/cache/status")
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert status["redis"]["state"] == "stopped" and status["redis"]["pid"] is None
        # Starting the app spawns nothing: neither Redis nor the embedded PostgreSQL.
        assert status["storages"]["durable"]["pid"] is None
        assert psutil.Process(proc.pid).children(recursive=True) == []

        result = get_json(f"{base}/api/cache/test", timeout=30)
        assert result["ok"] is True and result["source"] == "redis"
        session = urllib.request.Request(
            f"{base}/api/cache/session/test", data=b'{"session_id": "e2e", "data": {"v": 1}}',
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(session, timeout=30) as resp:
            assert json.loads(resp.read())["ok"] is True

        status = get_json(f"{base}/api/cache/status")
        redis_pid = status["redis"]["pid"]
        runtime_dir = Path(status["redis"]["runtime_dir"])
        durable = status["storages"]["durable"]
        assert durable["state"] == "up" and durable["embedded"]
        pg_pid = durable["pid"]
        assert redis_pid and pg_pid and runtime_dir.exists()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert pid_gone(redis_pid), "redis-server survived the app's shutdown"
        assert pid_gone(pg_pid), "the embedded PostgreSQL survived the app's shutdown"
        # The default runtime directory is the project's (kept for the next start, like the data), its
        # server's files are gone.
        assert runtime_dir == default_runtime_dir(tmp_path) and runtime_dir.is_dir()
        assert sorted(p.name for p in runtime_dir.iterdir()) == ["activity", "lock", "redis.log"]
        assert (tmp_path / ".ondemand/pgdata/PG_VERSION").exists(), "PostgreSQL data is kept for the next start"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
