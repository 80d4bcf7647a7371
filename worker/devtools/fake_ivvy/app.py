"""The fake iVvy over HTTP: routing, signatures, faults, the admin endpoints, and serving it.

Every call is ``POST /api/1.0/{namespace}?action={action}``, signed. Checks, in this order; the
first that fails answers:

1. method not POST: 405. Unknown API version, namespace or action (or no ``action``): 404.
2. the signature, with ``worker.signing.verify_request`` (the client signs with the same
   module; tests cross-check both against an independent implementation): a missing or bad
   X-Api-Authorization, unknown key, wrong Content-MD5 or signature, or a missing or unreadable
   date: 401. A date more than 5 minutes from the server's clock: 401, specific code 23005
   ("Request is stale").
3. the server's own rate limit per API key (``rate_limit_per_s``, off by default): a request past
   it in the last ``rate_limit_window_s`` (a second) is answered 429 with ``Retry-After`` that
   window (``1``) and not applied.
4. faults (``worker.devtools.fake_ivvy.faults``), only for requests that passed 1 to 3.
5. the body: empty means no parameters; otherwise it must be a JSON object sent as
   ``application/json``: else 400, specific code 23016.
6. the action (``worker.devtools.fake_ivvy.model``, ``.batch``).

Every error answer is iVvy's exception body (``worker.devtools.fake_ivvy.params.ApiError``).
Every API answer carries a ``Date`` header from the fake's clock (``clock_offset_s`` included).

Admin endpoints (no signature; the server binds to loopback unless told otherwise)
----------------------------------------------------------------------------------
* ``GET /_admin/stages`` -> ``{"stages": [{"id", "name", "colour", "applyTo", "editable"}]}``
* ``POST /_admin/stages`` ``{"name", "applyTo", "colour"?, "editable"?}`` -> ``{"id"}``:
  seed a stage directly, checked like an add (a 400 ``{"error", "field"}`` otherwise).
* ``GET /_admin/requests`` -> ``{"requests": [{"at", "namespace", "action", "key", "body",
  "status", "fault"}]}``: every API request, oldest first, the last 200 000 kept. ``at`` is
  unix seconds at receipt; ``key`` the key named in X-Api-Authorization (also when refused);
  ``body`` the parsed JSON or null; ``status`` the answer's status, null when hung or dropped;
  ``fault`` null, "latency", "5xx", "429", "hang", "drop", "24322", "gateway_5xx",
  "late_commit", "batch_drop" (a batch run accepted, its answer dropped) or "limit" (the
  server's own rate limit).
* ``GET /_admin/batches`` -> ``{"batches": [{"asyncId", "jobs", "applied", "starts"}]}``: every
  batch kept, oldest first: its number of jobs, how many are applied, and whether it ever starts
  (false for the never-ready fault).
* ``GET /_admin/faults`` -> the faults; ``POST /_admin/faults`` merges a partial object and
  returns the result, or 400 ``{"error", "field"}`` naming the bad setting.
* ``POST /_admin/reset`` (optional body ``{"faults": true}``): back to the built-in stages and
  id 1000, the request log and the batches emptied (a batch being applied stops), and with
  ``faults`` the faults too.

Speed: it serves benchmarks at thousands of requests a second, so there is no access log and
no per-request output unless asked (``log_requests``), and the request log is a bounded deque.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Final, TypedDict, Unpack

import orjson
from aiohttp import web

from worker.devtools.fake_ivvy.batch import DropAnswer
from worker.devtools.fake_ivvy.faults import CHANGE_FAULTS, FaultName, Faults, InvalidFaults
from worker.devtools.fake_ivvy.model import ACTIONS, FakeIvvy, RequestRecord
from worker.devtools.fake_ivvy.params import ApiError, apply_to_type, checked_values, string
from worker.signing import API_VERSION, CONTENT_TYPE

DEFAULT_HOST: Final = "127.0.0.1"
_ERROR_5XX: Final = (500, 502, 503)


def _json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _claimed_key(authorization: str | None) -> str | None:
    if not authorization or not authorization.startswith("IWS "):
        return None
    return authorization[4:].partition(":")[0] or None


class _Body:
    """Stand-ins for a body that has no JSON value: empty, or not JSON at all."""

    EMPTY = object()
    NOT_JSON = object()


def _parse_json(body: bytes) -> Any:
    """The decoded body, or ``_Body.EMPTY`` / ``_Body.NOT_JSON``."""
    if not body.strip():
        return _Body.EMPTY
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _Body.NOT_JSON


def _params(content_type: str, parsed: Any) -> Mapping[str, Any]:
    """The parameters of a call: the body's JSON object (an empty body has none), else 23016."""
    if parsed is _Body.EMPTY:
        return {}
    if content_type.partition(";")[0].strip().lower() != CONTENT_TYPE:
        raise ApiError(400, "The request body does not validate", 23016, [f"Content-Type must be {CONTENT_TYPE}"])
    if not isinstance(parsed, dict):
        raise ApiError(400, "The request body does not validate", 23016, ["The body must be a JSON object"])
    return parsed


def _abort(request: web.Request) -> None:
    """Drop the connection without a byte of answer (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()


class _Handlers:
    """The HTTP side of one app: routing, signatures, faults, admin."""

    def __init__(self, fake: FakeIvvy) -> None:
        self.fake = fake
        # Set at shutdown so that hanging requests end at once instead of holding the server.
        self.closing = asyncio.Event()

    async def on_shutdown(self, app: web.Application) -> None:
        self.closing.set()
        self.fake.batches.clear()

    async def api(self, request: web.Request) -> web.StreamResponse:
        fake = self.fake
        body = await request.read()
        parsed = _parse_json(body)
        record = RequestRecord(
            at=time.time(),
            namespace=request.match_info["namespace"],
            action=request.query.get("action"),
            key=_claimed_key(request.headers.get("X-Api-Authorization")),
            body=None if parsed is _Body.EMPTY or parsed is _Body.NOT_JSON else parsed,
        )
        fake.requests.append(record)
        fault: FaultName | None = None
        try:
            action = self._route(request, record)
            fake.verify(request.method, request.raw_path, request.headers.items(), body)
            if fake.over_rate_limit(record.key):
                record.fault = "limit"
                window = f"{fake.faults.rate_limit_window_s:g}"
                raise ApiError(429, "Too Many Requests", headers={"Retry-After": window})
            fault = fake.faults.pick(fake.rng)
            if fault in CHANGE_FAULTS and action is not FakeIvvy.add_or_update_lead_stage:
                fault = None
            record.fault = fault
            if fake.faults.latency_ms > 0:
                record.fault = fault or "latency"
                await asyncio.sleep(fake.faults.latency_ms / 1000)
            if fault == "hang":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(fake.faults.hang_s):
                        await self.closing.wait()
                return self._dropped(request, record)
            _raise_fault(fault, fake)
            if fault == "late_commit":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(fake.faults.late_commit_s):
                        await self.closing.wait()
            try:
                response = _json_response(200, action(fake, _params(request.headers.get("Content-Type", ""), parsed)))
            except DropAnswer:
                record.fault = "batch_drop"
                return self._dropped(request, record)
            if fault == "gateway_5xx":
                # Committed above; the gateway in front answers as if nothing happened.
                response = _json_response(504, ApiError(504, "Gateway Timeout").body())
        except ApiError as error:
            as_200 = fake.faults.errors_as_200_rate > 0 and fake.rng.random() < fake.faults.errors_as_200_rate
            response = _json_response(200 if as_200 else error.status, error.body(), error.headers)
        response.headers["Date"] = format_datetime(fake.now(), usegmt=True)
        if fault == "drop":
            return self._dropped(request, record)
        record.status = response.status
        if fake.log_requests:
            print(orjson.dumps(record).decode(), flush=True)
        return response

    def _route(self, request: web.Request, record: RequestRecord) -> Callable[[FakeIvvy, Mapping[str, Any]], Any]:
        if request.method != "POST":
            raise ApiError(405, "Method Not Allowed", additional_messages=["Every iVvy API call is a POST"])
        version = request.match_info["version"]
        if version != API_VERSION:
            raise ApiError(404, "Not Found", additional_messages=[f"API version {version!r} is not supported"])
        action = ACTIONS.get(record.namespace, {}).get(record.action or "")
        if action is None:
            raise ApiError(
                404, "Not Found", additional_messages=[f"Unknown call {record.namespace}?action={record.action}"]
            )
        return action

    def _dropped(self, request: web.Request, record: RequestRecord) -> web.Response:
        _abort(request)
        if self.fake.log_requests:
            print(orjson.dumps(record).decode(), flush=True)
        return web.Response(status=204)  # never written: the transport is gone

    async def not_found(self, request: web.Request) -> web.Response:
        return _json_response(404, ApiError(404, "Not Found").body())

    # Admin.

    async def get_stages(self, request: web.Request) -> web.Response:
        return _json_response(200, {"stages": [stage.admin() for stage in self.fake.stages.values()]})

    async def post_stage(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        editable = data.pop("editable", True)
        if not isinstance(editable, bool):
            return _admin_error("editable", "must be true or false")
        unknown = set(data) - {"name", "colour", "applyTo"}
        if unknown:
            return _admin_error(sorted(unknown)[0], "is not a stage field (name, colour, applyTo, editable)")
        try:
            fields = checked_values(string(data, "name"), string(data, "colour"), apply_to_type(data), adding=True)
        except ApiError as error:
            return _admin_error(error.field or "stage", "; ".join(error.additional_messages) or error.message)
        stage = self.fake.add_stage(
            fields["name"], apply_to=fields["applyTo"], colour=fields.get("colour"), editable=editable
        )
        return _json_response(200, {"id": stage.id})

    async def get_batches(self, request: web.Request) -> web.Response:
        return _json_response(200, {"batches": [batch.admin() for batch in self.fake.batches.batches.values()]})

    async def get_requests(self, request: web.Request) -> web.Response:
        return _json_response(200, {"requests": list(self.fake.requests)})

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json_response(200, self.fake.faults.as_dict())

    async def post_faults(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        try:
            faults = self.fake.update_faults(data)
        except InvalidFaults as exc:
            return _admin_error(exc.field, str(exc))
        return _json_response(200, faults.as_dict())

    async def post_reset(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        with_faults = data.get("faults", False)
        if not isinstance(with_faults, bool):
            return _admin_error("faults", "must be true or false")
        self.fake.reset(faults=with_faults)
        return _json_response(200, {"reset": True, "faults": self.fake.faults.as_dict()})


def _raise_fault(fault: FaultName | None, fake: FakeIvvy) -> None:
    """Answer instead of the action for the faults that answer (5xx, 429, 24322)."""
    if fault == "5xx":
        status = fake.rng.choice(_ERROR_5XX)
        raise ApiError(status, http.HTTPStatus(status).phrase)
    if fault == "429":
        raise ApiError(429, "Too Many Requests", headers={"Retry-After": str(fake.faults.retry_after_s)})
    if fault == "24322":
        raise ApiError(500, "An error has occurred", 24322)


async def _admin_json(request: web.Request) -> dict[str, Any]:
    """The admin request's JSON object ({} when empty); a 400 for anything else."""
    parsed = _parse_json(await request.read())
    if parsed is _Body.EMPTY:
        return {}
    if not isinstance(parsed, dict):
        raise web.HTTPBadRequest(
            text=orjson.dumps({"error": "the body must be a JSON object", "field": None}).decode(),
            content_type="application/json",
        )
    return parsed


def _admin_error(field: str, message: str) -> web.Response:
    return _json_response(400, {"error": message, "field": field})


#: Where other modules (and tests) find the fake of an app made by ``create_app``.
FAKE_IVVY_KEY = web.AppKey("fake_ivvy", FakeIvvy)


def create_app(fake: FakeIvvy) -> web.Application:
    """The aiohttp application serving ``fake``: the API and the admin endpoints."""
    handlers = _Handlers(fake)
    app = web.Application()
    app[FAKE_IVVY_KEY] = fake
    app.on_shutdown.append(handlers.on_shutdown)
    app.router.add_route("*", "/api/{version}/{namespace}", handlers.api)
    app.router.add_get("/_admin/stages", handlers.get_stages)
    app.router.add_post("/_admin/stages", handlers.post_stage)
    app.router.add_get("/_admin/requests", handlers.get_requests)
    app.router.add_get("/_admin/batches", handlers.get_batches)
    app.router.add_get("/_admin/faults", handlers.get_faults)
    app.router.add_post("/_admin/faults", handlers.post_faults)
    app.router.add_post("/_admin/reset", handlers.post_reset)
    # Anything else outside /_admin/ gets iVvy's 404 body (admin keeps aiohttp's 404/405).
    app.router.add_route("*", r"/{tail:(?!_admin/).*}", handlers.not_found)
    return app


class FakeOptions(TypedDict, total=False):
    """The keyword arguments of ``FakeIvvy``, passed through ``running_fake_ivvy``."""

    credentials: Mapping[str, str] | None
    faults: Faults | None
    seed: int | None
    clock: Callable[[], datetime]
    request_log_size: int
    log_requests: bool


@dataclass(frozen=True, slots=True)
class RunningFakeIvvy:
    """A fake being served: ``url`` is the base URL clients use (``IVVY_BASE_URL``)."""

    url: str
    host: str
    port: int
    fake: FakeIvvy


@contextlib.asynccontextmanager
async def running_fake_ivvy(
    host: str = DEFAULT_HOST, port: int = 0, **options: Unpack[FakeOptions]
) -> AsyncIterator[RunningFakeIvvy]:
    """Serve a new ``FakeIvvy(**options)`` on a real socket (port 0: a free one) until exit."""
    fake = FakeIvvy(**options)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    bound_port: int = sock.getsockname()[1]
    runner = web.AppRunner(create_app(fake), access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, backlog=1024).start()
        url_host = f"[{host}]" if ":" in host else host
        yield RunningFakeIvvy(url=f"http://{url_host}:{bound_port}", host=host, port=bound_port, fake=fake)
    finally:
        await runner.cleanup()
