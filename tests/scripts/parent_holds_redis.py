"""Run by a test as a separate process: start Redis through a Runtime, print its PID, then wait forever."""

import asyncio
import os
import sys

from ondemand import Runtime, load_config


async def main() -> None:
    environ = {k: v for k, v in os.environ.items() if k.startswith("ONDEMAND_")}
    config = load_config(None, overrides={"storage": {"durable": ""}}, environ=environ)
    async with Runtime(config) as rt:
        await rt.cache.cache_profile("u1", {"x": 1})
        print(rt.on_demand.lifecycle.pid(), rt.on_demand.lifecycle.runtime_dir, flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
