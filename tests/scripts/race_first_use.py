"""Run by a test as one of several processes: wait for the go file, race 100 first uses, report the server PID."""

import asyncio
import os
import sys
import time
from pathlib import Path

from ondemand import Runtime, load_config


async def main(go: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k.startswith("ONDEMAND_")}
    config = load_config(None, overrides={"storage": {"durable": ""}}, environ=environ)
    async with Runtime(config) as rt:
        while not go.exists():
            time.sleep(0.001)  # spin: all processes start the race within a millisecond or so
        await asyncio.gather(*(rt.cache.cache_profile(f"u{i}", {"i": i}) for i in range(100)))
        values = await asyncio.gather(*(rt.cache.get_profile(f"u{i}") for i in range(100)))
        assert values == [{"i": i} for i in range(100)]
        print(rt.on_demand.lifecycle.pid(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test says quit


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
