"""Run by a test as one of several processes racing the first use of one new data directory: say ready,
wait for the go file, start (or adopt) its embedded PostgreSQL, print its pid and who owns it, and keep
using it until the test closes our stdin."""

import asyncio
import json
import sys
import time
from pathlib import Path

from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from tests.support import TEST_SETTINGS


async def main(data_dir: str, go: Path) -> None:
    pg = EmbeddedPostgres(data_dir, startup_timeout=60.0, settings=TEST_SETTINGS)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)  # spin: every process starts the race within a millisecond or so
    await pg.start()
    print(json.dumps({"pid": pg.pid, "owner": pg.owner}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await pg.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
