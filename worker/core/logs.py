"""Logging: one structlog pipeline for every line the process writes.

Our own events and the stdlib ``logging`` records of arq, aiohttp and asyncio go through the
same processors and come out in one format, on stderr:

* JSON lines (orjson) when ``LEADSTAGE_LOG_FORMAT`` is ``json``, or ``auto`` and stderr is not a
  terminal (containers, CI, files);
* aligned, coloured text when it is ``console``, or ``auto`` on a terminal.

Every line carries ``timestamp`` (ISO 8601 UTC), ``level``, ``logger`` and ``event``, plus the
job's ``job_id``, ``idempotency_key``, ``account`` and ``attempt`` while ``bind_job_context``
is active (``merge_job_context``).

Secrets never reach the output (docs/contract.md: Configuration): ``secret_redactor`` runs after
tracebacks are formatted and just before rendering, for our events and foreign records alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from worker.core import tracing
from worker.core.settings import LogFormat, Settings

__all__ = [
    "LOG_LEVELS",
    "REDACTED",
    "bind_job_context",
    "configure_logging",
    "get_logger",
    "merge_job_context",
    "secret_redactor",
]

#: What a secret, or the value of a credential-like key, is replaced with.
REDACTED = "**********"

#: The logging level of each of LEADSTAGE_LOG_LEVEL's names (``worker.core.settings.LOG_LEVEL_NAMES``).
LOG_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# A key whose (normalised) name contains one of these holds a credential: its value is masked
# whatever it is. This covers authorization, x-api-authorization, api_secret, webhook_secret,
# webhook-signature, password, access_token, cookie, set-cookie...
_CREDENTIAL_KEY_PARTS = ("authorization", "secret", "password", "passwd", "token", "signature", "cookie", "credential")

# iVvy's "IWS {key}:{signature}": the key identifies the account and stays readable; the HMAC is
# a replayable credential for that request, so it goes. Case-insensitive because a client might
# send "iws" and the signature would still be a valid HMAC.
_IWS = r"(?P<iws>\bIWS\s+[^\s:]*:)[^\s\"',;)\]}>]+"

# structlog's bookkeeping keys and the raw exception: left alone, never rendered as values.
_UNTOUCHED_KEYS = frozenset({"_record", "_from_structlog", "exc_info"})

# Values that render without repr() and cannot hold text of ours.
_PLAIN_TYPES = (bool, int, float, datetime.date, datetime.time, datetime.timedelta, uuid.UUID)

# Deeper than this, a value is rendered with repr() and scrubbed as one string (cycles end here).
_MAX_DEPTH = 16


@functools.lru_cache(maxsize=4096)
def _is_credential_key(key: str) -> bool:
    normalised = key.lower().replace("-", "_")
    return any(part in normalised for part in _CREDENTIAL_KEY_PARTS)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not take the log line (or the job) down
        return f"<unrepresentable {type(value).__name__}>"


class _Redactor:
    """The processor built by ``secret_redactor``; see there."""

    __slots__ = ("_pattern",)

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if self._nothing_to_hide(event_dict):
            return event_dict
        for key, value in event_dict.items():
            if key in _UNTOUCHED_KEYS or value is None:
                continue
            # Top-level keys are the event's own names (never secrets): only values change, in
            # place, which is safe because structlog hands every processor its own copy.
            if _is_credential_key(key):
                event_dict[key] = REDACTED
            else:
                event_dict[key] = self._clean(value, 0)
        return event_dict

    def _nothing_to_hide(self, event_dict: EventDict) -> bool:
        """The usual line: flat strings and numbers, no credential key, and one search over all its
        strings joined finds nothing (a value holding a secret makes the joined text hold it, so
        this never misses; a match across two values only sends the line the long way)."""
        texts = []
        for key, value in event_dict.items():
            if key in _UNTOUCHED_KEYS or value is None:
                continue
            if _is_credential_key(key):
                return False
            if isinstance(value, str):
                texts.append(value)
            elif not isinstance(value, _PLAIN_TYPES):
                return False
        return self._pattern.search("\0".join(texts)) is None

    def _clean_key(self, key: object) -> object:
        return self._scrub(key) if isinstance(key, str) else key

    def _clean_item(self, key: object, value: object, depth: int) -> object:
        if value is not None and isinstance(key, str) and _is_credential_key(key):
            return REDACTED
        return self._clean(value, depth)

    def _scrub(self, text: str) -> str:
        # search() first: about half the cost of sub() on the usual string, which has nothing to hide.
        return self._pattern.sub(_replacement, text) if self._pattern.search(text) else text

    def _clean(self, value: object, depth: int) -> object:
        # New containers are built rather than edited: the caller's own objects (a headers
        # dict it goes on to send, say) must not change because they were logged.
        if isinstance(value, str):
            return self._scrub(value)
        if value is None or isinstance(value, _PLAIN_TYPES):
            return value
        if depth < _MAX_DEPTH:
            if isinstance(value, Mapping):
                return {self._clean_key(k): self._clean_item(k, v, depth + 1) for k, v in value.items()}
            if isinstance(value, list | tuple | set | frozenset):
                return [self._clean(v, depth + 1) for v in value]
        # Anything else (exceptions, bytes, objects) would be rendered with repr() by both
        # renderers anyway; doing it here lets the text be scrubbed before it is written.
        return self._scrub(_safe_repr(value))


def _replacement(match: re.Match[str]) -> str:
    prefix = match.group("iws")
    return REDACTED if prefix is None else prefix + REDACTED


def _secret_variants(secrets: Iterable[str]) -> set[str]:
    variants: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        variants.add(secret)
        # A Standard Webhooks secret is "whsec_" + base64 of the key; libraries strip the prefix,
        # so the bare base64 may show up in an error message on its own.
        if secret.startswith("whsec_") and len(secret) > len("whsec_"):
            variants.add(secret[len("whsec_") :])
    return variants


def secret_redactor(secrets: Iterable[str]) -> Callable[[WrappedLogger, str, EventDict], EventDict]:
    """A processor that hides secrets in every value of the event dict, however deep.

    * every occurrence of one of ``secrets`` (settings.secret_values()) in any string, nested
      dict key or value, list item, or repr() of another object becomes ``REDACTED``;
    * the value of a key whose name suggests a credential (authorization, api_secret, token,
      webhook-signature...) becomes ``REDACTED``, at any depth;
    * the signature of "IWS key:signature" becomes ``REDACTED`` (the key stays).

    Place it after ``format_exc_info`` (so traceback text is covered) and just before the
    renderer. With no secrets it costs one scan for "IWS" per string value.
    """
    # Longest first, so a secret that contains another is replaced whole.
    alternatives = [_IWS, *(re.escape(s) for s in sorted(_secret_variants(secrets), key=len, reverse=True))]
    return _Redactor(re.compile("|".join(alternatives), re.IGNORECASE))


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream is not a terminal
        return False


def _wants_json(log_format: LogFormat, stream: TextIO) -> bool:
    if log_format == "auto":
        return not _isatty(stream)
    return log_format == "json"


def _orjson_dumps(obj: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        # orjson refuses a few things the stdlib takes (integers beyond 64 bits): a line is
        # still better than a logging error.
        return json.dumps(obj, default=default or _safe_repr)


_LEADING_KEYS = ("timestamp", "level", "logger", "event")


def _leading_keys_first(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, logger, event first in JSON lines, for people reading them raw."""
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _report_failure(name: str) -> None:
    # logging's default prints record.msg and its args, unredacted, to stderr: report the
    # failure without the record's content.
    if logging.raiseExceptions and sys.stderr is not None:
        exc = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            sys.stderr.write(f"--- logging error: {type(exc).__name__} writing a record of {name!r}\n")


class _Handler(logging.StreamHandler[TextIO]):
    """Our one root handler (stdlib records: arq, aiohttp, asyncio), recognised on reconfiguration."""

    def handleError(self, record: logging.LogRecord) -> None:
        _report_failure(record.name)


class _Sink:
    """What our own structlog events are written by: the rendered line straight to the stream.

    No stdlib round trip (a ``LogRecord``, the handler chain, ``ProcessorFormatter``, a second
    copy of the event): that was most of what a log line cost. The handler's lock is shared, so
    our lines and stdlib records never interleave; a failing write is reported as the handler
    reports one, and never raised into the code that logged.
    """

    __slots__ = ("_handler", "name")

    def __init__(self, name: str, handler: _Handler) -> None:
        self.name = name
        self._handler = handler

    def msg(self, message: str) -> None:
        handler = self._handler
        try:
            with handler.lock or contextlib.nullcontext():
                handler.stream.write(message + "\n")
                handler.stream.flush()
        except Exception:  # noqa: BLE001 - as logging.Handler: a log line must not break the caller
            _report_failure(self.name)

    debug = info = warning = error = critical = msg


class _SinkFactory:
    """structlog's logger factory: one ``_Sink`` per logger name (the name is the ``logger`` key)."""

    __slots__ = ("_handler", "_sinks")

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self._sinks: dict[str, _Sink] = {}

    def __call__(self, *args: Any) -> _Sink:
        name = args[0] if args and isinstance(args[0], str) else ""
        sink = self._sinks.get(name)
        if sink is None:
            sink = self._sinks[name] = _Sink(name, self._handler)
        return sink


def configure_logging(settings: Settings, *, stream: TextIO | None = None, level: int | str | None = None) -> None:
    """Send every log line of the process (structlog and stdlib) through one pipeline to ``stream``.

    ``stream`` defaults to stderr; ``level`` to the settings' LEADSTAGE_LOG_LEVEL (info when
    unset), given as a name of ``LOG_LEVELS`` or a logging number. Calling it again replaces the
    previous configuration.
    """
    out = sys.stderr if stream is None else stream
    if level is None:
        level = settings.log_level or "info"
    numeric_level = LOG_LEVELS[level] if isinstance(level, str) else level

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Run for records from stdlib loggers (arq, aiohttp) before the shared tail below.
    # structlog's own contextvars (merge_contextvars) are not merged: nothing binds them, and
    # merging costs a copy of the whole context per line.
    foreign_pre_chain: list[Processor] = [
        merge_job_context,
        *tracing.log_processors(),
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        timestamper,
        structlog.processors.format_exc_info,
    ]
    renderer: Processor
    if _wants_json(settings.log_format, out):
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        tail: list[Processor] = [_leading_keys_first, renderer]
    else:
        colors = _isatty(out) and "NO_COLOR" not in os.environ
        # Tracebacks arrive already formatted (and redacted) as the "exception" string.
        renderer = structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)
        tail = [renderer]
    # After format_exc_info (in both chains), so traceback text is scrubbed too.
    redactor = secret_redactor(settings.secret_values())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign_pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redactor, *tail],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # warnings.warn() output goes through logging too, so it has the same format.
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            merge_job_context,
            *tracing.log_processors(),
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redactor,
            *tail,
        ],
        logger_factory=_SinkFactory(handler),
        # Below-level calls are empty methods: nothing at all is done for a debug line at info.
        # Positional arguments are %-formatted by it too, as the stdlib does.
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Not cached: a logger made at import time must follow a later configure_logging().
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    """The logger of a module: ``log = get_logger(__name__)``."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger


#: The job whose lines these are (one dict, set and reset once per job: structlog's per-key
#: contextvars cost a copy of the whole context at each bind).
_JOB: contextvars.ContextVar[Mapping[str, object] | None] = contextvars.ContextVar("leadstage_job", default=None)


class _JobContext:
    __slots__ = ("_token", "_values")

    def __init__(self, values: Mapping[str, object]) -> None:
        self._values = values

    def __enter__(self) -> None:
        self._token = _JOB.set(self._values)

    def __exit__(self, *exc_info: object) -> None:
        _JOB.reset(self._token)


def bind_job_context(
    job_id: str, idempotency_key: str, account: str, attempt: int
) -> contextlib.AbstractContextManager[None]:
    """Every line logged inside ``with bind_job_context(...):`` carries the job's identity.

    The previous values come back on exit, so nested or concurrent jobs (each asyncio task has
    its own context) do not see each other's.
    """
    return _JobContext({"job_id": job_id, "idempotency_key": idempotency_key, "account": account, "attempt": attempt})


def merge_job_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """The processor that adds the ``bind_job_context`` fields (an event's own keys win)."""
    job = _JOB.get()
    return event_dict if job is None else {**job, **event_dict}
