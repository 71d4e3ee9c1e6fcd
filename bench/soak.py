"""Soak test (not in CI): mixed HTTP load while Redis is SIGKILLed every few seconds and PostgreSQL restarts.

    python bench/soak.py [--seconds 60] [--quick] [--kill-every 3] [--workers 4]

What it does, everything started here is stopped here (and dies with us even on SIGKILL: PDEATHSIG):
1. starts an embedded PostgreSQL (pgserver's binaries) in a temp data dir;
2. starts the app (`run.py serve`) with that server as its durable store and Redis on demand;
3. runs a mixed load for --seconds: PUT/GET of sessions (durable), PUT/GET of profiles and POST/GET of
   messages (cache-only), from --workers clients pacing themselves to stay sane on 2 cores;
4. meanwhile SIGKILLs the Redis child every --kill-every seconds (its pid from GET /api/cache/status)
   and restarts PostgreSQL once midway (fast shutdown, down for a moment, start on the same socket);
5. keeps a client-side ledger, session id -> last acknowledged value (a write that failed may or may not
   have committed: its value is also accepted until a later write is acknowledged), checks every read
   against it during the run and reads every session back at the end;
6. samples the app's open file descriptors and sockets after warm-up and at the end;
7. stops the app and PostgreSQL and checks no redis-server/valkey-server/postgres is left.

A 5xx is expected only while PostgreSQL is down (plus a short grace for the pool to reconnect): a
durable write is acknowledged only after it committed there, and a durable read that misses Redis needs
it. Every other 5xx, any 5xx of a cache-only route, a lost acknowledged write, a stale read, a transport
error, an fd/socket leak or an orphaned server fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.process import ChildProcess  # noqa: E402
from plugins.postgres_server import EmbeddedPostgres  # noqa: E402

REDIS_NAMES = {"redis-server", "valkey-server"}
PG_GRACE = 2.0  # seconds after PostgreSQL is back in which a 5xx still counts as "while it was down"
FD_LEAK_LIMIT = 32  # growth of the app's open fds (and of its sockets) between warm-up and the end
SESSIONS_PER_WORKER = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def temp_base() -> str:
    """tmpfs when roomy (initdb and commits are faster there), else the temp dir."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage("/dev/shm").free > 1 << 30:
            return "/dev/shm"
    return tempfile.gettempdir()


@dataclass
class Window:
    start: float
    end: float | None = None

    def contains(self, t0: float, t1: float) -> bool:
        end = float("inf") if self.end is None else self.end + PG_GRACE
        return t0 <= end and t1 >= self.start


@dataclass
class Stats:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    server_errors: list[tuple[float, float, str, str, int]] = field(default_factory=list)  # t0, t1, op, path, status
    transport_errors: list[str] = field(default_factory=list)
    read_violations: list[str] = field(default_factory=list)
    acked_session_writes: int = 0
    ambiguous_session_writes: int = 0
    redis_kills: int = 0
    redis_pids: set[int] = field(default_factory=set)
    runtime_dirs: set[str] = field(default_factory=set)
    pg_down: Window | None = None


@dataclass
class Entry:
    acked: Any = None  # the last acknowledged value (None: never acknowledged)
    maybe: list[Any] = field(default_factory=list)  # failed writes since then: may or may not have committed

    def accepts(self, value: Any) -> bool:
        return value == self.acked or value in self.maybe


def short(value: Any) -> str:
    """A ledger value for a message: its worker and sequence number, not its padding."""
    return f"seq {value['seq']}" if isinstance(value, dict) and "seq" in value else repr(value)[:80]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="ondemand-soak-", dir=temp_base()))
        self.pg = EmbeddedPostgres(self.base / "pgdata", startup_timeout=60.0, stop_timeout=10.0)
        self.app: ChildProcess | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats = Stats()
        self.ledger: dict[str, Entry] = {}
        self.failures: list[str] = []
        self.figures: dict[str, Any] = {}
        self.stop_load = asyncio.Event()

    # -- processes ---------------------------------------------------------------------------------

    async def start(self) -> None:
        t0 = time.monotonic()
        await self.pg.start()
        self.figures["postgres start (incl. initdb)"] = f"{time.monotonic() - t0:.2f} s, pid {self.pg.pid}"
        config = self.base / "soak.toml"
        config.write_text(
            f"""
[server]
host = "127.0.0.1"
port = {self.port}
test_endpoints = false
shutdown_timeout = 5.0

[lifecycle]
plugin = "subprocess"
idle_timeout = 300.0
restart_backoff = 0.1
restart_backoff_max = 1.0    # the default 5 s would keep Redis down most of a run that kills it every 3 s

[storage]
durable = "postgres"

[postgres]
dsn = "{self.pg.dsn}"
connect_timeout = 1.0
statement_timeout = 1.0
"""
        )
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ONDEMAND_") and k not in ("REDIS_URL", "DATABASE_URL", "DOCKER_ENV")}
        self.app = await ChildProcess.spawn(
            "app", [sys.executable, str(REPO / "run.py"), "serve", "--config", str(config), "--log-level", "WARNING"],
            log_path=self.base / "app.log", env=env, cwd=REPO,
        )

        async def healthy() -> bool:
            async with aiohttp.ClientSession() as s, s.get(f"{self.url}/healthz") as resp:
                return resp.status == 200

        await self.app.wait_ready(healthy, timeout=30, interval=0.05, max_interval=0.2)

    async def stop(self) -> None:
        if self.app is not None and self.app.returncode is None:
            t0 = time.monotonic()
            code = await self.app.stop(grace=15)
            self.figures["app stop"] = f"{time.monotonic() - t0:.2f} s, exit status {code}"
            if code != 0:
                self.failures.append(f"the app exited with status {code} on SIGTERM")
        pg_tree: set[int] = set()
        if self.pg.pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                pg_tree = {self.pg.pid, *(p.pid for p in psutil.Process(self.pg.pid).children(recursive=True))}
        await self.pg.stop()
        for _ in range(100):  # postgres backends may take a moment to follow the postmaster
            if not self.leftovers(pg_tree):
                break
            await asyncio.sleep(0.05)

    def leftovers(self, pg_tree: frozenset[int] | set[int] = frozenset()) -> list[str]:
        """Live redis/valkey servers we saw or that ran in the app's runtime dirs, and our postgres processes."""
        found = []
        data_dir = str(self.pg.data_dir)
        for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                name = proc.info["name"]
                if name in REDIS_NAMES:
                    cwd = proc.cwd()
                    if proc.pid in self.stats.redis_pids or any(cwd == d for d in self.stats.runtime_dirs):
                        found.append(f"{name} pid {proc.pid} (cwd {cwd})")
                elif name == "postgres" and (proc.pid in pg_tree or data_dir in " ".join(proc.info["cmdline"] or ())):
                    found.append(f"postgres pid {proc.pid}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def sample(self) -> dict[str, int]:
        assert self.app is not None
        proc = psutil.Process(self.app.pid)
        return {"fds": proc.num_fds(), "sockets": len(proc.net_connections(kind="all")),
                "children": len(proc.children(recursive=True))}

    # -- load --------------------------------------------------------------------------------------

    async def request(self, session: aiohttp.ClientSession, method: str, path: str, route: str,
                      body: Any = None) -> tuple[int, Any]:
        t0 = time.monotonic()
        try:
            async with session.request(method, self.url + path, json=body) as resp:
                status = resp.status
                data = await resp.json() if resp.content_type == "application/json" else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.transport_errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            return 0, None
        t1 = time.monotonic()
        self.stats.requests += 1
        self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
        self.stats.latencies.append(t1 - t0)
        if status >= 500:
            self.stats.server_errors.append((t0, t1, route, f"{method} {path}", status))
        return status, data

    async def worker(self, n: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(n)
        seq = 0
        ids = [f"soak-{n}-{i}" for i in range(SESSIONS_PER_WORKER)]
        while not self.stop_load.is_set():
            seq += 1
            roll = rng.random()
            if roll < 0.35:
                sid = rng.choice(ids)
                value = {"worker": n, "seq": seq, "pad": "x" * rng.randint(0, 200)}
                status, _ = await self.request(session, "PUT", f"/api/sessions/{sid}", "session", value)
                entry = self.ledger.setdefault(sid, Entry())
                if status == 200:
                    entry.acked, entry.maybe = value, []
                    self.stats.acked_session_writes += 1
                else:
                    entry.maybe.append(value)
                    self.stats.ambiguous_session_writes += 1
            elif roll < 0.55:
                sid = rng.choice(ids)
                status, data = await self.request(session, "GET", f"/api/sessions/{sid}", "session")
                self.check_read(sid, status, data)
            elif roll < 0.70:
                uid = f"u{n}-{rng.randrange(50)}"
                await self.request(session, "PUT", f"/api/users/{uid}/profile", "profile", {"name": uid, "seq": seq})
            elif roll < 0.80:
                uid = f"u{n}-{rng.randrange(50)}"
                await self.request(session, "GET", f"/api/users/{uid}/profile", "profile")
            elif roll < 0.92:
                uid = f"u{n}-{rng.randrange(50)}"
                await self.request(session, "POST", f"/api/users/{uid}/messages", "messages", {"seq": seq})
            else:
                uid = f"u{n}-{rng.randrange(50)}"
                await self.request(session, "GET", f"/api/users/{uid}/messages?last=5", "messages")
            await asyncio.sleep(self.args.pause)

    def check_read(self, sid: str, status: int, data: Any) -> None:
        entry = self.ledger.get(sid)
        if status == 200:
            value = data["value"]
            if entry is None or not entry.accepts(value):
                expected = None if entry is None else entry.acked
                self.stats.read_violations.append(f"{sid}: read {short(value)} from {data.get('source')}, "
                                                  f"acknowledged {short(expected)}")
        elif status == 404 and entry is not None and entry.acked is not None:
            self.stats.read_violations.append(f"{sid}: 404 but {short(entry.acked)} was acknowledged")

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{self.url}/api/cache/status") as resp:
                return await resp.json()
        return None

    async def redis_killer(self, session: aiohttp.ClientSession) -> None:
        while not self.stop_load.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_load.wait(), self.args.kill_every)
            if self.stop_load.is_set():
                return
            doc = await self.status(session)
            redis = (doc or {}).get("redis") or {}
            if redis.get("runtime_dir"):
                self.stats.runtime_dirs.add(redis["runtime_dir"])
            pid = redis.get("pid")
            if redis.get("state") == "running" and pid and self.is_app_redis(pid):
                self.stats.redis_pids.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.stats.redis_kills += 1

    def is_app_redis(self, pid: int) -> bool:
        """Only ever signal the app's own Redis child, never a process that reused a stale pid."""
        try:
            proc = psutil.Process(pid)
            return proc.name() in REDIS_NAMES and self.app is not None and proc.ppid() == self.app.pid
        except psutil.Error:
            return False

    async def postgres_restarter(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_load.wait(), self.args.seconds / 2)
        if self.stop_load.is_set():
            return
        child = self.pg.child
        assert child is not None
        self.stats.pg_down = Window(start=time.monotonic())
        # Fast shutdown of the postmaster only: the socket dir stays, so the app's DSN works once it is back.
        child.signal(signal.SIGINT)
        await asyncio.wait_for(child.process.wait(), 30)
        await asyncio.sleep(self.args.pg_down)
        await self.pg.start()
        self.stats.pg_down.end = time.monotonic()

    async def run_load(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.args.workers + 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            # Warm-up: Redis started, pools and PostgreSQL connections open, before the first sample.
            self.figures["_began"] = time.monotonic()
            warm_until = time.monotonic() + min(3.0, self.args.seconds / 5)
            warm_stop = asyncio.Event()
            self.stop_load = warm_stop
            warm = [asyncio.create_task(self.worker(n, session)) for n in range(self.args.workers)]
            await asyncio.sleep(max(0.0, warm_until - time.monotonic()))
            warm_stop.set()
            await asyncio.gather(*warm)
            doc = await self.status(session)
            if doc and doc["redis"].get("runtime_dir"):
                self.stats.runtime_dirs.add(doc["redis"]["runtime_dir"])
            self.figures["sample after warm-up"] = self.sample()

            self.stop_load = asyncio.Event()
            started = time.monotonic()
            tasks = [asyncio.create_task(self.worker(n, session)) for n in range(self.args.workers)]
            tasks += [asyncio.create_task(self.redis_killer(session)), asyncio.create_task(self.postgres_restarter())]
            await asyncio.sleep(self.args.seconds)
            self.stop_load.set()
            await asyncio.gather(*tasks)
            self.figures["load phase"] = f"{time.monotonic() - started:.1f} s (after warm-up)"
            self.figures["_elapsed"] = time.monotonic() - self.figures.pop("_began")

            # Recovery: Redis answers again and the breaker is closed, then every session reads back.
            deadline = time.monotonic() + 15
            doc = None
            while time.monotonic() < deadline:
                await self.request(session, "GET", "/api/users/recovery/profile", "profile")
                doc = await self.status(session)
                if doc and doc["dispatcher"]["breaker"]["state"] == "closed" and doc["redis"]["state"] == "running":
                    break
                await asyncio.sleep(0.2)
            else:
                self.failures.append("Redis did not recover within 15 s after the load")
            if doc is not None:  # the last server too, for the orphan check
                if doc["redis"].get("pid"):
                    self.stats.redis_pids.add(doc["redis"]["pid"])
                if doc["redis"].get("runtime_dir"):
                    self.stats.runtime_dirs.add(doc["redis"]["runtime_dir"])
            self.figures["app counters at the end"] = {} if doc is None else {
                "redis spawns": doc["redis"]["counters"]["spawns"],
                "redis unexpected exits": doc["redis"]["counters"]["unexpected_exits"],
                "breaker opens": doc["dispatcher"]["breaker"].get("opens"),
                "durable state": (doc["storages"]["durable"] or {}).get("state"),
            }
            await self.verify(session)
            self.figures["sample at the end"] = self.sample()

    async def verify(self, session: aiohttp.ClientSession) -> None:
        lost, sources = [], {}
        for sid, entry in sorted(self.ledger.items()):
            status, data = await self.request(session, "GET", f"/api/sessions/{sid}", "verify")
            if entry.acked is None and not entry.maybe:
                continue
            if status == 200 and entry.accepts(data["value"]):
                sources[data["source"]] = sources.get(data["source"], 0) + 1
            elif status == 404 and entry.acked is None:
                continue  # only failed writes, none of which committed
            else:
                got = short(data["value"]) if status == 200 else (data or {}).get("error", {}).get("code")
                lost.append(f"{sid}: {status} {got}, acknowledged {short(entry.acked)}")
        acked = sum(1 for e in self.ledger.values() if e.acked is not None)
        self.figures["ledger"] = (f"{len(self.ledger)} sessions, {acked} with an acknowledged value, "
                                  f"read back: {sources}")
        if lost:
            self.failures.append(f"{len(lost)} acknowledged session writes did not read back, e.g. {lost[:3]}")

    # -- report ------------------------------------------------------------------------------------

    def evaluate(self) -> None:
        s = self.stats
        window = s.pg_down
        inside = [e for e in s.server_errors if window is not None and window.contains(e[0], e[1])]
        outside = [e for e in s.server_errors if e not in inside]
        cache_only = [e for e in s.server_errors if e[2] in ("profile", "messages")]
        latencies = sorted(s.latencies)
        p = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else None
        self.figures.update({
            "requests": f"{s.requests} ({s.requests / max(0.001, self.figures.pop('_elapsed', 0.0)):.0f}/s, "
                        "warm-up included)",
            "statuses": dict(sorted(s.statuses.items())),
            "latency": f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1] * 1000:.0f} ms"
            if latencies else "-",
            "session writes": f"{s.acked_session_writes} acknowledged, {s.ambiguous_session_writes} failed",
            "redis SIGKILLs": f"{s.redis_kills} ({len(s.redis_pids)} server pids seen)",
            "postgres down": "never" if window is None else
            f"{(window.end or time.monotonic()) - window.start:.2f} s (restarted midway)",
            "5xx while postgres was down (+grace)": len(inside),
            "5xx outside that window": len(outside),
            "last 5xx after postgres was back": "-" if not inside or window is None or window.end is None
            else f"{max(e[1] for e in inside) - window.end:+.2f} s",
            "5xx on cache-only routes": len(cache_only),
            "transport errors": len(s.transport_errors),
            "read violations during the load": len(s.read_violations),
        })
        if outside:
            self.failures.append(f"{len(outside)} 5xx outside the PostgreSQL outage, e.g. "
                                 f"{[(op, st) for _, _, _, op, st in outside[:5]]}")
        if cache_only:
            self.failures.append(f"{len(cache_only)} 5xx on cache-only routes, e.g. "
                                 f"{[(op, st) for _, _, _, op, st in cache_only[:5]]}")
        if s.transport_errors:
            self.failures.append(f"{len(s.transport_errors)} transport errors, e.g. {s.transport_errors[:3]}")
        if s.read_violations:
            self.failures.append(f"{len(s.read_violations)} stale or lost reads, e.g. {s.read_violations[:3]}")
        if s.redis_kills == 0:
            self.failures.append("Redis was never killed: the run did not test what it claims")
        if window is None or window.end is None:
            self.failures.append("PostgreSQL was not restarted")
        before, after = self.figures.get("sample after warm-up"), self.figures.get("sample at the end")
        if before and after:
            for key in ("fds", "sockets"):
                if after[key] - before[key] > FD_LEAK_LIMIT:
                    self.failures.append(f"the app's {key} grew from {before[key]} to {after[key]}")

    def report(self) -> int:
        print("ondemand soak")
        for key, value in self.figures.items():
            print(f"  {key:<38} {value}")
        if self.failures:
            print("FAILED:")
            for failure in self.failures:
                print(f"  - {failure}")
            if self.app is not None:
                from app.process import log_tail

                print(f"  app log tail ({self.app.log_path}):\n{log_tail(self.app.log_path, 20)}")
            return 1
        print("OK: every check passed")
        return 0


async def main(args: argparse.Namespace) -> int:
    soak = Soak(args)
    soak.figures["settings"] = (f"{args.seconds:g} s load, {args.workers} clients pausing {args.pause * 1000:g} ms, "
                                f"Redis SIGKILL every {args.kill_every:g} s, PostgreSQL down {args.pg_down:g} s")
    try:
        async with asyncio.timeout(args.seconds + 180):  # the whole run is bounded, whatever happens
            try:
                await soak.start()
                await soak.run_load()
                soak.evaluate()
            finally:
                await soak.stop()
                left = soak.leftovers()
                soak.figures["servers left after stopping"] = left or "none"
                if left:
                    soak.failures.append(f"orphaned servers: {left}")
                runtime_dirs = [d for d in soak.stats.runtime_dirs if os.path.exists(d)]
                if runtime_dirs:
                    soak.failures.append(f"runtime directories left behind: {runtime_dirs}")
    except TimeoutError:
        soak.failures.append("the run exceeded its time bound")
    except Exception as exc:  # report what we have, with the cause
        soak.failures.append(f"{type(exc).__name__}: {exc}")
    try:
        return soak.report()
    finally:
        shutil.rmtree(soak.base, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load phase (default 60)")
    parser.add_argument("--quick", action="store_true", help="a 10 s run with 3 clients, Redis killed every 2 s")
    parser.add_argument("--workers", type=int, default=4, help="concurrent HTTP clients (default 4)")
    parser.add_argument("--pause", type=float, default=0.005, help="seconds each client waits between requests")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between Redis SIGKILLs (default 3)")
    parser.add_argument("--pg-down", type=float, default=1.0, help="seconds PostgreSQL stays down midway")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.workers, args.kill_every = min(args.seconds, 10.0), 3, 2.0
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
