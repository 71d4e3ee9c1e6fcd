"""Benchmark 4: warm up N users (session, messages, profile each) via warmup_user_cache vs raw pipelines.

Ours: `rt.cache.warmup_user_cache` for every user of a chunk, gathered, chunk after chunk. Raw: one
redis.asyncio pipeline (transaction=False) of the same SETs (same keys, same JSON bytes, PX) per chunk.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from common import TTL, VALUE, Result, Table, Target, bench_config, keep_best, ratio, redis_client_kwargs

from ondemand import Runtime

CHUNK = 500
ROUNDS = 5
RAW, OURS = "raw redis.asyncio pipelines", "ondemand warmup_user_cache"


def user_data(i: int) -> dict[str, Any]:
    user_id = f"user-{i}"
    return {
        "session": {"user_id": user_id, "token": f"{i:032x}", "created_at": "2024-06-30T12:00:00Z"},
        "messages": [{"id": m, "from": "assistant" if m % 2 else user_id, "text": f"message number {m}"}
                     for m in range(10)],
        "profile": {**VALUE, "id": user_id},
    }


async def ours(rt: Runtime, users: list[tuple[str, dict[str, Any]]]) -> None:
    cache = rt.cache
    for start in range(0, len(users), CHUNK):
        await asyncio.gather(*(cache.warmup_user_cache(user_id, ttl=TTL, **data)
                               for user_id, data in users[start:start + CHUNK]))


async def raw(client: aioredis.Redis, users: list[tuple[str, dict[str, Any]]]) -> None:
    for start in range(0, len(users), CHUNK):
        pipe = client.pipeline(transaction=False)
        for user_id, data in users[start:start + CHUNK]:
            for namespace, value in data.items():
                pipe.set(f"ondemand:{namespace}:{user_id}", orjson.dumps(value), px=TTL * 1000)
        await pipe.execute()


async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    count = 200 if quick else 10_000
    users = [(f"user-{i}", user_data(i)) for i in range(count)]
    result = Result("warmup", f"4. Warm-up of {count:,} users (session + messages + profile each)")
    best: dict[str, dict[str, Any]] = {}
    paired: list[dict[str, Any]] = []  # per round: both rates, measured one after the other, and their ratio
    async with Runtime(bench_config(transport)) as rt:
        client = aioredis.Redis(**redis_client_kwargs(await rt.on_demand.ensure()))
        try:
            await ours(rt, users[:1])  # both connected before timing (ours has two pools: session, default)
            await raw(client, users[:1])
            contenders = [(RAW, lambda: raw(client, users)), (OURS, lambda: ours(rt, users))]
            for number in range(1 if quick else ROUNDS):
                measured: dict[str, float] = {}
                for name, write in contenders[number % 2:] + contenders[:number % 2]:  # who goes first alternates
                    await client.flushall()
                    started, cpu = time.perf_counter(), time.process_time()
                    await write()
                    seconds = time.perf_counter() - started
                    keep_best(best, name, {"client": name, "seconds": seconds, "users_per_s": count / seconds,
                                           "client_cpu_us/user": (time.process_time() - cpu) / count * 1e6},
                              "users_per_s")
                    measured[name] = count / seconds
                    if await client.dbsize() != 3 * count:
                        raise RuntimeError(f"{name}: expected {3 * count} keys, found {await client.dbsize()}")
                paired.append({"round": number + 1, "raw users_per_s": measured[RAW],
                               "ours users_per_s": measured[OURS], "x raw": ratio(measured[OURS], measured[RAW])})
            sample = await client.get(f"ondemand:messages:{users[-1][0]}")
            assert orjson.loads(sample) == users[-1][1]["messages"]
        finally:
            await client.aclose()
        stats = rt.dispatcher.stats
        lost = sum(s.dropped_writes + s.cache_errors for s in stats.values())
    rows = [best[RAW], best[OURS]]
    for row in rows:
        row["best x raw"] = ratio(row["users_per_s"], rows[0]["users_per_s"])
    runs = len(rows[0]["rounds users_per_s"])
    result.tables.append(Table(f"transport {transport}; chunks of {CHUNK} users; best of {runs} "
                               "run(s), raw and ours alternating, FLUSHALL before each; both leave 3 keys per user",
                               ["client", "seconds", "users_per_s", "best x raw", "client_cpu_us/user",
                                "rounds users_per_s"], rows))
    median = statistics.median(row["x raw"] for row in paired)
    paired.append({"round": "median", "raw users_per_s": statistics.median(r["raw users_per_s"] for r in paired),
                   "ours users_per_s": statistics.median(r["ours users_per_s"] for r in paired), "x raw": median})
    result.tables.append(Table("paired rounds: both clients one after the other (the first alternates), and ours "
                               "over raw (the target uses the median; see bench_http.py for why)",
                               ["round", "raw users_per_s", "ours users_per_s", "x raw"], paired))
    if lost:
        result.status = "invalid"
        result.notes.append(f"ondemand dropped {lost} writes: its number is NOT valid")
    result.targets.append(Target("4: warm-up vs raw pipelines, median of paired rounds", median, 0.9))
    return result


if __name__ == "__main__":
    print(asyncio.run(run()).markdown())
