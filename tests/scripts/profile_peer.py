"""Run by a test in a project directory, as a user's script would: `Runtime(load_config("config/default.toml"))`.

Reads the profile argv[1], caches {"from": "script"} as profile argv[2], then prints one JSON line: what it
read, and whose server it used (its status: owner, pid, runtime_dir). With --hold it keeps its Runtime (and
so a server it started) until its stdin is closed.
"""

import asyncio
import json
import sys

from ondemand import Runtime, load_config


async def main(read_id: str, write_id: str, hold: bool) -> None:
    async with Runtime(load_config("config/default.toml")) as rt:
        seen = await rt.cache.get_profile(read_id)
        await rt.cache.cache_profile(write_id, {"from": "script"})
        redis = rt.status()["redis"]
        print(json.dumps({"seen": seen, "owner": redis["owner"], "pid": redis["pid"],
                          "runtime_dir": redis["runtime_dir"]}), flush=True)
        if hold:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], "--hold" in sys.argv[3:]))
