"""Run by a test as "a script beside run.py": a Runtime on a config file, driven line by line on stdin.

Commands (one JSON array per line): ["set", id, value], ["get", id], ["status"], ["quit"].
Each answers one JSON line: {"ok": ...} or {"error": code, "message": ...}.
"""

import asyncio
import json
import logging
import sys

from ondemand import Runtime, load_config
from ondemand.errors import OndemandError


async def main(config_path: str) -> None:
    loop = asyncio.get_running_loop()
    async with Runtime(load_config(config_path, environ={})) as rt:
        print(json.dumps({"ok": "ready"}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command, *args = json.loads(line)
            try:
                if command == "set":
                    result = await rt.cache.cache_session(args[0], args[1])
                elif command == "get":
                    result = await rt.cache.get_session(args[0])
                elif command == "status":
                    result = rt.status()["storages"]["durable"]
                else:
                    return
                answer = {"ok": result}
            except OndemandError as exc:
                answer = {"error": exc.code, "message": str(exc)}
            print(json.dumps(answer, default=str), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(sys.argv[1]))
