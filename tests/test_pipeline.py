"""Automatic pipelining on one multiplexed connection, against a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ondemand import Runtime
from ondemand.errors import RedisCommandError, RedisTimeout
from ondemand.redis.pipeline import PipelinedConnection


async def connect(rt: Runtime, **kwargs) -> PipelinedConnection:
    endpoint = await rt.on_demand.ensure()
    options = {"op_timeout": 0.25, "connect_timeout": 1.0, "max_batch": 512} | kwargs
    return await PipelinedConnection.connect(endpoint, **options)


async def test_concurrent_commands_share_one_write_and_get_their_own_replies(runtime: Runtime) -> None:
    conn = await connect(runtime)
    try:
        replies = await asyncio.gather(*(conn.execute("SET", f"k{i}", f"v{i}") for i in range(100)))
        assert replies == [b"OK"] * 100
        assert conn.batches_written == 1 and conn.commands_written == 100
        values = await asyncio.gather(*(conn.execute("GET", f"k{i}") for i in range(100)))
        assert values == [f"v{i}".encode() for i in range(100)]
    finally:
        conn.close()


async def test_a_lone_command_is_written_on_the_next_loop_turn(runtime: Runtime) -> None:
    conn = await connect(runtime)
    try:
        fut = conn.execute("PING")
        assert conn.batches_written == 0  # buffered, not yet written
        await asyncio.sleep(0)  # one loop turn: no timer, no waiting for company
        assert conn.batches_written == 1
        assert await fut == b"PONG"
    finally:
        conn.close()


async def test_an_error_reply_goes_only_to_its_own_caller(runtime: Runtime) -> None:
    conn = await connect(runtime)
    try:
        await conn.execute("SET", "str", "x")
        results = await asyncio.gather(
            conn.execute("GET", "str"),
            conn.execute("LPUSH", "str", "y"),  # WRONGTYPE
            conn.execute("INCR", "str"),  # not an integer
            conn.execute("SET", "other", "1"),
            return_exceptions=True,
        )
        assert results[0] == b"x" and results[3] == b"OK"
        assert isinstance(results[1], RedisCommandError) and "WRONGTYPE" in str(results[1])
        assert isinstance(results[2], RedisCommandError)
        assert await conn.execute("GET", "other") == b"1", "the stream stays in step after errors"
    finally:
        conn.close()


async def test_cancelling_one_caller_disturbs_no_other(runtime: Runtime) -> None:
    conn = await connect(runtime)
    try:
        await asyncio.gather(*(conn.execute("SET", f"c{i}", str(i)) for i in range(50)))
        tasks = [asyncio.ensure_future(conn.execute("GET", f"c{i}")) for i in range(50)]
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 2:
                assert result == str(i).encode()
            else:
                assert isinstance(result, asyncio.CancelledError)
        # Replies to the cancelled callers were consumed and dropped: the next reply is the right one.
        assert await conn.execute("GET", "c7") == b"7"
    finally:
        conn.close()


async def test_batch_size_is_capped(runtime: Runtime) -> None:
    conn = await connect(runtime, max_batch=10)
    try:
        results = await asyncio.gather(*(conn.execute("INCR", "n") for _ in range(95)))
        assert sorted(results) == list(range(1, 96))
        assert conn.batches_written == 10  # ceil(95 / 10)
    finally:
        conn.close()


async def test_a_frozen_server_fails_every_waiter_with_a_timeout_in_time(runtime: Runtime) -> None:
    failures: list[tuple[type, int]] = []
    conn = await connect(runtime, op_timeout=0.2, on_failure=lambda exc, n: failures.append((type(exc), n)))
    pid = runtime.on_demand.lifecycle.pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(conn.execute("PING") for _ in range(20)), return_exceptions=True)
        elapsed = time.monotonic() - t0
        assert all(isinstance(r, RedisTimeout) for r in results)
        assert 0.2 <= elapsed < 0.45, elapsed
        assert conn.closed
        with pytest.raises(RedisTimeout):
            await conn.execute("PING")  # a closed connection fails at once with its reason
        assert failures == [(RedisTimeout, 20), (RedisTimeout, 1)]  # every failed command is reported
    finally:
        os.kill(pid, signal.SIGCONT)


def test_both_cache_connections_implement_the_protocol() -> None:
    """OnDemandRedis and the pools use a CacheConnection; each implementation has every member of it."""
    from ondemand.redis.cluster import ClusterConnection
    from ondemand.redis.connection import CacheConnection
    from ondemand.redis.pipeline import PipelinedConnection

    members = {name for name in dir(CacheConnection) if not name.startswith("_")}
    assert {"execute", "execute_many", "close", "closed_reason", "server_id", "busy", "status"} <= members
    for kind in (PipelinedConnection, ClusterConnection):
        instance_attributes = {"closed_reason", "server_id", "batches_written", "commands_written"}
        missing = {m for m in members - instance_attributes if not hasattr(kind, m)}
        assert not missing, (kind.__name__, missing)
        assert callable(kind.connect)
