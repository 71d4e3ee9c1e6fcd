"""Benchmark 10: the durable path: a session PUT (committed in PostgreSQL, then written to Redis) and the GET of a
cached session, through `rt.cache`, with PostgreSQL as the system of record (an embedded one in a temp dir).

    python bench/bench_durable.py [--quick] [--rounds N]     (or: python bench/run.py --only durable)

What a durable write costs is mostly PostgreSQL's; what this release adds to it (a version from a sequence
under a per-key lock, the outbox row in the same statement, its acknowledgement in the background, the
versioned script instead of a SET, a task that shields the work after the commit) shows as microseconds per
PUT: wall time per op at concurrency 1 (latency) and 10 (throughput), and CPU per op of this process and of
PostgreSQL. It uses only `Runtime` and `rt.cache`, so the same file measures an older checkout too (see
BENCHMARKS.md: paired runs of both, alternating).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from common import VALUE, Result, Table, bench_config

from ondemand import Runtime
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres

IDS = 1000


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its children (PostgreSQL's postmaster and backends)."""
    if pid is None:
        return 0.0
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


async def measure(rt: Runtime, pg_pid: int | None, op: str, concurrency: int, seconds: float) -> dict[str, Any]:
    cache, value = rt.cache, {**VALUE, "kind": "session"}
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            key = f"bench-{i % IDS}"
            if op == "put":
                await cache.cache_session(key, value)
            else:
                await cache.get_session(key)
            i += concurrency
            done += 1

    cpu, pg_cpu, began = time.process_time(), tree_cpu(pg_pid), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {"ops": done, "us_per_op": elapsed / done * 1e6,
            "client_cpu_us": (time.process_time() - cpu) / done * 1e6,
            "pg_cpu_us": (tree_cpu(pg_pid) - pg_cpu) / done * 1e6}


async def run(*, quick: bool = False, transport: str = "tcp", rounds: int | None = None) -> Result:
    rounds = rounds or (1 if quick else 5)
    seconds = 0.3 if quick else 2.0
    result = Result("durable", "10. Durable path: session PUT (PostgreSQL, then Redis) and GET of a cached session")
    base = Path(tempfile.mkdtemp(prefix="ondemand-bench-pg-"))
    pg = EmbeddedPostgres(base / "pgdata", settings={"fsync": "off"})
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        await pg.start()
        config = bench_config(transport, storage={"durable": "postgres"},
                              postgres={"dsn": pg.dsn, "pool_max": 20})
        async with Runtime(config) as rt:
            for i in range(IDS):  # every id cached and in PostgreSQL before the clock runs
                await rt.cache.cache_session(f"bench-{i}", {**VALUE, "kind": "session"})
            for _ in range(rounds):
                for op, concurrency in (("put", 1), ("put", 10), ("get", 1), ("get", 10)):
                    rows.setdefault((op, concurrency), []).append(await measure(rt, pg.pid, op, concurrency, seconds))
    finally:
        await pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    table = Table(f"transport {transport}; median of {rounds} round(s) of {seconds:g} s; {IDS} sessions cycled; "
                  "PostgreSQL with fsync off (commits still reach the OS)",
                  ["op", "concurrency", "us_per_op", "client_cpu_us/op", "pg_cpu_us/op", "rounds us_per_op"], [])
    for (op, concurrency), samples in rows.items():
        table.rows.append({
            "op": {"put": "PUT session (durable)", "get": "GET cached session"}[op], "concurrency": concurrency,
            "us_per_op": round(statistics.median(s["us_per_op"] for s in samples), 1),
            "client_cpu_us/op": round(statistics.median(s["client_cpu_us"] for s in samples), 1),
            "pg_cpu_us/op": round(statistics.median(s["pg_cpu_us"] for s in samples), 1),
            "rounds us_per_op": " / ".join(f"{s['us_per_op']:.0f}" for s in samples),
        })
    result.tables.append(table)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    result = asyncio.run(run(quick=args.quick, rounds=args.rounds))
    print(result.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
