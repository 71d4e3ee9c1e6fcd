"""Benchmark 1: CacheService get/set vs raw redis.asyncio, aiocache, cashews, coredis and valkey-glide, on
our spawned Redis.

An op is one SET (60 s TTL) plus one GET of the ~250-byte JSON value, awaited one after the other by
one task; N tasks loop for a fixed time. ops/s counts these pairs (commands/s is twice that).

Only our path (for a profiler): `python bench/bench_cache.py --ours-only [--concurrency 50] [--seconds 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib.metadata
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from common import (
    TTL,
    VALUE,
    Result,
    Table,
    Target,
    bench_config,
    cpu_seconds,
    keep_best,
    latency_ms,
    ratio,
    redis_client_kwargs,
    set_get_op,
)

from ondemand import Runtime

CONCURRENCY = (1, 10, 50, 200)
# redis-py 8 pools refuse (MaxConnectionsError) past 100 connections by default; every pooled client
# gets room for one connection per task at the highest concurrency, so none ever waits for one.
POOL_SIZE = max(CONCURRENCY)
KEYS_PER_TASK = 64
ROUNDS = 3
Op = Callable[[str], Awaitable[Any]]


# -- contenders: each returns (op, close, description) --------------------------------------------

async def ondemand(rt: Runtime, endpoint: Any) -> tuple[Op, Callable[[], Awaitable[None]], str]:
    cache = rt.cache

    async def op(key: str) -> Any:
        await cache.cache_profile(key, VALUE, ttl=TTL)
        return await cache.get_profile(key)

    async def close() -> None:
        pass

    return op, close, "rt.cache.cache_profile + get_profile (automatic pipelining, one connection)"


async def raw(rt: Runtime, endpoint: Any) -> tuple[Op, Callable[[], Awaitable[None]], str]:
    client = aioredis.Redis(**redis_client_kwargs(endpoint), max_connections=POOL_SIZE)
    op = set_get_op(client, "raw:", px=TTL * 1000)

    return op, client.aclose, (f"redis.asyncio.Redis (hiredis parser, pool of {POOL_SIZE}), orjson, "
                               "one command per call")


class _UnixPool(aioredis.ConnectionPool):
    """aiocache always passes host/port to its pool class; this one connects to a unix socket instead."""

    def __init__(self, *, host: Any = None, port: Any = None, path: str, **kwargs: Any) -> None:
        super().__init__(connection_class=aioredis.UnixDomainSocketConnection, path=path, **kwargs)


class _UnixBlockingPool(aioredis.BlockingConnectionPool):
    """For cashews, which accepts only redis:// URLs: builds the pool from the unix:// URL it is given."""

    @classmethod
    def from_url(cls, url: str, *, unix_url: str, **kwargs: Any) -> Any:
        kwargs.pop("socket_keepalive", None)  # a TCP option that cashews adds for redis:// URLs
        return super().from_url(unix_url, **kwargs)


async def aiocache(rt: Runtime, endpoint: Any) -> tuple[Op, Callable[[], Awaitable[None]], str]:
    from aiocache import RedisCache

    if endpoint.unix_socket:
        cache = RedisCache(password=endpoint.password, namespace="aiocache", connection_pool_class=_UnixPool,
                           connection_pool_kwargs={"path": endpoint.unix_socket}, pool_max_size=POOL_SIZE)
    else:
        cache = RedisCache(endpoint=endpoint.host, port=endpoint.port, password=endpoint.password,
                           namespace="aiocache", pool_max_size=POOL_SIZE)

    async def op(key: str) -> Any:
        await cache.set(key, VALUE, ttl=TTL)
        return await cache.get(key)

    return op, cache.close, f"aiocache.RedisCache ({type(cache.serializer).__name__}, pool of {POOL_SIZE})"


async def cashews(rt: Runtime, endpoint: Any) -> tuple[Op, Callable[[], Awaitable[None]], str]:
    from cashews import Cache

    password = urllib.parse.quote(endpoint.password or "", safe="")
    cache = Cache()
    if endpoint.unix_socket:  # cashews takes only redis:// URLs; its pool class can be swapped
        url = f"unix://{endpoint.unix_socket}?db=0" + (f"&password={password}" if endpoint.password else "")
        cache.setup("redis://localhost/0", max_connections=POOL_SIZE, connection_pool_class=_UnixBlockingPool,
                    unix_url=url)
    else:
        cache.setup(f"redis://{':' + password + '@' if endpoint.password else ''}{endpoint.host}:{endpoint.port}/0",
                    max_connections=POOL_SIZE)
    await cache.init()

    async def op(key: str) -> Any:
        await cache.set("cashews:" + key, VALUE, expire=TTL)
        return await cache.get("cashews:" + key)

    return op, cache.close, (f"cashews Cache.setup(redis URL) (default pickle serializer, "
                             f"BlockingConnectionPool of {POOL_SIZE})")


async def coredis(rt: Runtime, endpoint: Any) -> tuple[Op, Callable[[], Awaitable[None]], str]:
    import coredis

    where = ({"unix_socket_path": endpoint.unix_socket} if endpoint.unix_socket
             else {"host": endpoint.host, "port": endpoint.port})
    client = coredis.Redis(**where, password=endpoint.password, max_connections=POOL_SIZE)
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(client)  # coredis 6 clients work only inside their context (a task group)
    op = set_get_op(client, "coredis:", px=TTL * 1000)

    return op, stack.aclose, (f"coredis.Redis {coredis.__version__} (RESP3, its blocking pool of at most {POOL_SIZE}, "
                              "which multiplexes commands of several tasks on a connection), orjson")


async def glide(rt: Runtime, endpoint: Any) -> tuple[Op, Callable[[], Awaitable[None]], str] | None:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress, ServerCredentials

    if endpoint.unix_socket:
        return None  # glide connects over TCP only
    client = await GlideClient.create(GlideClientConfiguration(
        [NodeAddress(endpoint.host, endpoint.port)], credentials=ServerCredentials(endpoint.password),
        request_timeout=5000))
    op = set_get_op(client, "glide:", expiry=_glide_expiry())

    version = importlib.metadata.version("valkey-glide")
    return op, client.close, (f"valkey-glide {version} GlideClient (its Rust core, one multiplexed connection), "
                              "orjson; no unix socket, so not in a --transport unix run")


@functools.cache
def _glide_expiry() -> Any:
    from glide import ExpirySet, ExpiryType

    return ExpirySet(ExpiryType.MILLSEC, TTL * 1000)


CONTENDERS = {"raw redis.asyncio": raw, "ondemand CacheService": ondemand, "aiocache": aiocache, "cashews": cashews,
              "coredis": coredis, "valkey-glide": glide}
BASELINE = "raw redis.asyncio"
OURS = "ondemand CacheService"


# -- the load loop ----------------------------------------------------------------------------------

async def measure(op: Op, concurrency: int, seconds: float, redis_pids: Sequence[int | None] = ()) -> dict[str, Any]:
    """`concurrency` tasks each loop op(key) for `seconds`; returns ops/s, p50/p99 per op, misses, and the
    CPU time per op of this process (client) and of the server(s) `redis_pids` (every node of a cluster):
    unlike ops/s, barely moved by outside load."""
    latencies: list[float] = []
    misses = 0
    clock = time.perf_counter

    async def worker(w: int) -> None:
        nonlocal misses
        keys = [f"k{w}-{i}" for i in range(KEYS_PER_TASK)]
        n = 0
        while clock() < deadline:
            t = clock()
            found = await op(keys[n % KEYS_PER_TASK])
            latencies.append(clock() - t)
            if found is None:
                misses += 1
            n += 1

    gc.collect()
    cpu, redis_cpu = time.process_time(), cpu_seconds(list(redis_pids))
    started = clock()
    deadline = started + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = clock() - started
    ops = len(latencies)
    return {"ops": ops, "ops_per_s": ops / elapsed, **latency_ms(latencies), "misses": misses,
            "client_cpu_us/op": (time.process_time() - cpu) / ops * 1e6,
            "redis_cpu_us/op": ((cpu_seconds(list(redis_pids)) - redis_cpu) / ops * 1e6 if any(redis_pids)
                                else float("nan"))}


def pipeline_counts(rt: Runtime) -> tuple[int, int]:
    """(batches, commands) written so far by the default pool's pipelined connection."""
    pool = rt.on_demand.pools.get("default")
    mux = pool.mux if pool else None
    return (mux.batches_written, mux.commands_written) if mux else (0, 0)


async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    seconds, warmup, rounds = (0.1, 0.02, 1) if quick else (2.0, 0.3, ROUNDS)
    result = Result("cache", "1. CacheService get/set vs raw redis.asyncio, aiocache, cashews, coredis, valkey-glide")
    best: dict[tuple[int, str], dict[str, Any]] = {}
    async with Runtime(bench_config(transport)) as rt:
        endpoint = await rt.on_demand.ensure()
        contenders = {}
        for name, make in CONTENDERS.items():
            made = await make(rt, endpoint)
            if made is None:
                result.notes.append(f"{name}: not run over transport {transport}")
                continue
            contenders[name] = made
            result.notes.append(f"{name}: {made[2]}")
        stats = rt.dispatcher.stats["profile"]
        try:
            for _round in range(rounds):  # the whole matrix per round, so a burst of outside load hits one round
                for concurrency in CONCURRENCY:
                    for name, (op, _close, _desc) in contenders.items():
                        await measure(op, concurrency, warmup)
                        before = pipeline_counts(rt)
                        measured = await measure(op, concurrency, seconds, [rt.lifecycle.pid()])
                        row = {"concurrency": concurrency, "client": name, **measured}
                        if name == "ondemand CacheService":
                            batches, commands = (a - b for a, b in zip(pipeline_counts(rt), before, strict=True))
                            row["cmds/batch"] = commands / batches if batches else float("nan")
                        keep_best(best, (concurrency, name), row, "ops_per_s", summed=("misses",))
        finally:
            for _op, close, _desc in contenders.values():
                await close()
        if stats.cache_errors or stats.dropped_writes or not rt.dispatcher.breaker.closed:
            result.status = "invalid"
            result.notes.append(f"ondemand had cache errors ({stats.cache_errors}) or dropped writes "
                                f"({stats.dropped_writes}): its numbers are NOT valid")
    rows = list(best.values())
    for row in rows:
        row["x raw"] = ratio(row["ops_per_s"], best[row["concurrency"], BASELINE]["ops_per_s"])
        row["ours over it"] = ratio(best[row["concurrency"], OURS]["ops_per_s"], row["ops_per_s"])
    columns = ["concurrency", "client", "ops_per_s", "p50_ms", "p99_ms", "x raw", "ours over it", "client_cpu_us/op",
               "redis_cpu_us/op", "misses", "cmds/batch", "rounds ops_per_s"]
    result.tables.append(Table(f"transport {transport}; op = SET (PX 60000) + GET of a {len(orjson.dumps(VALUE))}-byte "
                               f"JSON value; best of {rounds} round(s) of {seconds:g} s per cell (its p50/p99)",
                               columns, rows))
    if any(row["misses"] for row in rows):
        result.status = "invalid"
        result.notes.append("some GETs missed (see `misses`): a contender failed silently")
    cell = {(r["concurrency"], r["client"]): r for r in rows}
    ours = "ondemand CacheService"
    result.targets += [
        Target("1: c=50 vs raw redis.asyncio", cell[50, ours]["x raw"], 2.5),
        Target("1: c=50 vs aiocache", ratio(cell[50, ours]["ops_per_s"], cell[50, "aiocache"]["ops_per_s"]), 3.0),
        Target("1: c=50 vs cashews", ratio(cell[50, ours]["ops_per_s"], cell[50, "cashews"]["ops_per_s"]), 3.0),
        Target("1: c=1 vs raw redis.asyncio", cell[1, ours]["x raw"], 0.95),
    ]
    return result


async def ours_only(concurrency: int, seconds: float, transport: str) -> None:
    """Only our contender, for an outside profiler (bench/profile.py runs py-spy on this)."""
    async with Runtime(bench_config(transport)) as rt:
        op, _close, _desc = await ondemand(rt, await rt.on_demand.ensure())
        await measure(op, concurrency, 0.5)
        print(f"ondemand CacheService, concurrency {concurrency}, transport {transport}: "
              f"{(await measure(op, concurrency, seconds))['ops_per_s']:,.0f} ops/s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-only", action="store_true", help="run only our CacheService path (to profile it)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    args = parser.parse_args()
    if args.ours_only:
        asyncio.run(ours_only(args.concurrency, args.seconds, args.transport))
    else:
        print(asyncio.run(run(transport=args.transport)).markdown())
