"""Serving an aiohttp application on host:port, as the webhook and the console do.

``serving(app, host, port, ...)`` listens (``ConfigError`` when the address cannot be used),
yields the bound address and stops the server on the way out. Its runner (``ProblemRunner``)
answers what aiohttp's HTTP parser refuses before any handler runs (a bad request line, a bad
header, a header over the 8 KiB field limit, bad chunking, a lying Content-Length) with a 400
``application/problem+json`` (415 for a Content-Encoding it cannot decode), as every other 4xx
of the service, instead of aiohttp's text/plain;
the detail names the kind of error only. Such a request is logged as one warning line naming the
kind of error, without the offending line (it may be a signature header or a piece of the body),
and an application that sets ``ON_REFUSED`` is told its status (no handler or middleware sees it:
the webhook counts it in ``leadstage_webhook_requests_total`` there).

aiohttp has no public hook for those answers: ``RequestHandler.handle_error`` is overridden, and
``tests/test_aiohttp_internals.py`` checks the internals this relies on against the installed
aiohttp (pyproject pins it below its next minor release).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Final

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from producers.problems import Problem, unsupported_encoding
from worker.core.errors import ConfigError

__all__ = ["KEEPALIVE_TIMEOUT_S", "ON_REFUSED", "ProblemRunner", "log_malformed_requests_as_warnings", "serving"]

#: An idle connection, or one still sending its request line and headers, is closed after this
#: (aiohttp's default is an hour). 75 s, nginx's default, stays above the 60 s idle timeout usual
#: in load balancers, which reuse connections and must not find them closed under them.
KEEPALIVE_TIMEOUT_S: Final = 75.0

#: Set on an application to be called with the status of each request the HTTP parser refuses.
ON_REFUSED: Final = web.AppKey[Callable[[int], None]]("leadstage_on_refused")

#: What the client is told about a request the parser refused, by the parser's exception (the
#: first class in the exception's MRO that is named here).
_MALFORMED: Final[dict[type[Exception], str]] = {
    http_exceptions.LineTooLong: "the request line or a header is too long",
    http_exceptions.InvalidHeader: "a header is malformed",
    http_exceptions.BadHttpMethod: "the request method is malformed",
    http_exceptions.BadStatusLine: "the request line is malformed",
    http_exceptions.InvalidURLError: "the request target is malformed",
    http_exceptions.TransferEncodingError: "the chunked encoding is malformed",
    http_exceptions.ContentLengthError: "the Content-Length is wrong for the body",
    http_exceptions.HttpProcessingError: "the request is malformed",
}


def malformed_detail(error: BaseException | None) -> str:
    """What a 400 of the parser says: the kind of error, never the offending bytes."""
    for kind in type(error).__mro__:
        if kind in _MALFORMED:
            return _MALFORMED[kind]
    return _MALFORMED[http_exceptions.HttpProcessingError]


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as problem+json."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: it logs (see _malformed_requests_as_warnings) and refuses a second answer
        # on a connection that has sent part of one.
        super().handle_error(request, status, exc, message)
        if isinstance(exc, http_exceptions.ContentEncodingError):
            # Refused with the headers, before any body: a coding aiohttp knows but cannot decode
            # here (br, zstd without their libraries). As any coding the service does not decode: 415.
            problem = unsupported_encoding()
        elif status >= HTTPStatus.INTERNAL_SERVER_ERROR:
            # A handler's exception that no middleware turned into an answer (the outer ones).
            problem = Problem(status, HTTPStatus(status).phrase, "unexpected error; see the server log")
        else:  # the parser refused the request (aiohttp answers those 400)
            problem = Problem(status, HTTPStatus(status).phrase, malformed_detail(exc), kind="malformed-request")
        manager = self._manager
        refused = problem.status < HTTPStatus.INTERNAL_SERVER_ERROR  # by the parser: no middleware saw it
        if refused and isinstance(manager, _ProblemServer) and manager.on_refused is not None:
            manager.on_refused(problem.status)
        response = problem.response()
        response.force_close()  # as aiohttp's: the connection's state is unknown after an error
        return response


class _ProblemServer(web.Server):
    """aiohttp's protocol factory, making ``_ProblemRequestHandler`` connections."""

    #: The application's ``ON_REFUSED``, when it set one.
    on_refused: Callable[[int], None] | None = None

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer the parser's refusals as problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp makes its Server in Application._make_handler and offers no hook for the class:
        # the same object, with the protocol factory above.
        server.__class__ = _ProblemServer
        assert isinstance(server, _ProblemServer)
        server.on_refused = self.app.get(ON_REFUSED)
        return server


def log_malformed_requests_as_warnings() -> None:
    """Log each request the parser refuses as one warning line (the applications call this: it
    holds however they are served, also by aiohttp's test server)."""
    logging.getLogger("aiohttp.server").addFilter(_malformed_requests_as_warnings)  # added once, however often


def _malformed_requests_as_warnings(record: logging.LogRecord) -> bool:
    """aiohttp logs a request its parser refuses (a client's fault: a bad Content-Length, a header
    over 8 KiB) at error level with a traceback; any client could fill the log with them. One
    warning line instead, the parser's exception name without the traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, RequestPayloadError):
        # aiohttp drains the rest of a body after the handler; one that failed to decode fails
        # again there, for a request already answered (400) and logged.
        return False
    if isinstance(error, http_exceptions.HttpProcessingError):
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        # The kind of error only: the parser's message quotes the offending line, which may be a
        # signature header or a piece of the body.
        record.msg, record.args = "malformed request from %s: %s (%s)", (remote, type(error).__name__, error.code)
        record.exc_info = record.exc_text = None
    return True


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float
) -> AsyncIterator[tuple[str, int]]:
    """Serve ``app`` on host:port (0: a free port) until the block ends; yields the bound (host, port).

    ``ConfigError`` when the address cannot be used. ``shutdown_timeout`` is how long running
    requests may finish at the end; an idle connection is closed after ``KEEPALIVE_TIMEOUT_S``.
    """
    runner = ProblemRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound_host, bound_port = runner.addresses[0][:2]
        yield str(bound_host), int(bound_port)
    finally:
        await runner.cleanup()
