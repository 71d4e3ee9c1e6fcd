"""Benchmark 7: invalidation delay. Two app processes (two "hosts") share one Redis and one PostgreSQL;
host A's route to Redis is cut (a TCP proxy between them, `tests/tcp_proxy.py`). A overwrites or deletes
a session that host B serves from Redis; B is polled until it serves the new state. The delay is
measured from A's acknowledgement to the end of B's first fresh read (an upper bound: B stopped serving
the old value somewhere between the start of its last stale read and then).

    python bench/bench_invalidation.py [--quick]        (or: python bench/run.py --only invalidation)

Everything runs as in the Docker deployment: `run.py --config config/docker.toml` with DOCKER_ENV,
REDIS_URL and DATABASE_URL, the Redis one our subprocess lifecycle runs on TCP, the PostgreSQL an
embedded one (pgserver's binaries) in a temp dir. `TwoHosts` is shared with `bench/soak.py --two-process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import Result, Table, Target, bench_config, percentile

from ondemand import Runtime
from ondemand.host.process import ChildProcess, log_tail
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from ondemand.redis.endpoint import RedisEndpoint
from tests.support import start_app
from tests.tcp_proxy import ProxyProcess

BOUND_MS = 100.0  # the target: p99 of the delay
GIVE_UP = 3.0  # seconds B is polled before a round counts as "never invalidated"
MODES = ("refuse", "blackhole")


def temp_base() -> str:
    """tmpfs when roomy (initdb and commits are faster there), else the temp dir."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage("/dev/shm").free > 1 << 30:
            return "/dev/shm"
    return tempfile.gettempdir()


class Host:
    """One app process: `run.py --config config/docker.toml`, as compose runs it."""

    def __init__(self, name: str, child: ChildProcess, port: int) -> None:
        self.name, self.child, self.port = name, child, port
        self.url = f"http://127.0.0.1:{port}"

    def log(self, lines: int = 20) -> str:
        return f"log of {self.name} ({self.child.log_path}):\n{log_tail(self.child.log_path, lines)}"


class TwoHosts:
    """An embedded PostgreSQL, one Redis on TCP, a proxy process in front of it and two app processes:
    A reaches Redis through the proxy, B directly. Everything started here is stopped here, by PID, and
    dies with us (PDEATHSIG) even if we are SIGKILLed."""

    def __init__(self, base: Path, *, log_level: str = "WARNING", env: dict[str, str] | None = None) -> None:
        self.base = base
        self.log_level = log_level
        self.extra_env = env or {}
        self.pg = EmbeddedPostgres(base / "pgdata", startup_timeout=60.0, stop_timeout=10.0)
        self._stack = contextlib.AsyncExitStack()
        self.redis: Runtime | None = None
        self.endpoint: RedisEndpoint | None = None
        self.proxy: ProxyProcess | None = None
        self.hosts: list[Host] = []
        self.exit_codes: dict[str, int | None] = {}
        self.figures: dict[str, Any] = {}

    @property
    def a(self) -> Host:
        return self.hosts[0]

    @property
    def b(self) -> Host:
        return self.hosts[1]

    async def __aenter__(self) -> TwoHosts:
        try:
            t0 = time.monotonic()
            await self.pg.start()
            self._stack.push_async_callback(self.pg.stop)
            self.figures["postgres start (incl. initdb)"] = f"{time.monotonic() - t0:.2f} s"
            self.redis = await self._stack.enter_async_context(
                Runtime(bench_config("tcp", lifecycle={"idle_timeout": 3600})))
            self.endpoint = await self.redis.on_demand.ensure()
            self.proxy = await ProxyProcess.start("127.0.0.1", self.endpoint.port or 0, max_connections=256)
            self._stack.push_async_callback(self.proxy.close)
            self._stack.push_async_callback(self._stop_hosts)
            for name, port in (("A", self.proxy.port), ("B", self.endpoint.port)):
                self.hosts.append(await self._start_host(name, port))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def redis_url(self, port: int | None) -> str:
        assert self.endpoint is not None
        return f"redis://:{self.endpoint.password}@127.0.0.1:{port}/0"

    async def _start_host(self, name: str, redis_port: int | None) -> Host:
        app = await start_app(name, self.base / name.lower(), self.redis_url(redis_port), self.pg.dsn, self.extra_env,
                              args=["--log-level", self.log_level])
        return Host(name, app.child, int(app.base.rsplit(":", 1)[1]))

    async def _stop_hosts(self) -> None:
        for host in self.hosts:
            self.exit_codes[host.name] = await host.child.stop(grace=15)

    def pids(self) -> list[int]:
        """Every process started here that is still ours to check: apps, proxy, Redis, postmaster."""
        pids = [h.child.pid for h in self.hosts]
        if self.proxy is not None:
            pids.append(self.proxy.pid)
        if self.redis is not None and self.redis.on_demand.lifecycle.pid():
            pids.append(self.redis.on_demand.lifecycle.pid())  # type: ignore[arg-type]
        if self.pg.pid:
            pids.append(self.pg.pid)
        return pids


class Client:
    """HTTP to the two hosts, with the session calls the benchmark and the soak need."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def call(self, host: Host, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, host.url + path, json=body) as resp:
            data = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, data

    async def expect(self, host: Host, method: str, path: str, status: int, body: Any = None) -> Any:
        got, data = await self.call(host, method, path, body)
        if got != status:
            raise RuntimeError(f"{method} {path} on {host.name}: {got} {data}, expected {status}\n{host.log()}")
        return data

    async def breaker(self, host: Host) -> str:
        return (await self.expect(host, "GET", "/api/cache/status", 200))["dispatcher"]["breaker"]["state"]

    async def wait_breaker_closed(self, host: Host, timeout: float = 20.0) -> float:
        t0 = time.monotonic()
        while (state := await self.breaker(host)) != "closed":
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{host.name}'s breaker is still {state} {timeout:g} s after the restore")
            await asyncio.sleep(0.02)
        return time.monotonic() - t0


async def one_round(client: Client, hosts: TwoHosts, key: str, kind: str) -> tuple[float, int]:
    """B serves `key` from Redis; A overwrites or deletes it. Returns (delay in s, B's stale reads);
    the delay is inf when B still served the old state GIVE_UP seconds later."""
    a, b = hosts.a, hosts.b
    old, new = {"key": key, "v": "old"}, {"key": key, "v": "new"}
    await client.expect(b, "PUT", f"/api/sessions/{key}", 200, old)
    served = await client.expect(b, "GET", f"/api/sessions/{key}", 200)
    if (served["value"], served["source"]) != (old, "redis"):
        raise RuntimeError(f"B should serve the old value from Redis before the round, got {served}")
    if kind == "write":
        await client.expect(a, "PUT", f"/api/sessions/{key}", 200, new)
    else:
        await client.expect(a, "DELETE", f"/api/sessions/{key}", 204)
    acked = time.perf_counter()
    stale = 0
    while True:
        status, data = await client.call(b, "GET", f"/api/sessions/{key}")
        end = time.perf_counter()
        fresh = status == 404 if kind == "delete" else status == 200 and data["value"] == new
        if fresh:
            return end - acked, stale
        if status not in (200, 404) or (status == 200 and data["value"] != old) or (status == 404 and kind == "write"):
            raise RuntimeError(f"B read {key} as {status} {data}: neither the old nor the new state\n{b.log()}")
        stale += 1
        if end - acked > GIVE_UP:
            return float("inf"), stale
        await asyncio.sleep(0.001)


def summary(delays: list[float]) -> dict[str, Any]:
    ordered = sorted(delays)
    finite = [d for d in ordered if d != float("inf")]
    return {"rounds": len(ordered), "never (> 3 s)": len(ordered) - len(finite),
            "p50_ms": percentile(ordered, 50) * 1000, "p99_ms": percentile(ordered, 99) * 1000,
            "max_ms": ordered[-1] * 1000 if ordered else float("nan")}


async def measure(hosts: TwoHosts, rounds: int, connected_rounds: int) -> dict[str, Any]:
    """Delays per (cut mode, operation), and for reference with A connected."""
    assert hosts.proxy is not None
    out: dict[str, Any] = {"delays": {}, "stale reads": {}, "breaker closed after restore": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        client = Client(http)
        for i in range(3):  # warm-up: both hosts connected to both stores, B's LISTEN (if any) set up
            await one_round(client, hosts, f"warm-{i}", "write")
        for mode in ("none", *MODES):
            n = connected_rounds if mode == "none" else rounds
            if mode != "none":
                await hosts.proxy.cut(mode)
            for i in range(n):
                kind = ("write", "delete")[i % 2]
                delay, stale = await one_round(client, hosts, f"inv-{mode}-{i}", kind)
                out["delays"].setdefault((mode, kind), []).append(delay)
                out["stale reads"][(mode, kind)] = out["stale reads"].get((mode, kind), 0) + stale
            if mode != "none":
                if await client.breaker(hosts.a) == "closed":
                    raise RuntimeError(f"A's breaker is closed after a {mode} cut: A was not cut off")
                await hosts.proxy.restore()
                out["breaker closed after restore"].append(await client.wait_breaker_closed(hosts.a))
    return out


async def run(quick: bool = False, transport: str = "tcp") -> Result:
    result = Result("invalidation", "7. Invalidation delay: a host cut off from the shared Redis")
    rounds, connected = (6, 4) if quick else (300, 40)
    base = Path(tempfile.mkdtemp(prefix="ondemand-bench-inv-", dir=temp_base()))
    try:
        async with TwoHosts(base) as hosts:
            t0 = time.monotonic()
            measured = await measure(hosts, rounds, connected)
            seconds = time.monotonic() - t0
        rows, cut_delays = [], []
        for (mode, kind), delays in measured["delays"].items():
            if mode != "none":
                cut_delays += delays
            rows.append({"A's route to Redis": "connected (reference)" if mode == "none" else f"cut: {mode}",
                         "operation by A": kind, **summary(delays),
                         "stale reads by B": measured["stale reads"][(mode, kind)]})
        rows.append({"A's route to Redis": "cut: all", "operation by A": "write + delete", **summary(cut_delays)})
        result.tables.append(Table(
            "delay from A's acknowledgement to the end of B's first read of the new state (B polled every ~1 ms; "
            f"a round gives up after {GIVE_UP:g} s)",
            ["A's route to Redis", "operation by A", "rounds", "p50_ms", "p99_ms", "max_ms", "never (> 3 s)",
             "stale reads by B"], rows))
        closes = measured["breaker closed after restore"]
        result.notes.append(f"{seconds:.1f} s of rounds; A's breaker closed {', '.join(f'{c:.2f}' for c in closes)} s "
                            f"after each restore ({' then '.join(MODES)}); the app processes exited with "
                            f"{hosts.exit_codes}")
        if any(code != 0 for code in hosts.exit_codes.values()):
            result.status = "failed"
            result.notes.append("an app process did not exit 0 on SIGTERM")
        overall = summary(cut_delays)
        result.targets.append(Target("7: invalidation delay p99 after a cut-off host's write or delete",
                                     overall["p99_ms"], BOUND_MS, " ms", higher_is_better=False))
        result.targets.append(Target("7: rounds never invalidated (> 3 s)", overall["never (> 3 s)"], 1, "",
                                     higher_is_better=False))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(asyncio.run(run(quick="--quick" in sys.argv)).markdown())
