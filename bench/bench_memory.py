"""Benchmark 6: RSS of an idle app process, and proof that it holds no redis-server until the first cache request.

The app is `create_app(config)` served in its own process (bench_http's `idle` server, the app exactly as
run.py builds it, with storage.durable = ""); a bare aiohttp server is measured alongside for scale.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import psutil
from bench_http import server
from common import Result, Table, redis_children


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def get(port: int, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        response.raise_for_status()
        return await response.json()


async def run(*, quick: bool = False, transport: str = "tcp") -> Result:
    settle = 0.2 if quick else 1.0
    result = Result("memory", "6. Memory of an idle app; no redis-server before the first cache request")
    rows: list[dict[str, Any]] = []
    failures: list[str] = []

    def snapshot(step: str, pid: int, expected_children: int) -> None:
        children = redis_children(pid)
        if len(children) != expected_children:
            failures.append(f"{step}: expected {expected_children} redis-server children, found {len(children)}")
        rows.append({"step": step, "app RSS MiB": rss_mib(pid), "redis-server children": len(children),
                     "redis-server RSS MiB": sum(c.memory_info().rss for c in children) / 2**20 if children else "-"})

    async with server("bare", transport) as (proc, _port, _info):
        await asyncio.sleep(settle)
        snapshot("bare aiohttp server, idle (same imports, no Runtime, no app)", proc.pid, 0)
    async with server("idle", transport) as (proc, port, _info):
        await asyncio.sleep(settle)
        snapshot("ondemand app started, no request yet", proc.pid, 0)
        status = await get(port, "/api/cache/status")
        snapshot("after GET /api/cache/status (not a cache op)", proc.pid, 0)
        if status["redis"]["state"] != "stopped":
            failures.append(f"status reports redis state {status['redis']['state']!r} before any cache op")
        test = await get(port, "/api/cache/test")
        if not test.get("ok"):
            failures.append(f"GET /api/cache/test failed: {test!r}")
        snapshot("after the first cache request (GET /api/cache/test)", proc.pid, 1)
        for _ in range(20):
            await get(port, "/api/cache/test")
        await asyncio.sleep(settle)
        snapshot("after 20 more cache requests", proc.pid, 1)
    result.tables.append(Table(f"transport {transport}; psutil RSS; children = redis-server/valkey-server "
                               "descendants of the app process", list(rows[0]), rows))
    if failures:
        result.status = "failed"
        result.notes += failures
    else:
        result.notes.append("proof holds: no redis-server child while idle, exactly one after the first cache request")
    return result


if __name__ == "__main__":
    print(asyncio.run(run()).markdown())
