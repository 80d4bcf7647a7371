"""The OpenTelemetry SDK's tracer provider, built from ``OTEL_*`` (``worker.core.tracing.setup``).

Imported only when tracing is on: this module imports the SDK (the ``leadstage-sync[otel]`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from worker.core.errors import ConfigError

__all__ = ["DEFAULT_SERVICE_NAME", "tracer_provider"]

DEFAULT_SERVICE_NAME: Final = "leadstage-sync"


def tracer_provider(names: str, env: Mapping[str, str]) -> TracerProvider:
    """The SDK's provider, with a batch span processor for each exporter of ``names``."""
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without either the
    # SDK says unknown_service, and ours is the better default.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The sampler comes from OTEL_TRACES_SAMPLER/_ARG, the batch sizes from OTEL_BSP_*; at exit the
    # provider flushes what is left (shutdown_on_exit).
    provider = TracerProvider(resource=resource)
    for name in (n.strip() for n in names.split(",") if n.strip()):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    """The span exporter registered under ``name`` (``otlp`` means OTLP over the configured protocol)."""
    from importlib.metadata import entry_points

    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
        name = "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        known = sorted({"otlp", *(e.name for e in entry_points(group="opentelemetry_traces_exporter"))})
        raise ConfigError(f"OTEL_TRACES_EXPORTER names no installed exporter: {name!r} (known: {', '.join(known)})")
    return found[0].load()()
