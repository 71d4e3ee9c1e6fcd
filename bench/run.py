"""Run the ondemand benchmarks, print markdown tables, write JSON.

    python bench/run.py [--quick] [--only NAME,...] [--json PATH] [--transport tcp|unix] [--wait-quiet SECONDS]

Prints a markdown table per benchmark and the targets from the issue, writes JSON (default
bench/results/latest.json), and checks that no redis-server/valkey-server child is left behind.
`--quick` only checks that everything still works (tiny counts; its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

import bench_aside
import bench_cache
import bench_cluster
import bench_coldstart
import bench_durable
import bench_failover
import bench_http
import bench_invalidation
import bench_memory
import bench_near
import bench_tls
import bench_warmup
import orjson
import psutil
from common import REPO, Result, Table, machine_info, md_table, redis_children

BENCHMARKS = {
    "cache": bench_cache.run,
    "http": bench_http.run,
    "coldstart": bench_coldstart.run,
    "warmup": bench_warmup.run,
    "failover": bench_failover.run,
    "memory": bench_memory.run,
    "invalidation": bench_invalidation.run,
    "cluster": bench_cluster.run,
    "tls": bench_tls.run,
    "durable": bench_durable.run,
    "near": bench_near.run,
    "coherence": bench_near.run_coherence,
    "aside": bench_aside.run,
}


def server_binary() -> str | None:
    from ondemand.plugins.lifecycle_subprocess import find_binary

    try:
        return asyncio.run(find_binary(None)).describe()
    except Exception as exc:
        return f"none found: {exc}"


class BackgroundLoad:
    """CPU used by processes other than ours (and our reaped descendants) while a benchmark ran."""

    @classmethod
    def wait_quiet(cls, timeout: float, cores: float = 0.15, window: float = 2.0) -> str:
        """Wait up to `timeout` s for a `window` in which others use under `cores` cores; say how it went."""
        deadline = time.monotonic() + timeout
        while True:
            with cls() as probe:
                time.sleep(window)
            if probe.cores < cores:
                return f"waited for a quiet machine: quiet after {timeout - (deadline - time.monotonic()):.0f} s"
            if time.monotonic() >= deadline:
                return f"waited {timeout:g} s for a quiet machine in vain (others used {probe.cores:.2f} cores)"

    def __enter__(self) -> BackgroundLoad:
        self.started, self.busy, self.ours = time.perf_counter(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.started
        other = (self._busy() - self.busy) - (self._ours() - self.ours)
        self.cores = max(0.0, other / elapsed)

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    @staticmethod
    def _ours() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def describe(self) -> str:
        warn = " -- another workload competed for the CPU: treat these numbers with caution" if self.cores > 0.1 else ""
        return f"background load: other processes used {self.cores:.2f} of {psutil.cpu_count()} cores{warn}"


class Watchdog:
    """A benchmark that outlives its bound is a hang, never a slow run: say where every task and thread was,
    stop our descendants by PID and exit 3, so a CI run fails in minutes with the place instead of timing out."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds, self.done = name, seconds, threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self, coro):  # type: ignore[no-untyped-def]
        self.loop = asyncio.get_running_loop()
        return await coro

    def __enter__(self) -> Watchdog:
        threading.Thread(target=self._watch, name=f"watchdog {self.name}", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()

    def _watch(self) -> None:
        if self.done.wait(self.seconds):
            return
        print(f"\nbenchmark {self.name!r} still running after {self.seconds:g} s: a hang; stacks follow",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._dump_tasks)
            self.done.wait(5)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(3)

    def _dump_tasks(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            print(f"-- {task!r}", file=sys.stderr)
            task.print_stack(file=sys.stderr)
        sys.stderr.flush()
        self.done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: only check that everything works")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument("--transport", choices=["tcp", "unix"], default="tcp",
                        help="how every client reaches the spawned Redis (default tcp: aiocache has no unix socket "
                             "option of its own)")
    parser.add_argument("--hang-after", type=float, metavar="SECONDS",
                        help="a benchmark still running after SECONDS is a hang: dump stacks, stop its children, "
                             "exit 3 (default 300 with --quick, 3600 without)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each benchmark, wait up to SECONDS for other processes to leave the CPU idle")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    started = time.perf_counter()
    info = machine_info(server_binary())
    print(f"# ondemand benchmarks{' (--quick: numbers are meaningless)' if args.quick else ''}\n")
    print(md_table(["key", "value"], [{"key": k, "value": v} for k, v in info.items()]) + "\n", flush=True)
    results: list[Result] = []
    for name in names:
        run = BENCHMARKS[name]
        waited = BackgroundLoad.wait_quiet(args.wait_quiet) if args.wait_quiet and run is not None else ""
        watchdog = Watchdog(name, args.hang_after or (300 if args.quick else 3600))
        with BackgroundLoad() as background, watchdog:
            result = asyncio.run(watchdog.run(run(quick=args.quick, transport=args.transport)))
        if run is not None:
            result.notes += [note for note in (waited, background.describe()) if note]
            result.background_cores = background.cores
        results.append(result)
        print(result.markdown(), flush=True)

    targets = [t for r in results for t in r.targets]
    if targets:
        summary = Result("targets", "Targets from the issue" + (" (--quick: not meaningful)" if args.quick else ""))
        summary.tables.append(Table("", ["target", "wanted", "measured", "met"], [t.row() for t in targets]))
        print(summary.markdown())

    leftovers = redis_children()
    for child in leftovers:  # ours by construction: descendants of this process
        child.kill()
    elapsed = time.perf_counter() - started
    print(f"{len(results)} benchmark(s) in {elapsed:.1f} s; redis-server children left: {len(leftovers)}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps({
        "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "transport": args.transport,
        "machine": info,
        "seconds": round(elapsed, 1),
        "results": [r.as_json() for r in results],
        "targets": [{**t.row(), "value": t.value, "threshold": t.threshold} for t in targets],
        "leftover_redis_children": len(leftovers),
    }, option=orjson.OPT_INDENT_2))
    print(f"JSON written to {args.json}")
    failed = [r.name for r in results if r.status not in ("ok", "not run")]
    if failed:
        print(f"benchmarks with invalid or failed results: {', '.join(failed)}", file=sys.stderr)
    return 1 if leftovers or failed else 0


if __name__ == "__main__":
    sys.exit(main())
