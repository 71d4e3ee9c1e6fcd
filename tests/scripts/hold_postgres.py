"""Run by a test as the owner of an embedded PostgreSQL that it will SIGKILL: start the server of the data
directory in argv[1], commit four rows, leave one backend busy in a long query (a backend notices its
postmaster's death only when it next waits, so this one holds the data directory for a while after the
kill, like a real request would), print the postmaster's pid, and wait to be killed."""

import asyncio
import sys

import aiopg

from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from tests.support import TEST_SETTINGS


async def main(data_dir: str) -> None:
    pg = EmbeddedPostgres(data_dir, startup_timeout=30.0, settings=TEST_SETTINGS)
    await pg.start()
    async with aiopg.connect(pg.dsn, enable_hstore=False) as conn, conn.cursor() as cur:
        await cur.execute("CREATE TABLE held (v int); INSERT INTO held SELECT generate_series(1, 4)")
    busy = await aiopg.connect(pg.dsn, enable_hstore=False)
    cur = await busy.cursor()
    query = asyncio.ensure_future(cur.execute("SELECT count(*) FROM generate_series(1, 10000000)"))
    await asyncio.sleep(0.2)  # the query is running
    print(pg.pid, flush=True)
    await query
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
