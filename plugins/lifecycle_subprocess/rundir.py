"""The runtime directory: where a server of ours lives (socket, config, log, state), used only if it is ours.

By default one per project (`.ondemand/redis` in the working directory, or a short per-user path keyed by
it), so processes started in the same directory share one server; `lifecycle.runtime_dir` names another,
`"private"` a fresh temp dir. The trust rules are `ondemand.host.files`'; this module applies them to the
directory and each entry we manage, and turns a refusal into `RuntimeDirError` naming the rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import attrs

from ondemand.errors import SpawnError
from ondemand.host import files
from ondemand.redis.endpoint import RedisEndpoint

# sun_path is 108 bytes on Linux and Redis 6.2 silently truncates long paths: stay well under.
MAX_SOCKET_PATH = 100
PRIVATE = "private"  # lifecycle.runtime_dir = "private": a fresh temp dir per process, shared with no one
DEFAULT_RUNTIME_DIR = Path(".ondemand") / "redis"  # in the project directory, beside .ondemand/pgdata
SOCKET_NAME = "redis.sock"
_STATE_MAX = 65536


def server_in(rundir: Path, pid: int) -> bool:
    """True when `pid` is a live process working in `rundir`: a redis-server we (or a sibling) started.

    Redis rewrites its process title, so the command line cannot tell; its working directory is the
    `dir` we configured, which no unrelated process shares.
    """
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(rundir)
    except OSError:
        return False



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

_DIR_RULE = ("a runtime directory must be ours (owned by our uid, not writable by group or others, not a "
             "symbolic link) under parents owned by root or us that no one else can write (or sticky, like "
             "/tmp); we never chmod or reuse one someone else prepared. Remove it or set lifecycle.runtime_dir")
_ENTRY_RULE = ("an entry in the runtime directory that is not a regular file (or socket) of ours with one link "
               "is never followed, reused or removed; find out who made it and remove it")


def prepare_runtime_dir(path: Path) -> None:
    """Make sure `path` (absolute, its parents resolved) is a directory only we can write, its parents
    trusted; what is missing is created 0700 (ondemand.host.files)."""
    try:
        files.make_private_dirs(path, check_parents=True)
        files.check_dir(path)
    except files.Untrusted as exc:
        where = exc.path if exc.path == path else f"{exc.path} (a parent of {path})"
        raise RuntimeDirError(f"runtime directory: {where} {exc.reason}; {_DIR_RULE}") from None
    except OSError as exc:
        raise RuntimeDirError(f"runtime directory: {exc.filename or path} cannot be created or inspected: "
                              f"{exc.strerror}; set lifecycle.runtime_dir to a writable directory of ours") from None


def _entry_error(exc: files.Untrusted) -> RuntimeDirError:
    return RuntimeDirError(f"runtime directory: {exc.path} {exc.reason}; {_ENTRY_RULE}")


def lstat_entry(path: Path, *, socket: bool = False) -> bool:
    """False when `path` does not exist; True when it is an entry of ours; RuntimeDirError otherwise."""
    try:
        return files.lstat_private(path, socket=socket)
    except files.Untrusted as exc:
        raise _entry_error(exc) from None


def open_ours(path: Path, flags: int) -> int:
    """Open (with O_CREAT: create, 0600) a file of ours in the runtime directory; RuntimeDirError unless ours."""
    try:
        return files.open_private(path, flags)
    except files.Untrusted as exc:
        raise _entry_error(exc) from None


def remove_ours(path: Path, *, socket: bool = False) -> None:
    """Unlink an entry of ours; anything else there is refused, never removed."""
    try:
        files.remove_private(path, socket=socket)
    except files.Untrusted as exc:
        raise _entry_error(exc) from None


def replace_file(path: Path, text: str) -> None:
    """Write `text` to a file of ours (0600) through a fresh name renamed over it; never through a symlink."""
    try:
        files.replace_private(path, text)
    except files.Untrusted as exc:
        raise _entry_error(exc) from None


def touch_ours(path: Path) -> None:
    """Set the mtime of a file of ours to now, creating it 0600; never through a symlink."""
    try:
        files.touch_private(path)
    except files.Untrusted as exc:
        raise _entry_error(exc) from None


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
                raise RuntimeDirError(f"runtime directory: {path} is accessible to other users ({files.mode(st)}, "
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
                                       # (our servers speak no TLS: the file keeps its format without the field)
                                       "endpoint": attrs.asdict(self.endpoint, filter=lambda a, _: a.name != "tls")}))
