"""Run by a test as the app process: a Runtime with the config overrides given (JSON; topology "cluster"),
one operation (which spawns the cluster), then the nodes' PIDs and the cluster's directory as one JSON
line; then wait forever (the test SIGKILLs us)."""

import asyncio
import json
import os
import sys

from ondemand import Runtime, load_config
from ondemand.config.load import merge


async def main(overrides: dict) -> None:
    base = {"storage": {"durable": ""}, "lifecycle": {"shutdown_grace": 1.0}}
    if os.environ.get("ONDEMAND_TEST_REDIS_BINARY"):
        base["lifecycle"]["redis_binary"] = os.environ["ONDEMAND_TEST_REDIS_BINARY"]
    async with Runtime(load_config(None, overrides=merge(base, overrides), environ={})) as rt:
        await rt.cache.cache_profile("u1", {"p": 1})
        cluster = rt.on_demand.lifecycle.cluster
        print(json.dumps({"pids": cluster.pids(), "path": str(cluster.path)}), flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
