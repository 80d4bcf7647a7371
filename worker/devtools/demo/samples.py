"""The demo's sample changes: what each is expected to do, enqueueing them, following their results."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from producers import LeadStageProducer
from worker.core import metrics
from worker.core.errors import DemoFailed, InvalidChange, redis_errors
from worker.core.states import TERMINAL
from worker.devtools.demo.embedded import DEMO_ACCOUNT
from worker.devtools.demo.printer import Printer
from worker.devtools.fake_ivvy import FakeIvvy, Faults

#: Every sample must have settled by then; with its start-up the demo stays well under 30 s.
SAMPLES_DEADLINE_S: Final = 20.0

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
        self.redis = producer.redis
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
        await _counted(outcomes.count("succeeded"), outcomes.count("failed"))
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


#: How long the summary waits for the worker to count the outcomes it has already published.
COUNTED_WITHIN_S: Final = 2.0
COUNTED_POLL_S: Final = 0.01


async def _counted(succeeded: int, failed: int) -> None:
    """Until this process's worker has counted the terminal outcomes the demo saw (or a moment has
    passed): on a Redis Cluster it publishes an event a round trip (its outbox's ack) before it counts it."""
    wanted = {"succeeded": succeeded, "failed": failed}
    for _ in range(int(COUNTED_WITHIN_S / COUNTED_POLL_S)):
        if all((metrics.counted_changes(DEMO_ACCOUNT, outcome) or 0) >= n for outcome, n in wanted.items()):
            return
        await asyncio.sleep(COUNTED_POLL_S)


def _metric_lines() -> list[str]:
    """This process's samples of the series the demo is about (its registry holds only the demo's)."""
    body, _ = metrics.render_latest()
    return [line for line in body.decode().splitlines() if line.startswith(_METRIC_SERIES)]
