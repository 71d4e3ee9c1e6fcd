"""Benchmark 2: GET /api/sessions/{id} of a cached session, our app vs a raw handler vs a bare ceiling.

Each server runs in its own process (this file with `serve KIND PORT TRANSPORT`); the load comes from
wrk (1 thread, 50 connections) or, without wrk, from this file with `load URL CONNECTIONS SECONDS`.

The ratios come from paired rounds: each round loads the three servers back to back (in an order that
rotates from round to round), its ratios compare measurements taken seconds apart, and the target is
the median over rounds. This machine's speed drifts by up to 2x within a minute (other tenants), so
comparing each server's best round would compare different moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from common import (
    REPO,
    VALUE,
    Result,
    Table,
    Target,
    bench_config,
    cpu_seconds,
    free_port,
    keep_best,
    latency_ms,
    ratio,
    redis_children,
    redis_client_kwargs,
    stop_process,
)

from ondemand import Runtime
from ondemand.host.workers import freeze_startup_objects
from ondemand.web import CONFIG, RUNTIME, create_app
from ondemand.web.serving import run_app

SESSION_ID = "bench-session-1"
SESSION = VALUE
SESSION_KEY = f"ondemand:session:{SESSION_ID}"  # the key our app uses (default key_prefix)
CONNECTIONS = 50
ROUNDS = 8  # a multiple of 4: each server takes each place in the order equally often
KINDS = {
    "bare": "(b) bare aiohttp handler, same JSON, no Redis (ceiling)",
    "raw": "(a) aiohttp handler, raw redis.asyncio GET, one command per request",
    "ondemand": "ondemand create_app(config)",
    "near": "ondemand create_app(config), [namespaces.session] near_cache = true",
}


# -- the servers (run in a child process) -----------------------------------------------------------

def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def has_session_route(app: web.Application) -> bool:
    """True if the app serves GET /api/sessions/{something}."""
    for resource in app.router.resources():
        if re.fullmatch(r"/api/sessions/\{[^}]+\}", resource.canonical):
            return any(route.method in ("GET", "*") for route in resource)
    return False


async def bench_local_session(request: web.Request) -> web.Response:
    found = await request.app[RUNTIME].dispatcher.lookup("session", request.match_info["session_id"])
    return _json({"session": found.value, "source": found.source})


def value_key(body: dict[str, Any]) -> str:
    """The key under which a response body carries the session value."""
    return next(key for key, value in body.items() if value == SESSION)


def build_app(kind: str, transport: str, template: dict[str, Any]) -> tuple[web.Application, dict[str, Any]]:
    """`template` is the JSON our app answered; the raw and bare handlers answer the same shape."""
    config = bench_config(transport, **({"namespaces": {"session": {"near_cache": True}}} if kind == "near" else {}))
    info: dict[str, Any] = {"kind": kind}
    if kind in ("ondemand", "idle", "near"):
        app = create_app(config)
        if kind == "idle":  # benchmark 6: exactly what run.py serves, untouched
            return app, info
        info["bench_local_handler"] = not has_session_route(app)
        if info["bench_local_handler"]:
            app.router.add_get("/api/sessions/{session_id}", bench_local_session)

        async def seed(app: web.Application) -> AsyncIterator[None]:
            await app[RUNTIME].cache.cache_session(SESSION_ID, SESSION, ttl=3600)
            yield

        app.cleanup_ctx.append(seed)
        return app, info

    app = web.Application()
    if kind == "bare":
        async def bare(request: web.Request) -> web.Response:
            return _json(template)

        app.router.add_get("/api/sessions/{session_id}", bare)
        return app, info

    client_key = web.AppKey("client", aioredis.Redis)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        async with Runtime(config) as rt:  # only to spawn the same server the others use
            client = aioredis.Redis(**redis_client_kwargs(await rt.on_demand.ensure()))
            await client.set(SESSION_KEY, orjson.dumps(SESSION), ex=3600)
            app[client_key] = client
            yield
            await client.aclose()

    key = value_key(template)

    async def raw(request: web.Request) -> web.Response:
        found = await request.app[client_key].get("ondemand:session:" + request.match_info["session_id"])
        if found is None:
            return _json({"error": {"code": "not_found"}}, status=404)
        return _json({**template, key: orjson.loads(found)})

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/api/sessions/{session_id}", raw)
    return app, info


def serve(kind: str, port: int, transport: str, template: str) -> None:
    app, info = build_app(kind, transport, orjson.loads(template))
    # Same server settings for all three: what run.py does after startup (gc.freeze), here too.
    app.on_startup.append(freeze_startup_objects)
    print(orjson.dumps(info).decode(), flush=True)
    if CONFIG in app:  # ours: served as run.py serves it (OndemandRunner: its protocol, its read timeouts)
        config = app[CONFIG]
        config = attrs.evolve(config, server=attrs.evolve(config.server, host="127.0.0.1", port=port,
                                                          shutdown_timeout=5))
        run_app(app, config)
    else:
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, shutdown_timeout=5)


@contextlib.asynccontextmanager
async def server(
    kind: str, transport: str, template: dict[str, Any] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, dict[str, Any]]]:
    """Start a server process; yield (process, port, info) once its port accepts connections; stop it."""
    port = free_port()
    with tempfile.TemporaryFile() as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "serve", kind, str(port), transport, orjson.dumps(template or {}).decode(),
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
        try:
            assert proc.stdout is not None
            info = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 30) or b"{}")
            deadline = time.monotonic() + 30
            while True:
                if proc.returncode is not None or time.monotonic() > deadline:
                    stderr.seek(0)
                    raise RuntimeError(f"{kind} server did not start:\n{stderr.read().decode()[-2000:]}")
                try:
                    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                break
            yield proc, port, info
        finally:
            await stop_process(proc, 10)


# -- the load ---------------------------------------------------------------------------------------

def _wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


async def wrk(url: str, seconds: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out = (await proc.communicate())[0].decode()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50, p99 = (re.search(rf"^\s+{q}%\s+(\S+)", out, re.MULTILINE) for q in (50, 99))
    if not (rps and p50 and p99):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    requests = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    return {"requests_per_s": float(rps.group(1)), "p50_ms": _wrk_ms(p50.group(1)), "p99_ms": _wrk_ms(p99.group(1)),
            "errors": int(bad.group(1)) if bad else 0, "socket_errors": socket_errors.group(0) if socket_errors else "",
            "requests": int(requests.group(1)) if requests else 0}


async def client_load(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """The fallback load generator: `connections` keep-alive loops for `seconds`."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    errors += response.status != 200
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {"requests_per_s": len(latencies) / elapsed, **latency_ms(latencies), "errors": errors, "socket_errors": "",
            "requests": len(latencies)}


async def load(url: str, seconds: float) -> dict[str, Any]:
    if shutil.which("wrk"):
        return await wrk(url, seconds)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "load", url, str(CONNECTIONS), str(seconds), stdout=asyncio.subprocess.PIPE,
    )
    return orjson.loads((await proc.communicate())[0])


# -- the benchmark ----------------------------------------------------------------------------------

async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    seconds, warmup, rounds = (1.0, 0.0, 1) if quick else (2.0, 1.0, ROUNDS)
    result = Result("http", "2. HTTP GET /api/sessions/{id} of a cached session")
    rows: dict[str, dict[str, Any]] = {}
    urls: dict[str, tuple[str, list[int]]] = {}  # kind -> (url, pids of the server and its redis-server)
    template: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as servers:
        for kind in ("ondemand", "near", "raw", "bare"):  # ours first: the others copy the shape of its answer
            proc, port, info = await servers.enter_async_context(server(kind, transport, template))
            url = f"http://127.0.0.1:{port}/api/sessions/{SESSION_ID}"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                body = await response.json()
            if response.status != 200 or SESSION not in body.values() or (template and body != template):
                raise RuntimeError(f"{kind} server answered {response.status} {body!r}")
            template = body
            if info.get("bench_local_handler"):
                result.notes.append("ondemand: create_app has no GET /api/sessions/{session_id}; a bench-local "
                                    "handler calling dispatcher.lookup('session', id) was registered on it")
            elif kind == "ondemand":
                result.notes.append("ondemand: the app's own GET /api/sessions/{session_id} route was used")
            urls[kind] = (url, [proc.pid, *(child.pid for child in redis_children(proc.pid))])
            if warmup:
                await load(url, warmup)
        paired: list[dict[str, Any]] = []  # one row per round: each server's requests/s and the ratios
        kinds = list(urls)
        for number in range(rounds):  # servers take turns, so a burst of outside load hits one round
            measured: dict[str, float] = {}
            for kind in kinds[number % len(kinds):] + kinds[:number % len(kinds)]:
                url, pids = urls[kind]
                before = cpu_seconds(pids[:1]), cpu_seconds(pids[1:])
                row = {"server": KINDS[kind], **await load(url, seconds)}
                served = max(1, row["requests"])
                row["server_cpu_us/req"] = (cpu_seconds(pids[:1]) - before[0]) / served * 1e6
                row["redis_cpu_us/req"] = (cpu_seconds(pids[1:]) - before[1]) / served * 1e6 if pids[1:] else 0.0
                keep_best(rows, kind, row, "requests_per_s", summed=("errors",))
                measured[kind] = row["requests_per_s"]
            paired.append({"round": number + 1, **{kind: measured[kind] for kind in KINDS},
                           "x raw (a)": ratio(measured["ondemand"], measured["raw"]),
                           "x bare (b)": ratio(measured["ondemand"], measured["bare"]),
                           "near x bare (b)": ratio(measured["near"], measured["bare"])})
    result.notes.append(f"every server answers the same JSON shape as ours: {sorted(template)}")
    rows = {kind: rows[kind] for kind in KINDS}
    for row in rows.values():  # the best rounds' ratios, for reference; the targets use the paired median
        row["best x raw (a)"] = ratio(row["requests_per_s"], rows["raw"]["requests_per_s"])
        row["best x bare (b)"] = ratio(row["requests_per_s"], rows["bare"]["requests_per_s"])
    median = {key: statistics.median(row[key] for row in paired)
              for key in ("x raw (a)", "x bare (b)", "near x bare (b)")}
    load_tool = f"wrk -t1 -c{CONNECTIONS}" if shutil.which("wrk") else f"aiohttp client, {CONNECTIONS} connections"
    columns = ["server", "requests_per_s", "p50_ms", "p99_ms", "best x raw (a)", "best x bare (b)",
               "server_cpu_us/req", "redis_cpu_us/req", "errors", "rounds requests_per_s"]
    result.tables.append(Table(f"transport {transport}; {load_tool}; best of {rounds} round(s) of {seconds:g} s "
                               f"(its p50/p99) after {warmup:g} s warm-up; each server one process", columns,
                               list(rows.values())))
    paired.append({"round": "median", **{kind: statistics.median(row[kind] for row in paired) for kind in KINDS},
                   **median})
    result.tables.append(Table("paired rounds: requests/s of each server in the same round, and ours over each "
                               "(the targets use the median)", ["round", *KINDS, "x raw (a)", "x bare (b)",
                                                               "near x bare (b)"], paired))
    if any(row["errors"] or row["socket_errors"] for row in rows.values()):  # socket errors: of the best round
        result.status = "invalid"
        result.notes += [f"{k}: {r['errors']} non-2xx; {r['socket_errors']}" for k, r in rows.items()]
    result.targets += [
        Target("2: vs raw handler (a), median of paired rounds", median["x raw (a)"], 2.2),
        Target("2: vs bare ceiling (b), median of paired rounds", median["x bare (b)"], 0.7),
        Target("2: near cache vs bare ceiling (b), median of paired rounds", median["near x bare (b)"], 0.95),
    ]
    return result


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1] == "load":
        print(orjson.dumps(asyncio.run(client_load(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))).decode())
    else:
        print(asyncio.run(run(quick="--quick" in sys.argv)).markdown())
