"""The example plugin's durable backend, `example-files` (README, "Writing a backend"): what its own suite
cannot show alone.

- Its promises across processes: two processes committing one id get versions in commit order, the value
  the store ends up with is the highest version's; a reader in another process never sees half a set_many;
  a commit waits for another process's lock at most `op_timeout`, and one that was killed holding it
  blocks nothing.
- Selected from TOML (`storage.durable = "example-files"`): check-config validates its section, and two
  servers (run.py) sharing its directory and one Redis of our subprocess lifecycle serve the session API;
  a third, after both stopped, reads what they wrote back from the store.
- The README walkthrough is the example plugin's code, block for block; a package assembled from those
  blocks alone passes the contract kit (strict asyncio mode, as a third party runs it); the example plugin
  imports only the public API.

(Its contract-kit suite, tests/example_plugin/tests/test_example_files.py, runs with the others.)
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from ondemand_example.files import FilesConfig, FilesStorage, FilesUnavailable

from ondemand.config.load import load_config
from ondemand.errors import ConfigError
from ondemand.host.net import free_port
from ondemand.store import Entry, Namespace, OutageTracker, StoreHealth
from tests.support import ROOT, pid_gone, redis_servers_under, wait_until_serving

EXAMPLE = ROOT / "tests/example_plugin"
SESSION = Namespace("session", None, True, "default", "ondemand:session:")


def files_storage(path: Path, op_timeout: float = 2.0) -> FilesStorage:
    return FilesStorage(FilesConfig(path=str(path), op_timeout=op_timeout),
                        StoreHealth(OutageTracker.quiet("example-files"), "example-files storage"))


async def python(code: str, *args: str, timeout: float = 60) -> str:
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code, *args], capture_output=True,
                                   text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# -- its promises across processes -------------------------------------------------------------------

WRITER = """
import asyncio, json, os, sys, time
from ondemand.store import Namespace
from ondemand_example.files import FilesConfig, FilesStorage

async def main(path, go, tag, rounds):
    store = FilesStorage(FilesConfig(path=path, op_timeout=20.0))
    await store.open()
    ns = Namespace("session", None, True, "default", "ondemand:session:")
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:   # both start together
        time.sleep(0.001)
    log = []
    for i in range(rounds):
        began = time.monotonic()
        if i % 5 == 4:
            value, version = None, (await store.delete(ns, ["race"])).committed[0].version
        else:
            value = f"{tag}{i}"
            version = (await store.set(ns, "race", value.encode(), None)).version
        log.append([began, time.monotonic(), version, value])
    await store.close()
    print(json.dumps(log))

asyncio.run(main(*sys.argv[1:4], int(sys.argv[4])))
"""


async def test_two_processes_committing_one_id_get_versions_in_commit_order(tmp_path: Path) -> None:
    store_dir, go = tmp_path / "store", tmp_path / "go"
    writers = [asyncio.ensure_future(python(WRITER, str(store_dir), str(go), tag, "150")) for tag in "AB"]
    await asyncio.sleep(1.0)  # both imported and waiting (a late one still runs, with less overlap)
    go.touch()
    logs = [json.loads(out) for out in await asyncio.gather(*writers)]
    ops = [(began, ended, version, value) for log in logs for began, ended, version, value in log]
    versions = [op[2] for op in ops]
    assert len(set(versions)) == len(versions), "two commits got the same version"
    for log in logs:
        assert [op[2] for op in log] == sorted(op[2] for op in log), "a process's later commit got a smaller version"
    a, b = ({op[2] for op in log} for log in logs)
    assert min(a) < max(b) and min(b) < max(a), "the two processes' commits did not interleave: nothing was shown"
    # One clock for both (CLOCK_MONOTONIC is the host's): a commit acknowledged before another began is older.
    for first in ops:
        for second in ops:
            if first[1] < second[0]:
                assert first[2] < second[2], f"{second} began after {first} was acknowledged, yet is older"
    last = max(ops, key=lambda op: op[2])
    store = files_storage(store_dir)
    await store.open()
    try:
        entry = await store.get_entry(SESSION, "race")
        assert (None if entry is None else (entry.value.decode(), entry.version)) == (
            None if last[3] is None else (last[3], last[2])), "the store holds another write than the newest"
    finally:
        await store.close()


SET_MANY_WRITER = """
import asyncio, sys
from ondemand.store import Entry, Namespace
from ondemand_example.files import FilesConfig, FilesStorage

async def main(path):
    store = FilesStorage(FilesConfig(path=path))
    await store.open()
    ns = Namespace("session", None, True, "default", "ondemand:session:")
    for generation in range(1, 41):
        value = b"gen%d " % generation + b"x" * 2000   # 400 kB a commit: long enough for a reader to meet it
        await store.set_many([Entry(ns, f"id{i}", value, None) for i in range(200)])
        await asyncio.sleep(0.005)
    await store.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_reader_in_another_process_sees_a_set_many_whole_or_not_at_all(tmp_path: Path) -> None:
    ids = [f"id{i}" for i in range(200)]
    reader = files_storage(tmp_path / "store")
    await reader.open()
    try:
        await reader.set_many([Entry(SESSION, item_id, b"gen0", None) for item_id in ids])
        writer = asyncio.ensure_future(python(SET_MANY_WRITER, str(tmp_path / "store")))
        seen: list[set[bytes | None]] = []
        while not writer.done():
            seen.append(set(await reader.get_many(SESSION, ids)))
        await writer
        torn = [s for s in seen if len(s) != 1]
        assert not torn, f"a reader saw a set_many of another process half written: {sorted(torn[0], key=repr)}"
        assert len({value for s in seen for value in s}) > 2, "the reader saw no commit in between: nothing shown"
        assert set(await reader.get_many(SESSION, ids)) == {b"gen40 " + b"x" * 2000}
    finally:
        await reader.close()


LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)   # a commit of another process, frozen while it holds the lock
print("locked", flush=True)
sys.stdin.read()
"""


async def test_a_commit_waits_for_another_processs_lock_at_most_op_timeout(tmp_path: Path) -> None:
    store = files_storage(tmp_path / "store", op_timeout=0.3)
    await store.open()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "store/lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        await store.set(SESSION, "k", b"1", None)
        assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
        started = time.monotonic()
        with pytest.raises(FilesUnavailable, match=r"waited 0\.3 s \(op_timeout\) for the lock") as info:
            await store.set(SESSION, "k", b"2", None)
        assert time.monotonic() - started < 0.3 + 0.5
        assert info.value.outcome_unknown is False and info.value.http_status == 503
        assert store.store_health.degraded and store.status()["state"] == "down"
        assert await store.get(SESSION, "k") == b"1", "reads take no lock: they still serve"
        assert store.status()["state"] == "up"

        holder.kill()  # kill -9 while it holds the lock: the kernel releases it
        holder.wait(10)
        assert (await store.set(SESSION, "k", b"3", None)).version == 2
        assert await store.get(SESSION, "k") == b"3"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        await store.close()


async def test_a_store_that_went_back_in_time_is_refused_not_served(tmp_path: Path) -> None:
    """A `data` file restored from an older copy would hand out versions the cache already saw."""
    store = files_storage(tmp_path / "store")
    await store.open()
    try:
        await store.set(SESSION, "k", b"old", None)
        old = (tmp_path / "store/data").read_bytes()
        await store.set(SESSION, "k", b"new", None)
        (tmp_path / "store/data").write_bytes(old)  # (written in place: still our file, mode 0600)
        with pytest.raises(FilesUnavailable, match="went back from version 2 to 1"):
            await store.get(SESSION, "k")
        with pytest.raises(FilesUnavailable, match="went back"):
            await store.set(SESSION, "k", b"newer", None)
        (tmp_path / "store/data").unlink()
        with pytest.raises(FilesUnavailable, match="disappeared after version 2"):
            await store.get(SESSION, "k")
    finally:
        await store.close()


# -- selected from TOML ------------------------------------------------------------------------------

CONFIG = """
[storage]
durable = "example-files"

[example_files]
path = "store"
op_timeout = 1.0
"""


def server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("ONDEMAND_", "EXAMPLE_")) and k not in {"DOCKER_ENV", "REDIS_URL", "DATABASE_URL"}}


def test_check_config_validates_the_example_files_section(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text(CONFIG)
    assert load_config(config, environ={}).section(FilesConfig) == FilesConfig(path="store", op_timeout=1.0)
    assert load_config(config, environ={"EXAMPLE_FILES_PATH": "/srv/x"}).section(FilesConfig).path == "/srv/x"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "check-config", "--config", str(config), "--json"],
                          cwd=tmp_path, env=server_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["example_files"] == {"path": "store", "op_timeout": 1.0}
    for good, bad, key, words in (
            ("op_timeout = 1.0", "op_timeout = 0", "op_timeout", "expected a finite number greater than 0"),
            ('path = "store"', 'path = " "', "path", "expected the path of a directory")):
        config.write_text(CONFIG.replace(good, bad))
        with pytest.raises(ConfigError, match=words) as info:
            load_config(config, environ={})
        assert info.value.key == f"example_files.{key}"
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "check-config", "--config", str(config)],
                              cwd=tmp_path, env=server_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"example_files.{key}" in proc.stderr and words in proc.stderr, proc.stderr


async def test_two_servers_selected_from_toml_serve_sessions_from_one_store_and_one_redis(tmp_path: Path) -> None:
    (tmp_path / "app.toml").write_text(CONFIG)
    procs: list[subprocess.Popen] = []
    redis_pids: set[int] = set()

    def start(name: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        with (tmp_path / f"{name}.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", "app.toml", "--host",
                                     "127.0.0.1", "--port", str(port)],
                                    cwd=tmp_path, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    async def stop(*stopping: subprocess.Popen) -> None:
        for proc in stopping:
            redis_pids.update(p.pid for p in redis_servers_under(proc.pid))
            proc.send_signal(signal.SIGTERM)
        for proc in stopping:
            assert await asyncio.to_thread(proc.wait, 30) == 0

    try:
        async with aiohttp.ClientSession(raise_for_status=False) as http:
            async def call(method: str, url: str, status: int, **kwargs) -> dict | None:
                async with http.request(method, url, **kwargs) as resp:
                    assert resp.status == status, f"{method} {url}: {resp.status} {await resp.text()}"
                    assert "Ondemand-Write" not in resp.headers, "the cache did not take a write"
                    return await resp.json() if resp.content_type == "application/json" else None

            (a, base_a), (b, base_b) = start("a"), start("b")
            await wait_until_serving(http, base_a, a, tmp_path / "a.log")
            await wait_until_serving(http, base_b, b, tmp_path / "b.log")
            for base in (base_a, base_b):
                durable = (await call("GET", f"{base}/api/cache/status", 200))["storages"]["durable"]
                assert durable["name"] == "example-files" and durable["path"] == str(tmp_path / "store")

            await call("PUT", f"{base_a}/api/sessions/s1", 200, json={"n": 1})
            assert await call("GET", f"{base_b}/api/sessions/s1", 200) == {
                "session_id": "s1", "value": {"n": 1}, "source": "redis"}
            await call("PUT", f"{base_b}/api/sessions/s1", 200, json={"n": 2})
            assert (await call("GET", f"{base_a}/api/sessions/s1", 200))["value"] == {"n": 2}
            await call("DELETE", f"{base_a}/api/sessions/s1", 204)
            await call("GET", f"{base_b}/api/sessions/s1", 404)
            await call("PUT", f"{base_a}/api/sessions/kept?ttl=3600", 200, json={"kept": True})

            # Both servers write one id at once: the cache ends with what the store ends with, the newest version.
            await asyncio.gather(*(call("PUT", f"{(base_a, base_b)[i % 2]}/api/sessions/race", 200, json={"i": i})
                                   for i in range(40)))
            store = files_storage(tmp_path / "store")
            await store.open()
            try:
                entry = await store.get_entry(SESSION, "race")
                kept = await store.get_entry(SESSION, "kept")
            finally:
                await store.close()
            for base in (base_a, base_b):
                assert (await call("GET", f"{base}/api/sessions/race", 200))["value"] == json.loads(entry.value)
            assert json.loads(kept.value) == {"kept": True} and 3500 < kept.remaining <= 3600
            await stop(a, b)

            # A server started after both stopped: a new Redis, empty; the store has what they wrote.
            c, base_c = start("c")
            await wait_until_serving(http, base_c, c, tmp_path / "c.log")
            assert await call("GET", f"{base_c}/api/sessions/kept", 200) == {
                "session_id": "kept", "value": {"kept": True}, "source": "example-files"}
            assert (await call("GET", f"{base_c}/api/sessions/kept", 200))["source"] == "redis"  # put back
            await call("GET", f"{base_c}/api/sessions/s1", 404)
            await stop(c)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert redis_pids and all(pid_gone(pid) for pid in redis_pids), "a Redis outlived the servers"


# -- the README walkthrough is the example plugin's code -----------------------------------------------

# The walkthrough's fenced blocks name their file in the info string: ```python file=ondemand_example/files.py
_BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Files the README shows whole, split into blocks with prose between; others it shows excerpts of.
WHOLE = ("pyproject.toml", "ondemand_example/files.py", "tests/test_example_files.py")


def readme_blocks() -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    for path, code in _BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8")):
        blocks.setdefault(path, []).append(code)
    return blocks


def test_the_readme_walkthrough_is_the_example_plugins_code() -> None:
    blocks = readme_blocks()
    assert set(WHOLE) <= set(blocks), f"the walkthrough shows no block of {set(WHOLE) - set(blocks)}"
    for path, codes in blocks.items():
        text = (EXAMPLE / path).read_text(encoding="utf-8")
        at = 0
        for code in codes:
            found = text.find(code, at)
            assert found >= 0, f"README.md shows {path} otherwise than tests/example_plugin has it:\n{code[:400]}"
            if path in WHOLE:
                assert not text[at:found].strip(), f"README.md leaves out part of {path}: {text[at:found][:400]}"
            at = found + len(code)
        if path in WHOLE:
            assert not text[at:].strip(), f"README.md leaves out the end of {path}: {text[at:][:400]}"


def test_a_backend_assembled_from_the_readme_alone_passes_the_contract_kit(tmp_path: Path) -> None:
    """The README's blocks, written into an empty folder, as a third party would (the package's __init__.py
    empty: the example's other plugin is no part of a backend); its test module, run in strict asyncio mode."""
    for path, codes in readme_blocks().items():
        if path in WHOLE:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text("\n\n".join(codes), encoding="utf-8")
    (tmp_path / "ondemand_example/__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    found = subprocess.run([sys.executable, "-c", "import ondemand_example.files as f; print(f.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(tmp_path / "ondemand_example/files.py"), found.stdout + found.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider",
         "-o", "asyncio_mode=strict", "-rs", "tests/test_example_files.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert re.search(r"\b40 passed, 4 skipped\b", out), out[-2000:]  # no outbox (3), no conditional write
    assert "carries no invalidation outbox" in out, out[-2000:]


# -- the example plugin imports only the public API ----------------------------------------------------

# The documented modules (README, "Writing a backend"); a built-in plugin's package may be imported to reuse
# it (the example's lifecycle subclasses the subprocess one), through what that package exports.
PUBLIC = {"ondemand", "ondemand.config", "ondemand.store", "ondemand.redis", "ondemand.registry", "ondemand.web",
          "ondemand.web.route_registry", "ondemand.testing", "ondemand.plugins.lifecycle_subprocess"}


def test_the_example_plugin_imports_only_public_names() -> None:
    sources = sorted(EXAMPLE.rglob("*.py"))
    assert {"files.py", "__init__.py", "test_example_files.py"} <= {path.name for path in sources}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [(node.module or "", [alias.name for alias in node.names])]
            else:
                continue
            for module, names in modules:
                if module.split(".")[0] != "ondemand":
                    continue
                where = f"{path.relative_to(EXAMPLE)}:{node.lineno}"
                assert module in PUBLIC, f"{where} imports {module}, not a documented module ({sorted(PUBLIC)})"
                exported = getattr(importlib.import_module(module), "__all__", None)
                for name in names:
                    assert not name.startswith("_"), f"{where} imports the private name {module}.{name}"
                    assert exported is None or name in exported, f"{where}: {module} does not export {name}"
