"""Benchmark 12: cache-aside under a hot key: get_or_compute against cashews (`lock=True`, `early`) and aiocache
(`cached_stampede`).

    python bench/bench_aside.py [--quick] [--rounds N]     (or: python bench/run.py --only aside)

One key whose ttl expires every second, read by 500 tasks across 2 worker processes (250 each, one read every
`PAUSE` seconds per task), with a loader that takes 50 ms. Per contender: loader calls per expiry (summed over
both processes; an expiry is a burst of loads, those within half a ttl of its first) and read latency p50/p99
during a refresh (a read that began while a load of that contender ran in either process, or in the 10 ms
before it) and in steady state (every other read). Rounds are paired: every contender runs once per round, in
rotating order. A last table: the µs per op of a hit through `get_or_compute` against a plain `get`
(concurrency 1, paired rounds in one process). Every wait for a worker is bounded; workers are killed on exit.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import VALUE, Result, Table, Target, bench_config, latency_ms, percentile

from ondemand import Runtime

HERE = Path(__file__).resolve().parent
LOADER_SECONDS = 0.05
TTL = 1.0
PAUSE = 0.2  # seconds between two reads of one task
CONTENDERS = ("ondemand stale_ttl", "ondemand lease only", "cashews lock=True", "cashews early", "aiocache stampede")
OURS = "ondemand stale_ttl"


# -- a worker process ---------------------------------------------------------------------------------------


async def _reader(contender: str, args: dict[str, Any], loads: list[list[float]]) -> tuple[Any, Any]:
    """(read(): the contender's cached call, close())."""
    key = f"aside-bench-{args['tag']}"

    async def loader() -> dict[str, Any]:
        began = time.time()
        await asyncio.sleep(LOADER_SECONDS)
        loads.append([began, time.time()])
        return VALUE

    if contender.startswith("ondemand"):
        overrides = {"lifecycle": {"plugin": "external", "redis_url": args["url"]}, "storage": {"durable": ""},
                     "redis": {"op_timeout": 2.0}}
        from ondemand import load_config

        rt = await Runtime(load_config(None, overrides=overrides, environ={})).start()
        options = {"ttl": TTL, "stale_ttl": 2 * TTL} if contender == OURS else {"ttl": TTL}
        await rt.cache_storage.leases.listen(2.0)

        def read() -> Any:
            return rt.cache.get_or_compute("profile", key, loader, **options)

        return read, rt.close
    if contender.startswith("cashews"):
        from cashews import Cache

        cache = Cache()
        cache.setup(args["url"])
        if contender == "cashews early":
            read = cache.early(ttl=3 * TTL, early_ttl=TTL, key=key)(loader)
        else:
            read = cache(ttl=TTL, key=key, lock=True)(loader)
        return read, cache.close
    from aiocache import RedisCache, cached_stampede

    # A connection per task: its redis-py pool refuses a command past its size rather than wait.
    decorator = cached_stampede(lease=2, ttl=TTL, key=key, cache=RedisCache, endpoint=args["host"], port=args["port"],
                                password=args["password"], namespace="aiocache", pool_max_size=args["tasks"] + 10)
    read = decorator(loader)

    async def close() -> None:
        await decorator.cache.close()

    return read, close


async def worker(args: dict[str, Any]) -> None:
    loads: list[list[float]] = []
    read, close = await _reader(args["contender"], args, loads)
    try:
        await read()  # connected (and, in the first process, the value loaded) before the clock runs
        loads.clear()
        print(json.dumps({"ready": True}), flush=True)
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), 60)
        start = float(line)
        await asyncio.sleep(max(0.0, start - time.time()))
        stop = start + args["seconds"]
        # Arrays, not lists of lists: thousands of small lists would make the collector's pauses part of the
        # latencies measured.
        began_at, took = array.array("d"), array.array("d")
        errors = 0

        async def task(offset: float) -> None:
            nonlocal errors
            await asyncio.sleep(offset)
            while time.time() < stop:
                began, t0 = time.time(), time.perf_counter()
                try:
                    await asyncio.wait_for(read(), 5.0)
                except Exception as exc:  # counted: a read that failed or took more than 5 s
                    if not errors:
                        print(f"{args['contender']}: {exc!r}", file=sys.stderr, flush=True)
                    errors += 1
                began_at.append(began)
                took.append(time.perf_counter() - t0)
                await asyncio.sleep(PAUSE)

        await asyncio.gather(*(task(i * PAUSE / args["tasks"]) for i in range(args["tasks"])))
        print(json.dumps({"began": began_at.tolist(), "took": took.tolist(), "loads": loads, "errors": errors}),
              flush=True)
    finally:
        await close()


# -- the parent ----------------------------------------------------------------------------------------------


async def _line(proc: subprocess.Popen, timeout: float, log: Any) -> dict[str, Any]:
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)  # type: ignore[union-attr]
    except TimeoutError:
        line = ""
    if not line:
        log.seek(0)
        raise RuntimeError(f"a worker did not answer within {timeout:g} s: {log.read()[-1500:]}")
    return json.loads(line)


def _spawn(args: dict[str, Any], log: Any) -> subprocess.Popen:
    """A worker; its stderr goes to a file (a pipe nobody reads would block it once full)."""
    return subprocess.Popen([sys.executable, str(HERE / "bench_aside.py"), "--worker", json.dumps(args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)


async def _drive(args: dict[str, Any], logs: list[Any], seconds: float) -> tuple[list[dict[str, Any]], float]:
    """Two workers: started, told when to begin (both at once), their reports; killed if still there."""
    procs = [_spawn(args, log) for log in logs]
    try:
        for proc, log in zip(procs, logs, strict=True):
            await _line(proc, 60.0, log)
        start = time.time() + 0.3
        for proc in procs:
            proc.stdin.write(f"{start}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        return [await _line(proc, seconds + 30.0, log) for proc, log in zip(procs, logs, strict=True)], start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


async def one_run(contender: str, endpoint: Any, tag: str, seconds: float, tasks: int) -> dict[str, Any]:
    url = f"redis://:{endpoint.password}@{endpoint.host}:{endpoint.port}/0"
    args = {"contender": contender, "url": url, "host": endpoint.host, "port": endpoint.port,
            "password": endpoint.password, "tag": tag, "seconds": seconds, "tasks": tasks}
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)]
        reports, start = await _drive(args, logs, seconds)
        for log in logs:
            log.seek(0)
        problems = " | ".join(text.strip()[-300:] for text in (log.read() for log in logs) if text.strip())

    loads = sorted(load for report in reports for load in report["loads"])
    warm = start + TTL  # the first expiry: the measured window starts there
    loads = [load for load in loads if load[0] >= warm]
    during, steady = [], []
    for report in reports:
        for began, latency in zip(report["began"], report["took"], strict=True):
            if began < warm:
                continue
            # Began while a load ran (or just before it: the read that missed starts the load)
            (during if any(a - 0.01 <= began <= b for a, b in loads) else steady).append(latency)
    # An expiry is a burst of loads: those that began within half a ttl of the burst's first.
    expiries, first = 0, -TTL
    for began, _ in loads:
        if began - first > TTL / 2:
            expiries, first = expiries + 1, began
    return {"loads_per_expiry": len(loads) / max(1, expiries), "during": during, "steady": steady,
            "errors": sum(report["errors"] for report in reports), "stderr": problems}


async def hit_cost(rt: Runtime, rounds: int, count: int) -> dict[str, list[float]]:
    """Wall and CPU µs per op of this process, concurrency 1: `get` and a hit through `get_or_compute`, in
    paired rounds (alternating which goes first). CPU is the one that shows what the call adds: the wall time
    also holds the round trip, which is the same one, and whatever else the machine runs."""
    await rt.dispatcher.set("profile", "hit", VALUE, 600)

    async def loader() -> Any:
        return VALUE

    measured: dict[str, list[float]] = {"get wall": [], "get cpu": [], "aside wall": [], "aside cpu": []}
    for r in range(rounds):
        for kind in (("get", "aside") if r % 2 == 0 else ("aside", "get")):
            began, cpu = time.perf_counter(), time.process_time()
            if kind == "get":
                for _ in range(count):
                    await rt.dispatcher.get("profile", "hit")
            else:
                for _ in range(count):
                    await rt.dispatcher.get_or_compute("profile", "hit", loader)
            measured[f"{kind} wall"].append((time.perf_counter() - began) / count * 1e6)
            measured[f"{kind} cpu"].append((time.process_time() - cpu) / count * 1e6)
    return measured


async def run(*, quick: bool = False, transport: str = "tcp", rounds: int | None = None) -> Result:
    rounds = rounds or (1 if quick else 3)
    seconds = 1.6 if quick else 6.0
    tasks = 20 if quick else 250
    result = Result("aside", "12. Cache-aside under a hot key: get_or_compute vs cashews and aiocache")
    samples: dict[str, dict[str, list[Any]]] = {c: {"lpe": [], "during": [], "steady": [], "errors": []}
                                                for c in CONTENDERS}
    async with Runtime(bench_config("tcp")) as rt:  # the workers reach the server over TCP
        endpoint = await rt.on_demand.ensure()
        for r in range(rounds):
            order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
            if quick:  # only checks that it works: every contender at once
                runs = await asyncio.gather(*(one_run(c, endpoint, f"{os.getpid()}-{r}-{CONTENDERS.index(c)}",
                                                      seconds, tasks) for c in order))
            else:
                runs = [await one_run(c, endpoint, f"{os.getpid()}-{r}-{CONTENDERS.index(c)}", seconds, tasks)
                        for c in order]
            for contender, measured in zip(order, runs, strict=True):
                samples[contender]["lpe"].append(measured["loads_per_expiry"])
                samples[contender]["during"] += measured["during"]
                samples[contender]["steady"] += measured["steady"]
                samples[contender]["errors"].append(measured["errors"])
        hits = await hit_cost(rt, 2 if quick else 9, 200 if quick else 5000)
    table = Table(f"2 processes x {tasks} tasks, one read per task every {PAUSE:g} s, ttl {TTL:g} s, loader "
                  f"{LOADER_SECONDS * 1000:g} ms; {rounds} round(s) of {seconds:g} s (the first second left out)",
                  ["contender", "loader calls per expiry", "p50 refresh ms", "p99 refresh ms", "p50 steady ms",
                   "p99 steady ms", "reads", "errors"], [])
    p99: dict[str, tuple[float, float]] = {}
    for contender, s in samples.items():
        during, steady = latency_ms(s["during"]), latency_ms(s["steady"])
        p99[contender] = (during["p99_ms"], steady["p99_ms"])
        table.rows.append({
            "contender": contender, "loader calls per expiry": round(statistics.median(s["lpe"]), 2),
            "p50 refresh ms": round(during["p50_ms"], 2), "p99 refresh ms": round(during["p99_ms"], 2),
            "p50 steady ms": round(steady["p50_ms"], 2), "p99 steady ms": round(steady["p99_ms"], 2),
            "reads": len(s["during"]) + len(s["steady"]), "errors": sum(s["errors"]),
        })
    result.tables.append(table)
    diffs = {kind: sorted(a - p for a, p in zip(hits[f"aside {kind}"], hits[f"get {kind}"], strict=True))
             for kind in ("wall", "cpu")}
    result.tables.append(Table(
        "A hit: µs per op at concurrency 1 in one process (paired rounds; medians, and the median of the "
        "per-round differences)",
        ["op", "wall µs/op", "CPU µs/op", "rounds (CPU)"],
        [{"op": "dispatcher.get", "wall µs/op": round(statistics.median(hits["get wall"]), 2),
          "CPU µs/op": round(statistics.median(hits["get cpu"]), 2),
          "rounds (CPU)": " / ".join(f"{v:.1f}" for v in hits["get cpu"])},
         {"op": "dispatcher.get_or_compute (hit)", "wall µs/op": round(statistics.median(hits["aside wall"]), 2),
          "CPU µs/op": round(statistics.median(hits["aside cpu"]), 2),
          "rounds (CPU)": " / ".join(f"{v:.1f}" for v in hits["aside cpu"])},
         {"op": "difference", "wall µs/op": round(percentile(diffs["wall"], 50), 2),
          "CPU µs/op": round(percentile(diffs["cpu"], 50), 2), "rounds (CPU)": ""}]))
    ours_during, ours_steady = p99[OURS]
    peers = [p99[c][0] for c in CONTENDERS if not c.startswith("ondemand") and p99[c][0] == p99[c][0]]  # (nan: none)
    result.targets += [
        Target("12: loader calls per expiry (ondemand)", statistics.median(samples[OURS]["lpe"]), 1.05, "",
               higher_is_better=False),
        Target("12: p99 during a refresh / steady p99 (ondemand)", ours_during / ours_steady if ours_steady else 0,
               2.0, "x", higher_is_better=False),
        Target("12: ondemand p99 during a refresh / best peer's", ours_during / min(peers) if peers else 0, 1.0, "x",
               higher_is_better=False),
        Target("12: a hit through get_or_compute minus a plain get (CPU)", percentile(diffs["cpu"], 50), 2.0,
               " µs", higher_is_better=False),
    ]
    result.notes.append("refresh: reads that began while a load of that contender ran in either process (or in the "
                        "10 ms before it: the read that missed starts it); "
                        "ondemand stale_ttl: ttl 1 s, stale_ttl 2 s; cashews early: early_ttl 1 s, ttl 3 s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker(json.loads(args.worker)))
        return 0
    result = asyncio.run(run(quick=args.quick, rounds=args.rounds))
    print(result.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
