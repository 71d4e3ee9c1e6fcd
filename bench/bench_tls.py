"""Benchmark 9: benchmark 1 over TLS: CacheService vs raw redis.asyncio and valkey-glide, each through the
same TLS endpoint, and each without TLS in the same rounds.

The bundled Valkey speaks no TLS, so a TLS terminator runs in front of our spawned server (tests/tls_proxy.py,
the standard library's ssl, as its own process: a core of its own), with a certificate made for the run
(tests/certs.py, the openssl command line). Every client verifies it (our CA, the name 127.0.0.1). An op is
benchmark 1's: one SET (PX 60000) plus one GET of the 244-byte JSON value, awaited one after the other by one
task; ops/s counts these pairs.

Paired rounds: each round measures all six (three clients, with and without TLS) at every concurrency back to
back, in an order that rotates from round to round. Ours over the best peer is taken within a round, with TLS
and without; the target is that the median of the TLS ratio is at least the median of the plain one.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from bench_cache import POOL_SIZE, Op, measure
from bench_cache import glide as glide_contender
from bench_cache import ondemand as ondemand_contender
from bench_cache import raw as raw_contender
from common import REPO, TTL, VALUE, Result, Table, Target, bench_config, ratio, set_get_op

from ondemand import Runtime
from tests.certs import Pki

CONCURRENCY = (1, 50, 200)
ROUNDS = 5
OURS, RAW, GLIDE = "ondemand CacheService", "raw redis.asyncio", "valkey-glide"
Contender = tuple[Op, Callable[[], Awaitable[None]], str]


@contextlib.asynccontextmanager
async def tls_front(port: int, pki: Pki) -> AsyncIterator[tuple[int, int]]:
    """The TLS terminator in front of 127.0.0.1:`port`, as a child process: (its port, its pid)."""
    issued = pki.issue("server", ["IP:127.0.0.1", "DNS:localhost"])
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "tests" / "tls_proxy.py"), "--target", f"127.0.0.1:{port}", "--cert",
        str(issued.cert), "--key", str(issued.key), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(15):
            line = (await process.stdout.readline()).decode()  # type: ignore[union-attr]
        if not line.startswith("listening "):
            raise RuntimeError(f"the TLS proxy did not start: {line!r}")
        yield int(line.split()[1]), process.pid
    finally:
        process.stdin.close()  # type: ignore[union-attr]  # it exits when stdin closes
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


async def raw_tls(host: str, port: int, password: str | None, ca: Path) -> Contender:
    client = aioredis.Redis(host=host, port=port, password=password, ssl=True, ssl_ca_certs=str(ca),
                            max_connections=POOL_SIZE)
    return (set_get_op(client, "rawtls:", px=TTL * 1000), client.aclose,
            f"redis.asyncio.Redis(ssl=True, ssl_ca_certs=...) (hiredis parser, pool of {POOL_SIZE}), orjson")


async def glide_tls(host: str, port: int, password: str | None, ca: Path) -> Contender:
    from glide import (
        AdvancedGlideClientConfiguration,
        ExpirySet,
        ExpiryType,
        GlideClient,
        GlideClientConfiguration,
        NodeAddress,
        ServerCredentials,
        TlsAdvancedConfiguration,
    )

    client = await GlideClient.create(GlideClientConfiguration(
        [NodeAddress(host, port)], use_tls=True, credentials=ServerCredentials(password), request_timeout=5000,
        advanced_config=AdvancedGlideClientConfiguration(
            tls_config=TlsAdvancedConfiguration(root_pem_cacerts=ca.read_bytes()))))
    op = set_get_op(client, "glidetls:", expiry=ExpirySet(ExpiryType.MILLSEC, TTL * 1000))
    version = importlib.metadata.version("valkey-glide")
    return op, client.close, f"valkey-glide {version} GlideClient(use_tls=True, root_pem_cacerts=...), orjson"


async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    seconds, warmup, rounds = (0.1, 0.02, 2) if quick else (2.0, 0.3, ROUNDS)
    result = Result("tls", "9. Benchmark 1 over TLS: CacheService vs raw redis.asyncio and valkey-glide, through one "
                           "TLS terminator, and without TLS in the same rounds")
    cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
    paired: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ondemand-bench-tls-") as scratch:
        pki = Pki.create(Path(scratch) / "pki")
        async with Runtime(bench_config("tcp")) as rt:
            server = await rt.on_demand.ensure()
            assert server.host is not None and server.port is not None
            async with tls_front(server.port, pki) as (proxy_port, proxy_pid):
                url = f"rediss://:{server.password}@127.0.0.1:{proxy_port}/0?ssl_ca_certs={pki.ca}"
                async with Runtime(bench_config("tcp", lifecycle={"plugin": "external", "redis_url": url})) as rt_tls:
                    await rt_tls.on_demand.ensure()
                    contenders: dict[str, Contender] = {}
                    try:
                        made = {
                            f"{OURS}": await ondemand_contender(rt, server),
                            f"{OURS} TLS": await ondemand_contender(rt_tls, None),
                            RAW: await raw_contender(rt, server),
                            f"{RAW} TLS": await raw_tls("127.0.0.1", proxy_port, server.password, pki.ca),
                            GLIDE: await glide_contender(rt, server),
                            f"{GLIDE} TLS": await glide_tls("127.0.0.1", proxy_port, server.password, pki.ca),
                        }
                        for name, contender in made.items():
                            if contender is None:
                                raise RuntimeError(f"{name} cannot run here")
                            contenders[name] = contender
                            result.notes.append(f"{name}: {contender[2]}")
                        names = list(contenders)
                        pids = [rt.lifecycle.pid()]
                        # Every pool opens its connections before the first round, not inside it: redis-py builds
                        # an SSL context per connection (the system's CAs loaded each time, ~35 ms here), so its
                        # pool of 200 takes seconds to fill. Until two warm-ups in a row agree.
                        for name in names:
                            last = 0.0
                            for _ in range(2 if quick else 12):
                                now = (await measure(contenders[name][0], max(CONCURRENCY), 0.1 if quick else 1.0))
                                if last and abs(now["ops_per_s"] - last) < 0.2 * last:
                                    break
                                last = now["ops_per_s"]
                        for number in range(rounds):
                            order = names[number % len(names):] + names[:number % len(names)]
                            for concurrency in CONCURRENCY:
                                row: dict[str, Any] = {"round": number + 1, "concurrency": concurrency}
                                for name in order:
                                    op = contenders[name][0]
                                    await measure(op, concurrency, warmup)
                                    measured = await measure(op, concurrency, seconds, [*pids, proxy_pid]
                                                             if name.endswith("TLS") else pids)
                                    cells.setdefault((concurrency, name), []).append(measured)
                                    row[name] = measured["ops_per_s"]
                                row["x best peer"] = ratio(row[OURS], max(row[RAW], row[GLIDE]))
                                row["x best peer, TLS"] = ratio(row[f"{OURS} TLS"],
                                                                max(row[f"{RAW} TLS"], row[f"{GLIDE} TLS"]))
                                paired.append(row)
                    finally:
                        for _op, close, _desc in contenders.values():
                            await close()
                    for runtime in (rt, rt_tls):
                        stats = runtime.dispatcher.stats["profile"]
                        if stats.cache_errors or stats.dropped_writes or not runtime.dispatcher.breaker.closed:
                            result.status = "invalid"
                            result.notes.append(f"ondemand had cache errors ({stats.cache_errors}) or dropped writes "
                                                f"({stats.dropped_writes}): its numbers are NOT valid")
    result.notes.append("the TLS terminator: tests/tls_proxy.py in a process of its own (asyncio, the standard "
                        "library's ssl, TLS 1.3); `redis_cpu_us/op` of the TLS rows counts the server and the proxy")
    rows = []
    for (concurrency, name), measured in cells.items():
        med = {key: statistics.median(m[key] for m in measured)
               for key in ("ops_per_s", "p50_ms", "p99_ms", "client_cpu_us/op", "redis_cpu_us/op")}
        rows.append({"concurrency": concurrency, "client": name, **med,
                     "misses": sum(m["misses"] for m in measured),
                     "rounds ops_per_s": [round(m["ops_per_s"]) for m in measured]})
    order = [OURS, f"{OURS} TLS", RAW, f"{RAW} TLS", GLIDE, f"{GLIDE} TLS"]
    rows.sort(key=lambda r: (r["concurrency"], order.index(r["client"])))
    result.tables.append(Table(
        f"TCP on 127.0.0.1; op = SET (PX 60000) + GET of a {len(orjson.dumps(VALUE))}-byte JSON value; {rounds} "
        f"paired round(s) of {seconds:g} s per cell; medians over the rounds",
        ["concurrency", "client", "ops_per_s", "p50_ms", "p99_ms", "client_cpu_us/op", "redis_cpu_us/op", "misses",
         "rounds ops_per_s"], rows))
    medians = {}
    for concurrency in CONCURRENCY:
        mine = [r for r in paired if r["concurrency"] == concurrency]
        medians[concurrency] = {key: statistics.median(r[key] for r in mine) for key in (*order, "x best peer",
                                                                                        "x best peer, TLS")}
    paired.sort(key=lambda r: (r["concurrency"], r["round"]))
    table_rows = []
    for concurrency in CONCURRENCY:
        table_rows += [r for r in paired if r["concurrency"] == concurrency]
        table_rows.append({"round": "median", "concurrency": concurrency, **medians[concurrency]})
    result.tables.append(Table("paired rounds: ops/s of each client in the same round, and ours over the best of "
                               "the others, without TLS and with (the targets compare the medians)",
                               ["concurrency", "round", *order, "x best peer", "x best peer, TLS"], table_rows))
    if any(r["misses"] for r in rows):
        result.status = "invalid"
        result.notes.append("some GETs missed (see `misses`): a contender failed silently")
    result.targets += [
        Target(f"9: c={c} ours over the best peer with TLS / without, median of paired rounds",
               ratio(medians[c]["x best peer, TLS"], medians[c]["x best peer"]), 1.0)
        for c in CONCURRENCY
    ]
    return result


if __name__ == "__main__":
    print(asyncio.run(run()).markdown())
