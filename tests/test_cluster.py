"""The HTTP API on a Redis Cluster, with real faults: every operation, a master SIGKILLed under load,
resharding under load, and the on-demand cluster's own life (spawn on first use, idle stop, a killed app).

Every cluster here is our own lifecycle's (`lifecycle.topology = "cluster"` with the subprocess
lifecycle): 3 masters x 1 replica of the bundled server, `cluster-node-timeout` 1 s, spawned by the first
operation. Independent checks go straight to the nodes with redis.asyncio (DBSIZE, ROLE, CLUSTER ...);
the product's own view is read from GET /api/cache/status.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import psutil
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from ondemand import Runtime
from ondemand.plugins.lifecycle_subprocess.local_cluster import ClusterNode, LocalCluster
from ondemand.redis.routing import key_slot
from ondemand.web import RUNTIME, create_app
from tests.support import ROOT, kill_node, migrate_slot, pid_gone, redis_children, wait_for, wait_gone

# Roomy start bounds: a loaded CI runner, and Valkey holds a new master back 2 s before cluster_state:ok.
CLUSTER: dict[str, Any] = {"lifecycle": {
    "topology": "cluster", "cluster_masters": 3, "cluster_replicas": 1, "startup_timeout": 20.0,
    "redis_options": {"cluster-node-timeout": "1000"},
}}


def with_cluster(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    merged = {"lifecycle": {**CLUSTER["lifecycle"], **(overrides or {}).get("lifecycle", {})}}
    return {**(overrides or {}), **merged}


def the_cluster(client: TestClient) -> LocalCluster:
    cluster = client.app[RUNTIME].on_demand.lifecycle.cluster
    assert cluster is not None, "the lifecycle runs no cluster"
    return cluster


def node_client(node: ClusterNode, password: str) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=node.port, password=password, socket_timeout=2.0)


async def on_node(node: ClusterNode, password: str, *command: Any) -> Any:
    async with node_client(node, password) as r:
        return await r.execute_command(*command)


def tag(item_id: str) -> str:
    """The hash tag of our keys for `item_id` ("=" + id: never empty, whatever the id)."""
    return "=" + item_id


def owner_of(cluster: LocalCluster, item_id: str) -> ClusterNode:
    """The master that was given the slot of `item_id` (the id is its keys' hash tag) at formation."""
    slot = key_slot(tag(item_id))
    return next(n for n in cluster.master_nodes() if n.slots and n.slots[0] <= slot <= n.slots[1])


async def status(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/api/cache/status")
    assert resp.status == 200
    return await resp.json()


def redirects(doc: dict[str, Any]) -> Counter[str]:
    """The redirects every pool's ClusterConnection followed, summed (sessions have a pool of their own)."""
    total: Counter[str] = Counter()
    for pool in doc["redis"]["pools"].values():
        if pool["pipeline"] is not None:
            total.update(pool["pipeline"].get("redirects", {}))
    return total


async def body_of(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, (resp.status, await resp.text())
    return await resp.json() if status != 204 else None


# -- every operation -----------------------------------------------------------------------------


async def test_every_api_operation_on_the_cluster_with_keys_on_every_master(aiohttp_client, durable_config) -> None:
    client = await aiohttp_client(create_app(durable_config(with_cluster())))
    rt = client.app[RUNTIME]
    assert rt.on_demand.lifecycle.cluster is None and redis_children() == [], "nothing runs before first use"

    ids = [f"u{i}" for i in range(60)]
    # sessions (durable): PUT, GET, HEAD, a ttl, DELETE with its tombstone
    for i, item in enumerate(ids):
        assert (await body_of(await client.put(f"/api/sessions/{item}", json={"n": i})))["session_id"] == item
    cluster = the_cluster(client)
    for i, item in enumerate(ids):
        assert await body_of(await client.get(f"/api/sessions/{item}")) == {
            "session_id": item, "value": {"n": i}, "source": "redis"}
    head = await client.head("/api/sessions/u1")
    assert head.status == 200 and await head.read() == b""
    assert (await body_of(await client.put("/api/sessions/short?ttl=30", json=1)))["ttl"] == 30.0
    pttl = await rt.on_demand.with_connection(lambda r: r.pttl("ondemand:session:{=short}"))
    assert 0 < pttl <= 30_000, "the key carries its id as its hash tag, with the ttl asked for"

    # a session whose Redis key is gone is read from PostgreSQL and put back into Redis
    assert await rt.on_demand.with_connection(lambda r: r.delete("ondemand:session:{=u7}")) == 1
    assert (await body_of(await client.get("/api/sessions/u7")))["source"] == "postgres"
    assert (await body_of(await client.get("/api/sessions/u7")))["source"] == "redis"
    for item in ids[:10]:
        await body_of(await client.delete(f"/api/sessions/{item}"), 204)
        await body_of(await client.get(f"/api/sessions/{item}"), 404)
        await body_of(await client.delete(f"/api/sessions/{item}"), 404)
    # the delete left a tombstone in the key itself (its version, no value): no read puts the deleted value back
    assert (await rt.on_demand.with_connection(lambda r: r.hgetall("ondemand:session:{=u3}"))).keys() == {b"n"}

    # profiles and messages (cache-only)
    for item in ids:
        await body_of(await client.put(f"/api/users/{item}/profile", json={"name": item}))
        assert (await body_of(await client.put(f"/api/users/{item}/messages", json=[{"m": 0}])))["count"] == 1
        assert (await body_of(await client.post(f"/api/users/{item}/messages", json=[{"m": 1}, {"m": 2}])))[
            "count"] == 3
    for item in ids:
        assert await body_of(await client.get(f"/api/users/{item}/profile")) == {
            "user_id": item, "profile": {"name": item}, "source": "redis"}
        got = await body_of(await client.get(f"/api/users/{item}/messages?last=2"))
        assert got == {"user_id": item, "messages": [{"m": 1}, {"m": 2}], "total": 3, "source": "redis"}
    await body_of(await client.delete("/api/users/u5/profile"), 204)
    await body_of(await client.get("/api/users/u5/profile"), 404)
    await body_of(await client.delete("/api/users/u5/messages"), 204)
    await body_of(await client.get("/api/users/u5/messages"), 404)

    # warm-up: session, messages and profile of users on every master, each read back from Redis
    warm = [item for item in (f"w{i}" for i in range(30))]
    assert {owner_of(cluster, item).index for item in warm} == {0, 1, 2}
    for item in warm:
        written = await body_of(await client.post(f"/api/users/{item}/warmup", json={
            "session": {"s": item}, "messages": [{"w": item}], "profile": {"p": item}}))
        assert sorted(written["written"]) == ["messages", "profile", "session"]
    for item in warm:
        assert (await body_of(await client.get(f"/api/sessions/{item}")))["value"] == {"s": item}
        assert (await body_of(await client.get(f"/api/users/{item}/messages")))["messages"] == [{"w": item}]
        assert await body_of(await client.get(f"/api/users/{item}/profile")) == {
            "user_id": item, "profile": {"p": item}, "source": "redis"}

    # 50 concurrent appends to one list: all land, each exactly once
    replies = await asyncio.gather(*(client.post("/api/users/crowd/messages", json={"i": i}) for i in range(50)))
    counts = sorted([(await body_of(r))["count"] for r in replies])
    assert counts == list(range(1, 51)), "every append saw a distinct length"
    got = await body_of(await client.get("/api/users/crowd/messages"))
    assert got["total"] == 50 and sorted(m["i"] for m in got["messages"]) == list(range(50))

    # the test endpoints, health, readiness, metrics
    assert (await body_of(await client.get("/api/cache/test")))["ok"] is True
    assert (await body_of(await client.post("/api/cache/session/test", json={"session_id": "st"})))["ok"] is True
    assert (await body_of(await client.post("/api/cache/batch/test", json={"user_id": "bt"})))["ok"] is True
    assert await body_of(await client.get("/healthz")) == {"status": "ok"}
    ready = await body_of(await client.get("/readyz"))
    assert ready["status"] == "ready" and ready["redis"]["breaker"] == "closed"
    metrics = await client.get("/metrics")
    text = await metrics.text()
    assert metrics.status == 200 and "ondemand_cache_hits" in text
    assert 'ondemand_redis_topology{topology="cluster"} 1.0' in text
    node_lines = [line for line in text.splitlines() if line.startswith("ondemand_cluster_node_up{")]
    assert len(node_lines) == 3 and all(line.endswith(" 1.0") for line in node_lines), node_lines
    assert sum(1 for line in text.splitlines() if line.startswith("ondemand_cluster_node_slots{")) == 3

    # keys spread over every master, each on its slot's owner; nothing went the long way
    sizes = [await on_node(node, cluster.password, "DBSIZE") for node in cluster.master_nodes()]
    assert all(size > 0 for size in sizes), f"keys must spread over every master: {sizes}"
    for item in ("u20", "u40", "w3"):
        owner = owner_of(cluster, item)
        assert await on_node(owner, cluster.password, "EXISTS", f"ondemand:profile:{{={item}}}") == 1
    doc = await status(client)
    assert doc["redis"]["topology"] == "cluster"
    nodes = doc["redis"]["pools"]["default"]["pipeline"]["nodes"]
    assert sorted(n["address"] for n in nodes) == sorted(f"127.0.0.1:{n.port}" for n in cluster.master_nodes())
    assert sum(n["slots"] for n in nodes) == 16384 and all(n["commands"] > 0 for n in nodes)
    assert redirects(doc)["moved"] == 0 and redirects(doc)["ask"] == 0
    assert rt.dispatcher.breaker.opens == 0
    assert cluster.password not in json.dumps(doc)


# -- a master SIGKILLed under load -------------------------------------------------------------------


class Load:
    """Mixed traffic through the API, each id written by one worker only, so that the value a read must
    return is known: the last one acknowledged (`ledger`; None once deleted)."""

    def __init__(self, client: TestClient, until: Callable[[], bool]) -> None:
        self.client, self.until = client, until
        self.ledger: dict[str, Any] = {}
        self.errors: list[str] = []  # durable: any failed request; cache-only: any 5xx
        self.stale: list[str] = []  # a read that answered another value than the last acknowledged
        self.ops = Counter[str]()

    async def sessions(self, worker: int, ids: list[str], pause: float) -> None:
        rng = random.Random(worker)
        n = 0
        while not self.until():
            item = rng.choice(ids)
            op = rng.choices(("put", "get", "delete"), (5, 4, 1))[0]
            self.ops[f"session {op}"] += 1
            url = f"/api/sessions/{item}"
            if op == "put":
                n += 1
                value = {"w": worker, "n": n}
                resp = await self.client.put(url, json=value)
                if resp.status == 200:
                    self.ledger[item] = value
                else:
                    self.errors.append(f"PUT {item}: {resp.status} {await resp.text()}")
            elif op == "get":
                resp = await self.client.get(url)
                expected = self.ledger.get(item)
                if resp.status == 200:
                    value = (await resp.json())["value"]
                    if value != expected:
                        self.stale.append(f"GET {item}: {value} instead of {expected}")
                elif resp.status == 404:
                    if expected is not None:
                        self.stale.append(f"GET {item}: 404 instead of {expected}")
                else:
                    self.errors.append(f"GET {item}: {resp.status} {await resp.text()}")
            else:
                resp = await self.client.delete(url)
                if resp.status in (204, 404):
                    if (resp.status == 404) != (self.ledger.get(item) is None):
                        self.stale.append(f"DELETE {item}: {resp.status} with {self.ledger.get(item)} stored")
                    self.ledger[item] = None
                else:
                    self.errors.append(f"DELETE {item}: {resp.status} {await resp.text()}")
            await asyncio.sleep(pause)

    async def cache_only(self, worker: int, ids: list[str], pause: float) -> None:
        rng = random.Random(1000 + worker)
        while not self.until():
            item = rng.choice(ids)
            path = rng.choice(("profile", "messages"))
            self.ops[f"{path}"] += 1
            if path == "profile":
                replies = [await self.client.put(f"/api/users/{item}/profile", json={"w": worker}),
                           await self.client.get(f"/api/users/{item}/profile")]
            else:
                replies = [await self.client.post(f"/api/users/{item}/messages", json={"w": worker}),
                           await self.client.get(f"/api/users/{item}/messages?last=1")]
            for resp in replies:
                if resp.status >= 500:
                    self.errors.append(f"{resp.method} {resp.url.path}: {resp.status} {await resp.text()}")
            await asyncio.sleep(pause)


async def served_from_redis(client: TestClient, item: str, value: Any) -> bool:
    """A cache-only write and its read back, answered by Redis."""
    if (await client.put(f"/api/users/{item}/profile", json=value)).status != 200:
        return False
    resp = await client.get(f"/api/users/{item}/profile")
    return resp.status == 200 and await resp.json() == {"user_id": item, "profile": value, "source": "redis"}


async def test_a_master_sigkilled_under_load_fails_no_durable_request_and_the_cache_heals_itself(
        aiohttp_client, durable_config) -> None:
    client = await aiohttp_client(create_app(durable_config(with_cluster())))
    rt = client.app[RUNTIME]
    await body_of(await client.put("/api/users/first/profile", json={}))  # spawns the cluster
    cluster = the_cluster(client)
    mux = rt.on_demand.pools["default"].mux
    # The master the breaker's PING goes to (the first in the slot map): the hardest one to lose.
    port = mux.slots.masters()[0][1]
    victim = next(n for n in cluster.master_nodes() if n.port == port)
    replica = next(n for n in cluster.nodes if n.master_index == victim.index)
    sessions = [f"s{i}" for i in range(60)]
    users = [f"u{i}" for i in range(60)]
    probes = [item for item in (f"p{i}" for i in range(200)) if owner_of(cluster, item) is victim][:5]
    assert {owner_of(cluster, s).index for s in sessions} == {0, 1, 2} and len(probes) == 5

    stop_at = [time.monotonic() + 15.0]  # the load's bound; brought forward once the cache healed
    load = Load(client, until=lambda: time.monotonic() >= stop_at[0])
    workers = [asyncio.ensure_future(load.sessions(w, sessions[w::6], 0.01)) for w in range(6)]
    workers += [asyncio.ensure_future(load.cache_only(w, users[w::3], 0.01)) for w in range(3)]
    try:
        await asyncio.sleep(1.0)
        before = sum(load.ops.values())
        killed_at = time.monotonic()
        assert await wait_gone([kill_node(victim)], timeout=2.0) == []
        promoted_at: float | None = None
        healed_at: float | None = None
        n = 0
        while healed_at is None and time.monotonic() < killed_at + 12.0:
            if promoted_at is None and (await on_node(replica, cluster.password, "ROLE"))[0] == b"master":
                promoted_at = time.monotonic()
            n += 1
            if all([await served_from_redis(client, item, {"n": n}) for item in probes]):
                healed_at = time.monotonic()
            await asyncio.sleep(0.05)
        assert promoted_at is not None, "the replica was not promoted"
        assert healed_at is not None, "cache-only operations on the lost master's slots never recovered"
        stop_at[0] = min(stop_at[0], time.monotonic() + 1.0)  # a second of traffic on the healed cluster
        await asyncio.gather(*workers)
    finally:
        stop_at[0] = 0.0
        await asyncio.gather(*workers, return_exceptions=True)
    rate = (sum(load.ops.values()) - before) / (time.monotonic() - killed_at)
    print(f"\npromoted {promoted_at - killed_at:.2f} s after the SIGKILL, cache served again "
          f"{healed_at - promoted_at:.2f} s later; {sum(load.ops.values())} operations ({rate:.0f}/s after the "
          f"kill), breaker opened {rt.dispatcher.breaker.opens} times")
    assert load.errors == [], load.errors[:5]
    assert load.stale == [], load.stale[:5]
    assert rate > 100, f"the load was too light to mean anything: {rate:.0f} operations/s"
    pipeline = (await status(client))["redis"]["pools"]["default"]["pipeline"]
    assert pipeline["recoveries"] >= 1, "the lost master went unnoticed: this test tested nothing"
    assert rt.dispatcher.breaker.opens == 0, "one master's failure opened the breaker of every master's keys"
    assert rt.dispatcher.stats["session"].fallback_reads > 0, "no session was read from PostgreSQL meanwhile"
    assert healed_at - promoted_at < 5.0, f"the cache recovered {healed_at - promoted_at:.1f} s after the promotion"
    # once healed, every id on every master is served from Redis again
    await wait_for(lambda: rt.dispatcher.breaker.closed, timeout=5.0)
    assert all([await served_from_redis(client, item, {"after": True}) for item in users])
    # every session reads back its last acknowledged value
    for item in sessions:
        resp = await client.get(f"/api/sessions/{item}")
        expected = load.ledger.get(item)
        if expected is None:
            assert resp.status == 404, (item, await resp.text())
        else:
            assert (await body_of(resp))["value"] == expected, item
    doc = await status(client)
    addresses = {n["address"] for n in doc["redis"]["pools"]["default"]["pipeline"]["nodes"]}
    assert f"127.0.0.1:{replica.port}" in addresses and f"127.0.0.1:{victim.port}" not in addresses


async def test_two_hosts_keep_serving_the_other_masters_keys_from_redis_while_one_master_fails_over(
        durable_config) -> None:
    """Two hosts (runtimes with connections of their own) on one 3-master cluster, one master SIGKILLed under
    load: a failover is that master's problem alone. On every other master, not one cache-only round trip
    fails and every session keeps being served from Redis, on both hosts, from the kill until the promoted
    replica serves again (no breaker opens, no other master's durable copies are cleared)."""
    async with Runtime(durable_config(with_cluster())) as one:
        await one.cache.cache_profile("first", {})  # spawns the cluster
        cluster = one.on_demand.lifecycle.cluster
        seed = cluster.master_nodes()[0]
        external = {"lifecycle": {"plugin": "external", "topology": "cluster",
                                  "redis_url": f"redis://:{cluster.password}@127.0.0.1:{seed.port}/0"}}
        async with Runtime(durable_config(external)) as two:
            victim = cluster.master_nodes()[1]
            replica = next(n for n in cluster.nodes if n.master_index == victim.index)
            # Each worker its own ids (on every master): what it reads back is what it wrote last, from Redis.
            items = {w: [f"w{w}-{i}" for i in range(30)] for w in range(6)}
            lost = {item for ids in items.values() for item in ids if owner_of(cluster, item) is victim}
            assert all(lost & set(ids) and set(ids) - lost for ids in items.values())
            failures: Counter[str] = Counter()
            served: Counter[str] = Counter()
            stop = asyncio.Event()

            async def load(host: Runtime, name: str, worker: int) -> None:
                rng, n = random.Random(worker), 0
                while not stop.is_set():
                    item, n = rng.choice(items[worker]), n + 1
                    where = "lost" if item in lost else "kept"
                    await host.dispatcher.set("profile", item, {"n": n, "w": worker})
                    found = await host.dispatcher.lookup("profile", item)
                    await host.dispatcher.set("session", item, {"n": n, "w": worker})
                    session = await host.dispatcher.lookup("session", item)
                    served[where] += 1
                    if found.source != "redis" or found.value != {"n": n, "w": worker}:
                        failures[f"{where} profile {name}"] += 1
                    if session.source != "redis" or session.value != {"n": n, "w": worker}:
                        failures[f"{where} session {name}"] += 1
                    await asyncio.sleep(0.002)

            workers = [asyncio.ensure_future(load(host, name, 2 * w + i)) for w in range(3)
                       for i, (host, name) in enumerate(((one, "one"), (two, "two")))]
            try:
                await asyncio.sleep(0.5)
                assert await wait_gone([kill_node(victim)], timeout=2.0) == []
                killed_at = time.monotonic()
                # Until the promoted replica serves the lost slots from Redis again, on both hosts.
                while True:
                    assert time.monotonic() < killed_at + 15.0, f"the lost slots never recovered: {failures}"
                    await asyncio.sleep(0.1)
                    item = sorted(lost)[0]
                    if all([(await host.dispatcher.lookup("session", item)).source == "redis" for host in (one, two)]) \
                            and (await on_node(replica, cluster.password, "ROLE"))[0] == b"master":
                        break
                healed = time.monotonic() - killed_at
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.gather(*workers)
            print(f"\nhealed {healed:.2f} s after the SIGKILL; round trips {dict(served)}; failed {dict(failures)}")
            assert served["kept"] > 500, f"the load was too light to mean anything: {served}"
            assert not {what: count for what, count in failures.items() if what.startswith("kept")}, failures
            assert failures, "the lost master's keys never failed: this test tested nothing"
            for host in (one, two):
                assert host.dispatcher.breaker.opens == 0, "a master's failover opened the breaker of every key"
                pool = host.status()["redis"]["pools"]["default"]["pipeline"]
                assert pool["recoveries"] >= 1 and pool["recovering"] == [], pool


async def test_a_failed_master_affects_only_the_keys_of_its_slots(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config(with_cluster())))
    ids = [f"u{i}" for i in range(30)]
    for item in ids:
        await body_of(await client.put(f"/api/users/{item}/profile", json={"p": item}))
    cluster = the_cluster(client)
    victim = cluster.master_nodes()[1]
    lost = [item for item in ids if owner_of(cluster, item) is victim]
    kept = [item for item in ids if owner_of(cluster, item) is not victim]
    assert lost and kept
    assert await wait_gone([kill_node(victim)], timeout=2.0) == []
    # Long before the replica can be promoted (cluster-node-timeout 1 s): the lost slots answer nothing...
    await body_of(await client.get(f"/api/users/{lost[0]}/profile"), 404)
    # ... and every other master goes on serving its keys from Redis.
    for item in kept:
        assert await body_of(await client.get(f"/api/users/{item}/profile")) == {
            "user_id": item, "profile": {"p": item}, "source": "redis"}


async def test_an_id_without_braces_is_its_keys_hash_tag(make_config) -> None:
    """The key scheme's promise (ondemand.store.Namespace): the id is the hash tag ("=" + id), so the tests can
    tell which master holds an id's key (`owner_of`); one key per id holds its value, version and tombstone."""
    async with Runtime(make_config(with_cluster())) as rt:  # (spawns nothing)
        ns = rt.dispatcher.namespaces["session"]
    for item in ("u1", "é", "x" * 256, "with space"):
        assert key_slot(ns.key(item)) == key_slot(tag(item)), item


async def test_a_write_the_replica_never_received_is_not_served_after_the_failover(
        aiohttp_client, durable_config) -> None:
    client = await aiohttp_client(create_app(durable_config(with_cluster())))
    rt = client.app[RUNTIME]
    await body_of(await client.put("/api/users/first/profile", json={}))
    cluster = the_cluster(client)
    victim = cluster.master_nodes()[1]
    replica = next(n for n in cluster.nodes if n.master_index == victim.index)
    item = next(i for i in (f"s{n}" for n in range(100)) if owner_of(cluster, i) is victim)
    await body_of(await client.put(f"/api/sessions/{item}", json={"v": 1}))
    assert await on_node(victim, cluster.password, "WAIT", 1, 2000) == 1, "the replica has v1"
    assert replica.child is not None
    replica.child.signal(signal.SIGSTOP)  # so that it cannot take the link up again before the master dies
    try:
        assert await on_node(victim, cluster.password, "CLIENT", "KILL", "TYPE", "replica") == 1
        await body_of(await client.put(f"/api/sessions/{item}", json={"v": 2}))  # acknowledged: committed
        assert await wait_gone([kill_node(victim)], timeout=2.0) == []
    finally:
        replica.child.signal(signal.SIGCONT)
    # One read (PostgreSQL answers it, the breaker opens), then none: with no command reaching the cluster,
    # the sessions' connection must find the promoted replica by itself, or the cache stays down until a
    # probe happens to fail again.
    assert await body_of(await client.get(f"/api/sessions/{item}")) == {
        "session_id": item, "value": {"v": 2}, "source": "postgres"}

    async def sessions_connection() -> dict[str, Any]:  # (the status page sends no command)
        return (await status(client))["redis"]["pools"]["session"]["pipeline"]

    assert (await sessions_connection())["unreachable"] == [f"127.0.0.1:{victim.port}"]
    sent = {n["address"]: n["commands"] for n in (await sessions_connection())["nodes"]}
    deadline = time.monotonic() + 10.0
    while f"127.0.0.1:{replica.port}" not in {n["address"] for n in (await sessions_connection())["nodes"]}:
        assert time.monotonic() < deadline, "the slot map never learned of the promoted replica"
        await asyncio.sleep(0.05)
    learned = await sessions_connection()
    assert learned["unreachable"] == [] and f"127.0.0.1:{victim.port}" not in {n["address"] for n in learned["nodes"]}
    promoted = f"127.0.0.1:{replica.port}"
    assert {n["address"]: n["commands"] for n in learned["nodes"] if n["address"] != promoted} == {
        address: sent.get(address, 0) for address in (n["address"] for n in learned["nodes"]) if address != promoted
    }, "no command sent"
    # Held as replaced, the promoted replica is brought up to date by the connection itself (its durable copies
    # cleared, on it alone), with no request of ours either.
    deadline = time.monotonic() + 10.0
    while (await sessions_connection())["recoveries"] < 1:
        assert time.monotonic() < deadline, "the promoted replica was never brought up to date"
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 10.0
    while True:  # until the promoted replica serves the slot
        found = await body_of(await client.get(f"/api/sessions/{item}"))
        if found["source"] == "redis" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert rt.dispatcher.breaker.opens == 0 and found["source"] == "redis", "the cluster did not heal"
    assert found == {"session_id": item, "value": {"v": 2}, "source": "redis"}


# -- resharding under load -----------------------------------------------------------------------


async def test_resharding_under_load_fails_no_request_and_serves_no_stale_value(
        aiohttp_client, durable_config) -> None:
    # An op budget roomy enough to wait out the slow slot at the end (TRYAGAIN for 0.4 s).
    client = await aiohttp_client(create_app(durable_config(with_cluster({"redis": {"op_timeout": 1.0}}))))
    rt = client.app[RUNTIME]
    ids = [f"r{i}" for i in range(48)]
    ledger: dict[str, int] = {}
    lengths: dict[str, int] = {}
    for item in ids:
        await body_of(await client.put(f"/api/users/{item}/profile", json={"n": 0}))
        await body_of(await client.post(f"/api/users/{item}/messages", json={"n": 0}))
        await body_of(await client.put(f"/api/sessions/{item}", json={"n": 0}))
        ledger[item], lengths[item] = 0, 1
    cluster = the_cluster(client)
    source, target = cluster.master_nodes()[0], cluster.master_nodes()[2]
    slots = sorted({key_slot(tag(item)) for item in ids if owner_of(cluster, item) is source})
    assert len(slots) >= 8, slots

    failures: list[str] = []
    stop = asyncio.Event()

    async def worker(mine: list[str]) -> None:
        while not stop.is_set():
            for item in mine:
                n = ledger[item] + 1
                resp = await client.put(f"/api/users/{item}/profile", json={"n": n})
                if resp.status != 200:
                    failures.append(f"PUT {item}: {resp.status} {await resp.text()}")
                    continue
                ledger[item] = n
                resp = await client.get(f"/api/users/{item}/profile")
                got = await resp.json()
                if resp.status != 200 or got != {"user_id": item, "profile": {"n": n}, "source": "redis"}:
                    failures.append(f"GET {item}: {resp.status} {got}, {n} written")
                resp = await client.post(f"/api/users/{item}/messages", json={"n": n})
                lengths[item] += 1
                if resp.status != 200 or (await resp.json())["count"] != lengths[item]:
                    failures.append(f"POST messages {item}: {resp.status} {await resp.text()}, {lengths[item]}")
                resp = await client.get(f"/api/users/{item}/messages?last=1")
                got = await resp.json()
                if resp.status != 200 or (got["messages"], got["total"]) != ([{"n": n}], lengths[item]):
                    failures.append(f"GET messages {item}: {resp.status} {got}, {lengths[item]} items")
                # a durable session: its delete leaves a tombstone in the key (a versioned script)
                for method, status, body in (("DELETE", 204, None), ("GET", 404, None), ("PUT", 200, {"n": n}),
                                             ("GET", 200, {"session_id": item, "value": {"n": n}, "source": "redis"})):
                    resp = await client.request(method, f"/api/sessions/{item}", json=body if method == "PUT" else None)
                    got = await resp.read()
                    if resp.status != status or (method == "GET" and body is not None and json.loads(got) != body):
                        failures.append(f"{method} session {item}: {resp.status} {got!r}")

    def redirected() -> Counter[str]:
        return redirects(rt.status())

    async def an_ask_is_followed() -> None:  # traffic meets the half-moved slot: ASK, then ASKING
        asks = redirected()["ask"]
        await wait_for(lambda: redirected()["ask"] > asks, timeout=5.0)

    workers = [asyncio.ensure_future(worker(ids[w::6])) for w in range(6)]
    began = time.monotonic()
    try:
        await asyncio.sleep(0.3)
        moved = 0
        for index, slot in enumerate(slots):
            moved += await migrate_slot(cluster, source, target, slot, pause=0.02,
                                        first_batch_moved=an_ask_is_followed if index == 0 else None)
        await asyncio.sleep(0.5)  # traffic on the moved slots: MOVED, the slot map learns their owner
    finally:
        stop.set()
        await asyncio.gather(*workers)
    seconds = time.monotonic() - began
    counts = redirected()
    print(f"\n{len(slots)} slots ({moved} keys) resharded in {seconds:.1f} s under "
          f"{sum(lengths.values()) * 8 / seconds:.0f} requests/s; redirects {dict(counts)}")
    assert failures == [], failures[:5]
    assert counts["ask"] > 0 and counts["moved"] > 0, counts
    assert moved >= 2 * len(slots), "every id's keys moved (profile, messages; a session or its tombstone)"
    stats = rt.dispatcher.stats
    assert rt.dispatcher.breaker.opens == 0 and sum(s.cache_errors + s.dropped_writes for s in stats.values()) == 0, (
        dict(rt.dispatcher.error_replies), {name: attrs.asdict(s) for name, s in stats.items()})
    # where the keys are now: on the target, each read back from there
    for slot in slots:
        assert await on_node(source, cluster.password, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert await on_node(target, cluster.password, "CLUSTER", "COUNTKEYSINSLOT", slot) >= 2
    for item in ids:
        assert (await body_of(await client.get(f"/api/users/{item}/profile")))["profile"] == {"n": ledger[item]}
        assert (await body_of(await client.get(f"/api/sessions/{item}")))["value"] == {"n": ledger[item]}
    doc = await status(client)
    nodes = {n["address"]: n["slots"] for n in doc["redis"]["pools"]["default"]["pipeline"]["nodes"]}
    assert nodes[f"127.0.0.1:{target.port}"] == target.slots[1] - target.slots[0] + 1 + len(slots)

    # A session deleted while its slot is half moved (its key moved already): the versioned delete follows the
    # ASK to the target, and the tombstone is there.
    item = next(i for i in (f"t{n}" for n in range(100)) if owner_of(cluster, i) is source)
    slot, key = key_slot(tag(item)), f"ondemand:session:{{={item}}}"
    assert (await client.put(f"/api/sessions/{item}", json={"n": 1})).status == 200
    await on_node(target, cluster.password, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    await on_node(source, cluster.password, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    await on_node(source, cluster.password, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                  "AUTH", cluster.password, "KEYS", key)
    asks = redirected()["ask"]
    await body_of(await client.delete(f"/api/sessions/{item}"), 204)
    for node in cluster.master_nodes():
        await on_node(node, cluster.password, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    assert redirected()["ask"] > asks
    assert rt.dispatcher.breaker.opens == 0 and sum(s.cache_errors for s in stats.values()) == 0, (
        dict(rt.dispatcher.error_replies))
    assert await on_node(target, cluster.password, "HKEYS", key) == [b"n"], "deleted, tombstone kept"
    await body_of(await client.get(f"/api/sessions/{item}"), 404)


# -- the on-demand cluster ---------------------------------------------------------------------------


async def test_the_cluster_is_spawned_by_the_first_request_and_stopped_when_idle(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config(with_cluster({"lifecycle": {"idle_timeout": 1.0}}))))
    rt = client.app[RUNTIME]
    for spawn in range(2):  # and again after the idle stop
        doc = await status(client)
        assert doc["redis"]["state"] == "stopped" and doc["redis"]["cluster"] is None
        assert redis_children() == [], "nothing runs before the first operation"
        await body_of(await client.put("/api/users/u1/profile", json={"p": 1}))
        cluster = the_cluster(client)
        pids, path = cluster.pids(), cluster.path
        assert len(pids) == 6 and sorted(p.pid for p in redis_children()) == sorted(pids)
        doc = await status(client)
        assert doc["redis"]["state"] == "running" and doc["redis"]["topology"] == "cluster"
        assert [n["role"] for n in doc["redis"]["cluster"]["nodes"]] == ["master"] * 3 + ["replica"] * 3
        assert (await body_of(await client.get("/api/users/u1/profile")))["source"] == "redis"
        if spawn == 1:
            break  # (the runtime's close stops this one)
        await wait_for(lambda: rt.on_demand.state == "stopped", timeout=5.0)
        assert await wait_gone(pids, timeout=1.0) == [], "every node is gone after the idle stop"
        assert path is not None and not path.exists()
    assert rt.on_demand.counters.idle_stops == 1 and rt.on_demand.counters.spawns == 2


def test_a_sigkilled_app_leaves_no_node_behind(tmp_path, make_config) -> None:
    run_dir = tmp_path / "run"
    overrides = with_cluster({"lifecycle": {"runtime_dir": str(run_dir)}})
    app = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/scripts/cluster_app.py"), json.dumps(overrides)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    pids: list[int] = []
    try:
        line = app.stdout.readline() if app.stdout else ""
        assert line, "the app did not start its cluster"
        report = json.loads(line)
        pids = report["pids"]
        assert len(pids) == 6 and all(psutil.Process(pid).ppid() == app.pid for pid in pids)
        app.send_signal(signal.SIGKILL)
        app.wait(5)
        deadline = time.monotonic() + 1.0
        while not all(pid_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [pid for pid in pids if not pid_gone(pid)] == [], "a node outlived the SIGKILLed app"

        async def next_app() -> None:  # the next app in the same runtime directory: a cluster of its own
            async with Runtime(make_config(overrides)) as rt:
                await rt.cache.cache_profile("u1", {"p": 1})
                assert rt.on_demand.lifecycle.cluster is not None
                assert not set(rt.on_demand.lifecycle.cluster.pids()) & set(pids)
                assert not os.path.exists(report["path"]), "the killed app's cluster directory was removed"

        asyncio.run(next_app())
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        if app.stdout:
            app.stdout.close()
        for pid in pids:  # only if an assertion above failed: never leave a node running
            if not pid_gone(pid):
                psutil.Process(pid).kill()

