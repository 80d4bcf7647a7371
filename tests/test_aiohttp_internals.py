"""The aiohttp internals ``producers.serving`` relies on, checked against the installed aiohttp.

aiohttp answers a request its HTTP parser refuses from ``RequestHandler`` itself, before any
middleware: ``data_received`` queues an ``_ErrInfo``, ``start`` hands it to ``_make_error_handler``,
whose handler calls ``self.handle_error``. ``producers.serving`` overrides ``handle_error`` in a
``RequestHandler`` subclass and makes the runner's ``Server`` build it (``Server.__call__``,
``self._loop`` and ``self._kwargs``). pyproject pins aiohttp below its next minor release; when a
new release is allowed, these tests say whether that still holds: a failure here means reading
aiohttp's new ``web_protocol.py`` and ``web_server.py`` before moving the bound.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from producers.serving import ProblemRunner, _ProblemRequestHandler, _ProblemServer

#: The aiohttp releases whose internals were read against ``producers.serving`` (pyproject's bound).
CHECKED_RELEASES = ("3.14",)


def test_the_installed_aiohttp_is_a_checked_release() -> None:
    version = importlib.metadata.version("aiohttp")
    assert version.rsplit(".", 1)[0] in CHECKED_RELEASES, f"aiohttp {version}: check its internals, then add it"


def test_handle_error_keeps_its_signature_and_is_overridden() -> None:
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"]
    assert not inspect.iscoroutinefunction(RequestHandler.handle_error)
    assert _ProblemRequestHandler.handle_error is not RequestHandler.handle_error


def test_parser_errors_reach_handle_error() -> None:
    assert "_ErrInfo(status=400" in inspect.getsource(RequestHandler.data_received)
    assert "self._make_error_handler(message)" in inspect.getsource(RequestHandler.start)
    assert "self.handle_error(" in inspect.getsource(RequestHandler._make_error_handler)


def test_the_server_builds_its_request_handlers_from_loop_and_kwargs() -> None:
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in inspect.getsource(web.Server.__call__)
    # The subclass adds no slots, so that the runner's Server can take its class.
    assert _ProblemRequestHandler.__slots__ == ()
    assert not hasattr(_ProblemServer, "__slots__") or _ProblemServer.__slots__ == ()


async def test_the_runner_serves_with_problem_handlers() -> None:
    runner = ProblemRunner(web.Application(), handle_signals=False)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, _ProblemServer)
        handler = server()
        assert isinstance(handler, _ProblemRequestHandler)
        assert handler._loop is asyncio.get_running_loop()
    finally:
        await runner.cleanup()
