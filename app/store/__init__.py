"""Storage: the protocols a storage plugin implements, and the core that routes operations to storages.

A backend author imports from here: `Storage`, `CacheStorage`, `DurableStorage`, `InvalidationOutbox`,
`StorageContext` (what a factory gets), `Namespace`, `Entry`, `Lookup`, `StoreHealth` and `StoreState`
(the health helper a storage composes), `OVERFLOW` and `purge_in_batches`. The modules: `protocols`,
`dispatcher` (the routing policy), `invalidation` (stale keys, the outbox, recovery), `breaker`, `values`
(what crosses the API).
"""

from ondemand.health import OutageTracker, StoreHealth, StoreState
from ondemand.store.dispatcher import Lookup
from ondemand.store.protocols import (
    OVERFLOW,
    CacheStorage,
    DurableStorage,
    Entry,
    InvalidationOutbox,
    Namespace,
    Storage,
    StorageContext,
    StorageFactory,
    purge_in_batches,
)

__all__ = [
    "OVERFLOW", "CacheStorage", "DurableStorage", "Entry", "InvalidationOutbox", "Lookup", "Namespace",
    "OutageTracker", "Storage", "StorageContext", "StorageFactory", "StoreHealth", "StoreState", "purge_in_batches",
]
