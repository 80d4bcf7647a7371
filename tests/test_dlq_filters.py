"""``leadstage dlq replay --error-code C --account A --since DURATION``, as a real subprocess.

The dead letters come from the real path: the worker applying changes to the fake iVvy, which
refuses updates of a stage it does not have (24320) and of its built-in stages (24321).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import redis.asyncio as aioredis

from tests.console_support import MISSING_STAGE, console_settings, enqueue
from tests.harness import read_events, wait_for_terminal
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

pytestmark = pytest.mark.system  # runs leadstage commands as processes


async def leadstage(settings: Settings, *args: str) -> tuple[int, list[dict[str, object]], str]:
    """Run one ``leadstage`` command: exit status, its JSON lines, its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",) and not k.startswith("IVVY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", *args,
        env={**env, "REDIS_URL": settings.redis_url, "LEADSTAGE_LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, [json.loads(line) for line in out.splitlines()], err.decode()


async def test_replay_chooses_dead_letters_by_error_code_account_and_age(
    redis_url: str, fake_ivvy: RunningFakeIvvy, redis_client: aioredis.Redis
) -> None:
    settings = console_settings(redis_url, fake_ivvy.url)
    await enqueue(redis_client, settings, {"id": MISSING_STAGE, "name": "Later"}, "missing-1")
    await enqueue(redis_client, settings, {"id": MISSING_STAGE, "colour": "#123456"}, "missing-2")
    await enqueue(redis_client, settings, {"id": 1, "name": "Quoted!"}, "builtin")
    await enqueue(redis_client, settings, {"id": 1, "name": "Elsewhere"}, "other-1", account="other")
    async with running_worker(settings):
        await wait_for_terminal(redis_client, ["missing-1", "missing-2", "builtin", "other-1"])

    status, lines, err = await leadstage(settings, "dlq", "replay", "--error-code", "24320", "--account", "default")
    assert status == 0, err
    assert sorted((line["idempotency_key"], line["status"]) for line in lines) == [
        ("missing-1", "queued"), ("missing-2", "queued"),
    ]  # fmt: skip
    assert "replayed 2 dead letter(s)" in err
    left = {(e["account"], e["idempotency_key"]) for e in await read_events(redis_client, settings.dlq_stream)}
    assert left == {("default", "builtin"), ("other", "other-1")}

    # --since alone chooses as --all does, of every account unless --account narrows it.
    status, lines, err = await leadstage(settings, "dlq", "replay", "--since", "1h", "--account", "other")
    assert (status, [line["idempotency_key"] for line in lines]) == (0, ["other-1"]), err
    status, lines, err = await leadstage(settings, "dlq", "replay", "--error-code", "no-such-code")
    assert (status, lines) == (0, [])
    assert "replayed 0 dead letter(s)" in err
    assert await redis_client.xlen(settings.dlq_stream) == 1


async def test_bad_filters_are_refused_before_anything_is_done(
    redis_url: str, fake_ivvy: RunningFakeIvvy, redis_client: aioredis.Redis
) -> None:
    settings = console_settings(redis_url, fake_ivvy.url)
    status, lines, err = await leadstage(settings, "dlq", "replay", "--since", "yesterday")
    assert (status, lines) == (2, [])
    assert "since must be a duration such as 90s, 15m, 2h or 7d" in err
    status, _, err = await leadstage(settings, "dlq", "replay", "some-key", "--error-code", "24320")
    assert status == 2
    assert "not both" in err
