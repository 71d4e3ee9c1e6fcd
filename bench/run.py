"""Run the benchmarks: `python bench/run.py [--quick] [--only NAME,...] [--json PATH] [--transport tcp|unix]`.

Prints a markdown table per benchmark and the targets from the issue, writes JSON (default
bench/results/latest.json), and checks that no redis-server/valkey-server child is left behind.
`--quick` only checks that everything still works (tiny counts; its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import bench_cache
import bench_coldstart
import bench_http
import bench_memory
import bench_warmup
import orjson
from common import REPO, Result, Table, machine_info, md_table, redis_children

BENCHMARKS = {
    "cache": bench_cache.run,
    "http": bench_http.run,
    "coldstart": bench_coldstart.run,
    "warmup": bench_warmup.run,
    "failover": None,  # TODO: needs the Postgres fallback
    "memory": bench_memory.run,
}


def failover_todo() -> Result:
    result = Result("failover", "5. Failover", status="not run")
    result.notes.append("TODO: requires the Postgres fallback; not run (no numbers are reported)")
    return result


def server_binary() -> str | None:
    from plugins.lifecycle_subprocess import find_binary

    try:
        return asyncio.run(find_binary(None)).describe()
    except Exception as exc:
        return f"none found: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: only check that everything works")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument("--transport", choices=["tcp", "unix"], default="tcp",
                        help="how every client reaches the spawned Redis (default tcp: aiocache has no unix socket "
                             "option of its own)")
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
        result = failover_todo() if run is None else asyncio.run(run(quick=args.quick, transport=args.transport))
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
