"""Shared fixtures: a real Redis (a database of its own, flushed per test) and real servers on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

#: Tests use their own database of the Redis on 127.0.0.1:6379 (scripts/setup.sh starts one).
TEST_REDIS_URL = os.environ.get("LEADSTAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@pytest.fixture
def redis_url() -> str:
    return TEST_REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A connection to the test database, emptied before and after the test."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()
