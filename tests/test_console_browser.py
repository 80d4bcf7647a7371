"""The console's pages in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Every step waits for a condition on the page (Playwright's ``expect`` polls until it holds),
never for a fixed time. Redis, the worker and the fake iVvy are the real ones, in this event loop.
``LEADSTAGE_CONSOLE_SCREENSHOT=docs/console.png`` saves the README's screenshot (the Failures page).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.console_support import (
    MISSING_STAGE,
    TOKEN,
    console_settings,
    create_missing_stage,
    enqueue,
    queue_with_one_claimed,
    retried_then_applied,
)
from tests.harness import eventually, read_events, wait_for_terminal
from worker.core import keys
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

pytestmark = pytest.mark.system  # starts a Chromium

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
CHROMIUM_PRESENT = Path(CHROMIUM).exists()
#: How long a page condition may take to hold (the pages poll the API every 2 s).
WAIT_MS = 20_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM_PRESENT:
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium when run as root")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    try:
        yield await context.new_page()
    finally:
        await context.close()


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    return console_settings(redis_url, fake_ivvy.url)


async def log_in(page: Page, console: str, path: str) -> None:
    """Open ``path``: the console sends the browser to the login form, then back to ``path``."""
    await page.goto(console + path)
    await page.fill("#token", TOKEN)
    await page.click("#login")
    await expect(page).to_have_url(console + path)


async def test_a_request_without_the_token_is_refused(page: Page, console: str) -> None:
    await page.goto(console + "/failures")
    await expect(page).to_have_url(re.compile(r"/login\?next=%2Ffailures$"))
    assert await page.evaluate("fetch('/api/v1/overview').then(r => r.status)") == 401
    await page.fill("#token", "not-the-console-token")
    await page.click("#login")
    await expect(page.locator("#login-error")).to_have_text("That token is not valid.")
    await page.fill("#token", TOKEN)
    await page.click("#login")
    await expect(page).to_have_url(console + "/failures")
    assert await page.evaluate("fetch('/api/v1/overview').then(r => r.status)") == 200
    [cookie] = await page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert await page.evaluate("document.cookie") == ""  # no script of the page can read it


async def expected_counts(redis_client: aioredis.Redis, settings: Settings, account: str) -> dict[str, int]:
    """What Redis holds for one account, read here directly: queued and due from the queue."""
    now_ms = time.time() * 1000
    entries = await redis_client.zrange(keys.queue_key(settings.queue_name, account), 0, -1, withscores=True)
    mine = [score for member, score in entries if keys.split_job_id(member.decode())[0] == account]
    return {"queued": len(mine), "due": sum(1 for score in mine if score <= now_ms)}


async def test_the_overview_shows_the_numbers_redis_holds(
    page: Page, console: str, settings: Settings, redis_client: aioredis.Redis
) -> None:
    await queue_with_one_claimed(redis_client, settings, "a1", "a2", "a3", "a4")
    await log_in(page, console, "/")
    for account, in_progress in (("default", 1), ("other", 0)):
        row = page.locator(f'#accounts tr[data-account="{account}"]')
        counts = await expected_counts(redis_client, settings, account)
        await expect(row.locator('[data-field="queued"]')).to_have_text(str(counts["queued"]))
        await expect(row.locator('[data-field="due"]')).to_have_text(str(counts["due"]))
        await expect(row.locator('[data-field="in_progress"]')).to_have_text(str(in_progress))
        await expect(row.locator('[data-field="dead_letters"]')).to_have_text("0")
    assert (await expected_counts(redis_client, settings, "default")) == {"queued": 4, "due": 3}
    await expect(page.locator("#no-workers")).to_be_visible()


async def test_a_dead_letter_is_replayed_from_the_failures_page_and_then_succeeds(
    page: Page, console: str, settings: Settings, redis_client: aioredis.Redis, fake_ivvy: RunningFakeIvvy
) -> None:
    await enqueue(redis_client, settings, {"id": MISSING_STAGE, "name": "Renamed"}, "missing-1")
    await enqueue(redis_client, settings, {"id": 1, "name": "Quoted!"}, "builtin")
    await enqueue(redis_client, settings, {"id": 2, "colour": "#00ff00"}, "builtin-2")
    for key in ("s1", "s2", "s3"):
        await enqueue(redis_client, settings, {"name": f"Stage {key}", "applyTo": "lead"}, key)
    async with running_worker(settings):
        await wait_for_terminal(redis_client, ["missing-1", "builtin", "builtin-2", "s1", "s2", "s3"])
        create_missing_stage(fake_ivvy.fake)  # the stage missing-1 updates exists now

        await log_in(page, console, "/failures")
        row = page.locator('#dead-letters tr[data-key="missing-1"]')
        await expect(row.locator('[data-field="error_code"]')).to_have_text("24320")
        group = page.locator("#groups tbody tr", has_text="24320")
        await expect(group.locator('[data-field="dead_letters"]')).to_have_text("1")
        builtins = page.locator("#groups tbody tr", has_text="24321")
        await expect(builtins.locator('[data-field="dead_letters"]')).to_have_text("2")
        target = os.environ.get("LEADSTAGE_CONSOLE_SCREENSHOT")
        if target:
            await page.screenshot(path=target, full_page=True)
        await row.get_by_role("button", name="Replay").click()
        await expect(page.locator("#confirm")).to_be_visible()
        await expect(page.locator("#confirm-text")).to_contain_text("missing-1")
        await page.click("#confirm-ok")
        await expect(page.locator("#outcome-list li")).to_have_text("default / missing-1: queued")

        async def succeeded() -> bool:
            events = await read_events(redis_client)
            return any(e["idempotency_key"] == "missing-1" and e["event"] == "succeeded" for e in events)

        await eventually(succeeded, within_s=20)
        await expect(row).to_have_count(0)
        await expect(page.locator('#dead-letters tr[data-key="builtin"]')).to_have_count(1)
        assert fake_ivvy.fake.stages[MISSING_STAGE].name == "Renamed"

        # A selection, then everything matching a filter (code 24321), discarded.
        await page.fill("#filter input[name=error_code]", "24321")
        await page.click("#filter button[type=submit]")
        await expect(page).to_have_url(console + "/failures?error_code=24321")
        await expect(page.locator("#matching")).to_have_text("(2 matching)")
        await page.locator('#dead-letters tr[data-key="builtin-2"] input.pick').check()
        await expect(page.locator("#discard-selected")).to_have_text("Discard selected (1)")
        await page.click("#discard-selected")
        await expect(page.locator("#confirm-text")).to_have_text("Discard 1 dead letter(s): builtin-2?")
        await page.click("#confirm-ok")
        await expect(page.locator("#outcome-list li")).to_have_text("default / builtin-2: discarded")
        await expect(page.locator("#matching")).to_have_text("(1 matching)")
        await page.click("#discard-matching")
        await expect(page.locator("#confirm-text")).to_have_text("Discard every dead letter matching error_code 24321?")
        await page.click("#confirm-ok")
        await expect(page.locator("#outcome-list li")).to_have_text("default / builtin: discarded")
        await expect(page.locator("#no-dead-letters")).to_be_visible()
        assert await redis_client.xlen(settings.dlq_stream) == 0

        await page.click("text=Overview")
        await expect(page.locator('#accounts tr[data-account="default"] [data-field="dead_letters"]')).to_have_text("0")
        await expect(page.locator("#succeeded-hour")).to_have_text("4")
        await expect(page.locator("#failed-hour")).to_have_text("3")
        await expect(page.locator("#workers tbody tr")).to_have_count(1)


async def test_a_changes_timeline_shows_its_attempts(
    page: Page, console: str, settings: Settings, redis_client: aioredis.Redis, fake_ivvy: RunningFakeIvvy
) -> None:
    await retried_then_applied(redis_client, settings, fake_ivvy, {"name": "Timeline", "applyTo": "lead"}, "t1")
    attempts = [e for e in await read_events(redis_client) if e["idempotency_key"] == "t1"]

    await log_in(page, console, "/changes")
    await page.fill("#key", "t1")
    await page.click("#search button[type=submit]")
    await expect(page.locator("#change-state")).to_have_text("succeeded")
    rows = page.locator("#timeline tbody tr")
    await expect(rows).to_have_count(1 + len(attempts))
    await expect(rows.nth(0)).to_have_attribute("data-kind", "enqueued")
    for index, event in enumerate(attempts, start=1):
        await expect(rows.nth(index).locator('[data-field="what"]')).to_have_text(
            f"attempt {event['attempt']}: {event['event']}"
        )
        await expect(rows.nth(index).locator('[data-field="http_status"]')).to_have_text(event["http_status"] or "-")
        await expect(rows.nth(index).locator('[data-field="duration_ms"]')).to_have_text(event["duration_ms"])
    last = rows.nth(len(attempts))
    await last.locator("summary").click()
    await expect(last.locator("details pre")).to_contain_text('"event": "succeeded"')
    await expect(page.locator("#change-json")).to_contain_text('"name": "Timeline"')
    await expect(page).to_have_url(console + "/changes?key=t1&account=default")
