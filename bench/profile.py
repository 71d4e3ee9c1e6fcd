"""Where the time goes: py-spy samples benchmark 1's CacheService path and ranks the functions.

`python bench/profile.py [--concurrency 50] [--seconds 8] [--rate 250] [--top 15]` runs
`bench_cache.py --ours-only` under `py-spy record` (a sampler outside the process) and prints, as
markdown: own time by kind and by line, and inclusive time of our functions (app/, plugins/), counting
only samples of the event-loop thread. Needs py-spy (`pip install py-spy`). Sampling pauses the process,
so the ops/s it reports are lower than benchmark 1's.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, md_table

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> tuple[str, str]:
    """`func (path/file.py:line)` -> (`file:func`, `file:line func`); repo paths relative, library paths cut."""
    match = FRAME.match(frame)
    if not match:
        return frame, frame
    path = match["file"]
    if path.startswith(str(REPO)):
        path = path[len(str(REPO)) + 1:]
    else:
        path = re.sub(r"^.*/(site-packages|python3\.\d+)/", "", path)
    return f"{path}:{match['func']}", f"{path}:{match['line']} {match['func']}"


def ours(name: str) -> bool:
    return name.startswith(("app/", "plugins/"))


def category(function: str) -> str:
    if ours(function):
        return "our code (app/, plugins/)"
    if function.startswith("bench_"):
        return "benchmark harness (bench/)"
    if "_SelectorSocketTransport.write" in function or "_read_ready" in function:
        return "socket send/recv (asyncio transport)"
    if function.startswith(("asyncio/", "selectors.py")):
        return "event loop (asyncio scheduling, epoll)"
    return "other (libraries)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        run = subprocess.run(
            [py_spy, "record", "--rate", str(args.rate), "--format", "raw",
             "--output", str(raw), "--", sys.executable, str(REPO / "bench" / "bench_cache.py"), "--ours-only",
             "--concurrency", str(args.concurrency), "--seconds", str(args.seconds), "--transport", args.transport],
            capture_output=True, text=True, cwd=REPO,
        )
        if run.returncode != 0 or not raw.exists():
            print(run.stdout, run.stderr, sep="\n", file=sys.stderr)
            return 1
        lines = raw.read_text().splitlines()
    own_lines: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if "BaseEventLoop._run_once" not in stack:  # keep the event loop thread; drop imports, helper threads
            continue
        frames = [short(f) for f in stack.split(";")]
        n = int(count)
        total += n
        own_lines[frames[-1][1]] += n
        categories[category(frames[-1][0])] += n
        for function in {f for f, _ in frames}:
            inclusive[function] += n

    def rows(counter: collections.Counter[str], keep=lambda name: True) -> list[dict[str, object]]:
        return [{"where": f"`{name}`", "samples": n, "% of all": f"{100 * n / total:.1f}"}
                for name, n in counter.most_common() if keep(name)][:args.top]

    ops = next((line for line in run.stdout.splitlines() if "ops/s" in line), "?")
    print(f"# py-spy profile of {ops} ({total} samples at {args.rate}/s, event-loop thread only)\n")
    print("## Own time by kind\n")
    print(md_table(["where", "samples", "% of all"], rows(categories)) + "\n")
    print("## Own time by line (a leaf on an `await` line is the cost of resuming/suspending through it)\n")
    print(md_table(["where", "samples", "% of all"], rows(own_lines)) + "\n")
    print("## Inclusive time of our functions\n")
    print(md_table(["where", "samples", "% of all"], rows(inclusive, ours)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
