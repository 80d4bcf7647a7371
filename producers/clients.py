"""The Redis client a producer-side object uses: its own (opened from the settings, closed with
it) or the caller's (left open)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import redis.asyncio as aioredis

from worker.core.redis_connection import connect_redis_of
from worker.core.settings import Settings

__all__ = ["RedisUser"]


class RedisUser:
    """Holds ``redis``: a client of ``settings`` (LEADSTAGE_REDIS_TIMEOUT and
    LEADSTAGE_REDIS_CONNECT_TIMEOUT included) when none is given, which ``aclose`` (or the end of
    ``async with``) closes; a given client belongs to the caller."""

    redis: aioredis.Redis

    def __init__(self, settings: Settings, redis: aioredis.Redis | None) -> None:
        self._owns_client = redis is None
        self.redis = connect_redis_of(settings) if redis is None else redis

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
