"""``run_demo``: set up the embedded default, play the samples, print the summary; the exit status."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TextIO

from producers import LeadStageProducer
from worker.core.errors import LeadstageError
from worker.core.logs import configure_logging
from worker.core.processes import until_signalled
from worker.core.redis_connection import connect_redis_or_cluster
from worker.core.redis_url import printable_url
from worker.core.settings import Settings
from worker.devtools.demo.embedded import (
    DEMO_DLQ,
    DEMO_QUEUE,
    DEMO_RESULTS,
    answers,
    clear_demo_keys,
    demo_credentials,
    own_redis_server,
    settings_for_demo,
    start_metrics,
)
from worker.devtools.demo.printer import Printer
from worker.devtools.demo.samples import SAMPLES_DEADLINE_S, DemoRun
from worker.devtools.fake_ivvy import DEFAULT_HOST, running_fake_ivvy
from worker.runner import running_worker

#: The fake's fault draws are seeded, so a rerun answers the same way.
FAKE_SEED: Final = 2026


@dataclass
class _Status:
    """The exit status, once the summary has decided it (a signal during --keep-running keeps it)."""

    code: int | None = None


async def _demo(settings: Settings, keep_running: bool, printer: Printer, status: _Status) -> int:
    """Set up the embedded default (Redis, fake iVvy, worker, metrics), play the samples, summarise."""
    async with contextlib.AsyncExitStack() as stack:
        redis_url, own_redis = settings.redis_url, not await answers(settings.redis_url)
        if own_redis:
            redis_url = await stack.enter_async_context(own_redis_server(settings.redis_url))
        client = connect_redis_or_cluster(redis_url)
        stack.push_async_callback(client.aclose)
        await clear_demo_keys(client)
        key, secret = credentials = demo_credentials(settings)
        server = await stack.enter_async_context(
            running_fake_ivvy(DEFAULT_HOST, 0, credentials={key: secret}, seed=FAKE_SEED)
        )
        demo_settings = settings_for_demo(settings, redis_url, server.url, credentials)
        worker_task = await stack.enter_async_context(running_worker(demo_settings))

        printer.line("leadstage demo: the change job end to end, on an embedded default", "bold")
        if own_redis:
            unanswered = printable_url(settings.redis_url)
            printer.line(
                f"  Redis    nothing answers at {unanswered}: started redis-server on {printable_url(redis_url)}"
            )
        else:
            printer.line(f"  Redis    {printable_url(redis_url)}")
        printer.line(f"           queue {DEMO_QUEUE}, results {DEMO_RESULTS}, dead letters {DEMO_DLQ}")
        printer.line(f"  iVvy     the fake, at {server.url}")
        printer.line(
            f"  worker   in this process: {demo_settings.rate_limit:g} requests/s, backoff base "
            f"{demo_settings.backoff_base_s:g} s, request timeout {demo_settings.request_timeout_s:g} s"
        )
        metrics_url = start_metrics(settings.metrics_port, printer, stack)
        if metrics_url:
            printer.line(f"  metrics  {metrics_url}")

        run = DemoRun(LeadStageProducer(demo_settings, redis=client), server.fake, printer, worker_task)
        settled = True
        try:
            async with asyncio.timeout(SAMPLES_DEADLINE_S) as deadline:
                await run.play()
        except TimeoutError:
            if not deadline.expired():
                raise
            run.report_missing()
            settled = False
        where = (
            f"the demo's own Redis ({printable_url(redis_url)}, stopped at exit)"
            if own_redis
            else printable_url(redis_url)
        )
        as_expected = await run.summarise(where, metrics_url)
        status.code = 0 if settled and as_expected else 1
        if keep_running:
            printer.line()
            printer.line(
                f"Still serving (--keep-running): the fake iVvy at {server.url}, the worker"
                + (f" and {metrics_url}" if metrics_url else "")
                + ". Ctrl-C or SIGTERM stops them."
            )
            await asyncio.Event().wait()
        return status.code


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_demo(settings: Settings, *, keep_running: bool = False, out: TextIO = sys.stdout) -> int:
    """``leadstage demo``: run the samples, print their results and a summary; the exit status.

    0 when every sample ended as expected, 1 otherwise (or when the demo cannot run: one line on
    stderr says why), 130 when interrupted before the summary. ``keep_running`` keeps the fake
    iVvy, the worker and the metrics endpoint up after the summary until SIGINT/SIGTERM.
    """
    status = _Status()
    try:
        # WARNING, so the worker's lines do not drown the demo's; LEADSTAGE_LOG_LEVEL when it is set.
        configure_logging(settings, level=settings.log_level or "warning")
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(until_signalled(_demo(settings, keep_running, Printer(out), status)))
    except LeadstageError as error:
        print(f"leadstage: error: {error}", file=sys.stderr)
        return 1
    if code is None:  # a signal: 130, unless the summary had already decided
        return 130 if status.code is None else status.code
    return code
