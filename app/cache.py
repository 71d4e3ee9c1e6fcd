"""CacheService: the seed's high-level API for sessions, messages and profiles, in Python names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ondemand.store.dispatcher import Dispatcher, WriteOutcome

SESSION, MESSAGES, PROFILE = "session", "messages", "profile"


class CacheService:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def get_or_compute(self, namespace: str, item_id: str, loader: Callable[[], Awaitable[Any]],
                       **options: Any) -> Awaitable[Any]:
        """Dispatcher.get_or_compute: the cached value, else the loader's, one load per key at a time."""
        return self.dispatcher.get_or_compute(namespace, item_id, loader, **options)

    # Each write returns None when stored as asked, else what happened (Dispatcher.set).
    async def cache_session(self, session_id: str, data: Any, *, ttl: float | None = None) -> WriteOutcome | None:
        return await self.dispatcher.set(SESSION, session_id, data, ttl)

    async def get_session(self, session_id: str) -> Any:
        return await self.dispatcher.get(SESSION, session_id)

    async def delete_session(self, session_id: str) -> bool:
        return await self.dispatcher.delete(SESSION, session_id) > 0

    async def cache_messages(self, user_id: str, messages: list[Any], *,
                             ttl: float | None = None) -> WriteOutcome | None:
        return await self.dispatcher.set(MESSAGES, user_id, messages, ttl)

    async def get_messages(self, user_id: str) -> list[Any] | None:
        return await self.dispatcher.get(MESSAGES, user_id)

    async def cache_profile(self, user_id: str, profile: Any, *, ttl: float | None = None) -> WriteOutcome | None:
        return await self.dispatcher.set(PROFILE, user_id, profile, ttl)

    async def get_profile(self, user_id: str) -> Any:
        return await self.dispatcher.get(PROFILE, user_id)

    async def warmup_user_cache(
        self,
        user_id: str,
        *,
        session: Any = None,
        messages: list[Any] | None = None,
        profile: Any = None,
        ttl: float | None = None,
    ) -> list[str]:
        """Write any of session, messages and profile for one user in one round trip; returns what was written."""
        entries = [
            (namespace, user_id, value, ttl)
            for namespace, value in ((SESSION, session), (MESSAGES, messages), (PROFILE, profile))
            if value is not None
        ]
        await self.dispatcher.set_many(entries)
        return [namespace for namespace, *_ in entries]
