"""The near cache: hot values of the namespaces that opt in (`near_cache = true`), kept in this process's memory.

The store and its policy; the connections that keep it coherent are ondemand.redis.tracking's. Entries are the
raw bytes Redis returned (decoded per hit: no two callers share a mutable object), keyed by the full Redis key.
Each entry belongs to the tracking connection that read it (a `Tracker`) and is served only while that
connection is fresh: it answered a command sent less than `max_silence` seconds ago, so every invalidation the
server sent before then has been applied. What makes an install safe (ondemand.redis.tracking calls `install`
from the connection's reader, in stream order):
- a read registers itself as the key's pending read before it is queued; an invalidation, one of our own
  writes (`evict`), a newer read of the key or a flush of its connection (its generation moves on) takes that
  place, and a read that lost it installs nothing;
- a flush drops every entry of a connection, or all of them, and nothing is installed while `serving` is off
  (the breaker is open).
Bounded by `max_bytes` (keys, values and a fixed per-entry overhead) and `max_entries`, least recently used
first; an entry never outlives the key's remaining ttl in Redis.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ondemand.config import NearCacheConfig

log = logging.getLogger("ondemand.near")

# Bytes counted per entry beside its key and value: the entry object, its OrderedDict node and slot, the key's and
# the value's object headers (tracemalloc: ~230 bytes per entry of a 40-byte key and a 244-byte value, beside them).
ENTRY_OVERHEAD = 240
_RETRY_REFUSED = 60.0  # seconds before a connection refused tracking (or too old a server) is asked again


class Tracker:
    """One tracking connection as the near cache sees it. `fresh_until` (monotonic seconds) is pushed forward by
    every answer the connection reads; `generation` moves on at every flush of its entries, so that a read queued
    before a flush never installs."""

    __slots__ = ("__weakref__", "closed", "entries", "fresh_until", "generation", "where")

    def __init__(self, where: str) -> None:
        self.where = where
        self.fresh_until = -math.inf  # serves nothing until it has answered
        self.generation = 0
        self.entries = 0
        self.closed = False


class NearEntry:
    __slots__ = ("expires", "raw", "size", "tracker", "version")

    def __init__(self, raw: bytes, expires: float, tracker: Tracker, version: int | None, size: int) -> None:
        self.raw = raw
        self.expires = expires
        self.tracker = tracker
        self.version = version
        self.size = size


class PendingRead:
    """A tracked read in flight (ondemand.redis.tracking's reads are these): the generation of its connection
    when it was queued."""

    __slots__ = ("generation",)

    def outdated_by(self, source: object) -> bool:
        """Whether an invalidation of its key that `source` (a connection) just delivered may concern a write
        the read did not see (then it must not install)."""
        return True


class NearCache:
    """See the module docstring. One per Runtime; OnDemandRedis's connections install, the dispatcher reads."""

    def __init__(self, config: NearCacheConfig, prefixes: Mapping[str, Sequence[str]]) -> None:
        """`prefixes`: for each pool (connection_id) that carries near-cached namespaces, their key prefixes."""
        self.max_bytes = config.max_bytes
        self.max_entries = config.max_entries
        self.max_silence = config.max_silence
        self.tracking = config.tracking
        self.prefixes = {pool: tuple(found) for pool, found in prefixes.items()}
        self.entries: OrderedDict[str, NearEntry] = OrderedDict()
        self.pending: dict[str, PendingRead] = {}
        self.bytes = 0
        self.serving = True  # off while the breaker is open: nothing served, nothing installed
        self.trackers: set[Tracker] = set()
        self.last_used = -math.inf  # monotonic time of the last hit (the server is in use while hits are served)
        self.installs = self.invalidations = self.evictions = self.expirations = 0
        self.flushes: Counter[str] = Counter()
        self.refused: dict[str, tuple[str, float]] = {}  # endpoint -> (why tracking is off there, when)
        self.refusals = 0

    # -- the hot path -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The value held for `key`, if it may be served now (not expired, its connection fresh)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        now = time.monotonic()
        if now < entry.expires and now < entry.tracker.fresh_until:
            self.entries.move_to_end(key)
            self.last_used = now
            return entry.raw
        if now >= entry.expires:
            self._remove(key, entry)
            self.expirations += 1
        return None  # (a connection silent for a while: kept, served again once it has answered)

    # -- reads in flight and installs (from the tracking connections) ---------------------------

    def begin_read(self, key: str, read: PendingRead) -> None:
        """`read` of `key` is about to be queued: it is the one that may install (any earlier one may not)."""
        self.pending[key] = read

    def end_read(self, key: str, read: PendingRead) -> None:
        """`read` failed or was answered: it no longer holds the key's place."""
        if self.pending.get(key) is read:
            del self.pending[key]

    def install(self, key: str, read: PendingRead, tracker: Tracker, raw: bytes, version: int | None,
                expires: float) -> bool:
        """Keep what `read` returned, unless anything since it was queued may have made it older than Redis."""
        if self.pending.get(key) is not read:
            return False  # invalidated, evicted by our own write, or a newer read of the key is in flight
        del self.pending[key]
        if read.generation != tracker.generation or tracker.closed or not self.serving:
            return False
        old = self.entries.pop(key, None)
        if old is not None:
            self._forget(old)
            if version is not None and old.version is not None and old.version > version:
                return False  # Redis went back: trust neither copy
        size = len(key) + len(raw) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        self.entries[key] = NearEntry(raw, expires, tracker, version, size)
        tracker.entries += 1
        self.bytes += size
        self.installs += 1
        entries = self.entries
        while self.bytes > self.max_bytes or len(entries) > self.max_entries:
            _key, victim = entries.popitem(last=False)
            self._forget(victim)
            self.evictions += 1
        return True

    # -- invalidations ----------------------------------------------------------------------------

    def invalidate(self, keys: Iterable[bytes], source: object = None) -> None:
        """The server's invalidation of `keys`, pushed to the tracking connection `source` in stream order: what is
        held goes, and so does a read in flight that may not have seen the write (see PendingRead.outdated_by)."""
        entries, pending = self.entries, self.pending
        for raw_key in keys:
            key = raw_key.decode("utf-8", "surrogateescape") if isinstance(raw_key, bytes) else str(raw_key)
            entry = entries.pop(key, None)
            if entry is not None:
                self._forget(entry)
                self.invalidations += 1
            read = pending.get(key)
            if read is not None and read.outdated_by(source):
                del pending[key]

    def evict(self, key: str) -> None:
        """One of our own writes of `key` is about to be sent (and again once it was answered): nothing read
        before it may be served or installed."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self._forget(entry)
        self.pending.pop(key, None)

    def flush(self, tracker: Tracker | None, cause: str) -> None:
        """Drop every entry of `tracker` (None: of every connection) and keep its reads in flight from installing."""
        self.flushes[cause] += 1
        trackers = self.trackers if tracker is None else (tracker,)
        for each in trackers:
            each.generation += 1
        if tracker is None or tracker.entries == len(self.entries):
            for each in trackers:
                each.entries = 0
            self.entries.clear()
            self.bytes = 0
            if tracker is None:
                self.pending.clear()
            return
        if tracker.entries:
            for key in [key for key, entry in self.entries.items() if entry.tracker is tracker]:
                self._forget(self.entries.pop(key))

    def flush_all(self, cause: str) -> None:
        self.flush(None, cause)

    # -- connections --------------------------------------------------------------------------------

    def register(self, tracker: Tracker) -> None:
        """A tracking connection is set up: its reads may install from now on."""
        self.trackers.add(tracker)

    def close(self, tracker: Tracker, cause: str) -> None:
        """Its connection is gone (lost, closed, replaced): none of its entries is served again."""
        if tracker.closed:
            return
        tracker.closed = True
        tracker.fresh_until = -math.inf
        if tracker in self.trackers:
            self.flush(tracker, cause)
            self.trackers.discard(tracker)

    def may_track(self, where: str) -> bool:
        """Whether to ask `where` for tracking: not if it refused less than a minute ago."""
        refused = self.refused.get(where)
        return refused is None or time.monotonic() - refused[1] >= _RETRY_REFUSED

    def refuse(self, where: str, reason: str) -> None:
        """`where` cannot keep a near cache coherent (it refused RESP3 or CLIENT TRACKING, or is too old): its
        pool's reads go to Redis, said in the status."""
        if where not in self.refused or self.refused[where][0] != reason:
            log.warning("near cache off for %s: %s", where, reason)
        self.refused[where] = (reason, time.monotonic())
        self.refusals += 1

    def tracked(self, where: str) -> None:
        self.refused.pop(where, None)

    def forget_after_fork(self) -> None:
        """A forked child: the connections are the parent's; nothing held here is served by the child."""
        self.entries.clear()
        self.pending.clear()
        self.bytes = 0
        self.trackers = set()

    # -- accounting -----------------------------------------------------------------------------

    def _remove(self, key: str, entry: NearEntry) -> None:
        if self.entries.get(key) is entry:
            del self.entries[key]
            self._forget(entry)

    def _forget(self, entry: NearEntry) -> None:
        self.bytes -= entry.size
        entry.tracker.entries -= 1

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            # tracking: every connection tracks; off: tracking refused (reads go to Redis); partial: some
            # cluster nodes refused; idle: no connection yet
            "state": ("partial" if self.trackers and self.refused else "tracking" if self.trackers else
                      "off" if self.refused else "idle"),
            "tracking": self.tracking,
            "max_silence": self.max_silence,
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "max_entries": self.max_entries,
            "reads_in_flight": len(self.pending),
            "installs": self.installs,
            "invalidations": self.invalidations,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "flushes": dict(self.flushes),
            "connections": len(self.trackers),
            "fresh_connections": sum(1 for t in self.trackers if t.fresh_until > now),
            "refused": {where: reason for where, (reason, _at) in sorted(self.refused.items())},
            "refusals": self.refusals,
        }
