"""Benchmark 8: benchmark 1 on a local Redis Cluster of 3 masters: CacheService vs RedisCluster and
GlideClusterClient.

The cluster is ours (plugins/redis_cluster.py LocalCluster), spawned once for the whole benchmark by the
Runtime's first operation (`lifecycle.topology = "cluster"`, 3 masters, no replicas: a replica's
replication stream would take CPU from the two cores everything here shares); the other contenders
are pointed at its first master as their seed and discover the rest. An op is benchmark 1's: one SET
(PX 60000) plus one GET of the 244-byte JSON value, awaited one after the other by one task; ops/s
counts these pairs. Keys differ per task and per contender, and spread over every master.

Paired rounds: each round measures every contender at every concurrency back to back, in an order
that rotates from round to round; the ratios are taken within a round and the targets use their
median over the rounds (this machine's speed drifts by up to 2x within a minute).

Only our path, for a profiler: `python bench/bench_cluster.py --ours-only [--concurrency 50] [--seconds 5]`;
`--profile` runs it under cProfile and prints the top functions; `--routing` times the routing steps
(key_slot, command_keys, ClusterConnection.execute against PipelinedConnection.execute) per command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import io
import pstats
import statistics
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from bench_cache import Op, measure
from bench_cache import ondemand as ondemand_contender
from common import TTL, VALUE, Result, Table, Target, bench_config, ratio, set_get_op
from redis.asyncio.cluster import RedisCluster

from ondemand import Runtime

CONCURRENCY = (1, 50, 200)
MASTERS, REPLICAS = 3, 0
ROUNDS = 5
# RedisCluster's max_connections is per node (redis-py 8 default 100, MaxConnectionsError past it). A
# task of this benchmark holds at most one connection at a time (one command in flight), so no node
# ever needs more connections than there are tasks: one per task at the highest concurrency.
POOL_PER_NODE = max(CONCURRENCY)
OURS, RC, GLIDE = "ondemand CacheService", "RedisCluster", "GlideClusterClient"
Contender = tuple[Op, Callable[[], Awaitable[None]], str]


def cluster_config(transport: str = "tcp", masters: int = MASTERS) -> Any:
    """A cluster of `masters` masters; 0: one standalone server (our path without routing, for comparison)."""
    if not masters:
        return bench_config(transport)
    return bench_config(transport, lifecycle={"topology": "cluster", "cluster_masters": masters,
                                              "cluster_replicas": REPLICAS})


# -- contenders: each returns (op, close, description) --------------------------------------------

async def redis_cluster(rt: Runtime, seed: Any) -> Contender:
    client = RedisCluster(host=seed.host, port=seed.port, password=seed.password, max_connections=POOL_PER_NODE)
    await client.initialize()
    op = set_get_op(client, "rc:", px=TTL * 1000)

    return op, client.aclose, (f"redis.asyncio.cluster.RedisCluster (hiredis parser, max_connections={POOL_PER_NODE} "
                               "per node: one per task, as a task has one command in flight at a time, so it "
                               "never raises MaxConnectionsError), orjson, one command per call")


async def glide_cluster(rt: Runtime, seed: Any) -> Contender:
    from glide import (
        ExpirySet,
        ExpiryType,
        GlideClusterClient,
        GlideClusterClientConfiguration,
        NodeAddress,
        ServerCredentials,
    )

    client = await GlideClusterClient.create(GlideClusterClientConfiguration(
        [NodeAddress(seed.host, seed.port)], credentials=ServerCredentials(seed.password), request_timeout=5000))
    op = set_get_op(client, "glide:", expiry=ExpirySet(ExpiryType.MILLSEC, TTL * 1000))

    version = importlib.metadata.version("valkey-glide")
    return op, client.close, (f"valkey-glide {version} GlideClusterClient (its Rust core, one multiplexed "
                              "connection per node, password via ServerCredentials), orjson")


async def ondemand(rt: Runtime, seed: Any) -> Contender:
    op, close, _ = await ondemand_contender(rt, seed)
    return op, close, ("rt.cache.cache_profile + get_profile, topology cluster (slot routing, one pipelined "
                       "connection per master)")


CONTENDERS = {OURS: ondemand, RC: redis_cluster, GLIDE: glide_cluster}


def cluster_mux(rt: Runtime) -> Any:
    pool = rt.on_demand.pools.get("default")
    return pool.mux if pool else None


def per_node_commands(rt: Runtime) -> list[int]:
    mux = cluster_mux(rt)
    return [node["commands"] for node in mux.status()["nodes"]] if mux is not None else []


async def keys_per_master(rt: Runtime, seed: Any) -> list[int]:
    """DBSIZE of every master: every contender's keys land on all of them."""
    client = RedisCluster(host=seed.host, port=seed.port, password=seed.password)
    try:
        await client.initialize()
        return [await client.execute_command("DBSIZE", target_nodes=node)
                for node in sorted(client.get_primaries(), key=lambda n: n.port)]
    finally:
        await client.aclose()


# -- the benchmark --------------------------------------------------------------------------------

async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    seconds, warmup, rounds = (0.1, 0.02, 2) if quick else (2.0, 0.3, ROUNDS)
    result = Result("cluster", f"8. Benchmark 1 on a {MASTERS}-master Redis Cluster: CacheService vs RedisCluster, "
                               "GlideClusterClient")
    cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
    paired: list[dict[str, Any]] = []
    async with Runtime(cluster_config()) as rt:
        seed = await rt.on_demand.ensure()
        cluster = rt.lifecycle.cluster
        result.notes.append(f"cluster: {MASTERS} masters x {REPLICAS} replicas, {cluster.server.describe()}, "
                            f"formed in {cluster.timings['total']:.2f} s, seed {seed.host}:{seed.port}; "
                            "TCP on 127.0.0.1 with a password for every client (a cluster has no unix sockets here)")
        contenders: dict[str, Contender] = {}
        try:
            for name, make in CONTENDERS.items():
                contenders[name] = await make(rt, seed)
                result.notes.append(f"{name}: {contenders[name][2]}")
            names = list(contenders)
            pids = cluster.pids()
            stats = rt.dispatcher.stats["profile"]
            await contenders[OURS][0]("warm")  # our cluster connection opens with the first command
            mux = cluster_mux(rt)
            for number in range(rounds):
                order = names[number % len(names):] + names[:number % len(names)]
                for concurrency in CONCURRENCY:
                    row: dict[str, Any] = {"round": number + 1, "concurrency": concurrency,
                                           "order": " > ".join(n.split()[-1] for n in order)}
                    for name in order:
                        op = contenders[name][0]
                        await measure(op, concurrency, warmup)
                        before = (mux.batches_written, mux.commands_written)
                        measured = await measure(op, concurrency, seconds, pids)
                        if name == OURS:
                            batches = mux.batches_written - before[0]
                            measured["cmds/batch"] = (mux.commands_written - before[1]) / batches if batches else 0
                        cells.setdefault((concurrency, name), []).append(measured)
                        row[name] = measured["ops_per_s"]
                    row["x RedisCluster"] = ratio(row[OURS], row[RC])
                    row["x Glide"] = ratio(row[OURS], row[GLIDE])
                    paired.append(row)
            spread = await keys_per_master(rt, seed)
            commands = per_node_commands(rt)
        finally:
            for _op, close, _desc in contenders.values():
                await close()
        if stats.cache_errors or stats.dropped_writes or not rt.dispatcher.breaker.closed:
            result.status = "invalid"
            result.notes.append(f"ondemand had cache errors ({stats.cache_errors}) or dropped writes "
                                f"({stats.dropped_writes}): its numbers are NOT valid")
        redirects = mux.status()["redirects"]
    result.notes.append(f"keys on each master at the end (DBSIZE): {' / '.join(f'{n:,}' for n in spread)}; "
                        f"our commands per master: {' / '.join(f'{n:,}' for n in commands)}; "
                        f"our redirects: {redirects}")
    if len(spread) != MASTERS or min(spread) == 0 or len(commands) != MASTERS or min(commands) == 0:
        result.status = "invalid"
        result.notes.append("keys or commands did not reach every master: not a cluster benchmark")

    rows = []
    for (concurrency, name), measured in cells.items():
        med = {key: statistics.median(m[key] for m in measured)
               for key in ("ops_per_s", "p50_ms", "p99_ms", "client_cpu_us/op", "redis_cpu_us/op")}
        row = {"concurrency": concurrency, "client": name, **med, "misses": sum(m["misses"] for m in measured),
               "rounds ops_per_s": [round(m["ops_per_s"]) for m in measured]}
        if name == OURS:
            row["cmds/batch"] = statistics.median(m["cmds/batch"] for m in measured)
        rows.append(row)
    rows.sort(key=lambda r: (r["concurrency"], list(CONTENDERS).index(r["client"])))
    result.tables.append(Table(
        f"{MASTERS} masters, TCP; op = SET (PX 60000) + GET of a {len(orjson.dumps(VALUE))}-byte JSON value; "
        f"{rounds} paired round(s) of {seconds:g} s per cell; medians over the rounds (ops/s, p50, p99, CPU per op "
        f"of this process and of all {MASTERS} nodes)",
        ["concurrency", "client", "ops_per_s", "p50_ms", "p99_ms", "client_cpu_us/op", "redis_cpu_us/op",
         "misses", "cmds/batch", "rounds ops_per_s"], rows))
    medians = {}
    for concurrency in CONCURRENCY:
        mine = [r for r in paired if r["concurrency"] == concurrency]
        medians[concurrency] = {key: statistics.median(r[key] for r in mine)
                                for key in (OURS, RC, GLIDE, "x RedisCluster", "x Glide")}
    paired.sort(key=lambda r: (r["concurrency"], r["round"]))
    table_rows = []
    for concurrency in CONCURRENCY:
        table_rows += [r for r in paired if r["concurrency"] == concurrency]
        table_rows.append({"round": "median", "concurrency": concurrency, **medians[concurrency]})
    result.tables.append(Table("paired rounds: ops/s of each client in the same round, and ours over each "
                               "(the targets use the median)",
                               ["concurrency", "round", "order", OURS, RC, GLIDE, "x RedisCluster", "x Glide"],
                               table_rows))
    if any(r["misses"] for r in rows):
        result.status = "invalid"
        result.notes.append("some GETs missed (see `misses`): a contender failed silently")
    result.targets += [
        Target(f"8: cluster c={c} vs {GLIDE}, median of paired rounds", medians[c]["x Glide"], 2.0) for c in (50, 200)
    ] + [
        Target(f"8: cluster c={c} vs {RC}, median of paired rounds", medians[c]["x RedisCluster"], 3.0)
        for c in (50, 200)
    ] + [Target(f"8: cluster c=1 vs {RC}, median of paired rounds", medians[1]["x RedisCluster"], 1.0)]
    return result


# -- where the time goes --------------------------------------------------------------------------

def _cprofile() -> Any:
    """The stdlib's cProfile, which imports `profile`: bench/profile.py (first on sys.path here) is not it."""
    saved, here = sys.path[:], str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", here) and Path(p or ".").resolve() != Path(here)]
    try:
        import cProfile
    finally:
        sys.path[:] = saved
    return cProfile


async def ours_only(concurrency: int, seconds: float, profile: bool, top: int, masters: int = MASTERS) -> None:
    """Only our contender on a fresh cluster of `masters` masters (0: a standalone server), optionally under
    cProfile (py-spy is not available here)."""
    async with Runtime(cluster_config(masters=masters)) as rt:
        op, _close, _desc = await ondemand(rt, await rt.on_demand.ensure())
        await measure(op, concurrency, 0.5)
        mux = cluster_mux(rt)
        before = (mux.batches_written, mux.commands_written)
        profiler = _cprofile().Profile() if profile else None
        if profiler:
            profiler.enable()
        pids = rt.lifecycle.cluster.pids() if masters else [rt.lifecycle.pid()]
        measured = await measure(op, concurrency, seconds, pids)
        if profiler:
            profiler.disable()
        batches, commands = mux.batches_written - before[0], mux.commands_written - before[1]
        where = f"a {masters}-master cluster" if masters else "one standalone server"
        print(f"ondemand CacheService on {where}, concurrency {concurrency}: {measured['ops_per_s']:,.0f} ops/s, "
              f"client {measured['client_cpu_us/op']:.1f} us/op, server(s) {measured['redis_cpu_us/op']:.1f} us/op, "
              f"{commands / max(1, batches):.1f} commands per batch, {batches / measured['ops']:.3f} batches per op"
              + (" (under cProfile: slower)" if profiler else ""), flush=True)
        if profiler:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
            print(out.getvalue())


async def routing_costs(number: int = 200_000) -> list[dict[str, Any]]:
    """Per-command CPU of the routing steps, on our key shapes, and ClusterConnection.execute against
    PipelinedConnection.execute on a live cluster (the queued commands are flushed and answered)."""
    from ondemand.redis.cluster import command_keys
    from ondemand.redis.routing import key_slot

    key = "ondemand:profile:{=k17-42}"  # our key scheme on a cluster: the id is the hash tag
    args = ("SET", key, b"x" * 244, "PX", 60000)
    rows = [
        {"step": "key_slot(key), a hash-tagged key", "us_per_command": timeit.timeit(lambda: key_slot(key),
                                                                                     number=number) / number * 1e6},
        {"step": "key_slot(key), no hash tag", "us_per_command": timeit.timeit(lambda: key_slot("rc:k17-42"),
                                                                               number=number) / number * 1e6},
        {"step": "command_keys(SET ...)", "us_per_command": timeit.timeit(lambda: command_keys(args),
                                                                          number=number) / number * 1e6},
    ]
    async with Runtime(cluster_config()) as rt:
        await rt.on_demand.ensure()
        await rt.cache.get_profile("warm")
        cluster = cluster_mux(rt)
        node = cluster.nodes[cluster.slots.owner(key_slot(key))].connection
        batch = 100

        async def timed(execute: Callable[..., Any], rounds: int) -> float:
            spent = 0.0
            for _ in range(rounds):
                started = time.perf_counter()
                pending = [execute("GET", key) for _ in range(batch)]
                spent += time.perf_counter() - started
                await asyncio.gather(*pending)  # not timed: the write, the server, the replies
            return spent / (rounds * batch) * 1e6

        for _ in range(2):  # the second pass is the one kept (warm caches)
            direct = await timed(node.execute, 500)
            routed = await timed(cluster.execute, 500)
    rows += [
        {"step": "PipelinedConnection.execute (queue one command, one node)", "us_per_command": direct},
        {"step": "ClusterConnection.execute (route + queue + the _finish coroutine)", "us_per_command": routed},
        {"step": "routing overhead per command (the difference)", "us_per_command": routed - direct},
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-only", action="store_true", help="run only our CacheService path")
    parser.add_argument("--profile", action="store_true", help="with --ours-only: under cProfile, print the top")
    parser.add_argument("--routing", action="store_true", help="time the routing steps per command")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--masters", type=int, default=MASTERS, help="with --ours-only: masters (0: standalone)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.routing:
        from common import md_table

        print(md_table(["step", "us_per_command"], asyncio.run(routing_costs())))
    elif args.ours_only:
        asyncio.run(ours_only(args.concurrency, args.seconds, args.profile, args.top, args.masters))
    else:
        print(asyncio.run(run(quick=args.quick)).markdown())
