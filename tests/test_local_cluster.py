"""The on-demand local cluster (plugins/redis_cluster.py), against real nodes of our bundled server.

redis.asyncio's RedisCluster is used here, and only here, as an independent client: if it can read back
through the slot map what it wrote, the nodes form a real working cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError

from ondemand import Runtime
from ondemand.errors import ConfigError, SpawnError
from ondemand.events import Events
from ondemand.plugins.lifecycle_subprocess.local_cluster import (
    MAX_PORT,
    SLOTS,
    ClusterNode,
    LocalCluster,
    free_cluster_port,
)
from tests.support import ROOT, kill_node, local_cluster, pid_gone, redis_children, wait_for, wait_gone


class Spawned(Events):
    """Events that remember every node spawned."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: list[int] = []

    def redis_spawned(self, *, lifecycle: str, pid: int, endpoint: str) -> None:
        self.pids.append(pid)
        super().redis_spawned(lifecycle=lifecycle, pid=pid, endpoint=endpoint)


def client(node: ClusterNode, password: str) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=node.port, password=password, socket_timeout=2.0,
                          decode_responses=True)


async def cluster_info(node: ClusterNode, password: str) -> dict[str, str]:
    async with client(node, password) as r:
        text = await r.execute_command("CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)


async def role(node: ClusterNode, password: str) -> list[Any]:
    async with client(node, password) as r:
        return await r.execute_command("ROLE")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async with local_cluster(tmp_path) as c:
        yield c


async def test_three_masters_with_a_replica_each_all_report_ok_and_their_role(cluster: LocalCluster) -> None:
    endpoints = [n.endpoint for n in cluster.master_nodes()]
    assert len(cluster.nodes) == 6 and len(endpoints) == 3
    assert all(e.host == "127.0.0.1" and e.password == cluster.password for e in endpoints)
    assert all(0 < n.port <= MAX_PORT for n in cluster.nodes), "the cluster bus (port + 10000) must fit"
    for node in cluster.nodes:
        info = await cluster_info(node, cluster.password)
        assert info["cluster_state"] == "ok", (node.name, info)
        assert info["cluster_slots_ok"] == str(SLOTS) and info["cluster_known_nodes"] == "6"
        reply = await role(node, cluster.password)
        if node.master_index is None:
            assert reply[0] == "master"
            assert [int(r[1]) for r in reply[2]] == [cluster.nodes[i].port for i in range(3, 6)
                                                     if cluster.nodes[i].master_index == node.index]
        else:
            assert reply[0] == "slave" and reply[2] == cluster.nodes[node.master_index].port
            assert reply[3] == "connected"
    status = cluster.status()
    assert [n["role"] for n in status["nodes"]] == ["master"] * 3 + ["replica"] * 3
    assert cluster.password not in json.dumps(status)
    assert status["startup_seconds"] == cluster.timings["total"] < 20


async def test_the_directory_and_files_are_private_and_the_password_is_on_no_command_line(
        cluster: LocalCluster) -> None:
    assert cluster.path is not None
    assert stat.S_IMODE(cluster.path.stat().st_mode) == 0o700
    for node in cluster.nodes:
        assert stat.S_IMODE(node.directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((node.directory / "server.conf").stat().st_mode) == 0o600
        assert cluster.password not in " ".join(psutil.Process(node.pid).cmdline())
        assert psutil.Process(node.pid).cwd() == str(node.directory)
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.nodes[0].port)
    try:  # without the password a node serves nothing
        writer.write(b"GET k\r\n")
        assert (await asyncio.wait_for(reader.readline(), 2.0)).startswith(b"-NOAUTH")
    finally:
        writer.close()


async def test_keys_written_through_the_cluster_live_on_their_slots_owner(cluster: LocalCluster) -> None:
    first = cluster.master_nodes()[0]
    async with RedisCluster(host="127.0.0.1", port=first.port, password=cluster.password,
                            decode_responses=True) as rc:
        for i in range(300):
            await rc.set(f"session:{i}", f"v{i}")
        assert [await rc.get(f"session:{i}") for i in range(300)] == [f"v{i}" for i in range(300)]
        # A hash tag keeps related keys in one slot, hence on one master.
        assert rc.keyslot("{u1}:value") == rc.keyslot("{u1}:tombstone")
        owner_port = rc.get_node_from_key("session:7").port
    counts = []
    for node in cluster.master_nodes():
        async with client(node, cluster.password) as r:
            counts.append(await r.dbsize())
            if node.port == owner_port:
                assert await r.get("session:7") == "v7"
            else:
                with pytest.raises(MovedError) as moved:  # redirected to the owner
                    await r.get("session:7")
                assert moved.value.node_addr == ("127.0.0.1", owner_port)
    assert sum(counts) == 300 and all(c > 50 for c in counts), counts  # spread over every master


async def test_a_sigkilled_master_is_replaced_by_its_replica_within_seconds(cluster: LocalCluster) -> None:
    master = cluster.nodes[1]
    replica = next(n for n in cluster.nodes if n.master_index == master.index)
    async with RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, password=cluster.password,
                            decode_responses=True) as rc:
        key = next(k for k in (f"k{i}" for i in range(1000)) if rc.get_node_from_key(k).port == master.port)
        await rc.set(key, "acknowledged")
    async with client(master, cluster.password) as r:
        assert await r.execute_command("WAIT", 1, 2000) == 1  # the replica has it
    exits: list[bool] = []
    cluster.set_exit_callback(lambda description, lost: exits.append(lost))
    killed_at = time.monotonic()
    pid = kill_node(master)
    assert await wait_gone([pid], timeout=2.0) == []
    deadline = killed_at + 10.0
    while (await role(replica, cluster.password))[0] != "master":
        assert time.monotonic() < deadline, "the replica was not promoted within 10 s"
        await asyncio.sleep(0.05)
    promoted_after = time.monotonic() - killed_at
    assert promoted_after < 6.0, f"promotion took {promoted_after:.1f} s with cluster-node-timeout 1000 ms"
    async with client(replica, cluster.password) as r:
        assert await r.get(key) == "acknowledged"
    survivors = [n for n in cluster.nodes if n is not master]
    while [(await cluster_info(n, cluster.password))["cluster_state"] for n in survivors] != ["ok"] * 5:
        assert time.monotonic() < deadline, "the cluster did not recover"
        await asyncio.sleep(0.05)
    await cluster.refresh()
    assert replica.role == "master" and master.status()["role"] == "down"
    assert exits == [False], "a master with a replica to take over is not a lost shard"
    await wait_gone([kill_node(replica)], timeout=2.0)
    await wait_for(lambda: len(exits) == 2, timeout=2.0)
    assert exits == [False, True], "its last node gone, the shard is lost: the owner must start a new cluster"
    print(f"\npromoted {promoted_after:.2f} s after the SIGKILL")


async def test_stop_leaves_no_node_and_no_directory(tmp_path: Path) -> None:
    events = Spawned()
    async with local_cluster(tmp_path, events=events) as cluster:
        pids, path = cluster.pids(), cluster.path
        assert sorted(pids) == sorted(events.pids) and len(pids) == 6
        assert {p.pid for p in redis_children()} >= set(pids)
        began = time.monotonic()
        await cluster.stop()
        stopped_in = time.monotonic() - began
    assert all(pid_gone(pid) for pid in pids)
    assert path is not None and not path.exists() and list(tmp_path.iterdir()) == []
    assert stopped_in < 2.0, f"stop took {stopped_in:.2f} s"
    await cluster.stop()  # twice is harmless


async def test_a_node_that_cannot_start_is_a_spawn_error_and_the_others_are_stopped(tmp_path: Path) -> None:
    events = Spawned()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_cluster_port()))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports: list[int] = []
        for _ in range(5):
            ports.append(free_cluster_port([taken, *ports]))
        ports.insert(2, taken)  # the third master's port is someone else's
        cluster = LocalCluster(binary=os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None, parent=tmp_path,
                               ports=ports, events=events, startup_timeout=20.0)
        with pytest.raises(SpawnError, match=f"cluster node 2 \\(port {taken}\\) could not start.*taken") as info:
            await cluster.start()
    assert "Address already in use" in str(info.value)  # the node's own log line
    assert info.value.code == "redis_spawn_failed"
    assert events.pids and all(pid_gone(pid) for pid in events.pids)
    assert cluster.nodes == [] and cluster.path is None and list(tmp_path.iterdir()) == []


async def test_a_start_is_bounded_by_its_timeout_and_says_what_it_waited_for(tmp_path: Path) -> None:
    # Valkey holds a new master back 2 s before it reports cluster_state:ok: 1 s can never be enough.
    events = Spawned()
    cluster = LocalCluster(binary=os.environ.get("ONDEMAND_TEST_REDIS_BINARY") or None, parent=tmp_path,
                           events=events, startup_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(SpawnError, match=r"not formed within 1 s \(lifecycle.startup_timeout\): still waiting until "
                                         r"(every node answers PING|every node knows every other|every node reports "
                                         r"cluster_state:ok)") as info:
        await cluster.start()
    assert time.monotonic() - began < 1.0 + 2.0, "the start's bound, then a bounded stop"
    if "agreed (" in str(info.value):  # the usual phase at 1 s, once one of its checks came back
        assert "cluster_state:fail" in str(info.value), "names what was missing"
    assert len(events.pids) == 6 and all(pid_gone(pid) for pid in events.pids)
    assert cluster.path is None and list(tmp_path.iterdir()) == []


async def test_an_exclusive_cluster_refuses_a_second_one_in_its_directory_until_it_stops(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, exclusive=True) as first:
        events = Spawned()
        second = LocalCluster(binary=first.server, parent=tmp_path, exclusive=True, events=events)
        with pytest.raises(SpawnError, match=f"another process \\(pid {os.getpid()}\\) runs a local cluster"):
            await second.start()
        assert events.pids == [] and second.path is None, "refused before anything was spawned"
        await first.stop()
        async with local_cluster(tmp_path, exclusive=True) as third:  # free again once the first stopped
            assert len(third.pids()) == 6


def test_a_sigkilled_owner_leaves_no_node_behind(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/scripts/holds_cluster.py"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )
    pids: list[int] = []
    try:
        line = owner.stdout.readline() if owner.stdout else ""
        assert line, "the script did not start its cluster"
        pids = json.loads(line)["pids"]
        assert len(pids) == 6 and not any(pid_gone(pid) for pid in pids)
        owner.kill()
        owner.wait(5)
        deadline = time.monotonic() + 1.0
        while not all(pid_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(pid_gone(pid) for pid in pids), "a node outlived its SIGKILLed owner"
        stale = Path(json.loads(line)["path"])
        assert stale.is_dir(), "nobody was left to remove it"

        async def next_owner() -> None:  # the dead owner's lock went with it; its directory goes now
            async with local_cluster(tmp_path, exclusive=True) as cluster:
                assert cluster.path is not None and not stale.exists()
                assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [cluster.path.name]

        asyncio.run(next_owner())
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout:
            owner.stdout.close()
        for pid in pids:  # only if the assertion above failed: never leave them running
            if not pid_gone(pid):
                psutil.Process(pid).kill()


# -- wired into the subprocess lifecycle: lifecycle.topology = "cluster" ------------------------------


async def test_the_subprocess_lifecycle_runs_a_cluster_from_the_first_operation_until_idle(make_config) -> None:
    config = make_config({"lifecycle": {"topology": "cluster", "idle_timeout": 1.0, "startup_timeout": 20.0,
                                        "cluster_masters": 3, "cluster_replicas": 1}})
    async with Runtime(config) as rt:
        lifecycle = rt.on_demand.lifecycle
        assert lifecycle.cluster is None and redis_children() == [], "nothing runs before the first operation"
        for i in range(60):
            await rt.cache.cache_profile(f"user{i}", {"n": i})
        cluster = lifecycle.cluster
        assert cluster is not None and len(cluster.pids()) == 6
        assert [await rt.cache.get_profile(f"user{i}") for i in range(60)] == [{"n": i} for i in range(60)]
        sizes = []
        for node in cluster.master_nodes():
            async with client(node, cluster.password) as r:
                sizes.append(await r.dbsize())
        assert all(size > 0 for size in sizes), f"keys must spread over every master: {sizes}"
        nodes = lifecycle.status()["cluster"]["nodes"]
        assert [n["role"] for n in nodes] == ["master"] * 3 + ["replica"] * 3
        assert lifecycle.pid() == cluster.nodes[0].pid
        pids, path = cluster.pids(), cluster.path
        await wait_for(lambda: rt.on_demand.state == "stopped", timeout=5)
        assert rt.on_demand.counters.idle_stops == 1 and lifecycle.cluster is None
        assert all(pid_gone(pid) for pid in pids) and path is not None and not path.exists()


def test_cluster_sizes_are_bounded(make_config) -> None:
    with pytest.raises(ConfigError, match="cluster_masters"):
        make_config({"lifecycle": {"cluster_masters": 17}})
    with pytest.raises(ConfigError, match="cluster_replicas"):
        make_config({"lifecycle": {"cluster_replicas": 5}})
