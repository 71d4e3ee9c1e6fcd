"""Soak test (not in CI): mixed HTTP load while Redis is SIGKILLed every few seconds and PostgreSQL restarts.

    python bench/soak.py [--seconds 60] [--quick] [--kill-every 3] [--workers 4]
    python bench/soak.py --two-process [--seconds 60] [--quick] [--cut-every 3] [--bound-ms 100]

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

`--two-process`: a host cut off from the shared Redis (issue 12). Two app processes A and B
(`run.py --config config/docker.toml`, DOCKER_ENV, REDIS_URL, DATABASE_URL: `TwoHosts` of
bench/bench_invalidation.py) share one Redis and one PostgreSQL; A reaches Redis through a TCP proxy
process (tests/tcp_proxy.py) that cuts the route and restores it every few seconds (refuse, blackhole,
blackhole freezing the open connections, in turn). The clients send every request to A or B at random:
session PUT/GET/DELETE, profile PUT/GET, each id written by one client only, read by all. One ledger
across both processes holds every version of every id (sent, acknowledged or failed) and checks each
read against it:
- a read that returns a value never written, or a 404 for a session whose acknowledged write was never
  deleted, is a lost write (a profile may read 404: cache-only data, dropped while A is cut off);
- a read that began more than --bound-ms after the acknowledgement of a newer write or delete, and
  returns the older state, is a stale read. Younger stale reads are counted ("within the bound").
At the end the route is restored, A's breaker must close, and every id reads back right from both
processes. Any lost write, stale read, 5xx (PostgreSQL is never faulted here), transport error, leak
or leftover process fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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

from bench_invalidation import Client, Host, TwoHosts  # noqa: E402

from ondemand.host.process import ChildProcess  # noqa: E402
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres  # noqa: E402

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
                from ondemand.host.process import log_tail

                print(f"  app log tail ({self.app.log_path}):\n{log_tail(self.app.log_path, 20)}")
            return 1
        print("OK: every check passed")
        return 0


# -- --two-process: a host cut off from the shared Redis ---------------------------------------------

ABSENT = None  # the state "no value" in a ledger history (a delete, and every id's initial state)
CUT_MODES = (("refuse", False), ("blackhole", False), ("blackhole", True))  # (mode, keep_open)
KEYS_PER_CLIENT = 10


@dataclass
class Version:
    value: Any  # ABSENT for a delete
    sent: float
    acked: float | None = None  # when its 2xx arrived; None while in flight, or when it failed
    failed: bool = False


@dataclass
class History:
    """Every version of one id, in the order its one writer sent them (each after the previous answer)."""

    versions: list[Version] = field(default_factory=lambda: [Version(ABSENT, float("-inf"), float("-inf"))])

    def match(self, value: Any, before: float) -> int | None:
        """The newest version with this value sent before `before` (a read cannot return a later one)."""
        for i in range(len(self.versions) - 1, -1, -1):
            v = self.versions[i]
            if v.sent < before and v.value == value:
                return i
        return None

    def superseded(self, j: int, at: float) -> float | None:
        """How long before `at` a version newer than j was acknowledged (the first such), or None."""
        for v in self.versions[j + 1:]:
            if v.acked is not None and v.acked < at:
                return at - v.acked
        return None

    def last_acked(self) -> int:
        return max(i for i, v in enumerate(self.versions) if v.acked is not None)


@dataclass
class TwoStats:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    by_host: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # "session write", "session delete", "profile write"
    failed: dict[str, int] = field(default_factory=dict)
    reads_checked: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # during the load
    stale: list[str] = field(default_factory=list)  # beyond the bound
    stale_by_kind: dict[str, int] = field(default_factory=dict)
    stale_within: dict[str, list[float]] = field(default_factory=dict)  # kind -> ages (s) of younger stale reads
    cuts: dict[str, int] = field(default_factory=dict)
    cut_seconds: float = 0.0
    breaker_close_after_restore: list[float] = field(default_factory=list)


class TwoProcessSoak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bound = args.bound_ms / 1000
        self.base = Path(tempfile.mkdtemp(prefix="ondemand-soak2-", dir=temp_base()))
        self.hosts = TwoHosts(self.base)
        self.stats = TwoStats()
        self.sessions = {f"s2-{n}-{i}": History() for n in range(args.workers) for i in range(KEYS_PER_CLIENT)}
        self.profiles = {f"p2-{n}-{i}": History() for n in range(args.workers) for i in range(KEYS_PER_CLIENT)}
        self.failures: list[str] = []
        self.figures: dict[str, Any] = {}
        self.stop_load = asyncio.Event()
        self.pids: set[int] = set()

    async def request(self, client: Client, host: Host, method: str, path: str,
                      body: Any = None) -> tuple[int, Any, float, float]:
        t0 = time.monotonic()
        try:
            status, data = await client.call(host, method, path, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.transport_errors.append(f"{method} {path} on {host.name}: {type(exc).__name__}: {exc}")
            return 0, None, t0, time.monotonic()
        t1 = time.monotonic()
        s = self.stats
        s.requests += 1
        s.statuses[status] = s.statuses.get(status, 0) + 1
        s.by_host[host.name] = s.by_host.get(host.name, 0) + 1
        s.latencies.append(t1 - t0)
        if status >= 500:
            s.server_errors.append(f"{method} {path} on {host.name}: {status} {data}")
        elif status not in (200, 204, 404):
            s.unexpected.append(f"{method} {path} on {host.name}: {status} {data}")
        return status, data, t0, t1

    def count(self, table: dict[str, int], what: str) -> None:
        table[what] = table.get(what, 0) + 1

    async def write(self, client: Client, host: Host, kind: str, key: str, value: Any) -> None:
        history = (self.sessions if kind == "session" else self.profiles)[key]
        version = Version(value, time.monotonic())
        history.versions.append(version)
        path = f"/api/sessions/{key}" if kind == "session" else f"/api/users/{key}/profile"
        what = f"{kind} {'delete' if value is ABSENT else 'write'}"
        if value is ABSENT:
            status, _, _, t1 = await self.request(client, host, "DELETE", path)
            ok = status in (204, 404)
            previous = history.versions[-2]
            if status == 404 and previous.value is not ABSENT and previous.acked is not None:
                self.stats.lost.append(f"{key}: DELETE on {host.name} found nothing, but {short(previous.value)} "
                                       f"was acknowledged {t1 - previous.acked:.3f} s before")
        else:
            status, _, _, t1 = await self.request(client, host, "PUT", path, value)
            ok = status == 200
        if ok:
            version.acked = t1
            self.count(self.stats.acked, what)
        else:
            version.failed = True
            self.count(self.stats.failed, what)

    async def read(self, client: Client, host: Host, kind: str, key: str, *, final: bool = False) -> None:
        history = (self.sessions if kind == "session" else self.profiles)[key]
        path = f"/api/sessions/{key}" if kind == "session" else f"/api/users/{key}/profile"
        status, data, t0, t1 = await self.request(client, host, "GET", path)
        if status not in (200, 404):
            return  # counted as a 5xx, an unexpected status or a transport error
        self.count(self.stats.reads_checked, kind)
        value = ABSENT if status == 404 else data["value" if kind == "session" else "profile"]
        where = f"{key} on {host.name} ({'404' if value is ABSENT else data['source']})"
        if value is ABSENT and kind == "profile":
            return  # cache-only data may be missing: dropped while A is cut off, or evicted
        j = history.match(value, t1)
        if j is None:
            self.stats.lost.append(f"{where}: read {short(value)}, which was never written")
            return
        if final and j < history.last_acked():
            self.failures.append(f"at the end {where} reads {short(value)}; acknowledged: "
                                 f"{short(history.versions[history.last_acked()].value)}")
            return
        age = history.superseded(j, t0)
        if age is None:
            return
        if age > self.bound:
            self.count(self.stats.stale_by_kind, kind)
            self.stats.stale.append(f"{where}: read {short(value) if value is not ABSENT else '404'} "
                                    f"{age * 1000:.0f} ms after a newer {kind} state was acknowledged")
        else:
            self.stats.stale_within.setdefault(kind, []).append(age)

    async def client(self, n: int, client: Client) -> None:
        rng = random.Random(n)
        seq = 0
        a, b = self.hosts.a, self.hosts.b
        sessions, profiles = list(self.sessions), list(self.profiles)
        own = [k for k in sessions if k.startswith(f"s2-{n}-")]
        own_profiles = [k for k in profiles if k.startswith(f"p2-{n}-")]
        while not self.stop_load.is_set():
            seq += 1
            host = a if rng.random() < 0.5 else b
            roll = rng.random()
            if roll < 0.28:
                await self.write(client, host, "session", rng.choice(own),
                                 {"client": n, "seq": seq, "pad": "x" * rng.randint(0, 200)})
            elif roll < 0.36:
                await self.write(client, host, "session", rng.choice(own), ABSENT)
            elif roll < 0.70:
                await self.read(client, host, "session", rng.choice(sessions))
            elif roll < 0.82:
                await self.write(client, host, "profile", rng.choice(own_profiles), {"client": n, "seq": seq})
            else:
                await self.read(client, host, "profile", rng.choice(profiles))
            await asyncio.sleep(self.args.pause)

    async def cutter(self) -> None:
        assert self.hosts.proxy is not None
        rng = random.Random(12)
        for i in itertools.count():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_load.wait(), self.args.cut_every * rng.uniform(0.5, 1.5))
            if self.stop_load.is_set():
                return
            mode, keep_open = CUT_MODES[i % len(CUT_MODES)]
            await self.hosts.proxy.cut(mode, keep_open=keep_open)
            started = time.monotonic()
            self.count(self.stats.cuts, mode + (" keeping connections open" if keep_open else ""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_load.wait(), self.args.cut_every * rng.uniform(0.5, 1.5))
            await self.hosts.proxy.restore()
            self.stats.cut_seconds += time.monotonic() - started

    def sample(self) -> dict[str, dict[str, int]]:
        out = {}
        for host in self.hosts.hosts:
            proc = psutil.Process(host.child.pid)
            out[host.name] = {"fds": proc.num_fds(), "sockets": len(proc.net_connections(kind="all"))}
        return out

    async def run(self) -> None:
        async with self.hosts:
            self.pids = set(self.hosts.pids())
            with contextlib.suppress(psutil.NoSuchProcess):
                self.pids |= {p.pid for p in psutil.Process(self.hosts.pg.pid).children(recursive=True)}
            self.figures.update(self.hosts.figures)
            timeout = aiohttp.ClientTimeout(total=10)
            connector = aiohttp.TCPConnector(limit=2 * self.args.workers + 4)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
                client = Client(http)
                began = time.monotonic()
                # Warm-up without cuts: both hosts connected to both stores before the first sample.
                warm = [asyncio.create_task(self.client(n, client)) for n in range(self.args.workers)]
                await asyncio.sleep(min(2.0, self.args.seconds / 5))
                self.stop_load.set()
                await asyncio.gather(*warm)
                self.figures["sample after warm-up"] = self.sample()

                self.stop_load = asyncio.Event()
                started = time.monotonic()
                tasks = [asyncio.create_task(self.client(n, client)) for n in range(self.args.workers)]
                tasks.append(asyncio.create_task(self.cutter()))
                await asyncio.sleep(self.args.seconds)
                self.stop_load.set()
                await asyncio.gather(*tasks)
                self.figures["load phase"] = f"{time.monotonic() - started:.1f} s (after warm-up)"
                elapsed = time.monotonic() - began

                # The route is back (the cutter restored it): both breakers close, then every id reads back
                # right from both processes.
                for host in self.hosts.hosts:
                    try:
                        self.figures[f"{host.name}'s breaker closed after the load"] = \
                            f"{await client.wait_breaker_closed(host):.2f} s"
                    except RuntimeError as exc:
                        self.failures.append(str(exc))
                await asyncio.sleep(self.bound)
                for host in self.hosts.hosts:
                    for key in self.sessions:
                        await self.read(client, host, "session", key, final=True)
                    for key in self.profiles:
                        await self.read(client, host, "profile", key, final=True)
                docs = {h.name: (await client.call(h, "GET", "/api/cache/status"))[1] for h in self.hosts.hosts}
                self.figures["app counters at the end"] = {
                    name: {"breaker opens": doc["dispatcher"]["breaker"]["opens"],
                           "outbox": doc["dispatcher"].get("outbox", "none (no outbox in this version)"),
                           "stale keys pending": doc["dispatcher"]["stale_keys_pending"]}
                    for name, doc in docs.items()}
                self.figures["sample at the end"] = self.sample()
                self.figures["_elapsed"] = elapsed
        self.figures["app exit statuses"] = self.hosts.exit_codes
        if any(code != 0 for code in self.hosts.exit_codes.values()):
            self.failures.append(f"an app process did not exit 0 on SIGTERM: {self.hosts.exit_codes}")

    def leftovers(self) -> list[str]:
        found = []
        for pid in sorted(self.pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"{proc.name()} pid {pid}")
        return found

    def evaluate(self) -> None:
        s = self.stats
        latencies = sorted(s.latencies)
        p = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else None

        def ages(kind: str) -> str:
            found = sorted(s.stale_within.get(kind, []))
            return (f"{len(found)}, the oldest began {found[-1] * 1000:.0f} ms after the newer acknowledgement"
                    if found else "0")

        self.figures.update({
            "requests": f"{s.requests} ({s.requests / max(0.001, self.figures.pop('_elapsed', 0.0)):.0f}/s, "
                        f"warm-up included; by host {dict(sorted(s.by_host.items()))})",
            "statuses": dict(sorted(s.statuses.items())),
            "latency": f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1] * 1000:.0f} ms"
            if latencies else "-",
            "acknowledged": dict(sorted(s.acked.items())),
            "failed (no 2xx)": dict(sorted(s.failed.items())) or 0,
            "reads checked (load + final)": dict(sorted(s.reads_checked.items())),
            "A's route cut": f"{sum(s.cuts.values())} times, {s.cut_seconds:.1f} s in all: {s.cuts}",
            "lost writes": len(s.lost),
            f"stale reads (> {self.args.bound_ms:g} ms)": f"{len(s.stale)} {s.stale_by_kind or ''}".strip(),
            "stale session reads within the bound": ages("session"),
            "stale profile reads within the bound": ages("profile"),
            "5xx": len(s.server_errors),
            "other unexpected statuses": len(s.unexpected),
            "transport errors": len(s.transport_errors),
        })
        for what, items in (("lost writes", s.lost), ("stale reads", s.stale), ("5xx", s.server_errors),
                            ("unexpected statuses", s.unexpected), ("transport errors", s.transport_errors)):
            if items:
                self.failures.append(f"{len(items)} {what}, e.g. {items[:3]}")
        if not s.cuts:
            self.failures.append("A's route was never cut: the run did not test what it claims")
        if not s.acked.get("session write"):
            self.failures.append("no session write was acknowledged")
        before, after = self.figures.get("sample after warm-up"), self.figures.get("sample at the end")
        if before and after:
            for name in before:
                for key in ("fds", "sockets"):
                    if after[name][key] - before[name][key] > FD_LEAK_LIMIT:
                        self.failures.append(f"{name}'s {key} grew from {before[name][key]} to {after[name][key]}")

    def report(self) -> int:
        print("ondemand soak --two-process")
        for key, value in self.figures.items():
            print(f"  {key:<42} {value}")
        if self.failures:
            print("FAILED:")
            for failure in self.failures:
                print(f"  - {failure}")
            for host in self.hosts.hosts:
                print(f"  {host.log(15)}")
            return 1
        print("OK: every check passed")
        return 0


async def two_process_main(args: argparse.Namespace) -> int:
    soak = TwoProcessSoak(args)
    soak.figures["settings"] = (f"{args.seconds:g} s load, {args.workers} clients pausing {args.pause * 1000:g} ms, "
                                f"A's route cut and restored every {args.cut_every / 2:g}-{args.cut_every * 1.5:g} s, "
                                f"bound {args.bound_ms:g} ms")
    try:
        async with asyncio.timeout(args.seconds + 180):  # the whole run is bounded, whatever happens
            try:
                await soak.run()
                soak.evaluate()
            finally:
                await asyncio.sleep(0.2)  # postgres backends follow their postmaster
                left = soak.leftovers()
                soak.figures["processes left after stopping"] = left or "none"
                if left:
                    soak.failures.append(f"processes left running: {left}")
    except TimeoutError:
        soak.failures.append("the run exceeded its time bound")
    except Exception as exc:  # report what we have, with the cause
        soak.failures.append(f"{type(exc).__name__}: {exc}")
    try:
        return soak.report()
    finally:
        shutil.rmtree(soak.base, ignore_errors=True)


async def main(args: argparse.Namespace) -> int:
    if args.two_process:
        return await two_process_main(args)
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
    parser.add_argument("--two-process", action="store_true",
                        help="two app processes share Redis and PostgreSQL; A's route to Redis is cut and restored")
    parser.add_argument("--cut-every", type=float, default=3.0,
                        help="--two-process: A's route is cut, then restored, for 0.5x to 1.5x this long each time")
    parser.add_argument("--bound-ms", type=float, default=100.0,
                        help="--two-process: a read this long after a newer acknowledged write must not return "
                             "the older state (default 100)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.workers, args.kill_every = min(args.seconds, 10.0), 3, 2.0
        args.cut_every = min(args.cut_every, 2.0)
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
