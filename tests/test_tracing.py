"""Tracing across the queue: a signed webhook with a traceparent, then the worker, in one trace.

In-process pieces export to the SDK's in-memory exporter. Worker processes (to be SIGKILLed) are
configured as an operator would configure them, by OTEL_* variables, exporting OTLP over HTTP to
a collector this test runs (an aiohttp route decoding the protobuf request): the real exporter
and the real wire format, read back without parsing text output.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from producers.openapi import CHANGES_PATH
from producers.webhook import create_app
from tests.harness import (
    eventually,
    reconciling_soon,
    start_worker_process,
    stop_process,
    wait_for_terminal,
    worker_env,
    worker_settings,
)
from tests.test_demo import run_demo
from tests.test_webhook import SECRET, log_stream, settings, signed  # noqa: F401 - fixtures: the webhook's logs
from worker.core import keys, tracing
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.logs import configure_logging, get_logger
from worker.core.settings import DEMO_API_SECRET, Secret, Settings
from worker.devtools.demo import DEMO_RESULTS
from worker.devtools.fake_ivvy import running_fake_ivvy
from worker.runner import running_worker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


_PROVIDERS: list[TracerProvider] = []


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    _PROVIDERS.append(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        _PROVIDERS.remove(provider)
        provider.shutdown()


def exported_tracer() -> Tracer:
    """A tracer of the provider ``exported`` installed (for spans of the test's own)."""
    return _PROVIDERS[-1].get_tracer("test")


@dataclass(frozen=True)
class Span:
    """What the tests read of a span, from the SDK or from OTLP alike."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    links: tuple[str, ...]
    attributes: dict[str, Any] = field(hash=False)


def from_sdk(span: ReadableSpan) -> Span:
    context = span.get_span_context()
    assert context is not None
    return Span(
        span.name,
        span.kind.name,
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
        f"{span.parent.span_id:016x}" if span.parent else "",
        tuple(f"{link.context.span_id:016x}" for link in span.links),
        dict(span.attributes or {}),
    )


def finished(exporter: InMemorySpanExporter) -> list[Span]:
    return [from_sdk(s) for s in exporter.get_finished_spans()]


def webhook_settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, webhook_secret=Secret(SECRET), webhook_max_body_bytes=64 * 1024)


def webhook_client(redis_url: str, redis_client: aioredis.Redis) -> TestClient[Any, Any]:
    """The webhook on a loopback socket (made now: it is traced if tracing is on now)."""
    return TestClient(TestServer(create_app(webhook_settings(redis_url), redis_client), host="127.0.0.1"))


async def stored_trace(redis_client: aioredis.Redis, job_id: str) -> bytes | None:
    """The ledger's trace field of a change."""
    raw: bytes | None = await redis_client.hget(keys.ledger_key(job_id), tracing.LEDGER_FIELD)  # type: ignore[misc]  # redis-py's async stubs
    return raw


async def post_change(client: TestClient[Any, Any], key: str, change: dict[str, object]) -> None:
    body = orjson.dumps(change)
    headers = {**signed(body, msg_id=key), "traceparent": TRACEPARENT}
    response = await client.post(CHANGES_PATH, data=body, headers=headers)
    assert response.status == 202, await response.text()


def no_secret_in(spans: list[Span]) -> None:
    text = json.dumps([s.attributes for s in spans])
    for secret in (DEMO_API_SECRET, SECRET, SECRET.removeprefix("whsec_"), "IWS "):
        assert secret not in text


def producer_side(spans: list[Span]) -> tuple[Span, Span]:
    (server,) = [s for s in spans if s.kind == "SERVER"]
    (producer,) = [s for s in spans if s.kind == "PRODUCER"]
    assert (server.trace_id, server.parent_id) == (TRACE_ID, CALLER_SPAN)
    assert server.attributes["http.response.status_code"] == 202
    assert (producer.trace_id, producer.parent_id) == (TRACE_ID, server.span_id)
    return server, producer


async def test_a_webhook_trace_holds_the_attempts_and_the_ivvy_requests_across_a_retry(
    redis_url: str,
    redis_client: aioredis.Redis,
    exported: InMemorySpanExporter,  # before log_stream: the logging it configures is traced
    log_stream: io.StringIO,  # noqa: F811 - the fixture imported above
) -> None:
    async with (
        running_fake_ivvy() as fake,
        webhook_client(redis_url, redis_client) as client,
    ):
        fake.fake.update_faults({"error_rate": 1.0})
        settings = reconciling_soon(worker_settings(redis_url, fake.url))
        async with running_worker(settings):
            await post_change(client, "traced", {"name": "Traced", "applyTo": "lead"})

            async def retried() -> bool:
                return any(s.attributes.get("leadstage.outcome") == "retrying" for s in finished(exported))

            await eventually(retried)
            fake.fake.update_faults({"error_rate": 0.0})
            terminal = await wait_for_terminal(redis_client, ["traced"])
    spans = finished(exported)
    server, producer = producer_side(spans)
    attempts = sorted((s for s in spans if s.kind == "CONSUMER"), key=lambda s: s.attributes["leadstage.attempt"])
    assert [(a.attributes["leadstage.attempt"], a.attributes["leadstage.outcome"]) for a in attempts] == [
        (1, "retrying"),
        (2, "succeeded"),
    ]
    for attempt in attempts:
        assert (attempt.trace_id, attempt.parent_id, attempt.links) == (TRACE_ID, producer.span_id, (producer.span_id,))
        assert attempt.attributes["leadstage.account"] == "default"
        assert attempt.attributes["leadstage.operation"] == "add"
    assert attempts[0].attributes["leadstage.error_code"]
    stage_id = int(terminal["traced"][0]["stage_id"])
    assert attempts[1].attributes["leadstage.stage_id"] == stage_id
    # The 5xx of an add may have been applied: the second attempt reconciles first, in a span of its own.
    (reconcile,) = [s for s in spans if s.name == "reconcile"]
    assert reconcile.parent_id == attempts[1].span_id
    clients = [s for s in spans if s.kind == "CLIENT"]
    by_parent = {(s.parent_id, s.attributes["ivvy.action"], s.attributes["http.response.status_code"]) for s in clients}
    (failed_post,) = [code for parent, action, code in by_parent if parent == attempts[0].span_id]
    assert failed_post >= 500
    assert (attempts[1].span_id, "addOrUpdateLeadStage", 200) in by_parent
    assert (reconcile.span_id, "getLeadStageList", 200) in by_parent
    assert all(s.name == f"POST {s.attributes['ivvy.action']}" for s in clients)
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert terminal["traced"][0]["trace_id"] == TRACE_ID
    no_secret_in(spans)
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    (request,) = [line for line in lines if line["event"] == "webhook.request"]
    assert (request["trace_id"], request["span_id"]) == (TRACE_ID, server.span_id)
    finishes = [line for line in lines if line["event"] in ("job.attempt_finished", "job.finished")]
    assert [(line["trace_id"], line["span_id"]) for line in finishes] == [(TRACE_ID, a.span_id) for a in attempts]


@dataclass
class Collector:
    """An OTLP/HTTP trace collector on loopback: what worker processes export arrives here."""

    url: str
    spans: list[Span]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    spans: list[Span] = []

    async def receive(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(from_otlp(span) for span in scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    async with TestServer(app, host="127.0.0.1") as server:
        yield Collector(str(server.make_url("/v1/traces")), spans)


def from_otlp(span: Any) -> Span:
    def value(any_value: Any) -> Any:
        return getattr(any_value, any_value.WhichOneof("value"))

    kinds = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
    return Span(
        span.name,
        kinds[span.kind],
        span.trace_id.hex(),
        span.span_id.hex(),
        span.parent_span_id.hex(),
        tuple(link.span_id.hex() for link in span.links),
        {a.key: value(a.value) for a in span.attributes},
    )


@pytest.mark.system
async def test_the_trace_goes_on_in_the_worker_that_takes_over_from_a_sigkilled_one(
    redis_url: str, redis_client: aioredis.Redis, exported: InMemorySpanExporter, collector: Collector, tmp_path: Path
) -> None:
    async with (
        running_fake_ivvy() as fake,
        webhook_client(redis_url, redis_client) as client,
    ):
        settings = worker_settings(redis_url, fake.url, request_timeout_s=10.0, job_timeout_s=60.0)
        env = {
            **worker_env(settings),
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "leadstage-worker-under-test",
        }
        fake.fake.update_faults({"hang_rate": 1.0, "hang_s": 60})
        first = start_worker_process(env, tmp_path / "first.log")
        try:
            await post_change(client, "orphan", {"name": "Orphan", "applyTo": "lead"})

            async def request_arrived() -> bool:
                return len(fake.fake.requests) > 0

            await eventually(request_arrived, within_s=20)
        finally:
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        fake.fake.update_faults({"hang_rate": 0.0})
        second = start_worker_process(env, tmp_path / "second.log")
        try:
            terminal = await wait_for_terminal(redis_client, ["orphan"], within_s=30)
        finally:
            # SIGTERM: the worker exits normally, and the SDK flushes what it has not sent yet.
            assert await asyncio.to_thread(stop_process, second) == 0
    _, producer = producer_side(finished(exported))
    spans = collector.spans
    (attempt,) = [s for s in spans if s.kind == "CONSUMER"]  # the killed worker's never ended
    assert (attempt.trace_id, attempt.parent_id, attempt.links) == (TRACE_ID, producer.span_id, (producer.span_id,))
    assert attempt.attributes["leadstage.attempt"] == 2
    assert attempt.attributes["leadstage.outcome"] == "succeeded"
    assert attempt.attributes["leadstage.stage_id"] == int(terminal["orphan"][0]["stage_id"])
    (reconcile,) = [s for s in spans if s.name == "reconcile"]
    assert reconcile.parent_id == attempt.span_id
    actions = {(s.parent_id, s.attributes["ivvy.action"]) for s in spans if s.kind == "CLIENT"}
    assert (reconcile.span_id, "getLeadStageList") in actions
    assert (attempt.span_id, "addOrUpdateLeadStage") in actions
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert terminal["orphan"][0]["trace_id"] == TRACE_ID
    no_secret_in(spans)


@pytest.mark.system
async def test_the_demo_with_the_console_exporter_prints_the_traces_of_its_results(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    run = await run_demo(REDIS_URL=redis_url, LEADSTAGE_METRICS_PORT="0", OTEL_TRACES_EXPORTER="console")
    assert run.status == 0, run.stderr
    printed = set(re.findall(r'"trace_id": "0x([0-9a-f]{32})"', run.stdout))
    events = [fields for _, fields in await redis_client.xrange(DEMO_RESULTS)]
    traced = {fields[b"trace_id"].decode() for fields in events}
    assert events
    assert "" not in traced
    assert traced <= printed


def leadstage(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACEPARENT"))}
    return subprocess.run(  # noqa: S603 - this interpreter with fixed arguments
        [sys.executable, "-m", "worker.cli", *argv], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.system  # runs the command
async def test_the_cli_continues_a_traceparent_from_its_environment(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    result = await asyncio.to_thread(
        leadstage,
        "enqueue", "--name", "From CI", "--apply-to", "lead", "--key", "ci-1",
        REDIS_URL=redis_url, OTEL_TRACES_EXPORTER="console", TRACEPARENT=TRACEPARENT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (span,) = re.findall(r"^\{\n.*?^\}$", result.stdout, re.MULTILINE | re.DOTALL)
    printed = json.loads(span)
    assert printed["kind"] == "SpanKind.PRODUCER"
    assert printed["context"]["trace_id"] == "0x" + TRACE_ID
    assert printed["parent_id"] == "0x" + CALLER_SPAN
    stored = await stored_trace(redis_client, "default:ci-1")
    assert stored == f"00-{TRACE_ID}-{printed['context']['span_id'][2:]}-01".encode()


@pytest.mark.system  # runs the command as a process
def test_an_unknown_exporter_is_refused_by_name() -> None:
    result = leadstage("stats", OTEL_TRACES_EXPORTER="nonesuch", REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER names no installed exporter: 'nonesuch'" in result.stderr


@pytest.mark.system  # a fresh interpreter: logging configured before tracing
def test_log_lines_carry_the_trace_ids_when_logging_is_configured_before_anything_traced() -> None:
    script = """
from opentelemetry import trace
from worker.core.logs import configure_logging, get_logger
from worker.core.settings import Settings
configure_logging(Settings(log_format="json"))
with trace.get_tracer("test").start_as_current_span("work"):
    get_logger("t").info("inside")
"""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(  # noqa: S603 - this interpreter with a fixed script
        [sys.executable, "-c", script],
        env={**base, "OTEL_TRACES_EXPORTER": "console"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (line,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert re.fullmatch("[0-9a-f]{32}", line["trace_id"]), line
    assert line["trace_id"] in result.stdout.replace('"0x', '"')  # the span the console printed


@pytest.mark.system  # a fresh interpreter: what tracing off imports
def test_tracing_off_imports_nothing_and_changes_nothing() -> None:
    script = """
import sys
from producers.webhook import create_app
from worker.core import tracing
from worker import runner
from worker.core.logs import configure_logging
from worker.core.settings import Settings
from worker.ivvy import AiohttpTransport
tracing.setup()
configure_logging(Settings())
assert tracing.server_middlewares() == []
assert tracing.log_processors() == []
assert tracing.current_traceparent() == tracing.current_trace_id() == ""
print(sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry"))
"""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    for env in ({}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}):
        result = subprocess.run(  # noqa: S603 - this interpreter with a fixed script
            [sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


async def test_the_trace_is_stored_with_the_change_but_never_compared(
    redis_url: str, redis_client: aioredis.Redis, exported: InMemorySpanExporter
) -> None:
    async with webhook_client(redis_url, redis_client) as client:
        await post_change(client, "once", {"name": "Once", "applyTo": "lead"})
        first = await stored_trace(redis_client, "default:once")
        # The same change again under another trace, then untraced: a duplicate each time, first trace kept.
        body = orjson.dumps({"name": "Once", "applyTo": "lead"})
        other = f"00-{'1' * 32}-{'2' * 16}-01"
        for extra in ({"traceparent": other}, {}):
            response = await client.post(CHANGES_PATH, data=body, headers={**signed(body, msg_id="once"), **extra})
            assert (await response.json())["receipts"][0]["status"] == "duplicate"
    _, producer = producer_side(finished(exported)[:2])  # the first request's two spans
    assert first == f"00-{TRACE_ID}-{producer.span_id}-01".encode()
    assert await stored_trace(redis_client, "default:once") == first


async def test_log_lines_carry_the_trace_and_span_ids_when_tracing_is_on(exported: InMemorySpanExporter) -> None:
    out = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=out, level="info")
    log = get_logger("leadstage.test")
    tracer = exported_tracer()
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
    log.info("outside")
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    context = span.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert "trace_id" not in outside
    tracing.use(None)
    configure_logging(Settings(log_format="json"), stream=out, level="info")
    with tracer.start_as_current_span("work"):
        log.info("untraced")
    assert "trace_id" not in json.loads(out.getvalue().splitlines()[-1])


async def test_a_batch_has_a_span_linked_to_each_change_and_each_change_its_attempt_span(
    redis_url: str, redis_client: aioredis.Redis, exported: InMemorySpanExporter
) -> None:
    """The batch's run and polls are children of one CONSUMER span linked to every change's producer
    span; each change's end is an attempt span of its own trace, with its outcome."""
    async with running_fake_ivvy() as fake:
        stages = [fake.fake.add_stage(f"Stage {i}", apply_to=1) for i in range(8)]
        settings = worker_settings(redis_url, fake.url, batch_mode="auto", batch_threshold=5)
        ledger = Ledger(redis_client, settings)
        with tracing.producer_span("enqueue", len(stages), settings.queue_name):
            await ledger.enqueue_many(
                [
                    (parse_change({"id": s.id, "name": f"Renamed {i}"}), parse_envelope(idempotency_key=f"b{i}"))
                    for i, s in enumerate(stages)
                ]
            )
        async with running_worker(settings):
            await wait_for_terminal(redis_client, [f"b{i}" for i in range(8)])
    spans = finished(exported)
    (producer,) = [s for s in spans if s.kind == "PRODUCER"]
    (batch,) = [s for s in spans if s.name == "process leadstage batch"]
    assert batch.links == (producer.span_id,) * 8
    assert (batch.attributes["messaging.batch.message_count"], batch.attributes["leadstage.batch.collected"]) == (
        8,
        False,
    )
    actions = sorted(
        {s.attributes["ivvy.action"] for s in spans if s.kind == "CLIENT" and s.parent_id == batch.span_id}
    )
    assert actions == ["progress", "results", "run"]
    attempts = [s for s in spans if s.name == "process leadstage"]
    assert len(attempts) == 8
    assert {(a.trace_id, a.parent_id, a.attributes["leadstage.outcome"]) for a in attempts} == {
        (producer.trace_id, producer.span_id, "succeeded")
    }
