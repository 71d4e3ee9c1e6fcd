"""Trusting files and directories: ours, or refused.

A path we did not create is used only if it is ours: not a symbolic link, the kind we expect, owned by
us (or by whom the caller names), writable by no one else, a file with one link; its parents owned by
root or us and writable by no one else unless sticky (OpenSSH's StrictModes). What is missing is
created one `mkdir` at a time, 0700, files 0600 with `O_EXCL`; nothing is ever chmodded into shape or
reached through a symlink (`O_NOFOLLOW`, and `O_NONBLOCK` so that a planted FIFO cannot block an open).
The runtime directory of the subprocess lifecycle, the embedded PostgreSQL's data directory and the
SQLite file all follow these rules; each caller turns `Untrusted` into its own typed error with its rule.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
from collections.abc import Collection
from pathlib import Path

_NEVER_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Untrusted(Exception):
    """`path` is not ours to use; `reason` says why ("is a symbolic link", ...)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} {reason}")


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def kind(st: os.stat_result) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO")):
        if test(st.st_mode):
            return name
    return "a device or special file"


def mode(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}"


def refusal(st: os.stat_result, *, directory: bool, owners: Collection[int] | None = None,
            socket: bool = False) -> str | None:
    """Why an entry (as `os.lstat` or `os.fstat` saw it) is not ours to use, or None when it is.

    `owners`: whose it may be (default: ours). `socket`: a socket will do as well as a regular file (its
    directory protects it; its mode is the server's business)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if directory and not stat.S_ISDIR(st.st_mode):
        return f"is {kind(st)}, not a directory"
    if not directory and not (stat.S_ISREG(st.st_mode) or (socket and stat.S_ISSOCK(st.st_mode))):
        return f"is {kind(st)}, not a regular file"
    owners = {os.geteuid()} if owners is None else set(owners)
    if st.st_uid not in owners:
        return f"is owned by {user_name(st.st_uid)}, not by {' or '.join(user_name(u) for u in sorted(owners))}"
    if st.st_mode & 0o022 and not stat.S_ISSOCK(st.st_mode):
        return f"is writable by group or others ({mode(st)})"
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        return f"has {st.st_nlink} hard links"
    return None


def parent_refusal(st: os.stat_result) -> str | None:
    """Why a parent directory lets someone else swap what is in it (None: it does not): owned by root or
    us, and writable by no one else unless sticky (like /tmp)."""
    if not stat.S_ISDIR(st.st_mode):
        return f"is {kind(st)}, not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by {user_name(st.st_uid)}, neither root nor us ({user_name(os.geteuid())})"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by group or others ({mode(st)}, not sticky)"
    return None


def make_private_dirs(path: Path, *, check_parents: bool = False) -> None:
    """Create `path` and its missing parents, each 0700 with one `mkdir` (an entry that appeared meanwhile
    is left to the caller's checks). With `check_parents`, every parent, existing or not, must pass
    `parent_refusal` (Untrusted otherwise). OSError when a directory cannot be created or inspected."""
    for directory in (*reversed(path.parents), path):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # ours from before, made meanwhile by another process, or someone else's: checked next
        except OSError:
            if not os.path.lexists(directory):
                raise
        if check_parents and directory != path:
            reason = parent_refusal(os.lstat(directory))
            if reason is not None:
                raise Untrusted(directory, reason)


def check_dir(path: Path, *, owners: Collection[int] | None = None) -> None:
    """Untrusted unless `path` is a directory of ours (`refusal`); OSError when it cannot be inspected."""
    reason = refusal(os.lstat(path), directory=True, owners=owners)
    if reason is not None:
        raise Untrusted(path, reason)


def lstat_private(path: Path, *, socket: bool = False) -> bool:
    """False when nothing is at `path`; True when a file of ours is; Untrusted for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    reason = refusal(st, directory=False, socket=socket)
    if reason is not None:
        raise Untrusted(path, reason)
    return True


def open_private(path: Path, flags: int) -> int:
    """Open a file of ours (with O_CREAT in `flags`: create it 0600), never through a symlink and never
    blocking on a planted FIFO; Untrusted unless what was opened is a regular file of ours."""
    try:
        fd = os.open(path, flags | _NEVER_FOLLOW, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a symlink, a FIFO, a directory
            lstat_private(path)  # raises Untrusted naming what is there
        raise
    try:
        reason = refusal(os.fstat(fd), directory=False)
        if reason is not None:
            raise Untrusted(path, reason)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private(path: Path) -> bool:
    """Create an empty file of ours (0600, O_EXCL: never through a symlink); False when something is there."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NEVER_FOLLOW, 0o600))
    except FileExistsError:
        return False
    return True


def remove_private(path: Path, *, socket: bool = False) -> None:
    """Unlink a file of ours (lstat first); anything else there is Untrusted, never removed."""
    if lstat_private(path, socket=socket):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def replace_private(path: Path, text: str | bytes, *, refuse_planted: bool = True) -> None:
    """Write `text` to `path` (0600) without ever following a symlink: to a fresh name (O_EXCL), then
    renamed over it. With `refuse_planted`, what `path` is now must be a file of ours (Untrusted otherwise);
    without, whatever is there is replaced by the rename, never written through."""
    if refuse_planted:
        lstat_private(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def touch_private(path: Path) -> None:
    """Set the mtime of a file of ours to now, creating it 0600; never through a symlink."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def read_pid_file(path: Path) -> int | None:
    """The first line of a pid file as an integer, read without following a symlink; None if none."""
    try:
        fd = os.open(path, os.O_RDONLY | _NEVER_FOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return int(os.read(fd, 64).split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


# -- files the operator names: secrets, certificates -----------------------------------------------------

_MAX_LINKS = 40  # symbolic links followed while resolving one path (the kernel's own limit)


def _provided_refusal(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"is {kind(st)}, not a regular file"
    if st.st_mode & 0o022:
        return f"is writable by group or others ({mode(st)}): whoever can write it chooses what we read"
    return None


def resolve_provided(path: str | os.PathLike[str]) -> Path:
    """Where a file the operator names (a secret, a certificate) really is, judged on the way.

    Unlike our own files these are often made by an orchestrator: Kubernetes mounts secrets as symlinks
    into a `..data` directory, Docker Compose bind-mounts them with the host's owner. So symlinks are
    followed and any owner is accepted, but nothing on the way may be swapped by someone else: every
    directory passed through must pass `parent_refusal` (root's or ours, writable by no one else unless
    sticky), every symlink must be root's, ours or its directory owner's (what the kernel's
    protected_symlinks allows), and the file must be a regular file writable by no one but its owner.
    Untrusted names the entry at fault; OSError (FileNotFoundError...) when something cannot be read."""
    pending = list(Path(os.path.abspath(path)).parts[1:])
    current = Path("/")
    checked: set[Path] = set()
    links = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        if current not in checked:
            reason = parent_refusal(os.lstat(current))
            if reason is not None:
                raise Untrusted(current, reason)
            checked.add(current)
        entry = current / name
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise Untrusted(path, f"leads through more than {_MAX_LINKS} symbolic links")
            if st.st_uid not in (0, os.geteuid(), os.lstat(current).st_uid):
                raise Untrusted(entry, f"is a symbolic link owned by {user_name(st.st_uid)}, neither root, us nor "
                                       "its directory's owner")
            target = Path(os.readlink(entry))
            if target.is_absolute():
                current = Path("/")
            pending[:0] = [part for part in target.parts if part != "/"]
            continue
        current = entry
    return current


def read_provided(path: str | os.PathLike[str], *, limit: int = 1 << 20) -> bytes:
    """The bytes of a file the operator names, after `resolve_provided`'s checks; opened without following
    a symlink (what was checked is what is read) and without blocking on a FIFO; at most `limit` bytes
    (Untrusted past that: not a file of the kind expected)."""
    real = resolve_provided(path)
    fd = os.open(real, os.O_RDONLY | _NEVER_FOLLOW)
    try:
        st = os.fstat(fd)
        reason = _provided_refusal(st)
        if reason is None and st.st_size > limit:
            reason = f"is {st.st_size} bytes, more than the {limit} expected"
        if reason is not None:
            raise Untrusted(path if Path(path) == real else f"{path} (-> {real})", reason)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)
