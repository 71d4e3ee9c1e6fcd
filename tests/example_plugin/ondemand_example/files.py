"""The `example-files` storage: a durable store in a directory of files, written as a third party would.

Small on purpose, and honest about what that costs: every value lives in one file, `data`, which each
commit rewrites whole, so a write costs as much as the whole store (fine for thousands of small values,
not for gigabytes), and each process keeps what it last read of it in memory. How it keeps the promises
of a durable store (README, "Writing a backend"):

- versions: one counter in `data`, read and bumped under an exclusive lock on the file `lock`, which every
  commit of every process takes: commits happen one at a time, their versions in their order;
- all or nothing: a commit writes a new file, fsyncs it and renames it over the old one, so a reader
  (or a restart after a crash) finds the old file or the new one, never half of a `set_many`;
- bounded waits: the files are read and written on a thread of its own; the wait for the lock ends at
  `op_timeout`, and the event loop stops waiting soon after, whatever the thread does;
- typed errors: whatever keeps it from serving is a `FilesUnavailable`, a `BackendUnavailable` (HTTP 503);
- health: every operation's outcome goes to the StoreHealth composed from `context.health`.

It carries no invalidation outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import math
import os
import queue
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import attrs

from ondemand import BackendUnavailable, hookimpl
from ondemand.config import FieldError, SectionRegistry, positive
from ondemand.registry import Registry
from ondemand.store import (
    Committed,
    Deleted,
    DurableEntry,
    Entry,
    Namespace,
    OutageTracker,
    StorageContext,
    StorageFactory,
    StoreHealth,
    StoreState,
)

T = TypeVar("T")


class FilesUnavailable(BackendUnavailable):
    """The directory cannot serve: not ours, unreadable, full, its lock held too long, its data corrupt."""

    code = "example_files_unavailable"


def _a_directory(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value.strip() or "\0" in value:
        raise FieldError(attribute.name, f"expected the path of a directory, got {value!r}")


@attrs.frozen
class FilesConfig:
    """The [example_files] table; every field has a default, so a config without the table is valid."""

    # The store's directory, created (0700) when missing; used only if it is ours: our user's, and writable by
    # no one else (the same for the files in it).
    path: str = attrs.field(default=".ondemand/example-files", validator=_a_directory)
    # Seconds an operation may take in all, its wait for another process's commit included.
    op_timeout: float = attrs.field(default=2.0, validator=positive)


@hookimpl
def ondemand_config_sections(sections: SectionRegistry) -> None:
    sections.add("example_files", FilesConfig, env={"EXAMPLE_FILES_PATH": "path"})


@hookimpl
def ondemand_register_storages(registry: Registry[StorageFactory]) -> None:
    registry.add("example-files", make_storage)


def make_storage(context: StorageContext) -> FilesStorage:
    return FilesStorage(context.config.section(FilesConfig), StoreHealth(context.health, "example-files storage"))


# The file `data`: a header (a magic string, the version counter, a CRC-32 of the rest), then one record per
# value: its version, its expiry (epoch seconds; inf: none), the lengths of the namespace, the id and the
# value, then those three.
_HEADER = struct.Struct(">8sQI")
_RECORD = struct.Struct(">QdHHI")
_MAGIC = b"odfiles1"
_NEVER_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no symlink followed, no FIFO waited on


class Row(NamedTuple):
    value: bytes
    expires_at: float | None  # epoch seconds
    version: int


Rows = dict[tuple[str, str], Row]  # (namespace, id) -> row


def _live(row: Row, now: float) -> bool:
    return row.expires_at is None or row.expires_at > now


def _entry(row: Row | None, now: float) -> DurableEntry | None:
    if row is None or not _live(row, now):
        return None
    return DurableEntry(row.value, None if row.expires_at is None else row.expires_at - now, row.version)


def _encode(last_version: int, rows: Rows) -> bytes:
    parts = []
    for (namespace, item_id), row in rows.items():
        name, key = namespace.encode(), item_id.encode()
        expires_at = math.inf if row.expires_at is None else row.expires_at
        parts += [_RECORD.pack(row.version, expires_at, len(name), len(key), len(row.value)), name, key, row.value]
    body = b"".join(parts)
    return _HEADER.pack(_MAGIC, last_version, zlib.crc32(body)) + body


def _decode(body: bytes) -> Rows:
    rows: Rows = {}
    at = 0
    while at < len(body):
        version, expires_at, name_len, key_len, value_len = _RECORD.unpack_from(body, at)
        at += _RECORD.size
        name, key = body[at:at + name_len].decode(), body[at + name_len:at + name_len + key_len].decode()
        at += name_len + key_len
        value = body[at:at + value_len]
        at += value_len
        rows[(name, key)] = Row(value, None if expires_at == math.inf else expires_at, version)
    return rows


class FilesStorage:
    """A DurableStorage in a directory: `data` (every value) and `lock` (see the module docstring)."""

    name = "example-files"

    def __init__(self, config: FilesConfig, health: StoreHealth | None = None) -> None:
        self.config = config
        self.path = Path(config.path).expanduser().absolute()
        self.store_health = health or StoreHealth(OutageTracker.quiet(self.name), "example-files storage")
        self._thread: _Thread | None = None
        self._last_version = 0  # the counter in `data` when this process last read or wrote it
        self._rows: Rows = {}  # what `data` held then
        self._ops = self._errors = 0

    async def open(self) -> None:
        """Start the thread and read the store once; a failure shows in status() and health, it is not raised
        (the service starts, and the store serves once it can)."""
        self._thread = self._thread or _Thread(f"ondemand-{self.name}")
        self.store_health.set_state(StoreState.STARTING)
        with contextlib.suppress(FilesUnavailable):
            await self._run("open", lambda deadline, now: self._read())

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            last_job = thread.submit(lambda: None)
            thread.stop()
            with contextlib.suppress(TimeoutError):  # a thread stuck in the kernel is left to end by itself
                await asyncio.wait_for(asyncio.wrap_future(last_job), self.config.op_timeout + 1.0)
        self.store_health.set_state(StoreState.STOPPED)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, **self.store_health.status(), "path": str(self.path),
                "op_timeout": self.config.op_timeout, "last_version": self._last_version, "ops": self._ops,
                "errors": self._errors}

    # -- reads: the data file as it is now, no lock needed (a commit replaces it whole) --------------

    async def get_entries(self, ns: Namespace, ids: Sequence[str]) -> list[DurableEntry | None]:
        def read(deadline: float, now: float) -> list[DurableEntry | None]:
            rows = self._read()
            return [_entry(rows.get((ns.name, item_id)), now) for item_id in ids]

        return await self._run("read", read)

    async def get_entry(self, ns: Namespace, item_id: str) -> DurableEntry | None:
        return (await self.get_entries(ns, [item_id]))[0]

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]:
        return [None if entry is None else entry.value for entry in await self.get_entries(ns, ids)]

    async def get(self, ns: Namespace, item_id: str) -> bytes | None:
        return (await self.get_many(ns, [item_id]))[0]

    # -- writes: each one commit, under the lock ---------------------------------------------------

    async def set_many(self, entries: Sequence[Entry]) -> list[Committed]:
        """One commit for every entry; a later entry for the same id wins, and they share the id's version."""
        if not entries:
            return []

        def change(rows: Rows, new_version: Callable[[], int], now: float) -> list[Committed]:
            latest = {(entry.namespace.name, entry.id): entry for entry in entries}
            committed = {}
            for key, entry in latest.items():
                version = new_version()
                rows[key] = Row(entry.value, None if entry.ttl is None else now + entry.ttl, version)
                committed[key] = Committed(entry.namespace, entry.id, version, None)
            return [committed[(entry.namespace.name, entry.id)] for entry in entries]

        return await self._commit("write", change)

    async def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> Committed:
        return (await self.set_many([Entry(ns, item_id, value, ttl)]))[0]

    async def delete(self, ns: Namespace, ids: Sequence[str]) -> Deleted:
        """One commit: counts the live values among `ids`, and gives every distinct id a version."""
        unique = list(dict.fromkeys(ids))
        if not unique:
            return Deleted(0, [])

        def change(rows: Rows, new_version: Callable[[], int], now: float) -> Deleted:
            removed = sum(rows.pop((ns.name, item_id), None) is not None for item_id in unique)
            return Deleted(removed, [Committed(ns, item_id, new_version(), None) for item_id in unique])

        return await self._commit("delete", change)

    async def expire(self, ns: Namespace, item_id: str, ttl: float) -> Committed | None:
        def change(rows: Rows, new_version: Callable[[], int], now: float) -> Committed | None:
            row = rows.get((ns.name, item_id))
            if row is None:
                return None
            rows[(ns.name, item_id)] = row = Row(row.value, now + ttl, new_version())
            return Committed(ns, item_id, row.version, None)

        return await self._commit("expire", change)

    # -- the event loop's side ---------------------------------------------------------------------

    async def _commit(self, what: str, change: Callable[[Rows, Callable[[], int], float], T]) -> T:
        return await self._run(what, lambda deadline, now: self._commit_in_thread(deadline, now, change),
                               write=True)

    async def _run(self, what: str, work: Callable[[float, float], T], *, write: bool = False) -> T:
        """`work(deadline, now)` on the thread, waited for op_timeout (and a little more: the thread keeps the
        deadline itself); the outcome goes to the health tracker."""
        self._ops += 1
        timeout = self.config.op_timeout
        try:
            if self._thread is None:
                raise FilesUnavailable(f"the {self.name} storage is not open")
            deadline = time.monotonic() + timeout
            job = self._thread.submit(lambda: self._in_thread(what, work, deadline))
            try:
                async with asyncio.timeout(timeout + 0.25):
                    result = await asyncio.wrap_future(job)
            except TimeoutError:  # the thread is stuck in the kernel (a hung disk)
                error = FilesUnavailable(f"{self.name} {what} did not complete within {timeout:g} s (op_timeout)")
                error.outcome_unknown = write and not job.cancel()  # it had started: its commit may still land
                raise error from None
        except FilesUnavailable as exc:
            self._errors += 1
            self.store_health.failed(str(exc))
            raise
        self.store_health.succeeded()
        return result

    # -- the thread's side -------------------------------------------------------------------------

    def _in_thread(self, what: str, work: Callable[[float, float], T], deadline: float) -> T:
        if time.monotonic() >= deadline:
            raise FilesUnavailable(f"{self.name} {what} waited {self.config.op_timeout:g} s (op_timeout) behind "
                                   "other operations; it did not start")
        try:
            return work(deadline, time.time())
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            where = self.path if exc.filename in (None, str(self.path)) else self.path / str(exc.filename)
            raise FilesUnavailable(f"{self.name} {what} failed on {where}: {reason}") from None

    def _commit_in_thread(self, deadline: float, now: float,
                          change: Callable[[Rows, Callable[[], int], float], T]) -> T:
        """Under the lock: read what the last commit of any process left, change a copy, write it if it changed."""
        with self._directory() as directory, self._locked(directory, deadline):
            self._load(directory)
            rows = {key: row for key, row in self._rows.items() if _live(row, now)}  # the expired go here
            versions = itertools.count(self._last_version + 1)
            result = change(rows, versions.__next__, now)
            last_version = next(versions) - 1
            if last_version != self._last_version:
                self._write(directory, last_version, rows)
                self._last_version, self._rows = last_version, rows
            return result

    def _read(self) -> Rows:
        with self._directory() as directory:
            return self._load(directory)

    def _load(self, directory: int) -> Rows:
        """The rows in `data`, read again only when a commit replaced it (its counter moved)."""
        try:
            fd = self._open("data", os.O_RDONLY, directory)
        except FileNotFoundError:
            if self._last_version:  # versions would start over, below those the cache holds
                raise FilesUnavailable(f"{self.path / 'data'} disappeared after version {self._last_version}; "
                                       "restore it (a store starts empty only once)") from None
            return self._rows
        with open(fd, "rb") as file:
            header = file.read(_HEADER.size)
            magic, last_version, crc = _HEADER.unpack(header) if len(header) == _HEADER.size else (b"", 0, 0)
            if magic != _MAGIC:
                raise FilesUnavailable(f"{self.path / 'data'} is not an example-files data file")
            if last_version == self._last_version:
                return self._rows
            if last_version < self._last_version:
                raise FilesUnavailable(f"{self.path / 'data'} went back from version {self._last_version} to "
                                       f"{last_version} (restored from a backup?); versions must never come back")
            body = file.read()
        try:
            if zlib.crc32(body) != crc:
                raise ValueError("checksum mismatch")
            self._rows, self._last_version = _decode(body), last_version
        except (ValueError, struct.error) as exc:
            raise FilesUnavailable(f"{self.path / 'data'} is corrupt ({exc})") from None
        return self._rows

    def _write(self, directory: int, last_version: int, rows: Rows) -> None:
        """A new `data`: written whole and fsync'd, renamed over the old one, then the rename fsync'd."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink("data.new", dir_fd=directory)  # left by a commit that failed, or a crash
        fd = self._open("data.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, directory)
        with open(fd, "wb") as file:
            file.write(_encode(last_version, rows))
            file.flush()
            os.fsync(file.fileno())
        os.rename("data.new", "data", src_dir_fd=directory, dst_dir_fd=directory)
        os.fsync(directory)

    @contextlib.contextmanager
    def _directory(self) -> Iterator[int]:
        try:
            fd = self._open(str(self.path), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = self._open(str(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, directory: int, deadline: float) -> Iterator[None]:
        """The lock every commit of every process takes (flock: the kernel drops it when its holder dies)."""
        fd = self._open("lock", os.O_RDWR | os.O_CREAT, directory)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FilesUnavailable(
                            f"{self.name} waited {self.config.op_timeout:g} s (op_timeout) for the lock on "
                            f"{self.path / 'lock'}, which another process holds") from None
                    time.sleep(0.002)
            yield
        finally:
            os.close(fd)  # and the lock with it

    def _open(self, name: str, flags: int, directory: int | None = None) -> int:
        """Open what must be ours (never through a symlink): our user's, writable by no one else, of the kind
        expected. Anything else is refused, not repaired: someone else may have put it there."""
        fd = os.open(name, flags | _NEVER_FOLLOW, 0o600, dir_fd=directory)
        found = os.fstat(fd)
        kind = "a directory" if flags & os.O_DIRECTORY else "a regular file"
        right_kind = stat.S_ISDIR(found.st_mode) if flags & os.O_DIRECTORY else stat.S_ISREG(found.st_mode)
        if right_kind and found.st_uid == os.geteuid() and not found.st_mode & 0o022:
            return fd
        os.close(fd)
        where = self.path / name if directory is not None else name
        raise FilesUnavailable(
            f"refusing {where}: it must be {kind} of uid {os.geteuid()} that no one else can write, and it is owned "
            f"by uid {found.st_uid} with mode {stat.S_IMODE(found.st_mode):04o}; fix or remove it, or set "
            "example_files.path to another directory")


class _Thread:
    """One daemon thread running jobs in order: a file operation stuck in the kernel (a hung disk) blocks
    neither the event loop nor the interpreter's exit."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future

    def stop(self) -> None:
        """The thread ends after the jobs already queued."""
        self._jobs.put(None)

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if future.set_running_or_notify_cancel():  # False: its caller gave up before it started
                try:
                    future.set_result(job())
                except BaseException as exc:
                    future.set_exception(exc)
            del item, job, future  # hold no finished job's result while waiting for the next
