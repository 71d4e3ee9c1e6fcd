"""Run by tests/test_aside.py: a Runtime on an external Redis calling get_or_compute from many tasks.

argv: a JSON object {"redis_url", "callers", "id", "loader_seconds", "log" (a file each loader call appends a
line to), "options" (get_or_compute's)}. Prints {"ready": true} once connected, waits for one line on stdin,
then prints one JSON line: every caller's value (or error code) and seconds, and the aside counters.
"""

import asyncio
import json
import os
import sys
import time

from ondemand import Runtime, load_config
from ondemand.errors import OndemandError


async def main(args: dict) -> None:
    overrides = {"lifecycle": {"plugin": "external", "redis_url": args["redis_url"]},
                 "redis": {"op_timeout": 1.0, "connect_timeout": 1.0}, "storage": {"durable": ""}}
    loop = asyncio.get_running_loop()
    async with Runtime(load_config(None, overrides=overrides, environ={})) as rt:
        await rt.dispatcher.get("profile", "warm-up")  # connected before the start line
        await rt.cache_storage.leases.listen(2.0)
        print(json.dumps({"ready": True}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

        async def loader() -> dict:
            fd = os.open(args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            await asyncio.sleep(args["loader_seconds"])
            return {"by": os.getpid()}

        async def call() -> tuple:
            began = time.monotonic()
            try:
                value = await rt.cache.get_or_compute("profile", args["id"], loader, **args["options"])
            except OndemandError as exc:
                value = {"error": exc.code}
            return value, time.monotonic() - began

        results = await asyncio.gather(*(call() for _ in range(args["callers"])))
        aside = rt.dispatcher.status()["aside"]["namespaces"]["profile"]
        print(json.dumps({"results": results, "aside": aside,
                          "notifications": rt.cache_storage.leases.notifications}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
