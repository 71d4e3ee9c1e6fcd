"""Starting and asking: a server that cannot start says why in one line and exits 2 (workers included: the
supervisor gives up and shows the worker's own error), and `status --config` finds the server a config
describes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondemand.cli import build_parser, format_status
from ondemand.cli import status as status_command
from ondemand.errors import StartupError
from ondemand.host import workers
from ondemand.host.net import free_port
from ondemand.host.workers import Supervisor
from tests.support import ROOT, get_json

TOKEN = "st4rtup-token"


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"} and not k.startswith("ONDEMAND_")}
    return {**env, "ONDEMAND_STORAGE__DURABLE": '""', **extra}


def run_py(*args: str, cwd: Path, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env or environment(),
                          capture_output=True, text=True, timeout=timeout)


def held_port() -> tuple[socket.socket, int]:
    """A port someone else listens on (without SO_REUSEPORT, as most servers)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def test_a_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    holder, port = held_port()
    with holder:
        result = run_py("--port", str(port), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"startup error: cannot listen on 127.0.0.1:{port}: Address already in use "
                     "(another process holds the port)"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_busy_port_with_workers_is_one_line_and_exit_2_before_any_worker(tmp_path: Path) -> None:
    holder, port = held_port()
    with holder:
        result = run_py("--port", str(port), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"startup error: cannot listen on 127.0.0.1:{port}: Address already in use (another process holds the port)"]


async def test_workers_that_cannot_start_stop_the_supervisor_with_their_own_error(make_config, monkeypatch,
                                                                                   capfd) -> None:
    """Real workers, that meet a port someone holds: the supervisor's own check of the port is skipped here,
    as if the port had been taken between that check and the workers' start. Each worker says why it could
    not start; after three failed starts in a row the supervisor stops, with that reason, instead of
    restarting workers forever."""
    monkeypatch.setattr(workers, "listening_sockets", lambda *args, **kwargs: [])
    holder, port = held_port()
    with holder:
        supervisor = Supervisor(make_config({"server": {"port": port, "workers": 2}}))
        with pytest.raises(StartupError) as failed:
            await asyncio.wait_for(supervisor.run(), 60)
    reason = f"cannot listen on 127.0.0.1:{port}: Address already in use (another process holds the port)"
    assert str(failed.value).startswith("worker ") and str(failed.value).endswith(f"could not start (3 attempts): "
                                                                                    f"{reason}")
    err = capfd.readouterr().err
    assert f"startup error: {reason}" in err and "Traceback" not in err  # each worker's own line
    assert all(w.returncode is not None for w in supervisor.workers.values())  # none left running


def test_status_reads_the_address_and_token_from_the_config(tmp_path: Path, capsys) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\nport = {port}\napi_token = "{TOKEN}"\n[storage]\ndurable = ""\n')
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", str(config)], cwd=tmp_path,
                            env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get_json(f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert status_command(build_parser().parse_args(["status", "--config", str(config)])) == 0
        out = capsys.readouterr().out
        assert out.startswith("service      ondemand") and "redis        subprocess: stopped" in out
        # Without the config: the default address, where nothing of ours listens (or not this one).
        assert status_command(build_parser().parse_args(["status", "--url", f"http://127.0.0.1:{port}"])) == 1
        assert "HTTP 401" in capsys.readouterr().err
    finally:
        proc.terminate()
        proc.wait(30)


def test_status_prints_every_line_of_an_error() -> None:
    doc = {
        "uptime_seconds": 3.0, "plugins": ["x"],
        "redis": {"lifecycle": "subprocess", "state": "failed", "server_version": "Valkey 8.1.8",
                  "last_error": "redis-server exited; last lines of /r/redis.log:\n*** FATAL CONFIG FILE ERROR ***\n"
                                ">>> 'bogus \"1\"'\nBad directive or wrong number of arguments"},
        "storages": {"durable": {"name": "postgres", "state": "down", "server_version": "PostgreSQL 16.4",
                                 "last_error": "cannot connect\nDETAIL: refused"}},
        "dispatcher": {"breaker": {"state": "open", "opens": 1, "last_reason": "first\nsecond"}, "namespaces": {}},
    }
    text = format_status(doc)
    assert "Bad directive or wrong number of arguments" in text and "FATAL CONFIG FILE ERROR" in text
    assert "version      Valkey 8.1.8" in text and "PostgreSQL 16.4" in text
    assert "DETAIL: refused" in text and "second" in text
