"""Run by a test as a separate process: start an exclusive LocalCluster in the directory given, print its
nodes' PIDs and its directory as one JSON line, then wait forever (the test SIGKILLs us)."""

import asyncio
import json
import os
import sys
from pathlib import Path

from ondemand.plugins.lifecycle_subprocess.local_cluster import LocalCluster


async def main() -> None:
    cluster = LocalCluster(binary=os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None, parent=Path(sys.argv[1]),
                           startup_timeout=20.0, exclusive=True)
    await cluster.start()
    print(json.dumps({"pids": cluster.pids(), "path": str(cluster.path)}), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
