"""Benchmark 5: failover. Session latency in the second after the Redis child is SIGKILLed, and the
steady rate on PostgreSQL alone (Redis off) vs the same statements through raw aiopg.

Both parts use one embedded PostgreSQL (pgserver's binaries) that this benchmark starts and stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import aiopg
import orjson
from common import TTL, VALUE, Result, Table, Target, bench_config, latency_ms, ratio

from ondemand import Runtime
from ondemand.errors import OndemandError
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres

CONCURRENCY = 20
SESSIONS = 200


async def the_second_after_the_kill(rt: Runtime, quick: bool) -> tuple[dict, dict, int, int]:
    """Writers and readers of sessions run; Redis is SIGKILLed; returns latencies within one second."""
    for i in range(SESSIONS):
        await rt.cache.cache_session(f"s{i}", {**VALUE, "n": i}, ttl=TTL)
    samples: list[tuple[float, str, float]] = []  # (finished at, kind, seconds)
    failures = 0
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        nonlocal failures
        i = n
        while not stop.is_set():
            key = f"s{i % SESSIONS}"
            for kind in ("write", "read"):
                t0 = time.perf_counter()
                try:
                    if kind == "write":
                        await rt.cache.cache_session(key, {**VALUE, "n": i}, ttl=TTL)
                    else:
                        await rt.cache.get_session(key)
                except OndemandError:
                    failures += 1
                t1 = time.perf_counter()
                samples.append((t1, kind, t1 - t0))
            i += CONCURRENCY

    workers = [asyncio.ensure_future(worker(n)) for n in range(CONCURRENCY)]
    await asyncio.sleep(0.3 if quick else 1.0)
    killed_at = time.perf_counter()
    os.kill(rt.on_demand.lifecycle.pid(), signal.SIGKILL)
    await asyncio.sleep(1.2)
    stop.set()
    await asyncio.gather(*workers)
    window = [(kind, s) for t, kind, s in samples if killed_at <= t <= killed_at + 1.0]
    reads = latency_ms([s for kind, s in window if kind == "read"])
    writes = latency_ms([s for kind, s in window if kind == "write"])
    return reads, writes, failures, len(window)


async def steady_rate(op, seconds: float) -> tuple[float, dict]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        i = n
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await op(f"p{i % SESSIONS}", i)
            latencies.append(time.perf_counter() - t0)
            i += CONCURRENCY

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    return len(latencies) / (time.perf_counter() - started), latency_ms(latencies)


async def run(quick: bool = False, transport: str = "tcp") -> Result:
    result = Result("failover", "5. Failover")
    seconds = 0.5 if quick else 3.0
    with tempfile.TemporaryDirectory(prefix="ondemand-bench-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", startup_timeout=60)
        await pg.start()
        try:
            postgres = {"dsn": pg.dsn, "pool_min": CONCURRENCY, "pool_max": CONCURRENCY}  # as the raw pool
            config = bench_config(transport, storage={"durable": "postgres"}, postgres=postgres,
                                  lifecycle={"restart_backoff": 0.05})
            async with Runtime(config) as rt:
                reads, writes, failures, count = await the_second_after_the_kill(rt, quick)
            result.tables.append(Table(
                f"sessions (durable), {CONCURRENCY} tasks writing and reading; latency of the {count} operations "
                "that finished in the second after SIGKILL of the Redis child",
                ["operation", "p50_ms", "p99_ms", "failed requests"],
                [{"operation": "read", **reads, "failed requests": failures},
                 {"operation": "write", **writes, "failed requests": failures}],
            ))
            result.targets.append(Target("5: failed requests in the failover second", failures, 1, "",
                                         higher_is_better=False))
            worst_p99 = max(reads["p99_ms"], writes["p99_ms"])
            result.targets.append(Target("5: p99 in the failover second", worst_p99, 250, " ms",
                                         higher_is_better=False))

            # PostgreSQL alone: Redis off (noop lifecycle), so every session op is a PostgreSQL statement.
            config = bench_config(transport, storage={"durable": "postgres"}, postgres=postgres,
                                  lifecycle={"plugin": "noop"})
            async with Runtime(config) as rt:
                async def ours(key: str, i: int) -> None:
                    await rt.cache.cache_session(key, {**VALUE, "n": i}, ttl=TTL)
                    await rt.cache.get_session(key)

                ours_rate, ours_lat = await steady_rate(ours, seconds)

            async with aiopg.create_pool(pg.dsn, minsize=CONCURRENCY, maxsize=CONCURRENCY) as pool:
                async def raw(key: str, i: int) -> None:
                    value = orjson.dumps({**VALUE, "n": i})
                    async with pool.acquire() as conn, conn.cursor() as cur:
                        await cur.execute(
                            "INSERT INTO ondemand_values (namespace, id, value, expires_at) "
                            "VALUES (%s, %s, %s, now() + %s * interval '1 second') ON CONFLICT (namespace, id) "
                            "DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
                            ("bench", key, value, TTL))
                    async with pool.acquire() as conn, conn.cursor() as cur:
                        await cur.execute(
                            "SELECT value FROM ondemand_values WHERE namespace = %s AND id = %s "
                            "AND (expires_at IS NULL OR expires_at > now())", ("bench", key))
                        orjson.loads(bytes((await cur.fetchone())[0]))

                raw_rate, raw_lat = await steady_rate(raw, seconds)
            result.tables.append(Table(
                f"steady rate on PostgreSQL alone, {CONCURRENCY} tasks, {seconds:g} s each; an op = one write "
                "(upsert) + one read of a ~250-byte JSON session",
                ["client", "ops_per_s", "p50_ms", "p99_ms", "x raw"],
                [{"client": "raw aiopg (same statements)", "ops_per_s": raw_rate, **raw_lat, "x raw": 1.0},
                 {"client": "ondemand, Redis off (noop)", "ops_per_s": ours_rate, **ours_lat,
                  "x raw": ratio(ours_rate, raw_rate)}],
            ))
        finally:
            await pg.stop()
    return result


if __name__ == "__main__":
    print(asyncio.run(run()).markdown())
