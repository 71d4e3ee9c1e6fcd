"""Benchmark 11: the near cache, against the near caches of cashews, valkey-glide and coredis.

Two parts, every client in a process of its own against one Valkey over TCP (the one our Runtime spawns here):

- `near`: the read-mostly workload of issue 20: 99% GET / 1% SET over 256 hot keys holding a 244-byte JSON
  value, decoded as an application would (a dict comes back), at 1 and 50 tasks. Paired rounds: each round runs
  every contender back to back (the order rotates), its ratios compare figures taken seconds apart, and the
  target is the median over rounds of ours over the best peer of that round.
- `coherence`: process A writes one of 32 keys every 2 ms (a sequence number in the value) and notes when each
  write was acknowledged; process B reads the keys from its near cache as fast as it can (8 tasks, each read
  followed by a yield to the event loop, as a server's handlers do) and notes, for every (key, sequence) it
  served, the last time it did. Per write: how long after its acknowledgement B still served an older value
  (0 when it never did). Clocks: CLOCK_MONOTONIC, one for every process of the machine.

    python bench/run.py --only near,coherence [--wait-quiet 120]
    python bench/bench_near.py near|coherence [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import importlib.metadata
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from common import REPO, VALUE, Result, Table, Target, bench_config, cpu_seconds, ratio

from ondemand import Runtime, load_config

HOT_KEYS = 256
WRITE_EVERY = 100  # one SET per 100 operations (1%)
CONCURRENCY = (1, 50)
ROUNDS = 5
COHERENCE_KEYS = 32
COHERENCE_WRITE_PERIOD = 0.002
COHERENCE_READERS = 8
PEERS = ("cashews client_side", "valkey-glide ClientSideCache", "coredis LRUCache")
OURS = "ondemand near cache"
Get = Callable[[str], Awaitable[Any]]
Set = Callable[[str, Any], Awaitable[Any]]


# -- the contenders (each made in its own process): get(key) -> decoded value, set(key, value) -------------------

async def ondemand(endpoint: dict[str, Any], near: bool = True, tracking: str = "optin"
                   ) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    url = f"redis://:{endpoint['password']}@{endpoint['host']}:{endpoint['port']}/0"
    overrides: dict[str, Any] = {
        "lifecycle": {"plugin": "external", "redis_url": url}, "storage": {"durable": ""},
        "namespaces": {"profile": {"near_cache": near}}, "near_cache": {"tracking": tracking}}
    rt = await Runtime(load_config(None, overrides=overrides, environ={})).start()
    cache = rt.cache

    async def set_(key: str, value: Any) -> None:
        await cache.cache_profile(key, value, ttl=3600)

    mode = rt.config.near_cache.tracking
    return cache.get_profile, set_, rt.close, (f"rt.cache.get_profile / cache_profile, namespace profile with "
                                               f"near_cache = {str(near).lower()}" + (f" ({mode})" if near else ""))


async def ondemand_plain(endpoint: dict[str, Any]) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    return await ondemand(endpoint, near=False)


async def ondemand_bcast(endpoint: dict[str, Any]) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    return await ondemand(endpoint, tracking="bcast")


async def cashews(endpoint: dict[str, Any]) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    from cashews import Cache

    cache = Cache()
    # protocol=2: redis-py 8 speaks RESP3 by default, and then the server pushes invalidations where cashews never
    # looks (it reads RESP2 messages of __redis__:invalidate): its local copies would never be invalidated.
    cache.setup(f"redis://:{endpoint['password']}@{endpoint['host']}:{endpoint['port']}/0", client_side=True,
                max_connections=100, protocol=2)
    await cache.init()

    async def set_(key: str, value: Any) -> None:
        await cache.set(key, value, expire=3600)

    version = importlib.metadata.version("cashews")
    return cache.get, set_, cache.close, (f"cashews {version} Cache.setup(..., client_side=True, protocol=2): BCAST "
                                          "tracking redirected to a pub/sub connection, its default pickle serializer "
                                          "(with redis-py 8's default RESP3 it is never invalidated)")


async def glide(endpoint: dict[str, Any]) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    from glide import (
        ClientSideCache,
        ExpirySet,
        ExpiryType,
        GlideClient,
        GlideClientConfiguration,
        NodeAddress,
        ProtocolVersion,
        ServerCredentials,
    )

    cache = ClientSideCache.create(max_cache_kb=64 * 1024, entry_ttl_ms=0, server_assisted=True)
    client = await GlideClient.create(GlideClientConfiguration(
        [NodeAddress(endpoint["host"], endpoint["port"])], credentials=ServerCredentials(endpoint["password"]),
        request_timeout=5000, protocol=ProtocolVersion.RESP3, client_side_cache=cache))
    expiry = ExpirySet(ExpiryType.SEC, 3600)

    async def get(key: str) -> Any:
        found = await client.get(key)
        return None if found is None else orjson.loads(found)

    async def set_(key: str, value: Any) -> None:
        await client.set(key, orjson.dumps(value), expiry=expiry)

    version = importlib.metadata.version("valkey-glide")
    return get, set_, client.close, (f"valkey-glide {version} GlideClient, ClientSideCache.create(max_cache_kb=65536, "
                                     "entry_ttl_ms=0, server_assisted=True), RESP3, orjson")


async def coredis(endpoint: dict[str, Any]) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    import coredis
    from coredis.patterns.cache import LRUCache

    client = coredis.Redis(host=endpoint["host"], port=endpoint["port"], password=endpoint["password"],
                           cache=LRUCache(max_keys=65536), max_connections=100)
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(client)  # coredis 6 clients work only inside their context

    async def get(key: str) -> Any:
        found = await client.get(key)
        return None if found is None else orjson.loads(found)

    async def set_(key: str, value: Any) -> None:
        await client.set(key, orjson.dumps(value), ex=3600)

    return get, set_, stack.aclose, (f"coredis {coredis.__version__} Redis(cache=LRUCache(max_keys=65536)), its "
                                     "tracking connection, orjson")


async def raw(endpoint: dict[str, Any]) -> tuple[Get, Set, Callable[[], Awaitable[None]], str]:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=endpoint["host"], port=endpoint["port"], password=endpoint["password"],
                            max_connections=100)

    async def get(key: str) -> Any:
        found = await client.get(key)
        return None if found is None else orjson.loads(found)

    async def set_(key: str, value: Any) -> None:
        await client.set(key, orjson.dumps(value), ex=3600)

    return get, set_, client.aclose, "redis.asyncio (hiredis), no near cache, orjson"


BCAST = "ondemand near cache, bcast"
CONTENDERS = {OURS: ondemand, BCAST: ondemand_bcast, "ondemand, no near cache": ondemand_plain,
              "cashews client_side": cashews, "valkey-glide ClientSideCache": glide, "coredis LRUCache": coredis,
              "raw redis.asyncio": raw}
PREFIX = {OURS: "near", BCAST: "bcast", "ondemand, no near cache": "plain", "cashews client_side": "",
          "valkey-glide ClientSideCache": "glide:", "coredis LRUCache": "coredis:", "raw redis.asyncio": "raw:"}


# -- in a child process -------------------------------------------------------------------------------------------

async def throughput(name: str, endpoint: dict[str, Any], concurrency: int, seconds: float, warmup: float
                     ) -> dict[str, Any]:
    get, set_, close, description = await CONTENDERS[name](endpoint)
    prefix = PREFIX[name]
    keys = [f"{prefix}hot{i}" for i in range(HOT_KEYS)]
    try:
        for key in keys:
            await set_(key, VALUE)
        schedule_rng = random.Random(20)
        # One schedule of (key, write?) every task walks from its own offset: 1% writes, keys uniform.
        schedule = [(keys[schedule_rng.randrange(HOT_KEYS)], i % WRITE_EVERY == WRITE_EVERY - 1) for i in range(20_000)]
        written = dict(VALUE)
        misses = 0
        ops = 0
        deadline = 0.0
        clock = time.perf_counter

        async def task(offset: int) -> None:
            nonlocal misses, ops
            n = offset
            done = 0
            size = len(schedule)
            while clock() < deadline:
                for _ in range(64):  # the clock read every 64 operations
                    key, write = schedule[n % size]
                    n += 1
                    if write:
                        await set_(key, written)
                    elif await get(key) is None:
                        misses += 1
                done += 64
            ops += done

        deadline = clock() + warmup
        await asyncio.gather(*(task(w * 997) for w in range(concurrency)))
        ops = misses = 0
        gc.collect()
        cpu, server_cpu = time.process_time(), cpu_seconds([endpoint["pid"]])
        started = clock()
        deadline = started + seconds
        await asyncio.gather(*(task(w * 997) for w in range(concurrency)))
        elapsed = clock() - started
        return {"ops_per_s": ops / elapsed, "ops": ops, "misses": misses,
                "client_cpu_us/op": (time.process_time() - cpu) / max(1, ops) * 1e6,
                "redis_cpu_us/op": (cpu_seconds([endpoint["pid"]]) - server_cpu) / max(1, ops) * 1e6,
                "description": description}
    finally:
        await close()


async def coherence_writer(name: str, endpoint: dict[str, Any], seconds: float, out: str) -> dict[str, Any]:
    _get, set_, close, description = await CONTENDERS[name](endpoint)
    prefix = PREFIX[name]
    keys = [f"{prefix}co{i}" for i in range(COHERENCE_KEYS)]
    acks: list[tuple[int, int, float]] = []
    try:
        seqs = [0] * COHERENCE_KEYS
        for key in keys:
            await set_(key, {**VALUE, "seq": 0})
        print("ready", flush=True)
        sys.stdin.readline()  # the reader is ready too
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            await asyncio.sleep(COHERENCE_WRITE_PERIOD)
            i = n % COHERENCE_KEYS
            n += 1
            seqs[i] += 1
            await set_(keys[i], {**VALUE, "seq": seqs[i]})
            acks.append((i, seqs[i], time.monotonic()))
    finally:
        await close()
    Path(out).write_bytes(orjson.dumps(acks))
    return {"writes": len(acks), "description": description}


async def coherence_reader(name: str, endpoint: dict[str, Any], seconds: float, out: str) -> dict[str, Any]:
    get, _set, close, description = await CONTENDERS[name](endpoint)
    prefix = PREFIX[name]
    keys = [f"{prefix}co{i}" for i in range(COHERENCE_KEYS)]
    last_seen: dict[tuple[int, int], float] = {}
    reads = 0
    absent = 0
    try:
        for key in keys:  # fill the near cache (the writer seeded the keys)
            await get(key)
        print("ready", flush=True)
        sys.stdin.readline()
        stop = time.monotonic() + seconds + 0.5
        clock = time.monotonic

        async def task(mine: list[int]) -> None:
            nonlocal reads, absent
            while True:
                for i in mine:
                    found = await get(keys[i])
                    now = clock()
                    reads += 1
                    if found is None:
                        absent += 1
                    else:
                        last_seen[(i, found["seq"])] = now
                    await asyncio.sleep(0)  # a handler's yield: the event loop runs between two reads
                if clock() > stop:
                    return

        await asyncio.gather(*(task(list(range(t, COHERENCE_KEYS, COHERENCE_READERS)))
                               for t in range(COHERENCE_READERS)))
    finally:
        await close()
    Path(out).write_bytes(orjson.dumps([[i, seq, t] for (i, seq), t in last_seen.items()]))
    return {"reads": reads, "absent": absent, "description": description}


def child_main(argv: list[str]) -> None:
    role, name, endpoint = argv[0], argv[1], json.loads(argv[2])
    if role == "throughput":
        result = asyncio.run(throughput(name, endpoint, int(argv[3]), float(argv[4]), float(argv[5])))
    elif role == "writer":
        result = asyncio.run(coherence_writer(name, endpoint, float(argv[3]), argv[4]))
    else:
        result = asyncio.run(coherence_reader(name, endpoint, float(argv[3]), argv[4]))
    print(json.dumps(result), flush=True)


# -- the parent -----------------------------------------------------------------------------------------------------

async def child(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "child", *args, cwd=REPO, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {err.decode()[-3000:]}")
    return json.loads(lines[-1])


async def endpoint_of(rt: Runtime) -> dict[str, Any]:
    endpoint = await rt.on_demand.ensure()
    return {"host": endpoint.host, "port": endpoint.port, "password": endpoint.password, "pid": rt.lifecycle.pid()}


async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    """Benchmark 11a: the read-mostly workload, paired rounds."""
    seconds, warmup, rounds = (0.3, 0.1, 1) if quick else (2.0, 0.5, ROUNDS)
    result = Result("near", "11. Near cache: 99% GET / 1% SET over 256 hot keys, each client its own process")
    if transport != "tcp":
        result.notes.append("always over TCP (valkey-glide has no unix socket)")
    names = list(CONTENDERS)
    best: dict[tuple[int, str], list[float]] = {}
    cpu: dict[tuple[int, str], list[float]] = {}
    redis_cpu: dict[tuple[int, str], list[float]] = {}
    paired: list[dict[str, Any]] = []
    descriptions: dict[str, str] = {}
    async with Runtime(bench_config("tcp")) as rt:
        endpoint = await endpoint_of(rt)
        for number in range(rounds):
            for concurrency in CONCURRENCY:
                measured: dict[str, float] = {}
                for name in names[number % len(names):] + names[:number % len(names)]:
                    proc = await child("throughput", name, json.dumps(endpoint), str(concurrency), str(seconds),
                                       str(warmup))
                    row = await finish(proc, 120)
                    redis_cpu.setdefault((concurrency, name), []).append(row["redis_cpu_us/op"])
                    descriptions[name] = row["description"]
                    measured[name] = row["ops_per_s"]
                    best.setdefault((concurrency, name), []).append(row["ops_per_s"])
                    cpu.setdefault((concurrency, name), []).append(row["client_cpu_us/op"])
                    if row["misses"]:
                        result.status = "invalid"
                        result.notes.append(f"{name} at {concurrency} tasks missed {row['misses']} reads")
                peer = max(PEERS, key=lambda p: measured[p])
                paired.append({"round": number + 1, "tasks": concurrency, **{n: measured[n] for n in names},
                               "best peer": peer, "x best peer": ratio(measured[OURS], measured[peer]),
                               "bcast x best peer": ratio(measured[BCAST], measured[peer]),
                               "x no near cache": ratio(measured[OURS], measured["ondemand, no near cache"])})
    rows = []
    for concurrency in CONCURRENCY:
        for name in names:
            rates = best[(concurrency, name)]
            rows.append({"tasks": concurrency, "client": name, "median ops_per_s": statistics.median(rates),
                         "client_cpu_us/op": statistics.median(cpu[(concurrency, name)]),
                         "redis_cpu_us/op": statistics.median(redis_cpu[(concurrency, name)]),
                         "rounds ops_per_s": [round(r) for r in rates]})
    result.tables.append(Table(f"median of {rounds} paired round(s) of {seconds:g} s after {warmup:g} s warm-up; "
                               "values decoded (a dict comes back)",
                               ["tasks", "client", "median ops_per_s", "client_cpu_us/op", "redis_cpu_us/op",
                                "rounds ops_per_s"], rows))
    result.tables.append(Table("paired rounds: ops/s of each client in the same round, ours over the round's best peer",
                               ["round", "tasks", *names, "best peer", "x best peer", "bcast x best peer",
                                "x no near cache"], paired))
    result.notes += [f"{name}: {text}" for name, text in descriptions.items()]
    for concurrency in CONCURRENCY:
        ratios = [row["x best peer"] for row in paired if row["tasks"] == concurrency]
        result.targets.append(Target(f"11: {concurrency} task(s), ours over the best peer (median of paired rounds)",
                                     statistics.median(ratios), 2.0))
    return result


def _delays(acks: list[list[Any]], seen: list[list[Any]]) -> list[float]:
    """Per write: how long after its acknowledgement an older value of its key was still served (0: never)."""
    by_key: dict[int, list[tuple[int, float]]] = {}
    for i, seq, t in seen:
        by_key.setdefault(i, []).append((seq, t))
    delays = []
    for i, entries in by_key.items():
        entries.sort()
        seqs = [seq for seq, _ in entries]
        running, latest = [], float("-inf")
        for _, t in entries:
            latest = max(latest, t)
            running.append(latest)  # the last time any seq <= this one was served
        writes = sorted((seq, t_ack) for key, seq, t_ack in acks if key == i)
        for seq, t_ack in writes:
            index = bisect.bisect_left(seqs, seq) - 1  # entries with a seq older than this write's
            last_old = running[index] if index >= 0 else float("-inf")
            delays.append(max(0.0, last_old - t_ack))
    return delays


async def run_coherence(*, quick: bool = False, transport: str = "tcp", seconds: float | None = None) -> Result:
    """Benchmark 11b: coherence across processes, ours and the peers through the same check."""
    seconds = seconds if seconds is not None else (2.0 if quick else 60.0)
    result = Result("coherence", f"11b. Coherence across processes: A writes every "
                                 f"{COHERENCE_WRITE_PERIOD * 1000:g} ms, B reads from its near cache as fast as it "
                                 f"can, {seconds:g} s each")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with Runtime(bench_config("tcp")) as rt:
            endpoint = await endpoint_of(rt)
            for name in (OURS, BCAST, *PEERS):
                acks_file, seen_file = os.path.join(tmp, "acks.json"), os.path.join(tmp, "seen.json")
                writer = await child("writer", name, json.dumps(endpoint), str(seconds), acks_file)
                assert writer.stdout is not None and writer.stdin is not None
                await asyncio.wait_for(writer.stdout.readline(), 60)  # seeded
                reader = await child("reader", name, json.dumps(endpoint), str(seconds), seen_file)
                assert reader.stdout is not None and reader.stdin is not None
                await asyncio.wait_for(reader.stdout.readline(), 60)
                reader.stdin.write(b"go\n")
                writer.stdin.write(b"go\n")
                wrote = await finish(writer, seconds + 120)
                read = await finish(reader, seconds + 120)
                delays = sorted(_delays(orjson.loads(Path(acks_file).read_bytes()),
                                        orjson.loads(Path(seen_file).read_bytes())))
                stale = [d for d in delays if d > 0]
                rows.append({"client": name, "writes": wrote["writes"], "reads": read["reads"],
                             "writes B served older after": len(stale),
                             "p50_ms": statistics.median(delays) * 1000 if delays else float("nan"),
                             "p99_ms": delays[int(len(delays) * 0.99) - 1] * 1000 if delays else float("nan"),
                             "max_ms": delays[-1] * 1000 if delays else float("nan"),
                             "writes served older > 50 ms after": sum(1 for d in delays if d > 0.05),
                             "absent reads": read["absent"]})
                result.notes.append(f"{name}: {read['description']}")
    result.tables.append(Table("per write: how long after its acknowledgement B still served an older value of its key "
                               "(0 when it never did)", ["client", "writes", "reads", "writes B served older after",
                                                         "p50_ms", "p99_ms", "max_ms",
                                                         "writes served older > 50 ms after", "absent reads"], rows))
    ours = rows[0]
    result.targets += [
        Target("11b: coherence p99 (ms)", ours["p99_ms"], 5.0, unit=" ms", higher_is_better=False),
        Target("11b: coherence max (ms)", ours["max_ms"], 50.0, unit=" ms", higher_is_better=False),
        Target("11b: writes served older > 50 ms after their ack", ours["writes served older > 50 ms after"], 1.0,
               unit="", higher_is_better=False),
    ]
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["near", "coherence"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None, help="coherence: seconds of writes")
    args = parser.parse_args()
    if args.part == "near":
        print(asyncio.run(run(quick=args.quick)).markdown())
    else:
        print(asyncio.run(run_coherence(quick=args.quick, seconds=args.seconds)).markdown())
