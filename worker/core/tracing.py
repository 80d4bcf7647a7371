"""OpenTelemetry tracing, optional: the ``leadstage-sync[otel]`` extra, configured by ``OTEL_*``.

Everything else calls the tiny hooks below; with tracing off each is one check of ``_tracer``
and OpenTelemetry is never imported (``setup`` looks at the environment only).

On when ``OTEL_TRACES_EXPORTER`` names an exporter (``console``, ``otlp``, or any name the
installed exporters register) and ``OTEL_SDK_DISABLED`` is not true. Unlike the SDK's own
default (otlp), unset means off: a worker must not start exporting because a package is
installed. The rest is the SDK's standard configuration: ``OTEL_SERVICE_NAME`` (default
leadstage-sync) and ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``/``_PROTOCOL`` (http/protobuf; grpc when
opentelemetry-exporter-otlp-proto-grpc is installed), ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``.
A host application that set its own tracer provider keeps it: ours is installed only when none is.

One trace follows a change across the queue:

* the webhook's SERVER span continues an incoming W3C ``traceparent``; the library's PRODUCER
  span (``producer_span``) continues whatever span is current (the webhook's, the host
  application's, or the CLI's ``TRACEPARENT`` environment variable);
* the producer's context is stored with the change: the ledger field ``trace``, written by
  enqueue.lua, and never part of the idempotency comparison (a redelivery with another
  traceparent is still a duplicate, and keeps the first trace);
* each worker attempt is a CONSUMER span, child of that context and linked to it, with the
  account, operation, attempt, stage id, outcome and error code; the iVvy requests are CLIENT
  spans (``worker.ivvy_tracing``, around the one transport seam), reconcile calls spans of their own;
* the results event carries the ``trace_id``; log lines carry ``trace_id`` and ``span_id``.

No attribute holds a secret: no headers (the iVvy signature, webhook signatures), no bodies.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from worker.core.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: importing them is what tracing off must not pay
    from opentelemetry.trace import SpanContext, Tracer
    from structlog.typing import EventDict, Processor, WrappedLogger


__all__ = [
    "attempt_span",
    "continue_from_env",
    "current_trace_id",
    "current_traceparent",
    "enabled",
    "log_processors",
    "producer_span",
    "record_outcome",
    "server_middlewares",
    "setup",
    "traced",
    "tracer",
    "use",
]

SCOPE: Final = "leadstage-sync"
#: The ledger field that holds the producer's ``traceparent``.
LEDGER_FIELD: Final = "trace"
_P = ParamSpec("_P")
_T = TypeVar("_T")

_tracer: Tracer | None = None
_set_up = False
#: A shared do-nothing context manager: what every span hook returns when tracing is off.
_OFF: Final[contextlib.nullcontext[None]] = contextlib.nullcontext()


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer | None:
    """The tracer when tracing is on (for ``worker.ivvy_tracing``'s transport), else None."""
    return _tracer


def _wanted(env: Mapping[str, str]) -> str | None:
    """The exporter name asked for, or None when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return None if name in ("", "none") else name


def setup(env: Mapping[str, str] | None = None) -> None:
    """Turn tracing on if the environment asks for it; once per process (later calls do nothing).

    ``ConfigError`` names the variable when the exporter is unknown or the extra is not installed.
    """
    global _set_up
    if _set_up:
        return
    _set_up = True
    env = os.environ if env is None else env
    names = _wanted(env)
    if names is None:
        return
    try:
        from opentelemetry import trace

        from worker.core.tracing_sdk import tracer_provider  # imports the SDK
    except ImportError:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed: pip install 'leadstage-sync[otel]'"
        ) from None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(tracer_provider(names, env))
    use(trace.get_tracer_provider())


def use(provider: Any) -> None:
    """Trace through ``provider`` (a ``TracerProvider``), or stop tracing with None (tests)."""
    global _tracer, _set_up
    _set_up = True
    _tracer = None if provider is None else provider.get_tracer(SCOPE)


# -- logs --------------------------------------------------------------------------------------


def log_processors() -> list[Processor]:
    """The structlog processors that add ``trace_id``/``span_id``: none when tracing is off."""
    return [_add_trace_ids] if _tracer is not None else []


def _add_trace_ids(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    context = _current_context()
    if context is not None:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def _current_context() -> SpanContext | None:
    """The current span's context, when tracing is on and there is a valid one."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


# -- producers ---------------------------------------------------------------------------------


def continue_from_env() -> None:
    """Make the ``TRACEPARENT`` environment variable (W3C, as CI systems pass it) the current
    context of this process's main thread, so a CLI command joins its caller's trace."""
    carrier = {k.lower(): v for k, v in os.environ.items() if k in ("TRACEPARENT", "TRACESTATE")}
    if _tracer is not None and carrier:
        from opentelemetry import context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context.attach(TraceContextTextMapPropagator().extract(carrier))


def server_middlewares(*, untraced: Collection[str] = ()) -> list[Any]:
    """The webhook's tracing: a middleware (to put first) that makes each request a SERVER span
    continuing its ``traceparent``, so the request's log line is in it too; none when tracing is
    off. Requests for the ``untraced`` paths (probes, metrics) make no spans."""
    setup()  # an application embedding the webhook may not have run the CLI's
    if _tracer is None:
        return []
    from aiohttp import web

    tracer = _tracer

    @web.middleware
    async def trace_request(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in untraced:
            return await handler(request)
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route, "url.path": request.path},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return [trace_request]


def producer_span(operation: str, count: int, destination: str) -> contextlib.AbstractContextManager[Any]:
    """A PRODUCER span around enqueuing ``count`` changes, child of the current span if any."""
    if _tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(
        f"{operation} {destination}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "leadstage",
            "messaging.operation.type": "send",
            "messaging.operation.name": operation,
            "messaging.destination.name": destination,
            "messaging.batch.message_count": count,
        },
    )


def current_traceparent() -> str:
    """The current span as a W3C ``traceparent`` ('' when tracing is off or nothing is sampled)."""
    context = _current_context()
    return "" if context is None else f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def current_trace_id() -> str:
    """The current trace id, 32 hex digits ('' when tracing is off): the results event's ``trace_id``."""
    context = _current_context()
    return "" if context is None else format(context.trace_id, "032x")


# -- worker ------------------------------------------------------------------------------------


def attempt_span(
    traceparent: str, *, job_id: str, account: str, operation: str, attempt: int
) -> contextlib.AbstractContextManager[Any]:
    """The CONSUMER span of one attempt: a child of the producer's context, and linked to it."""
    if _tracer is None:
        return _OFF
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # Stored as W3C whatever OTEL_PROPAGATORS says (that is for the webhook's incoming headers).
    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None
    producer = trace.get_current_span(parent).get_span_context() if parent is not None else None
    return _tracer.start_as_current_span(
        "process leadstage",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=[Link(producer)] if producer is not None and producer.is_valid else None,
        attributes={
            "messaging.system": "leadstage",
            "messaging.operation.type": "process",
            "messaging.message.id": job_id,
            "leadstage.account": account,
            "leadstage.operation": operation,
            "leadstage.attempt": attempt,
        },
    )


def batch_span(account: str, traceparents: Sequence[str], *, collected: bool) -> contextlib.AbstractContextManager[Any]:
    """The CONSUMER span of one iVvy batch (its run and polls are its children), linked to each
    change's producer context; each change's end has its own attempt span (``attempt_span``)."""
    if _tracer is None:
        return _OFF
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    contexts = [
        trace.get_current_span(propagator.extract({"traceparent": t})).get_span_context() for t in traceparents if t
    ]
    return _tracer.start_as_current_span(
        "process leadstage batch",
        kind=SpanKind.CONSUMER,
        links=[Link(c) for c in contexts if c.is_valid] or None,
        attributes={
            "messaging.system": "leadstage",
            "messaging.operation.type": "process",
            "messaging.batch.message_count": len(traceparents),
            "leadstage.account": account,
            "leadstage.batch.collected": collected,
        },
    )


def record_outcome(fields: Mapping[str, str]) -> None:
    """Put a results event's outcome on the current attempt span: outcome, stage id, error code."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    span = trace.get_current_span()
    span.set_attribute("leadstage.outcome", fields["event"])
    if fields.get("stage_id"):
        span.set_attribute("leadstage.stage_id", int(fields["stage_id"]))
    if fields.get("error_code"):
        span.set_attribute("leadstage.error_code", fields["error_code"])
        span.set_attribute("error.type", fields["error_code"])
    if fields.get("http_status"):
        span.set_attribute("http.response.status_code", int(fields["http_status"]))
    if fields["event"] == "failed":
        span.set_status(Status(StatusCode.ERROR, fields.get("error_code") or None))


def traced(name: str) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, Awaitable[_T]]]:
    """A coroutine function in a span of its own (e.g. a reconcile), decided at each call."""

    def decorate(function: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
        @functools.wraps(function)
        async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            if _tracer is None:
                return await function(*args, **kwargs)
            with _tracer.start_as_current_span(name) as span:
                result = await function(*args, **kwargs)
                if isinstance(result, int) and not isinstance(result, bool):
                    span.set_attribute("leadstage.result", result)
                return result

        return wrapper

    return decorate
