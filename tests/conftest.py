"""Shared fixtures: a real Redis (a database of its own, flushed per test) and real servers on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from worker.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret

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


@pytest.fixture
async def fake_ivvy() -> AsyncIterator[RunningFakeIvvy]:
    """The fake iVvy on a free loopback port, accepting the demo key and secret, without faults."""
    async with running_fake_ivvy(credentials={DEMO_API_KEY: DEMO_API_SECRET}) as server:
        yield server


@pytest.fixture
def ivvy_account(fake_ivvy: RunningFakeIvvy) -> Account:
    """The default account, pointing at ``fake_ivvy``."""
    return Account("default", fake_ivvy.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), rate_limit=1000.0)
