"""The Redis client a producer-side object uses: its own (opened from the settings, closed with
it) or the caller's (left open); a single Redis's (``aioredis.Redis``) or, for what runs on a
Redis Cluster too, either (``RedisClient``)."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings

__all__ = ["RedisUser"]


_Client = TypeVar("_Client", bound=RedisClient)


class RedisUser(Generic[_Client]):
    """Holds ``redis``: ``connect(settings)`` (LEADSTAGE_REDIS_TIMEOUT and
    LEADSTAGE_REDIS_CONNECT_TIMEOUT included) when none is given, which ``aclose`` (or the end of
    ``async with``) closes; a given client belongs to the caller."""

    redis: _Client

    def __init__(self, settings: Settings, redis: _Client | None, connect: Callable[[Settings], _Client]) -> None:
        self._owns_client = redis is None
        self.redis = connect(settings) if redis is None else redis

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis client if this object opened it."""
        if self._owns_client:
            await self.redis.aclose()
