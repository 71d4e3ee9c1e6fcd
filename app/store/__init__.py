"""Storage: the protocols a storage plugin implements, and the core that routes operations to storages.

A backend author imports from here: `Storage`, `CacheStorage`, `DurableStorage`, `InvalidationOutbox`,
`WritesConditionally`,
`StorageContext` (what a factory gets), `Namespace`, `Entry`, what a durable store answers (`Committed`,
`Deleted`, `DurableEntry`) and an outbox's rows (`Target`, `OutboxRow`), `Lookup`, `StoreHealth`,
`StoreState` and `OutageTracker` (the health helper a storage composes), `OVERFLOW` and `purge_in_batches`.
The modules: `protocols`, `dispatcher` (the routing policy), `invalidation` (stale keys, the outbox,
recovery), `breaker`, `values` (what crosses the API).
"""

from ondemand.health import OutageTracker, StoreHealth, StoreState
from ondemand.store.dispatcher import Lookup
from ondemand.store.protocols import (
    OVERFLOW,
    CacheStorage,
    Committed,
    Deleted,
    DurableEntry,
    DurableStorage,
    Entry,
    InvalidationOutbox,
    Namespace,
    OutboxRow,
    Storage,
    StorageContext,
    StorageFactory,
    Target,
    WritesConditionally,
    purge_in_batches,
)

__all__ = [
    "OVERFLOW",
    "CacheStorage",
    "Committed",
    "Deleted",
    "DurableEntry",
    "DurableStorage",
    "Entry",
    "InvalidationOutbox",
    "Lookup",
    "Namespace",
    "OutageTracker",
    "OutboxRow",
    "Storage",
    "StorageContext",
    "StorageFactory",
    "StoreHealth",
    "StoreState",
    "Target",
    "WritesConditionally",
    "purge_in_batches",
]
