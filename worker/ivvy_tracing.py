"""The iVvy transport traced: a CLIENT span around each request, when tracing is on (``worker.core.tracing``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from worker.core import tracing
from worker.core.errors import IvvyNoAnswer
from worker.ivvy import RawResponse, Transport

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


class TracedTransport:
    """The iVvy transport with a CLIENT span per request: method, server, url (without userinfo),
    iVvy action, status code or error type. Headers and bodies are never recorded."""

    def __init__(self, inner: Transport, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> RawResponse:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        parts = urlsplit(url)
        action = parse_qs(parts.query).get("action", [""])[0]
        with self._tracer.start_as_current_span(
            f"POST {action}" if action else "POST",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "server.address": parts.hostname or "",
                "server.port": parts.port or (443 if parts.scheme == "https" else 80),
                "url.full": parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(),
                "ivvy.action": action,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await self._inner.post(url, headers, body, timeout_s)
            except IvvyNoAnswer as error:
                span.set_attribute("error.type", error.error_code)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:
                span.set_attribute("error.type", str(response.status))
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def close(self) -> None:
        await self._inner.close()


def traced_transport(transport: Transport) -> Transport:
    """``transport`` with a CLIENT span per request when tracing is on; itself when off."""
    tracing.setup()  # a worker built in another program may not have run the CLI's
    tracer = tracing.tracer()
    return transport if tracer is None else TracedTransport(transport, tracer)
