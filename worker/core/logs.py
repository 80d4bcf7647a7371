"""Logging: one structlog pipeline for every line the process writes.

Our own events and the stdlib ``logging`` records of arq, aiohttp and asyncio go through the
same processors and come out in one format, on stderr:

* JSON lines (orjson) when ``LEADSTAGE_LOG_FORMAT`` is ``json``, or ``auto`` and stderr is not a
  terminal (containers, CI, files);
* aligned, coloured text when it is ``console``, or ``auto`` on a terminal.

Every line carries ``timestamp`` (ISO 8601 UTC), ``level``, ``logger`` and ``event``, plus the
job's ``job_id``, ``idempotency_key``, ``account`` and ``attempt`` while ``bind_job_context``
is active (``merge_job_context``).

Secrets never reach the output (docs/contract.md: Configuration): ``secret_redactor``
(``worker.core.redaction``) runs after tracebacks are formatted and just before rendering, for
our events and foreign records alike.

Inside an event loop, info and debug lines to a file may wait ``FLUSH_AFTER_S`` to be written
together (``_Handler``); a SIGKILL loses those of its last moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from worker.core import tracing
from worker.core.redaction import safe_repr, secret_redactor
from worker.core.settings import LogFormat, Settings

__all__ = ["LOG_LEVELS", "bind_job_context", "configure_logging", "get_logger", "merge_job_context"]

#: The logging level of each of LEADSTAGE_LOG_LEVEL's names (``worker.core.settings.LOG_LEVEL_NAMES``).
LOG_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


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
        return json.dumps(obj, default=default or safe_repr)


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


#: How long our info and debug lines may wait, inside an event loop, to be written with the
#: others of the same moment in one write(2) instead of one each (a worker writes a line per
#: change). Warnings and errors are written at once, after the lines still waiting.
FLUSH_AFTER_S: Final = 0.05
#: Lines that may wait at most: a burst is written in slices of this many.
_MAX_PENDING: Final = 256


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _has_file(stream: TextIO) -> bool:
    """Whether writing to ``stream`` costs a system call (in-memory streams are written at once)."""
    try:
        stream.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both of the first two
        return False
    return True


class _Handler(logging.StreamHandler[TextIO]):
    """Our one root handler, recognised on reconfiguration, and the one writer of the stream.

    Stdlib records (arq, aiohttp, asyncio) come through ``emit``, our own lines through ``_Sink``:
    ``now`` writes a line at once, ``later`` lets it wait up to ``FLUSH_AFTER_S`` on the running
    loop's timer when the stream is a file. Everything goes through ``_write`` under the lock, the
    waiting lines first, so lines come out in the order they were logged (a line logged in
    another thread meanwhile may come before those waiting). ``flush`` writes what waits, and
    logging calls it at exit (a SIGTERM or Ctrl-C ends the worker through that exit); a SIGKILL
    loses the info and debug lines of the last ``FLUSH_AFTER_S``.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # whose timer writes _pending
        self._waits = _has_file(stream)

    def later(self, line: str) -> None:
        loop = _running_loop() if self._waits else None
        with self.lock or contextlib.nullcontext():
            timer_loop = self._timer_loop
            if loop is not None and timer_loop is not loop and timer_loop is not None:
                if timer_loop.is_running():  # another thread's loop: its lines wait, this one not
                    loop = None
                else:  # a loop closed before its timer ran: this loop's timer takes over
                    self._timer_loop = timer_loop = None
            if loop is None or len(self._pending) >= _MAX_PENDING:
                self._write(line)
                return
            if timer_loop is None:
                loop.call_later(FLUSH_AFTER_S, self._on_timer)
                self._timer_loop = loop
            self._pending.append(line)

    def now(self, line: str) -> None:
        with self.lock or contextlib.nullcontext():
            self._write(line)

    def _on_timer(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._timer_loop = None
            try:
                self._write("")
            except Exception:  # noqa: BLE001 - as logging.Handler: a log line must not break the loop
                _report_failure("(lines written together)")

    def flush(self) -> None:
        self.now("")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            self._write(line)  # handle() holds the lock
        except RecursionError:  # as logging.StreamHandler.emit
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler.emit
            self.handleError(record)

    def _write(self, line: str) -> None:
        if self._pending:
            line = "".join(self._pending) + line
            self._pending.clear()
        if line:
            self.stream.write(line)
            self.stream.flush()

    def handleError(self, record: logging.LogRecord) -> None:
        _report_failure(record.name)


class _Sink:
    """What our own structlog events are written by: the rendered line handed to the handler.

    No stdlib round trip (a ``LogRecord``, the handler chain, ``ProcessorFormatter``, a second
    copy of the event): that was most of what a log line cost. Info and debug lines may wait to
    be written together (``_Handler.later``); a failing write is reported as the handler reports
    one, and never raised into the code that logged.
    """

    __slots__ = ("_handler", "name")

    def __init__(self, name: str, handler: _Handler) -> None:
        self.name = name
        self._handler = handler

    def info(self, message: str) -> None:
        self._hand_over(self._handler.later, message)

    def msg(self, message: str) -> None:
        self._hand_over(self._handler.now, message)

    def _hand_over(self, write: Callable[[str], None], message: str) -> None:
        try:
            write(message + "\n")
        except Exception:  # noqa: BLE001 - as logging.Handler: a log line must not break the caller
            _report_failure(self.name)

    debug = info
    warning = error = critical = msg


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
    tracing.setup()  # before its log processors are asked for (a program may configure logging first)
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


class _Logger:
    """What ``get_logger`` returns: structlog's logger of one name, assembled once per
    configuration. structlog's own lazy proxy (uncached, so that it follows a later
    ``configure_logging`` or a test's ``capture_logs``) assembles a new one, with its sink and
    context, at every call, even a debug call below the level."""

    __slots__ = ("_config", "_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._config: tuple[object, ...] = ()
        self._logger: Any = None

    def __getattr__(self, attribute: str) -> Any:
        config = tuple(structlog.get_config().values())
        if config != self._config:
            self._logger, self._config = structlog.get_logger(self._name).bind(), config
        return getattr(self._logger, attribute)


def get_logger(name: str) -> FilteringBoundLogger:
    """The logger of a module: ``log = get_logger(__name__)``."""
    return cast("FilteringBoundLogger", _Logger(name))


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
