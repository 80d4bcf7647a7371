"""``leadstage demo``: the product's main job, end to end, on an embedded default.

One command shows what leadstage-sync does without any set-up beyond a Redis: a fake iVvy
(``worker.devtools.fake_ivvy``) and a worker run in this process, sample changes go through the producer
library, and every result is printed as it arrives on the results stream:

1. adds, a change the producer refuses (it never reaches the queue), a duplicate enqueue of the
   same key, and an update of a built-in stage that iVvy refuses (24321: dead-lettered);
2. an update of the stage the first add created;
3. iVvy misbehaving for one change (5xx, then 429 with Retry-After), retried with backoff.

Then a summary, with the Prometheus series the run moved. The exit status says whether every
sample ended as expected, so the demo doubles as a smoke test of a deployment's Redis.

Isolation: a demo may be pointed at a production Redis, so it never shares a key with
production. Its queue and streams have their own names, its changes belong to their own account
(``DEMO_ACCOUNT``: stage ordering, locks, claims and the rate limiter are per account), and its
idempotency keys carry a per-run prefix. Its keys are cleared at the start of each run, so reruns
are deterministic, and left at the end, so the results and dead letters can be inspected.

Redis: ``REDIS_URL``; when nothing answers there and ``redis-server`` is on PATH, the demo runs
its own on a free loopback port, in a temporary directory, and stops it at the end (also on an
error, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import redis.asyncio as aioredis

from producers import LeadStageProducer
from worker.core import keys, metrics
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import (
    ConfigError,
    DemoFailed,
    InvalidChange,
    LeadstageError,
    RedisCredentialsRefused,
    RedisUnavailable,
    redis_errors,
)
from worker.core.logs import configure_logging
from worker.core.processes import Children, RedisServer, until_signalled
from worker.core.redis_connection import connect_redis, ping, printable_url
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings
from worker.core.states import TERMINAL
from worker.devtools.fake_ivvy import DEFAULT_HOST, FakeIvvy, Faults, running_fake_ivvy
from worker.runner import running_worker

__all__ = ["DEMO_ACCOUNT", "DEMO_DLQ", "DEMO_QUEUE", "DEMO_RESULTS", "run_demo"]

#: The demo's own names (see the module docstring: it never shares a key with production).
DEMO_ACCOUNT: Final = "leadstage-demo"
DEMO_QUEUE: Final = "leadstage:demo:queue"
DEMO_RESULTS: Final = "leadstage:demo:results"
DEMO_DLQ: Final = "leadstage:demo:dlq"

#: Every sample must have settled by then; with its start-up the demo stays well under 30 s.
SAMPLES_DEADLINE_S: Final = 20.0
#: How long a redis-server the demo started may take to answer.
REDIS_START_TIMEOUT_S: Final = 5.0
#: How long "does Redis answer at REDIS_URL?" may take (an unroutable host would hang otherwise).
REDIS_PROBE_TIMEOUT_S: Final = 2.0
#: The fake's fault draws are seeded, so a rerun answers the same way.
FAKE_SEED: Final = 2026

#: Requests per second to the fake: the shared rate limiter at work, without slowing the demo.
DEMO_RATE_LIMIT: Final = 20.0
#: The demo's ledger entries are throw-away: they expire after an hour, not the production 24 h.
DEMO_LEDGER_RETENTION_S: Final = 3600

#: What the fake does to the retried change, one step per ``retrying`` event: (what is said, faults).
RETRY_SCRIPT: Final[tuple[tuple[str, Mapping[str, object]], ...]] = (
    ("fake iVvy: every request now answers 500/502/503", {"error_rate": 1.0}),
    (
        "fake iVvy: every request now answers 429 with Retry-After: 1",
        {"error_rate": 0.0, "rate_limit_rate": 1.0, "retry_after_s": 1},
    ),
    ("fake iVvy: healthy again", {"rate_limit_rate": 0.0}),
)

#: iVvy's error text without the status and code the line shows in columns of its own.
_IVVY_PREFIX = re.compile(r"^iVvy answered \d+(?: \(specific code \d+\))?: ")

Expectation = Literal["succeeded", "not_editable", "retried", "refused", "duplicate"]


# -- output --------------------------------------------------------------------------------------

_STYLES: Final = {"green": "32", "yellow": "33", "red": "31", "magenta": "35", "cyan": "36", "dim": "2", "bold": "1"}

#: kind -> (mark, ASCII fallback, style) of the lines about one change.
_MARKS: Final = {
    "queued": ("→", "->", "dim"),
    "succeeded": ("✔", "ok", "green"),
    "retrying": ("↻", "..", "yellow"),
    "failed": ("✘", "xx", "red"),
    "superseded": ("≈", "~~", "dim"),
    "refused": ("⊘", "!!", "magenta"),
    "duplicate": ("≡", "==", "cyan"),
}


class Printer:
    """The demo's readable lines: aligned columns, colour only on a terminal (and not under NO_COLOR)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        try:
            self.colour = bool(out.isatty()) and "NO_COLOR" not in os.environ
        except (AttributeError, OSError, ValueError):  # a closed or unusual stream is no terminal
            self.colour = False
        # A terminal or pipe that cannot show the marks (a Latin-1 locale) gets ASCII ones.
        try:
            "".join(mark for mark, _, _ in _MARKS.values()).encode(getattr(out, "encoding", None) or "utf-8")
            self.unicode = True
        except (UnicodeEncodeError, LookupError):
            self.unicode = False

    def paint(self, text: str, style: str) -> str:
        return f"\x1b[{_STYLES[style]}m{text}\x1b[0m" if self.colour else text

    def line(self, text: str = "", style: str | None = None) -> None:
        self.out.write((self.paint(text, style) if style else text) + "\n")
        self.out.flush()

    def heading(self, text: str) -> None:
        self.line()
        self.line(text, "bold")

    def note(self, text: str) -> None:
        self.line(f"    {text}", "dim")

    def change(self, kind: str, operation: str, subject: str, detail: str) -> None:
        """One line about one change: mark and kind, operation, subject, then what happened."""
        mark, ascii_mark, style = _MARKS[kind]
        head = self.paint(f"{mark if self.unicode else ascii_mark} {kind:<10}", style)
        self.line(f"  {head} {operation:<7} {subject:<26} {detail}".rstrip())


# -- the samples ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sample change, what the demo expects of it, and what happened to it."""

    change: Mapping[str, object]
    key: str
    expect: Expectation
    receipt: str | None = None
    refused: str | None = None
    events: list[dict[str, str]] = field(default_factory=list)
    dead_lettered: bool = False

    @property
    def operation(self) -> str:
        return "update" if "id" in self.change else "add"

    @property
    def subject(self) -> str:
        if "id" not in self.change:
            return f'"{self.change.get("name", "")}"'
        fields = ", ".join(name for name in self.change if name != "id")
        return f"stage {self.change['id']} ({fields})"

    @property
    def terminal(self) -> dict[str, str] | None:
        return next((e for e in reversed(self.events) if e["event"] in TERMINAL), None)

    @property
    def retries(self) -> int:
        return sum(1 for e in self.events if e["event"] == "retrying")

    @property
    def settled(self) -> bool:
        """Nothing more will happen to it: refused, a duplicate, or a terminal event arrived."""
        return self.refused is not None or self.receipt == "duplicate" or self.terminal is not None

    @property
    def stage_id(self) -> int | None:
        terminal = self.terminal
        if terminal is None or terminal["event"] != "succeeded" or not terminal["stage_id"]:
            return None
        return int(terminal["stage_id"])

    @property
    def outcome(self) -> str:
        """How it ended (so far): refused, duplicate, its terminal event, or where it waits."""
        if self.refused is not None:
            return "refused"
        if self.events:
            return (self.terminal or self.events[-1])["event"]
        return self.receipt or "not enqueued"

    def as_expected(self) -> bool:
        match self.expect:
            case "succeeded":
                return self.outcome == "succeeded"
            case "retried":
                return self.outcome == "succeeded" and self.retries > 0
            case "not_editable":
                # iVvy's "not editable" answer, and the change kept in the dead-letter stream.
                code = (self.terminal or {}).get("error_code")
                return self.outcome == "failed" and code == "24321" and self.dead_lettered
            case "refused" | "duplicate":
                return self.outcome == self.expect

    def whereabouts(self) -> str:
        """Where it stands, for a timeout report."""
        if not self.events:
            return f"{self.receipt or 'not enqueued'}, no result yet"
        last = self.events[-1]
        return f"last result {last['event']} (attempt {last['attempt']}, {last['error_code'] or 'no error'})"


def _event_detail(event: Mapping[str, str]) -> str:
    """The columns after the subject for one results-stream event."""
    stage = f"stage {event['stage_id']}" if event["stage_id"] else ""
    timing = f"{stage:<11} attempt {event['attempt']:<2} {event['duration_ms']:>5} ms"
    if event["event"] == "superseded":
        return "nothing sent: a later change overtook every field"
    if not event["error_code"]:
        return timing
    message = _IVVY_PREFIX.sub("", event["error_message"])
    error = " ".join(part for part in (event["http_status"], event["error_code"]) if part)
    tail = " (dead-lettered)" if event["event"] == "failed" else ""
    return f"{timing}  {error}: {message}{tail}"


class DemoRun:
    """The sample changes of one run: enqueue them phase by phase and follow their results."""

    def __init__(
        self,
        producer: LeadStageProducer,
        fake: FakeIvvy,
        printer: Printer,
        worker_task: asyncio.Task[Any],
    ) -> None:
        self.producer = producer
        self.redis: aioredis.Redis = producer.redis
        self.settings = producer.settings
        self.fake = fake
        self.printer = printer
        self.worker_task = worker_task
        self.prefix = f"demo-{uuid.uuid4().hex[:6]}-"
        self.samples: list[Sample] = []
        #: idempotency key -> the sample whose results arrive under it (a duplicate has none of its own).
        self.by_key: dict[str, Sample] = {}
        self.last_entry = "0-0"

    async def play(self) -> None:
        """The three phases; each waits for its results, as the next one builds on them."""
        self.printer.heading("1. Adds, a change the producer refuses, a duplicate, and a stage iVvy will not edit")
        referral_change = {"name": "Referral", "applyTo": "lead", "colour": "#1F77B4"}
        referral = await self.enqueue("referral", referral_change, "succeeded")
        await self.enqueue("trade-show", {"name": "Trade show", "applyTo": "opportunity"}, "succeeded")
        await self.enqueue("bad-input", {"name": "  ", "applyTo": "customer", "colour": "red"}, "refused")
        await self.enqueue("referral", referral_change, "duplicate")
        await self.enqueue("quoted", {"id": 1, "name": "Quoted (renamed)"}, "not_editable")
        await self.follow()

        self.printer.heading("2. An update of the stage the first add created")
        if referral.stage_id is None:
            self.printer.note("skipped: the add did not succeed")
        else:
            await self.enqueue("referral-update", {"id": referral.stage_id, "colour": "#2CA02C"}, "succeeded")
            await self.follow()

        self.printer.heading("3. iVvy misbehaves for one change: retried with backoff, honouring Retry-After")
        script = iter(RETRY_SCRIPT)

        def next_fault() -> None:
            step = next(script, None)
            if step is not None:
                self.printer.note(step[0])
                self.fake.update_faults(step[1])

        next_fault()
        try:
            await self.enqueue("webinar", {"name": "Webinar", "applyTo": "lead"}, "retried")
            await self.follow(on_retrying=next_fault)
        finally:
            self.fake.update_faults(Faults().as_dict())

    async def enqueue(self, name: str, change: Mapping[str, object], expect: Expectation) -> Sample:
        """Enqueue one sample through the producer library and say what the producer answered."""
        sample = Sample(change, self.prefix + name, expect)
        self.samples.append(sample)
        try:
            receipt = await self.producer.enqueue(change, idempotency_key=sample.key, account=DEMO_ACCOUNT)
        except InvalidChange as error:
            sample.refused = str(error)
            self.printer.change("refused", sample.operation, sample.subject, "InvalidChange, never queued:")
            for reason in error.errors:
                self.printer.note(f"  {reason}")
            return sample
        sample.receipt = receipt.status
        self.by_key.setdefault(sample.key, sample)
        if receipt.status == "duplicate":
            detail = f"key {sample.key} is already known: nothing queued again"
        else:
            detail = f"key {sample.key}"
        self.printer.change(receipt.status, sample.operation, sample.subject, detail)
        return sample

    async def follow(self, on_retrying: Callable[[], None] | None = None) -> None:
        """Print results as they arrive (XREAD BLOCK) until every sample so far has settled."""
        while not all(sample.settled for sample in self.samples):
            if self.worker_task.done():
                error = None if self.worker_task.cancelled() else self.worker_task.exception()
                raise DemoFailed(f"the worker stopped: {error or 'cancelled'}")
            with redis_errors():
                answer = await self.redis.xread({self.settings.results_stream: self.last_entry}, count=100, block=250)
            for _, entries in answer:
                for entry_id, raw in entries:
                    self.last_entry = entry_id
                    event = {k.decode(): v.decode() for k, v in raw.items()}
                    sample = self.by_key.get(event["idempotency_key"])
                    if sample is None:
                        continue
                    sample.events.append(event)
                    self.printer.change(event["event"], sample.operation, sample.subject, _event_detail(event))
                    if event["event"] == "retrying" and on_retrying is not None:
                        on_retrying()

    def report_missing(self) -> None:
        """After the deadline: which samples never settled, and their last known state."""
        self.printer.line()
        self.printer.line(f"Timed out after {SAMPLES_DEADLINE_S:g} s; still waiting for:", "red")
        for sample in self.samples:
            if not sample.settled:
                self.printer.line(f"  {sample.operation} {sample.subject} (key {sample.key}): {sample.whereabouts()}")

    async def summarise(self, redis_where: str, metrics_url: str | None) -> bool:
        """Print the summary; True when every sample ended as expected."""
        with redis_errors():
            dead = await self.redis.xrange(self.settings.dlq_stream)
        dead_keys = {fields.get(b"idempotency_key", b"").decode() for _, fields in dead}
        for sample in self.samples:
            sample.dead_lettered = sample.key in dead_keys
        queued = list(self.by_key.values())
        outcomes = [s.outcome for s in self.samples]
        p = self.printer
        p.heading("Summary")
        p.line(
            f"  {outcomes.count('succeeded')} succeeded, {outcomes.count('failed')} failed, "
            f"{sum(1 for s in queued if s.retries)} retried ({sum(s.retries for s in queued)} retries); "
            f"{outcomes.count('refused')} refused by the producer, {outcomes.count('duplicate')} duplicate"
        )
        p.line(f"  results:      stream {self.settings.results_stream} on {redis_where}")
        entries = f"{len(dead)} {'entry' if len(dead) == 1 else 'entries'}"
        p.line(f"  dead letters: stream {self.settings.dlq_stream} on {redis_where} ({entries})")
        p.line(f"  metrics:      {metrics_url or 'no endpoint'}; the series this run moved:")
        for series in _metric_lines():
            p.line(f"    {series}", "dim")
        unexpected = [s for s in self.samples if not s.as_expected()]
        if not unexpected:
            p.line(f"  Every sample ended as expected ({len(self.samples)} samples).", "green")
            return True
        for sample in unexpected:
            got = f"expected {sample.expect}, got {sample.outcome}"
            p.line(f"  Not as expected: {sample.operation} {sample.subject}: {got}", "red")
        return False


_METRIC_SERIES: Final = (
    "leadstage_changes_total{",
    "leadstage_attempts_total{",
    "leadstage_ivvy_request_seconds_count{",
)


def _metric_lines() -> list[str]:
    """This process's samples of the series the demo is about (its registry holds only the demo's)."""
    body, _ = metrics.render_latest()
    return [line for line in body.decode().splitlines() if line.startswith(_METRIC_SERIES)]


# -- the embedded default --------------------------------------------------------------------------


async def _answers(url: str) -> bool:
    """Whether a Redis answers at ``url``; one that answers but refuses us is a ``DemoFailed``."""
    client = connect_redis(url)
    try:
        await ping(client, REDIS_PROBE_TIMEOUT_S)
    except RedisCredentialsRefused as error:  # a RedisUnavailable: before it
        raise DemoFailed(f"the Redis at {printable_url(url)} (REDIS_URL) refused the demo: {error}") from None
    except RedisUnavailable:
        return False
    finally:
        await client.aclose()
    return True


@contextlib.asynccontextmanager
async def _own_redis_server(unanswered_url: str) -> AsyncIterator[str]:
    """A redis-server of the demo's own, on a free loopback port, without persistence; stopped on exit."""
    if shutil.which("redis-server") is None:
        raise DemoFailed(
            f"nothing answers at {printable_url(unanswered_url)} (REDIS_URL) and redis-server is not on PATH: "
            "start a Redis or point REDIS_URL at one"
        )
    with tempfile.TemporaryDirectory(prefix="leadstage-demo-redis-") as directory:
        children = Children(Path(directory))
        try:
            # A session of its own: Ctrl-C reaches the demo only, which stops the worker before Redis.
            server = RedisServer(children, Path(directory, "data"), new_session=True)
            await asyncio.to_thread(server.start, REDIS_START_TIMEOUT_S)
            yield server.url
        finally:
            await asyncio.to_thread(children.close)


async def _clear_demo_keys(client: aioredis.Redis) -> None:
    """Delete what earlier demos left: the demo's queue, streams and every key of its account.

    One SCAN pass, then an exact prefix check, so that no production key is ever touched.
    """
    prefixes = tuple(
        prefix + keys.tag(DEMO_ACCOUNT) + ":"
        for prefix in (keys.LEDGER_PREFIX, keys.STAGE_PREFIX, keys.STAGE_LOCK_PREFIX)
    )
    doomed = [DEMO_QUEUE, DEMO_RESULTS, DEMO_DLQ, keys.claims_key(DEMO_ACCOUNT), keys.rate_key(DEMO_ACCOUNT)]
    doomed += [keys.newest_claim_key(DEMO_ACCOUNT), keys.queue_key(DEMO_QUEUE, DEMO_ACCOUNT)]
    doomed += [keys.ready_key(DEMO_QUEUE), keys.wake_key(DEMO_QUEUE), keys.epoch_key(DEMO_QUEUE)]
    with redis_errors():
        async for raw in client.scan_iter(match="leadstage:*" + keys.tag(DEMO_ACCOUNT) + ":*", count=1000):
            if raw.decode(errors="replace").startswith(prefixes):
                doomed.append(raw)
        for start in range(0, len(doomed), 500):
            await client.unlink(*doomed[start : start + 500])


def _demo_credentials(settings: Settings) -> tuple[str, str]:
    """The default account's key and secret when one is configured, else the fake's demo pair."""
    account = settings.account(DEFAULT_ACCOUNT)
    if account is None:
        return DEMO_API_KEY, DEMO_API_SECRET
    return account.api_key, account.api_secret.get()


def _demo_settings(settings: Settings, redis_url: str, ivvy_url: str, credentials: tuple[str, str]) -> Settings:
    """``settings`` with the demo's names, its one account (at the fake) and its fast timings."""
    key, secret = credentials
    account = Account(DEMO_ACCOUNT, ivvy_url, key, Secret(secret), DEMO_RATE_LIMIT)
    return dataclasses.replace(
        settings,
        redis_url=redis_url,
        accounts={DEMO_ACCOUNT: account},
        queue_name=DEMO_QUEUE,
        results_stream=DEMO_RESULTS,
        dlq_stream=DEMO_DLQ,
        ledger_retention_s=DEMO_LEDGER_RETENTION_S,
        rate_limit=DEMO_RATE_LIMIT,
        concurrency=10,
        # Fast timings: a retry is seen within a second, not after the production defaults.
        max_attempts=6,
        max_age_s=60.0,
        backoff_base_s=0.2,
        backoff_max_s=2.0,
        request_timeout_s=2.0,
        job_timeout_s=10.0,
        shutdown_grace_s=2.0,
    )


def _start_metrics(port: int, printer: Printer, stack: contextlib.AsyncExitStack) -> str | None:
    """The metrics endpoint on loopback at ``port``, if it is free; the demo goes on without it otherwise."""
    try:
        server = metrics.start_metrics_server(port, host="127.0.0.1")
    except ConfigError as error:
        printer.note(f"no metrics endpoint: {error}")
        return None
    if server is None:
        printer.note("no metrics endpoint: LEADSTAGE_METRICS_PORT is 0")
        return None
    stack.callback(server.close)
    return f"http://127.0.0.1:{server.port}/metrics"


@dataclass
class _Status:
    """The exit status, once the summary has decided it (a signal during --keep-running keeps it)."""

    code: int | None = None


async def _demo(settings: Settings, keep_running: bool, printer: Printer, status: _Status) -> int:
    """Set up the embedded default (Redis, fake iVvy, worker, metrics), play the samples, summarise."""
    async with contextlib.AsyncExitStack() as stack:
        redis_url, own_redis = settings.redis_url, not await _answers(settings.redis_url)
        if own_redis:
            redis_url = await stack.enter_async_context(_own_redis_server(settings.redis_url))
        client = connect_redis(redis_url)
        stack.push_async_callback(client.aclose)
        await _clear_demo_keys(client)
        key, secret = credentials = _demo_credentials(settings)
        server = await stack.enter_async_context(
            running_fake_ivvy(DEFAULT_HOST, 0, credentials={key: secret}, seed=FAKE_SEED)
        )
        demo_settings = _demo_settings(settings, redis_url, server.url, credentials)
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
        metrics_url = _start_metrics(settings.metrics_port, printer, stack)
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
