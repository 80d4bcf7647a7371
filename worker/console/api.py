"""The console's JSON API under ``/api/v1/`` (documented by ``worker.console.openapi``).

Handlers read through ``worker.core.readers`` and change things only through ``readers.replay`` and
``readers.discard``. Replay and discard take ``{"keys": [...], "account": A}`` or
``{"filter": {"account", "error_code", "since"}}`` and answer what they did, key by key; the
matching dead letters are read first, then acted on, so a replayed change that fails again
during the request is not met again by it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from producers.problems import Problem, excerpt, not_json
from worker.console.openapi import API, DEFAULT_LIMIT, MAX_KEYS, MAX_LIMIT, openapi_document
from worker.core import readers
from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import InvalidChange
from worker.core.logs import get_logger
from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings

log = get_logger("leadstage.console")


#: How long one overview is reused: however many pages are open, the queue is read about once a second.
OVERVIEW_TTL_S = 1.0


class Shared:
    """One computation at a time, shared by the requests that ask meanwhile and reused for ``ttl_s``."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._at = -math.inf
        self._value: dict[str, object] = {}
        self._lock = asyncio.Lock()

    async def get(self, compute: Callable[[], Awaitable[dict[str, object]]]) -> dict[str, object]:
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl_s:
                self._value = await compute()
                self._at = time.monotonic()
            return self._value


@dataclass(frozen=True, slots=True)
class ApiState:
    settings: Settings
    redis: RedisClient
    history: readers.RateHistory
    openapi: bytes
    overview: Shared


API_STATE = web.AppKey("leadstage_console_api", ApiState)


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def bad_request(detail: str, errors: list[dict[str, object]] | None = None) -> Problem:
    return Problem(400, "Bad Request", detail, kind="bad-request", errors=errors or ())


def _optional(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name, "").strip()
    return value or None


async def overview(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    return json_response(await state.overview.get(lambda: readers.overview(state.redis, state.settings, state.history)))


async def failures(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    query = request.query
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    # ASCII digits only, and few of them: int() refuses other digits and numbers of over 4,300.
    if (
        not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6)
        or not 1 <= int(raw_limit) <= MAX_LIMIT
    ):
        raise bad_request(f"limit must be a whole number 1..{MAX_LIMIT}, not {excerpt(raw_limit)!r}")
    answer = await readers.failures(
        state.redis,
        state.settings,
        state.history,
        account=_optional(query, "account"),
        error_code=_optional(query, "error_code"),
        since_ms=await readers.since_as_ms(state.redis, _optional(query, "since"), state.settings.dlq_stream),
        limit=int(raw_limit),
        before=_optional(query, "before"),
    )
    return json_response(answer)


def _checked_key(idempotency_key: str, account: str) -> None:
    try:
        parse_envelope(idempotency_key=idempotency_key, account=account)
    except InvalidChange as exc:
        raise bad_request(str(exc), [{"field": e.field, "reason": e.reason} for e in exc.errors]) from None


async def change(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    key = request.match_info["idempotency_key"]
    account = request.query.get("account") or DEFAULT_ACCOUNT
    _checked_key(key, account)
    answer = await readers.change_timeline(state.redis, state.settings, account, key)
    if answer is None:
        hours = state.settings.ledger_retention_s / 3600
        raise Problem(
            404,
            "Not Found",
            f"no change with idempotency key {key!r} for account {account!r} "
            f"(never enqueued, or finished more than {hours:g} h ago)",
        )
    return json_response(answer)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[API_STATE].openapi, content_type="application/json")


# -- replay and discard ------------------------------------------------------------------------


def _string_field(value: object, where: str, errors: list[dict[str, object]]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        errors.append({"field": where, "reason": "must be a non-empty string"})
        return None
    return value.strip()


def parse_selection(payload: object) -> readers.Selection:
    """The body of a replay or discard request; 400 naming each bad field."""
    if not isinstance(payload, dict):
        raise bad_request('the body must be a JSON object: {"keys": [...], "account": ...} or {"filter": {...}}')
    errors: list[dict[str, object]] = [
        {"field": name, "reason": "is not a field (keys, account, filter)"}
        for name in sorted(set(payload) - {"keys", "account", "filter"})
    ]
    if ("keys" in payload) == ("filter" in payload):
        raise bad_request("give either keys or filter (a filter without fields matches every dead letter)", errors)
    if "keys" in payload:
        raw_keys = payload["keys"]
        account = _string_field(payload.get("account"), "account", errors) or DEFAULT_ACCOUNT
        if not isinstance(raw_keys, list) or not 1 <= len(raw_keys) <= MAX_KEYS:
            errors.append({"field": "keys", "reason": f"must be a list of 1..{MAX_KEYS} idempotency keys"})
        elif not all(isinstance(key, str) and key for key in raw_keys):
            errors.append({"field": "keys", "reason": "every key must be a non-empty string"})
        if errors:
            raise bad_request("invalid selection; nothing was done", errors)
        return readers.Selection(keys=list(dict.fromkeys(raw_keys)), account=account)
    if "account" in payload:
        errors.append({"field": "account", "reason": "goes inside filter when there are no keys"})
    raw_filter = payload["filter"]
    if not isinstance(raw_filter, dict):
        raise bad_request(
            "invalid selection; nothing was done", [*errors, {"field": "filter", "reason": "must be an object"}]
        )
    errors.extend(
        {"field": f"filter.{name}", "reason": "is not a filter (account, error_code, since)"}
        for name in sorted(set(raw_filter) - {"account", "error_code", "since"})
    )
    selection = readers.Selection(
        account=_string_field(raw_filter.get("account"), "filter.account", errors),
        error_code=_string_field(raw_filter.get("error_code"), "filter.error_code", errors),
        since=_string_field(raw_filter.get("since"), "filter.since", errors),
    )
    if selection.since is not None:
        try:
            readers.parse_duration(selection.since)
        except readers.BadFilter as exc:
            errors.append({"field": "filter.since", "reason": str(exc)})
    if errors:
        raise bad_request("invalid selection; nothing was done", errors)
    return selection


Act = Callable[[RedisClient, Settings, readers.Entry], Awaitable[dict[str, Any]]]


async def _replay_one(client: RedisClient, settings: Settings, entry: readers.Entry) -> dict[str, Any]:
    outcome = await readers.replay(client, settings, entry)
    return {
        "idempotency_key": outcome.idempotency_key,
        "account": outcome.account,
        "dead_letter_id": outcome.dead_letter_id,
        "status": outcome.status,
        "generation": outcome.generation,
    }


async def _discard_one(client: RedisClient, settings: Settings, entry: readers.Entry) -> dict[str, Any]:
    return {
        "idempotency_key": entry.get("idempotency_key", ""),
        "account": entry.get("account", ""),
        "dead_letter_id": entry["id"],
        "status": await readers.discard(client, settings, entry),
    }


async def _act(request: web.Request, action: str, act: Act) -> web.Response:
    state = request.app[API_STATE]
    if request.content_type != "application/json":
        raise not_json(request.content_type)
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    selection = parse_selection(payload)
    entries = [entry async for entry in readers.selected_dead_letters(state.redis, state.settings, selection)]
    results: list[dict[str, Any]] = []
    for entry in entries:
        try:
            results.append(await act(state.redis, state.settings, entry))
        except InvalidChange as exc:
            # A dead letter whose change no longer passes the rules: reported, and the others go on.
            results.append(
                {
                    "idempotency_key": entry.get("idempotency_key", ""),
                    "account": entry.get("account", ""),
                    "dead_letter_id": entry["id"],
                    "status": "error",
                    "message": str(exc),
                }
            )
    found = {entry.get("idempotency_key") for entry in entries}
    results.extend(
        {"idempotency_key": key, "account": selection.account, "dead_letter_id": None, "status": "not_found"}
        for key in selection.keys or ()
        if key not in found
    )
    log.info(
        f"console.{action}",
        done=sum(1 for r in results if r["status"] in ("queued", "discarded")),
        results=len(results),
    )
    return json_response({"action": action, "results": results})


async def replay(request: web.Request) -> web.Response:
    return await _act(request, "replay", _replay_one)


async def discard(request: web.Request) -> web.Response:
    return await _act(request, "discard", _discard_one)


def add_routes(app: web.Application, state: ApiState) -> None:
    app[API_STATE] = state
    app.router.add_get(f"{API}/overview", overview)
    app.router.add_get(f"{API}/failures", failures)
    app.router.add_get(f"{API}/changes/{{idempotency_key}}", change)
    app.router.add_post(f"{API}/dead-letters/replay", replay)
    app.router.add_post(f"{API}/dead-letters/discard", discard)
    app.router.add_get(f"{API}/openapi.json", openapi)


def new_state(settings: Settings, redis: RedisClient, overview_ttl_s: float = OVERVIEW_TTL_S) -> ApiState:
    return ApiState(settings, redis, readers.RateHistory(), orjson.dumps(openapi_document()), Shared(overview_ttl_s))
