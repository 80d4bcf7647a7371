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
from opentelemetry.trace import SpanKind

from producers.openapi import CHANGES_PATH
from producers.webhook import create_app
from tests.harness import eventually, start_worker_process, stop_process, wait_for_terminal, worker_env, worker_settings
from tests.test_demo import run_demo
from tests.test_webhook import SECRET, signed
from worker import keys, tracing
from worker.demo import DEMO_RESULTS
from worker.fake_ivvy import running_fake_ivvy
from worker.logs import configure_logging, get_logger
from worker.runner import running_worker
from worker.settings import Secret, Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        provider.shutdown()


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


async def post_change(client: TestClient[Any, Any], key: str, change: dict[str, object]) -> None:
    body = orjson.dumps(change)
    headers = {**signed(body, msg_id=key), "traceparent": TRACEPARENT}
    response = await client.post(CHANGES_PATH, data=body, headers=headers)
    assert response.status == 202, await response.text()


def no_secret_in(spans: list[Span]) -> None:
    text = json.dumps([s.attributes for s in spans])
    for secret in ("demo-secret", SECRET, SECRET.removeprefix("whsec_"), "IWS "):
        assert secret not in text


def producer_side(spans: list[Span]) -> tuple[Span, Span]:
    (server,) = [s for s in spans if s.kind == "SERVER"]
    (producer,) = [s for s in spans if s.kind == "PRODUCER"]
    assert (server.trace_id, server.parent_id) == (TRACE_ID, CALLER_SPAN)
    assert server.attributes["http.response.status_code"] == 202
    assert (producer.trace_id, producer.parent_id) == (TRACE_ID, server.span_id)
    return server, producer


async def test_a_webhook_trace_holds_the_attempts_and_the_ivvy_requests_across_a_retry(
    redis_url: str, redis_client: aioredis.Redis, exported: InMemorySpanExporter
) -> None:
    async with running_fake_ivvy() as fake, TestClient(
        TestServer(create_app(webhook_settings(redis_url), redis_client), host="127.0.0.1")
    ) as client:
        fake.fake.update_faults({"error_rate": 1.0})
        settings = worker_settings(redis_url, fake.url)
        async with running_worker(settings):
            await post_change(client, "traced", {"name": "Traced", "applyTo": "lead"})

            async def retried() -> bool:
                return any(s.attributes.get("leadstage.outcome") == "retrying" for s in finished(exported))

            await eventually(retried)
            fake.fake.update_faults({"error_rate": 0.0})
            terminal = await wait_for_terminal(redis_client, ["traced"])
    spans = finished(exported)
    _, producer = producer_side(spans)
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
