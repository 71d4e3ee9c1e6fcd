"""Benchmark 2 counted in CPU instructions: each HTTP server under callgrind, wrk for load.

    python bench/instructions.py [--seconds 8] [--transport tcp|unix]

Requests per second on this VM drift by up to 2x within a minute (other tenants); the number of
instructions a server executes per request moves by a few percent between runs. Each server of
benchmark 2 (`bench_http.py serve KIND ...`) runs under `valgrind --tool=callgrind` (its redis-server
child natively), is warmed up, its counters are zeroed, wrk loads it for `--seconds`, and the counters
are dumped: instructions per request = Ir / requests answered. Prints a markdown table with the ratios
of benchmark 2. Fewer instructions is not the same as more requests per second (cache misses and
system calls are not counted), but it is the steadiest number to compare two versions of the code
with; the raw handler's count varies far more between runs than ours or the bare one's. Needs valgrind
and wrk (Debian packages `valgrind`, `wrk`). A server runs ~50x slower under callgrind, so expect
about a minute per server.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from bench_http import KINDS, SESSION_ID, wrk
from common import REPO, free_port, md_table, ratio, stop_process


async def wait_for_answer(url: str, proc: asyncio.subprocess.Process, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server behind {url} did not answer within {timeout:g} s")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return await response.json()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)


async def callgrind_control(option: str, pid: int) -> None:
    proc = await asyncio.create_subprocess_exec("callgrind_control", option, str(pid),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed")


def total_instructions(dump: Path) -> int:
    out = subprocess.run(["callgrind_annotate", str(dump)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^\s*([\d,]+) \([^)]*\)\s+PROGRAM TOTALS", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"no PROGRAM TOTALS in callgrind_annotate {dump}")
    return int(match.group(1).replace(",", ""))


async def measure(kind: str, transport: str, template: dict, seconds: float, workdir: Path) -> tuple[dict, dict]:
    """(row, the server's answer) for one server under callgrind."""
    port = free_port()
    out = workdir / f"{kind}.callgrind"
    proc = await asyncio.create_subprocess_exec(
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", "--separate-threads=no",
        sys.executable, str(Path(__file__).parent / "bench_http.py"), "serve", kind, str(port), transport,
        orjson.dumps(template).decode(), cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/sessions/{SESSION_ID}"
        answer = await wait_for_answer(url, proc, timeout=300)
        await wrk(url, 2)  # warm-up: imports, caches, the pipeline's connection
        await callgrind_control("-z", proc.pid)  # count from here
        load = await wrk(url, seconds)
        await callgrind_control("-d", proc.pid)  # to here
        dumps = sorted(workdir.glob(f"{kind}.callgrind*"), key=lambda p: p.stat().st_mtime)
        instructions = total_instructions(dumps[-1])
    finally:
        await stop_process(proc, 60)
    requests = max(1, load["requests"])
    return {"server": KINDS[kind], "requests": load["requests"], "errors": load["errors"],
            "instructions/req": instructions / requests}, answer


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    args = parser.parse_args()
    tools = ("valgrind", "callgrind_control", "callgrind_annotate", "wrk")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        print(f"needs {', '.join(missing)} (Debian packages valgrind and wrk)", file=sys.stderr)
        return 2
    rows: dict[str, dict] = {}
    template: dict = {}
    with tempfile.TemporaryDirectory(prefix="ondemand-callgrind-") as workdir:
        for kind in ("ondemand", "raw", "bare"):  # ours first: the others copy the shape of its answer
            rows[kind], answer = await measure(kind, args.transport, template, args.seconds, Path(workdir))
            template = template or answer
    for row in rows.values():
        row["x raw (a)"] = ratio(rows["raw"]["instructions/req"], row["instructions/req"])
        row["x bare (b)"] = ratio(rows["bare"]["instructions/req"], row["instructions/req"])
    print(f"**instructions per request under callgrind; transport {args.transport}; wrk -t1 -c50 for "
          f"{args.seconds:g} s; ratios: the other server's instructions over this one's**\n")
    print(md_table(["server", "instructions/req", "requests", "errors", "x raw (a)", "x bare (b)"],
                   [rows[kind] for kind in KINDS]))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
