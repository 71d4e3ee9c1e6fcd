"""TLS through Redis Sentinel and Redis Cluster, for real: every node and every sentinel behind a TLS
terminator (tests/tls_proxy.py), the addresses the servers give out leading through TLS.

The bundled servers speak no TLS, so a node's proxy also passes plaintext through (`plaintext_too`) and the
node announces the proxy's port: sentinels and replicas reach it there in plaintext, while the address a
sentinel names for the master, a cluster's slot map or a MOVED reply leads our client through TLS. Our
client is configured for TLS only: a connection of ours that went around TLS would fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.errors import RedisUnavailable
from ondemand.redis.cluster import ClusterConnection
from ondemand.redis.resp import RespConnection
from ondemand.redis.routing import key_slot
from tests.certs import Pki
from tests.support import SentinelGroup, local_cluster, sentinel_group
from tests.tls_proxy import TlsProxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("tls") / "ca")


@contextlib.asynccontextmanager
async def proxies() -> AsyncIterator[list[TlsProxy]]:
    made: list[TlsProxy] = []
    try:
        yield made
    finally:
        for proxy in made:
            await proxy.close()


# -- Sentinel ---------------------------------------------------------------------------------------------


async def test_sentinel_over_tls_follows_a_failover_to_the_replica_through_tls(pki: Pki, make_config) -> None:
    issued = pki.issue("sentinel-group", ["IP:127.0.0.1"])
    async with proxies() as made:
        by_node: dict[str, TlsProxy] = {}

        async def front(group: SentinelGroup) -> None:
            for node in group.data:  # announced: sentinels and replicas come through in plaintext
                by_node[node.name] = await TlsProxy(("127.0.0.1", node.port), cert=issued.cert, key=issued.key,
                                                    plaintext_too=True).start()
                group.announce[node.name] = by_node[node.name].port
            for node in group.watchers:  # only we talk to the sentinels through theirs
                by_node[node.name] = await TlsProxy(("127.0.0.1", node.port), cert=issued.cert,
                                                    key=issued.key).start()
            made.extend(by_node.values())

        async with sentinel_group(before_spawn=front) as group:
            lifecycle = {**group.config()["lifecycle"], "sentinels": [by_node[n.name].address for n in group.watchers],
                         "redis_tls": True, "redis_tls_ca_file": str(pki.ca)}
            config = make_config({"lifecycle": lifecycle, "redis": {"op_timeout": 0.25, "connect_timeout": 0.5},
                                  "storage": {"durable": ""}})
            async with Runtime(config) as rt:
                await rt.cache.cache_profile("p", {"n": 1})
                assert await rt.cache.get_profile("p") == {"n": 1}
                master, replica = group.data
                status = rt.lifecycle.status()
                assert status["sentinel"]["master"] == by_node[master.name].address
                assert status["url"] == f"rediss://:***@{by_node[master.name].address}/0"
                assert status["sentinel"]["tls"]["verify"] is True
                assert all(by_node[s.name].tls_connections for s in group.watchers[:1])
                before = by_node[master.name].tls_connections
                assert before >= 2 and by_node[replica.name].tls_connections == 0  # the ROLE check, the pipeline

                group.kill(master)
                await group.wait_settled(timeout=30, master=replica)

                async def served() -> bool:
                    with contextlib.suppress(RedisUnavailable):
                        await rt.cache.cache_profile("p", {"n": 2})
                        return await rt.cache.get_profile("p") == {"n": 2}
                    return False

                deadline = asyncio.get_running_loop().time() + 20
                while not await served():
                    assert asyncio.get_running_loop().time() < deadline, rt.on_demand.status()
                    await asyncio.sleep(0.1)
                assert rt.lifecycle.status()["sentinel"]["master"] == by_node[replica.name].address
                assert by_node[replica.name].tls_connections >= 2
        # Every handshake of ours verified; the plaintext ones were the servers' own.
        assert all(not proxy.handshake_failures for proxy in made)


# -- Cluster ----------------------------------------------------------------------------------------------


async def _announce_proxies(cluster: Any, by_port: dict[int, TlsProxy]) -> None:
    """Every node announces its proxy's port; returns once every node's slot map names only proxies."""
    for node in cluster.nodes:
        async with await RespConnection.open(node.endpoint) as conn:
            await conn.call("CONFIG", "SET", "cluster-announce-port", str(by_port[node.port].port))
    proxied = {proxy.port for proxy in by_port.values()}

    async def announced() -> bool:
        for node in cluster.nodes:
            async with await RespConnection.open(node.endpoint) as conn:
                slots = await conn.call("CLUSTER", "SLOTS")
            if {int(part[1]) for entry in slots for part in entry[2:]} - proxied:
                return False
        return True

    deadline = asyncio.get_running_loop().time() + 20
    while not await announced():
        assert asyncio.get_running_loop().time() < deadline, "the nodes did not learn each other's new ports"
        await asyncio.sleep(0.1)


async def test_cluster_over_tls_every_node_learned_from_the_slot_map_and_moved(tmp_path: Path, pki: Pki,
                                                                               make_config) -> None:
    # One certificate for a name no node's address is: only the configured server name makes it verify, for
    # the seed and for every node learned later alike.
    issued = pki.issue("cluster", ["DNS:cluster.internal.example"])
    async with local_cluster(tmp_path, masters=3, replicas=1) as cluster, proxies() as made:
        by_port = {}
        for node in cluster.nodes:
            by_port[node.port] = await TlsProxy(("127.0.0.1", node.port), cert=issued.cert, key=issued.key,
                                                plaintext_too=True).start()
            made.append(by_port[node.port])
        await _announce_proxies(cluster, by_port)
        seed = by_port[cluster.master_nodes()[0].port]
        url = f"rediss://:{cluster.password}@127.0.0.1:{seed.port}/0?ssl_ca_certs={pki.ca}"
        lifecycle = {"plugin": "external", "topology": "cluster", "redis_url": url}
        config = make_config({"lifecycle": lifecycle, "redis": {"op_timeout": 0.5, "connect_timeout": 1.0}})
        async with Runtime(config) as rt:  # without the server name: refused, naming it
            with pytest.raises(RedisUnavailable, match=r"not valid for the name '127\.0\.0\.1'"):
                await rt.on_demand.ensure()

        lifecycle["redis_tls_server_name"] = "cluster.internal.example"
        config = make_config({"lifecycle": lifecycle, "redis": {"op_timeout": 0.5, "connect_timeout": 1.0}})
        async with Runtime(config) as rt:
            ids = [f"user{i}" for i in range(60)]
            for i in ids:
                await rt.cache.cache_profile(i, {"id": i})
            assert [await rt.cache.get_profile(i) for i in ids] == [{"id": i} for i in ids]
            conn = rt.on_demand.pools["default"].mux
            assert isinstance(conn, ClusterConnection)
            masters = {by_port[n.port].port for n in cluster.master_nodes()}
            assert {port for _, port in conn.slots.masters()} == masters  # learned from the slot map: proxies
            for node in cluster.master_nodes():
                assert by_port[node.port].tls_connections >= 1, "a master was reached around TLS"

            # A stale map: the slot of one id pointed at another master. The MOVED reply names the owner's
            # announced address (its proxy), which is followed through TLS with the same server name.
            profile = rt.dispatcher.namespace("profile")
            key = profile.key("user7")
            owner = conn.slots.owner(key_slot(key))
            elsewhere = next(address for address in conn.slots.masters() if address != owner)
            conn.slots.move(key_slot(key), elsewhere)
            if rt.dispatcher.near is not None:  # (ONDEMAND_TEST_NEAR_CACHE: the read must reach the cluster)
                rt.dispatcher.near.evict(key)
            assert await rt.cache.get_profile("user7") == {"id": "user7"}
            assert conn.redirects["moved"] >= 1 and conn.slots.owner(key_slot(key)) == owner

            # with_connection lends redis-py's RedisCluster: its nodes, learned from the slot map too, with our
            # TLS connection (the server name included).
            async def read_all(client: Any) -> list[Any]:
                return [await client.get(profile.key(i)) for i in ids]

            found = await rt.on_demand.with_connection(read_all)
            assert found == [f'{{"id":"{i}"}}'.encode() for i in ids]
        assert all(not proxy.handshake_failures[1:] for proxy in made)  # (the seed refused the first Runtime)
