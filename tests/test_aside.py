"""get_or_compute: one load per key in a process and across processes, leases revoked by writes, stale values,
early refresh, negative caching. Real processes on a real Redis; loaders are gated by events, not timings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.errors import InvalidInput, LoadTimeout
from tests.support import ROOT, plain_server

WORKER = ROOT / "tests/scripts/aside_worker.py"


def _url(server: Any) -> str:
    return f"redis://:{server.password}@127.0.0.1:{server.port}/0"


def _external(server: Any) -> dict[str, Any]:
    return {"lifecycle": {"plugin": "external", "redis_url": _url(server)}, "redis": {"op_timeout": 1.0}}


class Counting:
    """A loader that counts its calls and, when gated, waits for `release` (bounded)."""

    def __init__(self, value: Any = "v", *, gated: bool = False) -> None:
        self.value, self.calls = value, 0
        self.started, self.release = asyncio.Event(), asyncio.Event()
        if not gated:
            self.release.set()

    async def __call__(self) -> Any:
        self.calls += 1
        self.started.set()
        await asyncio.wait_for(self.release.wait(), 10.0)
        value = self.value
        if isinstance(value, BaseException):
            raise value
        return value(self.calls) if callable(value) else value


def _spawn(args: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


async def _line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)  # type: ignore[union-attr]
    if not line:
        raise AssertionError(f"worker {proc.pid} ended: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
    return json.loads(line)


@contextlib.contextmanager
def _stopped(procs: list[subprocess.Popen]):
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5.0)


async def test_four_processes_of_fifty_callers_missing_one_key_call_the_loader_once(tmp_path: Path) -> None:
    log = tmp_path / "loads"
    async with plain_server(tmp_path / "redis") as server:
        args = {"redis_url": _url(server), "callers": 50, "id": "hot", "loader_seconds": 0.2, "log": str(log),
                "options": {"ttl": 30, "wait": 5, "lease_ttl": 5}}
        procs = [_spawn(args) for _ in range(4)]
        with _stopped(procs):
            for proc in procs:
                assert (await _line(proc, 20.0))["ready"]
            for proc in procs:
                proc.stdin.write("go\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
            reports = [await _line(proc, 20.0) for proc in procs]
    loaders = log.read_text().split()
    assert len(loaders) == 1, loaders
    values = {json.dumps(value) for report in reports for value, _ in report["results"]}
    assert values == {json.dumps({"by": int(loaders[0])})}
    assert sum(len(report["results"]) for report in reports) == 200
    assert sum(report["aside"]["loads"] for report in reports) == 1
    # The processes without the lease waited for it (all of them, unless one started after the install), and
    # were woken by the install's notification, none by its wait's bound.
    waiting = [report for report in reports if report["aside"]["lease_waits"]]
    assert waiting and all(r["aside"]["lease_timeouts"] == 0 and r["notifications"] >= 1 for r in waiting)


async def test_a_lease_holder_killed_mid_load_is_replaced_once_its_lease_expires(tmp_path: Path) -> None:
    log = tmp_path / "loads"
    async with plain_server(tmp_path / "redis") as server:
        args = {"redis_url": _url(server), "callers": 1, "id": "k", "loader_seconds": 30, "log": str(log),
                "options": {"lease_ttl": 1.0, "wait": 4.0}}
        holder = _spawn(args)
        with _stopped([holder]):
            assert (await _line(holder, 20.0))["ready"]
            holder.stdin.write("go\n")  # type: ignore[union-attr]
            holder.stdin.flush()  # type: ignore[union-attr]
            for _ in range(200):  # its loader has started: it holds the lease
                if log.exists() and log.read_text():
                    break
                await asyncio.sleep(0.05)
            os.kill(holder.pid, signal.SIGKILL)
            async with Runtime(_config(server)) as rt:
                loader = Counting({"by": "survivor"})
                began = time.monotonic()
                calls = [asyncio.ensure_future(rt.cache.get_or_compute("profile", "k", loader, lease_ttl=1.0,
                                                                          wait=4.0)) for _ in range(20)]
                values = await asyncio.wait_for(asyncio.gather(*calls), 10.0)
                waited = time.monotonic() - began
                assert values == [{"by": "survivor"}] * 20 and loader.calls == 1
                assert waited < 4.0 + 1.0  # within the bound: wait + lease_ttl
                aside = rt.dispatcher.status()["aside"]["namespaces"]["profile"]
                assert aside["lease_waits"] == 1 and aside["lease_timeouts"] == 0  # it took the expired lease
                assert await rt.dispatcher.get("profile", "k") == {"by": "survivor"}


def _config(server: Any, extra: dict[str, Any] | None = None) -> Any:
    from ondemand import load_config
    from ondemand.config.load import merge
    from tests.conftest import TEST_OVERRIDES

    return load_config(None, overrides=merge(merge(TEST_OVERRIDES, _external(server)), extra or {}), environ={})


@pytest.mark.parametrize("write", ["set", "delete"])
async def test_a_write_during_a_load_is_not_overwritten_by_the_loaded_value(runtime: Runtime, write: str) -> None:
    loader = Counting("loaded before the write", gated=True)
    call = asyncio.ensure_future(runtime.cache.get_or_compute("profile", "w", loader))
    await asyncio.wait_for(loader.started.wait(), 5.0)
    if write == "set":
        await runtime.dispatcher.set("profile", "w", "written")
    else:
        await runtime.dispatcher.delete("profile", "w")
    loader.release.set()
    assert await asyncio.wait_for(call, 5.0) == "loaded before the write"  # its callers get what it loaded
    assert await runtime.dispatcher.get("profile", "w") == ("written" if write == "set" else None)
    assert runtime.dispatcher.status()["aside"]["namespaces"]["profile"]["not_installed"] == 1


async def test_a_cancelled_caller_does_not_cancel_the_load_for_the_others(runtime: Runtime) -> None:
    loader = Counting("v", gated=True)
    calls = [asyncio.ensure_future(runtime.cache.get_or_compute("profile", "c", loader)) for _ in range(3)]
    await asyncio.wait_for(loader.started.wait(), 5.0)
    calls[0].cancel()
    loader.release.set()
    assert await asyncio.wait_for(asyncio.gather(*calls[1:]), 5.0) == ["v", "v"]
    assert calls[0].cancelled() and loader.calls == 1
    assert await runtime.dispatcher.get("profile", "c") == "v"


async def test_a_loader_error_reaches_every_waiter_and_is_not_cached(runtime: Runtime) -> None:
    loader = Counting(RuntimeError("backend down"), gated=True)
    calls = [asyncio.ensure_future(runtime.cache.get_or_compute("profile", "e", loader)) for _ in range(5)]
    await asyncio.wait_for(loader.started.wait(), 5.0)
    loader.release.set()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5.0)
    assert [str(r) for r in results] == ["backend down"] * 5 and loader.calls == 1
    loader.value = "recovered"
    assert await runtime.cache.get_or_compute("profile", "e", loader) == "recovered" and loader.calls == 2
    assert runtime.dispatcher.status()["aside"]["namespaces"]["profile"]["load_errors"] == 1


async def test_a_waiter_past_its_bound_gets_a_typed_error_and_the_load_goes_on(runtime: Runtime) -> None:
    loader = Counting("slow", gated=True)
    first = asyncio.ensure_future(runtime.cache.get_or_compute("profile", "s", loader, wait=0.1, lease_ttl=0.2))
    await asyncio.wait_for(loader.started.wait(), 5.0)
    with pytest.raises(LoadTimeout, match="wait \\+ lease_ttl"):
        await asyncio.wait_for(first, 5.0)
    loader.release.set()
    assert await runtime.cache.get_or_compute("profile", "s", loader) == "slow" and loader.calls == 1


async def test_negative_caching_is_off_by_default_and_keeps_a_none_for_its_own_ttl(runtime: Runtime) -> None:
    loader = Counting(None)
    assert await runtime.cache.get_or_compute("profile", "n", loader) is None
    assert await runtime.cache.get_or_compute("profile", "n", loader) is None
    assert loader.calls == 2  # not cached
    assert await runtime.cache.get_or_compute("profile", "m", loader, negative_ttl=0.3) is None
    assert await runtime.cache.get_or_compute("profile", "m", loader, negative_ttl=0.3) is None
    assert loader.calls == 3  # the second was the cached "not found"
    await asyncio.sleep(0.4)
    assert await runtime.cache.get_or_compute("profile", "m", loader, negative_ttl=0.3) is None
    assert loader.calls == 4


async def test_a_not_found_exception_is_cached_as_none_when_named(runtime: Runtime) -> None:
    loader = Counting(KeyError("no such user"))
    assert await runtime.cache.get_or_compute("profile", "x", loader, negative_ttl=30, not_found=KeyError) is None
    assert await runtime.cache.get_or_compute("profile", "x", loader, negative_ttl=30, not_found=KeyError) is None
    assert loader.calls == 1
    with pytest.raises(KeyError):
        await runtime.cache.get_or_compute("profile", "y", loader)  # not named: an error, not cached


async def test_a_stale_value_is_served_while_one_refresh_runs(runtime: Runtime) -> None:
    loader = Counting(lambda calls: f"v{calls}")
    assert await runtime.cache.get_or_compute("profile", "st", loader, ttl=0.2, stale_ttl=30) == "v1"
    await asyncio.sleep(0.3)  # past its ttl, within its stale_ttl
    loader.release.clear()
    served = [await runtime.cache.get_or_compute("profile", "st", loader, ttl=0.2, stale_ttl=30) for _ in range(5)]
    assert served == ["v1"] * 5  # answered while the refresh is held
    await asyncio.wait_for(loader.started.wait(), 5.0)
    assert loader.calls == 2  # one refresh for the five
    loader.release.set()
    for _ in range(100):
        if await runtime.dispatcher.get("profile", "st") == "v2":
            break
        await asyncio.sleep(0.02)
    assert await runtime.cache.get_or_compute("profile", "st", loader, ttl=0.2, stale_ttl=30) == "v2"
    assert runtime.dispatcher.status()["aside"]["namespaces"]["profile"]["stale_served"] >= 5


async def test_xfetch_refreshes_before_the_ttl(runtime: Runtime) -> None:
    loader = Counting(lambda calls: f"v{calls}")
    assert await runtime.cache.get_or_compute("profile", "xf", loader, ttl=60, early=1e9) == "v1"
    assert await runtime.cache.get_or_compute("profile", "xf", loader, ttl=60, early=1e9) == "v1"
    for _ in range(100):
        if await runtime.dispatcher.get("profile", "xf") == "v2":
            break
        await asyncio.sleep(0.02)
    assert loader.calls == 2 and await runtime.dispatcher.get("profile", "xf") == "v2"
    assert runtime.dispatcher.status()["aside"]["namespaces"]["profile"]["early_refreshes"] >= 1
    assert await runtime.cache.get_or_compute("profile", "xg", loader, ttl=60) == "v3"  # early off: no refresh
    assert await runtime.cache.get_or_compute("profile", "xg", loader, ttl=60) == "v3" and loader.calls == 3


async def test_with_redis_gone_loads_still_share_one_call_in_process(tmp_path: Path) -> None:
    async with plain_server(tmp_path / "redis") as server, Runtime(_config(server)) as rt:
        await rt.dispatcher.get("profile", "warm")
        server.child.signal(signal.SIGKILL)
        await asyncio.wait_for(server.child.process.wait(), 5.0)
        loader = Counting("computed", gated=True)
        calls = [asyncio.ensure_future(rt.cache.get_or_compute("profile", "d", loader)) for _ in range(10)]
        await asyncio.wait_for(loader.started.wait(), 5.0)
        loader.release.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), 10.0) == ["computed"] * 10
        assert loader.calls == 1


async def test_bad_options_are_typed_errors_naming_the_option(runtime: Runtime) -> None:
    async def loader() -> int:
        return 1

    for options, words in [({"stale_ttl": -1}, "stale_ttl"), ({"early": "x"}, "early"), ({"lease_ttl": 0}, "lease_ttl"),
                           ({"not_found": "KeyError"}, "not_found"), ({"ttl": -5}, "ttl")]:
        with pytest.raises(InvalidInput, match=words):
            await runtime.cache.get_or_compute("profile", "o", loader, **options)
    with pytest.raises(InvalidInput, match="loader"):
        await runtime.cache.get_or_compute("profile", "o", 42)  # type: ignore[arg-type]


async def test_a_durable_namespace_writes_the_loaded_value_through_the_durable_store(make_config, tmp_path) -> None:
    config = make_config({"storage": {"durable": "sqlite"},
                          "sqlite": {"path": str(tmp_path / "app" / "ondemand.sqlite3")}})
    async with Runtime(config) as rt:
        loader = Counting({"user": 1})
        values = await asyncio.gather(*(rt.cache.get_or_compute("session", "d1", loader, ttl=60) for _ in range(10)))
        assert values == [{"user": 1}] * 10 and loader.calls == 1
        ns = rt.dispatcher.namespace("session")
        entry = await rt.durable_storage.get_entry(ns, "d1")
        assert entry is not None and json.loads(entry.value) == {"user": 1}  # in the system of record
        await rt.cache_storage.delete_keys([ns.key("d1")])  # the cache lost it: the durable copy serves
        assert await rt.cache.get_or_compute("session", "d1", loader, ttl=60) == {"user": 1} and loader.calls == 1
        gated = Counting("loaded before the write", gated=True)
        call = asyncio.ensure_future(rt.cache.get_or_compute("session", "d2", gated))
        await asyncio.wait_for(gated.started.wait(), 5.0)
        await rt.dispatcher.set("session", "d2", "written")
        gated.release.set()
        assert await asyncio.wait_for(call, 5.0) == "loaded before the write"
        assert await rt.dispatcher.get("session", "d2") == "written"
        stored = await rt.durable_storage.get_entry(ns, "d2")
        assert stored is not None and json.loads(stored.value) == "written"


async def test_a_waiter_in_another_process_is_woken_by_the_install_not_by_the_lease_ending(tmp_path: Path) -> None:
    async with plain_server(tmp_path / "redis") as server, Runtime(_config(server)) as a, Runtime(_config(server)) as b:
        holder, waiter = Counting("from a", gated=True), Counting("from b")
        loading = asyncio.ensure_future(a.cache.get_or_compute("profile", "n", holder, lease_ttl=20, wait=15))
        await asyncio.wait_for(holder.started.wait(), 5.0)
        waiting = asyncio.ensure_future(b.cache.get_or_compute("profile", "n", waiter, lease_ttl=20, wait=15))
        for _ in range(100):  # b is waiting for a's lease
            if b.dispatcher.status()["aside"]["namespaces"]["profile"]["lease_waits"]:
                break
            await asyncio.sleep(0.02)
        holder.release.set()
        # Far sooner than the 20 s lease or the 15 s wait: the install's notification woke it.
        assert await asyncio.wait_for(waiting, 5.0) == "from a" and await loading == "from a"
        assert waiter.calls == 0 and b.cache_storage.leases.notifications >= 1


async def test_a_waiter_past_its_wait_loads_by_itself_without_installing(tmp_path: Path) -> None:
    async with plain_server(tmp_path / "redis") as server, Runtime(_config(server)) as a, Runtime(_config(server)) as b:
        holder, waiter = Counting("from a", gated=True), Counting("from b")
        loading = asyncio.ensure_future(a.cache.get_or_compute("profile", "t", holder, lease_ttl=20))
        await asyncio.wait_for(holder.started.wait(), 5.0)
        assert await asyncio.wait_for(b.cache.get_or_compute("profile", "t", waiter, wait=0.3), 5.0) == "from b"
        aside = b.dispatcher.status()["aside"]["namespaces"]["profile"]
        assert aside["lease_waits"] == 1 and aside["lease_timeouts"] == 1 and waiter.calls == 1
        assert await b.dispatcher.get("profile", "t") is None  # not installed: the lease is a's
        holder.release.set()
        assert await asyncio.wait_for(loading, 5.0) == "from a"
        assert await b.dispatcher.get("profile", "t") == "from a"


async def test_a_load_whose_callers_all_gave_up_is_still_installed(runtime: Runtime) -> None:
    loader = Counting("v", gated=True)
    calls = [asyncio.ensure_future(runtime.cache.get_or_compute("profile", "g", loader)) for _ in range(3)]
    await asyncio.wait_for(loader.started.wait(), 5.0)
    for call in calls:
        call.cancel()
    loader.release.set()
    for _ in range(100):
        if await runtime.dispatcher.get("profile", "g") == "v":
            break
        await asyncio.sleep(0.02)
    assert await runtime.dispatcher.get("profile", "g") == "v" and loader.calls == 1


async def test_a_near_cached_namespace_serves_hits_from_the_near_cache_and_its_writes_revoke(make_config) -> None:
    config = make_config({"namespaces": {"profile": {"near_cache": True}}, "lifecycle": {"tcp": True},
                          "near_cache": {"max_silence": 30.0}})
    async with Runtime(config) as rt:
        loader = Counting("v")
        for _ in range(5):  # the first read after the install installs it in the near cache
            assert await rt.cache.get_or_compute("profile", "nc", loader) == "v"
            if rt.dispatcher.stats["profile"].near_hits:
                break
            await rt.on_demand.execute("PING")
        assert rt.dispatcher.stats["profile"].near_hits >= 1 and loader.calls == 1
        gated = Counting("loaded before the write", gated=True)
        call = asyncio.ensure_future(rt.cache.get_or_compute("profile", "nw", gated))
        await asyncio.wait_for(gated.started.wait(), 5.0)
        await rt.dispatcher.set("profile", "nw", "written")  # the near cache's tracked write path
        gated.release.set()
        assert await asyncio.wait_for(call, 5.0) == "loaded before the write"
        assert await rt.dispatcher.get("profile", "nw") == "written"


async def test_a_write_during_a_stale_refresh_is_not_overwritten_and_its_value_is_fresh(runtime: Runtime) -> None:
    loader = Counting(lambda calls: f"v{calls}")
    options = {"ttl": 0.2, "stale_ttl": 30}
    assert await runtime.cache.get_or_compute("profile", "wr", loader, **options) == "v1"
    await asyncio.sleep(0.3)
    loader.release.clear()
    loader.started.clear()
    assert await runtime.cache.get_or_compute("profile", "wr", loader, **options) == "v1"  # stale: a refresh
    await asyncio.wait_for(loader.started.wait(), 5.0)
    await runtime.dispatcher.set("profile", "wr", "written", 60)
    loader.release.set()
    stats = runtime.dispatcher.status()["aside"]["namespaces"]["profile"]
    for _ in range(100):
        if runtime.dispatcher.status()["aside"]["refreshes_in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert await runtime.dispatcher.get("profile", "wr") == "written"  # the refresh began before the write
    assert runtime.dispatcher.status()["aside"]["namespaces"]["profile"]["not_installed"] == 1
    served = stats["stale_served"]
    # The write's value has no expiry of a load: fresh for its own ttl, not stale, no refresh.
    assert await runtime.cache.get_or_compute("profile", "wr", loader, **options) == "written"
    after = runtime.dispatcher.status()["aside"]["namespaces"]["profile"]
    assert after["stale_served"] == served and loader.calls == 2


async def test_without_notifications_a_waiter_looks_again_instead_of_waiting_out_the_lease(tmp_path: Path) -> None:
    rule = "ondemand on >secret-pw resetkeys ~ondemand:* resetchannels &ondemand:aside +@all -subscribe"
    async with plain_server(tmp_path / "redis", users=[rule]) as server:
        url = f"redis://ondemand:secret-pw@127.0.0.1:{server.port}/0"
        extra = {"lifecycle": {"plugin": "external", "redis_url": url}}
        async with Runtime(_config(server, extra)) as a, Runtime(_config(server, extra)) as b:
            assert not await b.cache_storage.leases.listen(2.0)  # SUBSCRIBE refused
            holder, waiter = Counting("from a", gated=True), Counting("from b")
            loading = asyncio.ensure_future(a.cache.get_or_compute("profile", "p", holder, lease_ttl=20, wait=15))
            await asyncio.wait_for(holder.started.wait(), 5.0)
            waiting = asyncio.ensure_future(b.cache.get_or_compute("profile", "p", waiter, lease_ttl=20, wait=15))
            await asyncio.sleep(0.2)
            holder.release.set()
            assert await asyncio.wait_for(waiting, 5.0) == "from a" and await loading == "from a"
            assert waiter.calls == 0 and b.cache_storage.leases.notifications == 0


async def test_a_durable_write_the_lease_never_saw_is_not_overtaken_by_the_load_sqlite(make_config, tmp_path) -> None:
    config = make_config({"storage": {"durable": "sqlite"},
                          "sqlite": {"path": str(tmp_path / "app" / "ondemand.sqlite3")}})
    async with Runtime(config) as rt:
        await _a_durable_write_the_lease_never_saw(rt)


async def test_a_durable_write_the_lease_never_saw_is_not_overtaken_by_the_load_postgres(durable_config) -> None:
    async with Runtime(durable_config({"postgres": {"connect_timeout": 2.0, "statement_timeout": 5.0}})) as rt:
        await _a_durable_write_the_lease_never_saw(rt)


async def _a_durable_write_the_lease_never_saw(rt: Runtime) -> None:
    """A host cut off from Redis writes the system of record alone (it cannot revoke the lease): the value loaded
    after a miss is written only while the id holds no live value, so that write stays."""
    ns, durable = rt.dispatcher.namespace("session"), rt.durable_storage
    gated = Counting("loaded before the write", gated=True)
    call = asyncio.ensure_future(rt.cache.get_or_compute("session", "w1", gated, ttl=60))
    await asyncio.wait_for(gated.started.wait(), 5.0)
    written = await durable.set(ns, "w1", b'"written by a host cut off from Redis"', 60)
    gated.release.set()
    assert await asyncio.wait_for(call, 5.0) == "loaded before the write"  # what its callers loaded
    entry = await durable.get_entry(ns, "w1")
    assert entry is not None and entry.version == written.version
    assert json.loads(entry.value) == "written by a host cut off from Redis"
    assert await rt.dispatcher.get("session", "w1") == "written by a host cut off from Redis"
    assert rt.dispatcher.status()["aside"]["namespaces"]["session"]["not_installed"] == 1
    # A refresh (stale_ttl) replaces a value: its write holds only over the version it was loaded after.
    first = Counting("first")
    assert await rt.cache.get_or_compute("session", "w2", first, ttl=0.2, stale_ttl=30) == "first"
    await asyncio.sleep(0.3)
    refresh = Counting("refreshed before the write", gated=True)
    assert await rt.cache.get_or_compute("session", "w2", refresh, ttl=0.2, stale_ttl=30) == "first"  # stale
    await asyncio.wait_for(refresh.started.wait(), 5.0)
    written = await durable.set(ns, "w2", b'"written during the refresh"', 60)
    refresh.release.set()
    for _ in range(250):
        if not rt.dispatcher.status()["aside"]["refreshes_in_flight"]:
            break
        await asyncio.sleep(0.02)
    entry = await durable.get_entry(ns, "w2")
    assert entry is not None and entry.version == written.version
    assert json.loads(entry.value) == "written during the refresh"
    assert rt.dispatcher.status()["aside"]["namespaces"]["session"]["not_installed"] == 2
