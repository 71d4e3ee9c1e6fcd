"""Partial failures with the real fault: a frozen PostgreSQL, a full Redis, integers JSON cannot carry.

No stale read and no silently changed value: a write whose outcome is unknown leaves no older copy in
Redis, an error reply from Redis never fails a request the durable store acknowledged, and a value
that would not read back as written is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from ondemand import Runtime
from ondemand.errors import BackendUnavailable, InvalidInput, WriteOutcomeUnknown
from ondemand.store.values import MAX_INT, MIN_INT
from ondemand.web import create_app
from tests.support import process_tree, query


@contextlib.contextmanager
def frozen(pids: set[int]) -> Iterator[None]:
    """SIGSTOP every process of a server (postmaster and backends); SIGCONT afterwards, always."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def stored_in_postgres(dsn: str, item_id: str) -> object:
    rows = await query(dsn, "SELECT value FROM ondemand_values WHERE namespace = 'session' AND id = %s", (item_id,))
    return json.loads(bytes(rows[0][0])) if rows else None  # type: ignore[arg-type]


async def eventually_equal(read, expected_of, timeout: float = 10.0) -> None:
    """After the thaw, PostgreSQL settles (the frozen statement commits or not); every read must then
    return what PostgreSQL holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        expected = await expected_of()
        got = await read()
        if got == expected:
            return
        assert asyncio.get_running_loop().time() < deadline, (got, expected)
        await asyncio.sleep(0.1)


async def test_a_durable_put_and_delete_frozen_in_postgres_leave_no_stale_copy(durable_config, pg) -> None:
    config = durable_config({"postgres": {"connect_timeout": 0.3, "statement_timeout": 0.3}})
    async with Runtime(config) as rt:
        await rt.cache.cache_session("s", {"v": 1})
        await rt.cache.cache_session("t", {"v": 1})
        assert await rt.cache.get_session("s") == {"v": 1}  # cached
        with frozen(process_tree(pg.pid)):
            with pytest.raises(WriteOutcomeUnknown, match="may still take effect"):
                await rt.cache.cache_session("s", {"v": 2})
            # Unknown outcome or surely not applied (no connection could even be had): no copy stays either way.
            with pytest.raises(BackendUnavailable):
                await rt.cache.delete_session("t")
            # Before answering, the old copies left Redis: no read can serve them, frozen or not.
            for key in ("ondemand:session:s", "ondemand:session:t"):  # a tombstone each (a version, no value)
                assert await rt.on_demand.with_connection(lambda r, key=key: r.hexists(key, "v")) == 0
        for item_id in ("s", "t"):
            await eventually_equal(lambda i=item_id: rt.cache.get_session(i),
                                   lambda i=item_id: stored_in_postgres(pg.dsn, i))
        # And again once the cache holds a copy (put back after the tombstone: never an older one).
        assert await rt.cache.get_session("s") == await stored_in_postgres(pg.dsn, "s")


async def test_a_full_redis_fails_no_durable_write_and_serves_no_old_copy(durable_config) -> None:
    config = durable_config({"lifecycle": {"maxmemory": "8mb", "maxmemory_policy": "noeviction"}})
    async with Runtime(config) as rt:
        await rt.cache.cache_session("s", {"v": "old"})
        await rt.cache.cache_profile("p", {"v": "old"})
        # A session only PostgreSQL holds (written there directly, as another host would have).
        await rt.durable_storage.set(rt.dispatcher.namespace("session"), "pg-only", b'{"v": "pg"}', None)

        async def fill(r) -> int:
            # Ballast, then maxmemory set well below what is used: every write is refused with OOM
            # (noeviction) until the ballast goes, however small it is and whatever gets deleted meanwhile.
            for i in range(5):
                await r.set(f"ballast:{i}", b"x" * 100_000)
            used = (await r.info("memory"))["used_memory"]
            await r.config_set("maxmemory", used - 300_000)
            with pytest.raises(Exception, match="maxmemory"):
                await r.set("probe", b"1")
            return used

        await rt.on_demand.with_connection(fill)

        await rt.cache.cache_session("s", {"v": "new"})  # acknowledged: PostgreSQL committed it
        assert await rt.cache.get_session("s") == {"v": "new"}, "no old copy is served"
        assert await rt.cache.get_session("pg-only") == {"v": "pg"}, "a refused put-back does not fail the read"
        await rt.cache.cache_profile("p", {"v": "new"})  # cache-only: dropped and counted, old copy gone
        assert await rt.cache.get_profile("p") is None

        status = rt.dispatcher.status()
        assert status["error_replies"]["oom"] >= 3
        assert status["namespaces"]["profile"]["dropped_writes"] == 1
        assert status["namespaces"]["profile"]["cache_errors"] >= 1
        assert status["namespaces"]["session"]["fallback_writes"] == 1
        assert rt.dispatcher.breaker.closed, "an out-of-memory reply concerns the command, not the server"

        await rt.on_demand.with_connection(lambda r: r.delete(*(f"ballast:{i}" for i in range(5))))
        assert await rt.cache.get_session("s") == {"v": "new"}
        await rt.cache.cache_profile("p", {"v": "newer"})
        assert await rt.cache.get_profile("p") == {"v": "newer"}


async def test_a_replica_answering_readonly_is_never_written_to_twice(make_config) -> None:
    # Our own server turned into a replica of a closed port: every write is refused with READONLY.
    async with Runtime(make_config()) as rt:
        await rt.cache.cache_profile("p", {"v": "old"})
        await rt.on_demand.with_connection(lambda r: r.execute_command("REPLICAOF", "127.0.0.1", "1"))
        try:
            await rt.cache.cache_profile("p", {"v": "new"})  # refused: counted as dropped, never a 5xx
            assert rt.dispatcher.error_replies["readonly"] >= 1
            pool = rt.on_demand.pools["default"]
            assert pool.mux is None or pool.mux.closed, "READONLY closes the connection: the next command reconnects"
            assert rt.dispatcher.stats["profile"].dropped_writes == 1
        finally:
            await rt.on_demand.with_connection(lambda r: r.execute_command("REPLICAOF", "NO", "ONE"))
        # The old copy could not be deleted on the replica: it was remembered and goes before any read.
        assert await rt.cache.get_profile("p") in (None, {"v": "new"})


@pytest.mark.parametrize("value", [MAX_INT, MIN_INT, 2**53 + 1, -(2**53) - 1])
async def test_integers_at_the_64_bit_limits_are_kept_exactly(runtime: Runtime, value: int) -> None:
    await runtime.cache.cache_profile("u", {"n": value, "list": [value]})
    assert await runtime.cache.get_profile("u") == {"n": value, "list": [value]}


@pytest.mark.parametrize("value", [MAX_INT + 1, MIN_INT - 1, 10**30])
async def test_integers_beyond_64_bits_are_refused_in_the_python_api(runtime: Runtime, value: int) -> None:
    with pytest.raises(InvalidInput, match="64 bits"):
        await runtime.cache.cache_profile("u", {"n": value})
    with pytest.raises(InvalidInput, match="NaN or infinity"):
        await runtime.cache.cache_profile("u", {"x": [float("nan")]})


async def test_integers_through_http(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config()))
    headers = {"Content-Type": "application/json"}
    for text in (str(MAX_INT), str(MIN_INT)):
        resp = await client.put("/api/users/u/profile", data=f'{{"n": {text}}}', headers=headers)
        assert resp.status == 200, await resp.text()
        resp = await client.get("/api/users/u/profile")
        assert f'"n":{text}' in (await resp.text()).replace(" ", "")
    for text in (str(MAX_INT + 1), str(MIN_INT - 1), "1" + "0" * 300):
        resp = await client.put("/api/users/u/profile", data=f'{{"n": {text}}}', headers=headers)
        assert resp.status == 400
        body = await resp.json()
        assert body["error"]["code"] == "invalid_input" and "64 bits" in body["error"]["message"]
    # A long run of digits inside a string is just text.
    resp = await client.put("/api/users/u/profile", data='{"n": "184467440737095516160000"}', headers=headers)
    assert resp.status == 200
    resp = await client.get("/api/users/u/profile")
    assert (await resp.json())["profile"] == {"n": "184467440737095516160000"}


async def test_a_process_that_cannot_reach_redis_invalidates_through_the_outbox(durable_config, make_config) -> None:
    # B and the Redis it shares with A: our own subprocess lifecycle over TCP. A's route to that Redis is
    # a closed port (nothing listens there): every write of A reaches PostgreSQL only.
    async with Runtime(make_config({"lifecycle": {"tcp": True}})) as server:
        endpoint = await server.on_demand.ensure()
        shared = f"redis://:{endpoint.password}@127.0.0.1:{endpoint.port}/0"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
        common = {"lifecycle": {"plugin": "external"}, "storage": {"outbox_poll": 5.0}}
        b_config = durable_config({**common, "lifecycle": {"plugin": "external", "redis_url": shared}})
        a_config = durable_config({**common, "lifecycle": {"plugin": "external", "redis_url": closed}})
        async with Runtime(b_config) as b, Runtime(a_config) as a:
            await b.cache.cache_session("s", {"v": 1})
            await b.cache.cache_session("t", {"v": 1})
            await b.cache.cache_profile("p", {"v": 1})
            assert await b.cache.get_session("s") == {"v": 1}  # cached in the shared Redis
            await a.cache.cache_session("s", {"v": 2})  # acknowledged: PostgreSQL committed it
            await a.cache.delete_session("t")
            await a.cache.cache_profile("p", {"v": 2})  # cache-only, dropped by A: the old copy must go too
            # B is woken by NOTIFY (its poll is 5 s): it stops serving the old values long before that.
            loop = asyncio.get_running_loop()
            started = loop.time()
            async def seen_by_b() -> tuple[object, ...]:
                return (await b.cache.get_session("s"), await b.cache.get_session("t"), await b.cache.get_profile("p"))

            while await seen_by_b() != ({"v": 2}, None, None):
                assert loop.time() - started < 2.0, "B went on serving what A replaced"
                await asyncio.sleep(0.01)
            for _ in range(20):  # and never the old values again
                assert await seen_by_b() == ({"v": 2}, None, None)
            assert b.dispatcher.status()["outbox"]["delivered"] >= 3
            assert a.dispatcher.status()["outbox"]["recorded"] >= 3
            rows = await query(b_config_dsn(b), "SELECT count(*) FROM ondemand_invalidations")
            assert rows[0][0] == 0, "delivered rows are deleted"


def b_config_dsn(rt: Runtime) -> str:
    from ondemand.plugins.storage_postgres import PostgresConfig

    return rt.config.section(PostgresConfig).dsn


async def _plain_server(tmp_path, port: int, password: str):
    """A server behind a fixed address, as a Sentinel's or a provider's would be: not ours to manage."""
    from ondemand.host.process import ChildProcess
    from ondemand.plugins.lifecycle_subprocess import find_binary
    from ondemand.redis.endpoint import RedisEndpoint
    from ondemand.redis.resp import probe

    binary = await find_binary(None)
    child = await ChildProcess.spawn(
        "redis-server", [binary.path, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        log_path=tmp_path / f"server-{port}-{os.urandom(2).hex()}.log")
    endpoint = RedisEndpoint(host="127.0.0.1", port=port, password=password)
    await child.wait_ready(lambda: probe(endpoint, child.pid), timeout=5)
    return child


async def test_a_server_replaced_behind_the_address_serves_no_older_durable_copy(tmp_path, durable_config) -> None:
    # A failover to a replica that missed the last acknowledged write: the same address, another server
    # process, an older copy of the session.
    from ondemand.host.net import free_port

    port, password = free_port(), "replaced-test-pw"
    first = await _plain_server(tmp_path, port, password)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    config = durable_config({"lifecycle": {"plugin": "external", "redis_url": url}})
    async with Runtime(config) as rt:
        try:
            await rt.cache.cache_session("s", {"v": 2})  # acknowledged: in PostgreSQL and in the first server
            assert (await rt.dispatcher.lookup("session", "s")).source == "redis"
        finally:
            await first.stop(grace=2)
        second = await _plain_server(tmp_path, port, password)
        try:
            key = rt.dispatcher.namespace("session").key("s")
            direct = aioredis.Redis(host="127.0.0.1", port=port, password=password)
            await direct.hset(key, mapping={"v": b'{"v": 1}', "n": 0})  # the replica's older copy
            await direct.aclose()
            for _ in range(30):  # every read, from the first after the switch on, is the acknowledged value
                assert await rt.cache.get_session("s") == {"v": 2}
                await asyncio.sleep(0.02)
            await wait_until(lambda: rt.dispatcher.breaker.closed)
            assert await rt.cache.get_session("s") == {"v": 2}
        finally:
            await second.stop(grace=2)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
