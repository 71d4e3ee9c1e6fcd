"""Redis Sentinel (`lifecycle.topology = "sentinel"`, the external lifecycle): the master is discovered from the
sentinels and followed through a failover. Against a real group of the bundled server (tests/support.py
SentinelGroup: 1 master, 1 replica, 3 sentinels, down-after-milliseconds 1000), passwords on every node."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from typing import Any

import pytest

from ondemand import Runtime, load_config
from ondemand.config import redact
from ondemand.config.load import merge
from ondemand.errors import ConfigError, RedisUnavailable
from ondemand.plugins.lifecycle_external import ExternalConfig, SentinelLifecycle
from ondemand.web import RUNTIME, create_app
from tests.support import PROBE_NAME, GroupNode, SentinelGroup, sentinel_group, wait_for

# The sentinel group's own bounds: failures are noticed within the op budget, connects are quick on loopback.
FAST = {"redis": {"op_timeout": 0.25, "connect_timeout": 0.5}, "lifecycle": {"restart_backoff": 0.05,
                                                                             "restart_backoff_max": 0.5}}


def sentinel_config(make: Any, group: SentinelGroup, overrides: dict[str, Any] | None = None) -> Any:
    return make(merge(merge(group.config(), FAST), overrides or {}))


async def foreign_clients(group: SentinelGroup, node: GroupNode) -> list[str]:
    """`node`'s client connections that are not a sentinel's, its master link, a replica's, or the test's own
    (SentinelGroup.call's), nor one that has run no command yet: a connection of the app's to it."""
    text = (await group.call(node, "CLIENT", "LIST")).decode()
    found = []
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("name", "").startswith("sentinel-") or set(fields.get("flags", "")) & {"M", "S"}:
            continue
        if fields.get("name") == PROBE_NAME or fields.get("tot-cmds") == "0":
            continue  # (a connection that has sent nothing yet is not known to be anyone's: not even AUTH)
        found.append(line)
    return found


async def readonly_errors(group: SentinelGroup, node: GroupNode) -> int:
    """How many commands `node` refused with READONLY (a write sent to it while a replica) since it started."""
    stats = await group.info(node, "errorstats")
    entry = stats.get("errorstat_READONLY")
    return int(entry.split("count=")[1].split(",")[0]) if entry else 0


# -- configuration ----------------------------------------------------------------------------------------


async def test_sentinel_keys_from_the_environment_validated_and_redacted() -> None:
    environ = {"ONDEMAND_LIFECYCLE__PLUGIN": "external", "ONDEMAND_LIFECYCLE__TOPOLOGY": "sentinel",
               "ONDEMAND_LIFECYCLE__SENTINELS": '["127.0.0.1:26379", "[::1]:26380"]',
               "ONDEMAND_LIFECYCLE__SENTINEL_MASTER": "mymaster",
               "ONDEMAND_LIFECYCLE__SENTINEL_PASSWORD": "sentinel-secret",
               "ONDEMAND_LIFECYCLE__REDIS_PASSWORD": "data-secret"}
    config = load_config(None, environ=environ)
    section = config.section(ExternalConfig)
    assert config.lifecycle.topology == "sentinel"
    assert section.sentinels == ("127.0.0.1:26379", "[::1]:26380") and section.sentinel_master == "mymaster"
    shown = json.dumps(redact(config))
    assert "sentinel-secret" not in shown and "data-secret" not in shown and "***" in shown
    lifecycle = SentinelLifecycle(config)
    assert [s.address for s in lifecycle.sentinels] == ["127.0.0.1:26379", "[::1]:26380"]
    assert "secret" not in json.dumps(lifecycle.status())

    with pytest.raises(ConfigError) as bad:
        load_config(None, environ={**environ, "ONDEMAND_LIFECYCLE__SENTINELS": '["127.0.0.1"]'})
    assert bad.value.key == "lifecycle.sentinels" and "host:port" in str(bad.value)
    for missing, key in (("ONDEMAND_LIFECYCLE__SENTINELS", "lifecycle.sentinels"),
                         ("ONDEMAND_LIFECYCLE__SENTINEL_MASTER", "lifecycle.sentinel_master")):
        config = load_config(None, environ={k: v for k, v in environ.items() if k != missing})
        with pytest.raises(ConfigError) as bad:
            async with Runtime(config):
                pass
        assert bad.value.key == key and key in str(bad.value)


# -- against a real group ---------------------------------------------------------------------------------


async def test_every_api_operation_goes_through_the_discovered_master(aiohttp_client, make_config) -> None:
    async with sentinel_group() as group:
        master, replica = group.data
        config = sentinel_config(make_config, group, {"server": {"test_endpoints": True}})
        client = await aiohttp_client(create_app(config))

        async def call(method: str, path: str, status: int, **kwargs: Any) -> Any:
            async with client.request(method, path, **kwargs) as resp:
                assert resp.status == status, f"{method} {path}: {resp.status} {await resp.text()}"
                return await resp.json() if resp.content_type == "application/json" else None

        await call("GET", "/readyz", 200)
        await call("PUT", "/api/sessions/s1", 200, json={"user": 1})
        assert await call("GET", "/api/sessions/s1", 200) == {"session_id": "s1", "value": {"user": 1},
                                                              "source": "redis"}
        await call("PUT", "/api/users/u1/messages", 200, json=[{"t": 1}])
        await call("POST", "/api/users/u1/messages", 200, json={"t": 2})
        assert (await call("GET", "/api/users/u1/messages", 200))["messages"] == [{"t": 1}, {"t": 2}]
        await call("PUT", "/api/users/u1/profile", 200, json={"name": "Ada"})
        assert (await call("GET", "/api/users/u1/profile", 200))["profile"] == {"name": "Ada"}
        await call("POST", "/api/users/u2/warmup", 200, json={"session": {"s": 1}, "profile": {"p": 1}})
        assert (await call("GET", "/api/cache/test", 200))["ok"] is True
        await call("POST", "/api/cache/session/test", 200, json={"session_id": "t1", "data": {"v": 1}})
        await call("POST", "/api/cache/batch/test", 200, json={"user_id": "b1"})
        for key in ("ondemand:session:s1", "ondemand:messages:u1", "ondemand:profile:u1", "ondemand:session:u2",
                    "ondemand:profile:u2", "ondemand:session:t1", "ondemand:profile:b1"):
            assert await group.call(master, "EXISTS", key) == 1, key
        await call("DELETE", "/api/sessions/s1", 204)
        await call("DELETE", "/api/users/u1/messages", 204)
        await call("DELETE", "/api/users/u1/profile", 204)
        assert await group.call(master, "EXISTS", "ondemand:profile:u1") == 0
        assert await group.call(master, "EXISTS", "ondemand:messages:u1") == 0

        status = await call("GET", "/api/cache/status", 200)
        redis = status["redis"]
        assert redis["topology"] == "sentinel" and redis["state"] == "running"
        assert redis["endpoint"] == f"redis://:***@{master.address}/0"
        sentinel = redis["sentinel"]
        assert sentinel["master_name"] == group.master_name and sentinel["master"] == master.address
        assert [s["address"] for s in sentinel["sentinels"]] == group.sentinel_addresses()
        assert sentinel["sentinels"][0]["state"] == "up" and sentinel["failovers"] == 0
        await wait_for(lambda: client.app[RUNTIME].on_demand.lifecycle.subscribed is not None, timeout=5)
        text = json.dumps(status)
        assert group.password not in text and group.sentinel_password not in text
        # The replica served nothing of ours and was never written to: replication alone filled it. (The
        # master shows our connections: what the check looks for.)
        assert await foreign_clients(group, master) != []
        assert await foreign_clients(group, replica) == []
        assert await readonly_errors(group, replica) == 0
        assert await group.call(replica, "EXISTS", "ondemand:session:u2") == 1


async def test_master_sigkill_under_mixed_load_fails_no_durable_operation(durable_config) -> None:
    async with sentinel_group() as group:
        old, new = group.data
        config = durable_config(merge(group.config(), FAST))
        async with Runtime(config) as rt:
            lifecycle = rt.on_demand.lifecycle
            acknowledged: dict[str, int] = {}
            durable_errors: list[BaseException] = []
            cache_only: dict[str, list[tuple[float, bool]]] = {"ok": [], "failed": []}
            killed_at: list[float] = []
            stop = asyncio.Event()
            await rt.cache.get_session("warm")

            async def durable_worker(n: int) -> None:
                i = 0
                while not stop.is_set():
                    key = f"w{n}-{i % 5}"
                    try:
                        await rt.cache.cache_session(key, {"n": n, "i": i})
                        acknowledged[key] = i
                        value = await rt.cache.get_session(key)
                        assert value == {"n": n, "i": i}, (key, value)
                    except Exception as exc:  # every failure is the test's finding
                        durable_errors.append(exc)
                    i += 1
                    await asyncio.sleep(0.005)

            async def cache_only_worker(n: int) -> None:
                i = 0
                while not stop.is_set():
                    item = f"p{n}-{i % 5}"
                    await rt.dispatcher.set("profile", item, {"i": i})
                    found = await rt.dispatcher.lookup("profile", item)
                    outcome = "ok" if found.source == "redis" and found.value == {"i": i} else "failed"
                    cache_only[outcome].append((time.monotonic(), outcome == "ok"))
                    i += 1
                    await asyncio.sleep(0.005)

            async def scenario() -> None:
                await asyncio.sleep(0.5)
                killed_at.append(time.monotonic())
                group.kill(old)
                await group.wait_settled(master=new, timeout=30)
                # Cache-only operations come back to Redis (the promoted replica) by themselves.
                await wait_for(lambda: cache_only["ok"] and cache_only["ok"][-1][0] > time.monotonic() - 0.2
                               and lifecycle.master == ("127.0.0.1", new.port), timeout=15)
                await asyncio.sleep(0.5)
                stop.set()

            await asyncio.gather(scenario(), *(durable_worker(n) for n in range(6)),
                                 *(cache_only_worker(n) for n in range(3)))
            assert durable_errors == []
            assert len(acknowledged) == 30
            ok_times = [t for t, _ in cache_only["ok"]]
            assert min(ok_times) < killed_at[0] < max(ok_times)
            # Every session reads back its last acknowledged value (from Redis or the durable store).
            for key, i in acknowledged.items():
                assert (await rt.cache.get_session(key))["i"] == i, key
            assert await group.call(new, "EXISTS", "ondemand:profile:p0-0") == 1  # written to the new master
            status = rt.status()["redis"]
            assert status["sentinel"]["master"] == new.address and status["sentinel"]["failovers"] >= 1
            assert status["sentinel"]["last_failover"]["to"] == new.address
            assert status["endpoint"] == f"redis://:***@{new.address}/0"

            # The old master comes back (empty, as a master, as a crashed one does); the sentinels make it a
            # replica of the new one, and we never write to it meanwhile or after.
            await group.spawn(old)
            stop.clear()
            sampled: list[list[str]] = []

            async def sample() -> None:
                while not stop.is_set():
                    sampled.append(await foreign_clients(group, old))
                    await asyncio.sleep(0.05)

            async def rejoin() -> None:
                await group.wait_settled(master=new, timeout=40)
                await asyncio.sleep(1.0)
                stop.set()

            await asyncio.gather(rejoin(), sample(), *(durable_worker(n) for n in range(3)), cache_only_worker(0))
            assert await group.role(old) == "slave"
            assert durable_errors == []
            assert sampled and all(found == [] for found in sampled), [f for f in sampled if f]
            assert await readonly_errors(group, old) == 0
            stats = await group.info(old, "commandstats")
            assert all("rejected_calls=0" in value for key, value in stats.items() if key.startswith("cmdstat_"))
            for key, i in acknowledged.items():
                assert (await rt.cache.get_session(key))["i"] == i, key


async def test_a_sentinel_down_then_all_down_bounded_errors_and_recovery(make_config) -> None:
    async with sentinel_group() as group:
        master = group.data[0]
        first, *others = group.watchers
        group.kill(first)
        await asyncio.sleep(0.1)
        config = sentinel_config(make_config, group)
        async with Runtime(config) as rt:
            lifecycle = rt.on_demand.lifecycle
            began = time.monotonic()
            await rt.cache.cache_profile("a", {"v": 1})  # discovered through the second sentinel
            assert time.monotonic() - began < 1.0
            assert lifecycle.master == ("127.0.0.1", master.port)
            views = {s.address: s for s in lifecycle.sentinels}
            assert views[first.address].state == "down" and views[others[0].address].state == "up"
            await wait_for(lambda: lifecycle.subscribed is not None, timeout=5)
            assert lifecycle.subscribed.address != first.address

            # Every sentinel down: the master still serves the connection we have.
            for sentinel in others:
                group.kill(sentinel)
            await wait_for(lambda: lifecycle.subscribed is None, timeout=5)
            assert (await rt.dispatcher.lookup("profile", "a")).source == "redis"

            # Our connection to the master is cut: we must ask the sentinels again, and none answers. Each
            # operation gives up within its bounds (a cache-only read is a miss), and none is served by an
            # address remembered from before.
            await group.call(master, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            for _ in range(5):
                began = time.monotonic()
                found = await rt.dispatcher.lookup("profile", "a")
                assert time.monotonic() - began < 1.0
                if found.source == "miss":
                    break
                await asyncio.sleep(0.05)
            assert found.source == "miss"
            began = time.monotonic()
            with pytest.raises(RedisUnavailable) as down:
                await rt.on_demand.ensure()
            assert time.monotonic() - began < 3 * 0.5 + 0.5
            assert "themaster" in str(down.value)
            assert lifecycle.master is None

            # The sentinels come back (with the configuration they rewrote): we find the master again.
            for sentinel in group.watchers:
                await group.spawn(sentinel, rewrite=False)
            await group.wait_settled(master=master)
            deadline = time.monotonic() + 15
            while (await rt.dispatcher.lookup("profile", "a")).source != "redis":
                assert time.monotonic() < deadline, rt.status()["redis"]
                await asyncio.sleep(0.1)
            assert lifecycle.master == ("127.0.0.1", master.port)
            await wait_for(lambda: lifecycle.subscribed is not None, timeout=10)


# -- the status page --------------------------------------------------------------------------------------


async def test_status_page_shows_the_sentinels_the_master_and_failovers(aiohttp_server, make_config) -> None:
    """In a real headless Chromium (Debian's; skipped without one): the Redis card's sentinel rows."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with sentinel_group() as group:
        old, new = group.data
        server = await aiohttp_server(create_app(sentinel_config(make_config, group)))
        rt = server.app[RUNTIME]
        await rt.cache.cache_profile("x", {"v": 1})
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=binary, headless=True, chromium_sandbox=False,
                                                       args=["--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = await browser.new_page()
                problems: list[str] = []
                page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
                page.on("pageerror", lambda e: problems.append(str(e)))
                await page.goto(str(server.make_url("/")), wait_until="load")

                async def text(element_id: str, expected: str, timeout: float = 15.0) -> str:
                    deadline = time.monotonic() + timeout
                    while True:
                        found = await page.evaluate(
                            f"(document.getElementById({element_id!r}) || {{}}).textContent || ''")
                        if expected in found:
                            return found
                        assert time.monotonic() < deadline, (element_id, found, problems)
                        await asyncio.sleep(0.1)

                await text("sentinel-master", f"{group.master_name} at {old.address}")
                listed = await text("sentinel-list", "(subscribed)")
                first, *others = group.sentinel_addresses()  # the first answered: the others were not asked
                assert listed.startswith(f"{first} up (subscribed)"), listed
                assert all(f"{address} unknown" in listed for address in others), listed
                assert (await text("sentinel-failovers", "0")).strip() == "0"

                group.kill(old)
                await group.wait_settled(master=new, timeout=30)
                deadline = time.monotonic() + 15
                while (await rt.dispatcher.lookup("profile", "x")).source != "redis" or \
                        rt.on_demand.lifecycle.master != ("127.0.0.1", new.port):
                    assert time.monotonic() < deadline, rt.status()["redis"]
                    await rt.cache.cache_profile("x", {"v": 2})
                    await asyncio.sleep(0.1)
                await text("sentinel-master", f"{group.master_name} at {new.address}")
                await text("sentinel-failovers", f"last {old.address} → {new.address}")
                assert problems == []
            finally:
                await browser.close()


async def test_a_readonly_reply_ends_writes_to_that_server_and_a_replica_is_never_taken_for_the_master(
        make_config) -> None:
    """With no sentinel to tell us (all down), the master turns replica behind our connection: its READONLY
    reply makes us stop writing there, and a sentinel naming it later (its stale view) is not believed: ROLE
    decides."""
    async with sentinel_group() as group:
        first, second = group.data
        async with Runtime(sentinel_config(make_config, group)) as rt:
            lifecycle = rt.on_demand.lifecycle
            await rt.cache.cache_profile("a", {"v": 1})
            assert lifecycle.master == ("127.0.0.1", first.port)
            for sentinel in group.watchers:
                group.kill(sentinel)
            await wait_for(lambda: lifecycle.subscribed is None, timeout=5)
            assert await group.call(second, "REPLICAOF", "NO", "ONE") == b"OK"
            assert await group.call(first, "REPLICAOF", "127.0.0.1", second.port) == b"OK"

            async def writes(count: int) -> None:
                for i in range(count):
                    began = time.monotonic()
                    await rt.dispatcher.set("profile", f"k{i}", {"i": i})  # a cache-only write: dropped, not failed
                    assert time.monotonic() - began < 1.0
                    await asyncio.sleep(0.02)

            await writes(10)
            refused = await readonly_errors(group, first)
            assert refused >= 1  # the first write after the switch met the replica: that is how we knew
            assert lifecycle.master is None and rt.on_demand.state != "running"
            await writes(20)
            assert await readonly_errors(group, first) == refused  # and nothing more was sent there

            # The sentinels come back believing the old master; it says it is a replica: not taken.
            for sentinel in group.watchers:
                await group.spawn(sentinel, rewrite=False)
            deadline = time.monotonic() + 5
            while True:
                with pytest.raises(RedisUnavailable) as refused_master:
                    await rt.on_demand.ensure()
                if f"names {first.address}, but its ROLE is 'slave'" in str(refused_master.value):
                    break
                assert time.monotonic() < deadline, str(refused_master.value)
                await asyncio.sleep(0.05)
            assert await readonly_errors(group, first) == refused


async def test_a_write_the_replica_never_received_is_not_served_after_the_failover(durable_config) -> None:
    # Asynchronous replication: the master acknowledges a write, its replica never gets it, the master dies
    # and the replica is promoted holding the older copy. The first connection to it sees another run_id
    # (CacheReplaced): durable copies are cleared before anything is served from it.
    async with sentinel_group() as group:
        old, new = group.data
        config = durable_config(merge(group.config(), FAST))
        async with Runtime(config) as rt:
            await rt.cache.cache_session("s", {"v": 1})
            assert await group.call(old, "WAIT", 1, 2000) == 1, "the replica has v1"
            assert new.child is not None
            new.child.signal(signal.SIGSTOP)  # it cannot take the link up again before the master dies
            try:
                assert await group.call(old, "CLIENT", "KILL", "TYPE", "replica") == 1
                await rt.cache.cache_session("s", {"v": 2})  # acknowledged: PostgreSQL and the old master
                group.kill(old)
            finally:
                new.child.signal(signal.SIGCONT)
            await group.wait_settled(master=new, timeout=30)
            key = rt.dispatcher.namespace("session").key("s")
            assert await group.call(new, "HGET", key, "v") == b'{"v":1}', "the promoted replica holds the older copy"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:  # every read, during and after the switch, is the acknowledged value
                found = await rt.dispatcher.lookup("session", "s")
                assert found.value == {"v": 2}, found
                if found.source == "redis" and rt.on_demand.lifecycle.master == ("127.0.0.1", new.port):
                    break
                assert loop.time() < deadline, "the cache did not come back on the promoted replica"
                await asyncio.sleep(0.05)
            assert await group.call(new, "HGET", key, "v") == b'{"v":2}'
