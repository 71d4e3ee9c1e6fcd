"""The near cache's install rules, one by one, on the real objects (no server: these are the rules the tests of
tests/test_near_cache.py cannot always make the server interleave on demand). Each rule removed fails one test."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from ondemand.config import NearCacheConfig
from ondemand.redis.tracking import TrackingConnection, _Read
from ondemand.store.near import ENTRY_OVERHEAD, NearCache, Tracker

KEY = "ondemand:profile:k"


def near_cache(**config: object) -> NearCache:
    return NearCache(NearCacheConfig(**config), {"default": ["ondemand:profile:"]})  # type: ignore[arg-type]


def fresh(near: NearCache, where: str = "redis://a") -> Tracker:
    tracker = Tracker(where)
    near.register(tracker)
    tracker.fresh_until = math.inf
    return tracker


async def connection(near: NearCache) -> TrackingConnection:
    """A tracking connection that has not connected (its reader's rules need no socket)."""
    conn = TrackingConnection(op_timeout=0.25, max_batch=64, loop=asyncio.get_running_loop(), near=near,
                              where="redis://a")
    near.register(conn.tracker)
    conn.tracker.fresh_until = math.inf
    return conn


async def read_of(conn: TrackingConnection, key: str = KEY, step: int = 1) -> _Read:
    read = _Read(conn, None, key, False, step, time.monotonic())
    conn.near.begin_read(key, read)
    return read


async def test_only_the_latest_read_of_a_key_installs() -> None:
    near = near_cache()
    conn = await connection(near)
    first, second = await read_of(conn), await read_of(conn)
    assert not near.install(KEY, first, conn.tracker, b"1", None, math.inf)
    assert near.install(KEY, second, conn.tracker, b"2", None, math.inf)
    assert near.get(KEY) == b"2" and near.pending == {}


async def test_an_invalidation_on_the_read_s_own_connection_before_its_reply_keeps_it() -> None:
    near = near_cache()
    conn = await connection(near)
    read = await read_of(conn)  # its value not received: the write came before the server ran it
    near.invalidate([KEY.encode()], conn)
    assert near.install(KEY, read, conn.tracker, b"after the write", None, math.inf)


async def test_an_invalidation_after_the_read_s_reply_keeps_it_from_installing() -> None:
    near = near_cache()
    conn = await connection(near)
    read = await read_of(conn, step=2)  # its value received, its PTTL not: the write may have come in between
    near.invalidate([KEY.encode()], conn)
    assert not near.install(KEY, read, conn.tracker, b"older", None, math.inf)


async def test_an_invalidation_from_another_connection_keeps_the_read_from_installing() -> None:
    near = near_cache()
    conn, other = await connection(near), await connection(near)
    read = await read_of(conn)
    near.invalidate([KEY.encode()], other)  # no order between two connections
    assert not near.install(KEY, read, conn.tracker, b"maybe older", None, math.inf)


async def test_our_own_write_keeps_every_read_before_it_from_installing() -> None:
    near = near_cache()
    conn = await connection(near)
    read = await read_of(conn)
    near.evict(KEY)
    assert not near.install(KEY, read, conn.tracker, b"older", None, math.inf)


async def test_a_flush_of_the_connection_keeps_its_reads_in_flight_from_installing() -> None:
    near = near_cache()
    conn = await connection(near)
    read = await read_of(conn)
    near.flush(conn.tracker, "slot_change")
    assert not near.install(KEY, read, conn.tracker, b"from the old owner", None, math.inf)


async def test_nothing_installs_from_a_closed_connection_or_while_the_breaker_is_open() -> None:
    near = near_cache()
    conn = await connection(near)
    read = await read_of(conn)
    near.serving = False
    assert not near.install(KEY, read, conn.tracker, b"v", None, math.inf)
    near.serving = True
    read = await read_of(conn)
    near.close(conn.tracker, "closed")
    assert not near.install(KEY, read, conn.tracker, b"v", None, math.inf)


async def test_a_version_going_back_drops_both() -> None:
    near = near_cache()
    conn = await connection(near)
    assert near.install(KEY, await read_of(conn), conn.tracker, b"v5", 5, math.inf)
    assert not near.install(KEY, await read_of(conn), conn.tracker, b"v4", 4, math.inf)
    assert near.get(KEY) is None


def test_a_hit_needs_a_fresh_connection_and_an_unexpired_entry() -> None:
    near = near_cache()
    tracker = fresh(near)
    read = type("Read", (), {"generation": 0})()
    near.begin_read(KEY, read)  # type: ignore[arg-type]
    assert near.install(KEY, read, tracker, b"v", None, time.monotonic() + 60)  # type: ignore[arg-type]
    assert near.get(KEY) == b"v"
    tracker.fresh_until = time.monotonic() - 0.001  # silent past the bound: kept, not served
    assert near.get(KEY) is None and KEY in near.entries
    tracker.fresh_until = math.inf
    assert near.get(KEY) == b"v"
    near.entries[KEY].expires = time.monotonic() - 0.001  # past the key's ttl in Redis: gone
    assert near.get(KEY) is None and KEY not in near.entries


@pytest.mark.parametrize("bound", ["max_bytes", "max_entries"])
def test_the_least_recently_used_goes_first(bound: str) -> None:
    value = b"x" * 300
    size = len(KEY) + 2 + len(value) + ENTRY_OVERHEAD  # (keys of KEY's length and two digits)
    near = near_cache(**({"max_bytes": 3 * size} if bound == "max_bytes" else {"max_entries": 3}))
    tracker = fresh(near)

    def install(key: str) -> None:
        read = type("Read", (), {"generation": 0})()
        near.begin_read(key, read)  # type: ignore[arg-type]
        assert near.install(key, read, tracker, value, None, math.inf)  # type: ignore[arg-type]

    keys = [f"{KEY}{n:02d}" for n in range(4)]
    for key in keys[:3]:
        install(key)
    assert near.get(keys[0]) == value  # used: the second is the least recently used now
    install(keys[3])
    assert list(near.entries) == [keys[2], keys[0], keys[3]] and near.evictions == 1
    assert near.bytes == 3 * size and tracker.entries == 3
