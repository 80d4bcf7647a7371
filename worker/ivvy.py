"""The iVvy API client: signed POSTs, typed results, one exception tree.

``Transport`` is the one seam for HTTP (as in httpx): ``AiohttpTransport`` is the real one,
one ``aiohttp.ClientSession`` per process, made at start-up. It is also where aiohttp's
exceptions become ``IvvyNoAnswer``/``IvvyTimeout``; ``IvvyClient`` turns iVvy's answers into
results or into the exceptions of ``worker.core.errors`` (classified there, once): by the body's
``errorCode`` when it has one, whatever the HTTP status, as the official .NET SDK does.

Every answer's ``Date`` header, when iVvy sends one, measures this host's clock against iVvy's
(``leadstage_clock_skew_seconds``): a stale-request answer (23005) then says by how much.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

from worker.backoff import backoff_seconds
from worker.core import metrics
from worker.core.change import LeadStageChange
from worker.core.errors import (
    IvvyClockSkew,
    IvvyNoAnswer,
    IvvyRejected,
    IvvyTimeout,
    IvvyUnavailable,
    RetryableError,
    error_for_response,
)
from worker.core.settings import Account
from worker.signing import API_VERSION, parse_http_date, signed_headers

log = structlog.get_logger("leadstage.ivvy")

#: The most stages getLeadStageList is asked for per page.
LIST_PAGE_SIZE = 100
#: Never follow more pages than this (a server that keeps saying "more" is broken).
LIST_MAX_PAGES = 1000
#: Tries per page of getLeadStageList. Reconciling an add needs every page: if a share p of
#: requests fail, all N pages of one listing succeed only with (1-p)^N (3% for 45 pages at 7%,
#: as the soak found), and each failed listing cost the add an attempt. A page is a read, safe to
#: ask again at once; a listing now fails only if one page fails this many times in a row.
LIST_PAGE_TRIES = 4
#: How long an account pauses after a stale-request answer (23005) unless told otherwise: a
#: host's clock is not put right in milliseconds (the worker passes LEADSTAGE_BACKOFF_MAX).
CLOCK_SKEW_PAUSE_S = 60.0
#: Backoff between two tries of a page (full jitter); a Retry-After longer than the cap is not
#: waited out here but left to the job's own backoff, which pauses the account.
LIST_RETRY_BASE_S = 0.1
LIST_RETRY_CAP_S = 1.0


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """Sends one POST and returns the answer, or raises ``IvvyNoAnswer``."""

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> RawResponse: ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """The real transport: one pooled aiohttp session for the whole process."""

    def __init__(self, *, max_connections: int = 100) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            raise_for_status=False,
            skip_auto_headers=("User-Agent",),
        )

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> RawResponse:
        try:
            async with self._session.post(
                url, data=body, headers=dict(headers), timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                return RawResponse(response.status, dict(response.headers), await response.read())
        except TimeoutError:
            raise IvvyTimeout(f"iVvy did not answer within {timeout_s:g}s", outcome_unknown=True) from None
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made, so the request cannot have reached iVvy.
            raise IvvyNoAnswer(
                f"cannot connect to iVvy: {exc.os_error.strerror or exc}", outcome_unknown=False
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise IvvyNoAnswer(f"the connection to iVvy broke: {type(exc).__name__}", outcome_unknown=True) from None

    async def close(self) -> None:
        await self._session.close()


@dataclass(frozen=True, slots=True)
class StageSummary:
    """One entry of getLeadStageList: only id and name are promised by the docs."""

    id: int
    name: str
    raw: Mapping[str, Any]


@dataclass(slots=True)
class IvvyClient:
    """Calls of one iVvy account."""

    account: Account
    transport: Transport
    _: KW_ONLY
    timeout: float
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    clock_skew_pause_s: float = CLOCK_SKEW_PAUSE_S

    async def call(self, namespace: str, action: str, payload: Mapping[str, Any]) -> Any:
        """POST one signed call; return the decoded JSON answer or raise from ``worker.core.errors``."""
        request_uri = f"/api/{API_VERSION}/{namespace}?action={action}"
        body = orjson.dumps(payload)
        headers = signed_headers(
            api_key=self.account.api_key,
            api_secret=self.account.api_secret.get(),
            request_uri=request_uri,
            body=body,
            now=self.clock(),
        )
        response = await self.transport.post(self.account.base_url + request_uri, headers, body, self.timeout)
        skew = clock_skew_s(response.headers, self.clock())
        if skew is not None:
            metrics.CLOCK_SKEW.labels(self.account.name).set(skew)
        try:
            return _decode(response, skew, self.clock_skew_pause_s)
        except IvvyClockSkew as error:
            metrics.CLOCK_SKEW_ERRORS.labels(self.account.name).inc()
            log.warning("ivvy.clock_skew", account=self.account.name, skew_s=skew, pause_s=error.retry_after)
            raise

    async def add_or_update_lead_stage(self, change: LeadStageChange) -> int:
        """Apply one change; return the stage id iVvy reports."""
        return lead_stage_id(await self.call("crm", "addOrUpdateLeadStage", change.body()), change)

    async def get_lead_stage_list(
        self, *, name: str | None = None, per_page: int = LIST_PAGE_SIZE
    ) -> list[StageSummary]:
        """Every lead stage (of this ``name``, with the docs' filter), following the pagination of the
        docs (``start``/``perPage``); each page is tried up to ``LIST_PAGE_TRIES`` times (see there).

        A server that ignores the filter answers with every stage: callers still check the names.
        """
        query: dict[str, Any] = {} if name is None else {"filter": {"name": name}}
        stages: list[StageSummary] = []
        start = 0
        for _ in range(LIST_MAX_PAGES):
            answer = await self._list_page({**query, "start": start, "perPage": per_page})
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list):
                raise IvvyUnavailable(f"getLeadStageList answered without results: {excerpt(answer)}")
            for item in results:
                if isinstance(item, dict) and "id" in item:
                    try:
                        stages.append(StageSummary(int(item["id"]), str(item.get("name", "")), item))
                    except (TypeError, ValueError):
                        continue
            meta = answer.get("meta") if isinstance(answer.get("meta"), dict) else {}
            total = meta.get("totalResults")
            start += len(results)
            # Stop on an empty page, or when the server's own count says we have everything.
            if not results or (isinstance(total, int) and start >= total):
                return stages
        raise IvvyUnavailable(f"getLeadStageList did not end after {LIST_MAX_PAGES} pages")

    async def _list_page(self, query: Mapping[str, Any]) -> Any:
        """One page of getLeadStageList, tried up to ``LIST_PAGE_TRIES`` times on a retryable error."""
        for attempt in range(1, LIST_PAGE_TRIES + 1):
            try:
                return await self.call("crm", "getLeadStageList", query)
            except RetryableError as error:
                if attempt == LIST_PAGE_TRIES or (error.retry_after or 0.0) > LIST_RETRY_CAP_S:
                    raise
                await asyncio.sleep(
                    backoff_seconds(
                        attempt, base=LIST_RETRY_BASE_S, cap=LIST_RETRY_CAP_S, retry_after=error.retry_after
                    )
                )
        raise AssertionError("unreachable: the last try returns or raises")

    async def ping(self) -> Any:
        return await self.call("test", "ping", {})


def lead_stage_id(answer: Any, change: LeadStageChange) -> int:
    """The stage id of addOrUpdateLeadStage's successful answer to ``change`` (a single call's or a
    batch job's), or the error that says it did not succeed."""
    stage_id = answer.get("id") if isinstance(answer, dict) else None
    if not isinstance(answer, dict) or answer.get("success") is not True:
        raise IvvyRejected(f"iVvy did not report success: {excerpt(answer)}", http_status=200)
    try:
        return int(stage_id)  # type: ignore[arg-type]  # checked by the except below
    except (TypeError, ValueError):
        if change.id is not None:
            return change.id
        raise IvvyUnavailable(f"iVvy reported success without a stage id: {excerpt(answer)}") from None


def _decode(response: RawResponse, clock_skew: float | None = None, stale_pause_s: float = 0.0) -> Any:
    try:
        answer = orjson.loads(response.body) if response.body else None
    except orjson.JSONDecodeError:
        answer = None
    return classify_answer(
        answer,
        response.status,
        response.headers,
        raw=response.body.decode("utf-8", "replace"),
        clock_skew=clock_skew,
        stale_pause_s=stale_pause_s,
    )


def classify_answer(
    answer: Any,
    http_status: int | None,
    headers: Mapping[str, str],
    *,
    raw: str,
    clock_skew: float | None = None,
    stale_pause_s: float = 0.0,
) -> Any:
    """The one reading of an iVvy answer (docs/contract.md: Retries): ``answer`` itself, or the
    exception of ``worker.core.errors`` it means. A batch job's response goes through here too,
    without an HTTP status of its own (``http_status`` None: read as 200) and without headers: its
    body's ``errorCode`` decides."""
    status = 200 if http_status is None else http_status
    error = answer if isinstance(answer, dict) and answer.get("errorCode") not in (None, False, 0) else None
    if 200 <= status < 300 and error is None:
        if answer is None:
            raise IvvyUnavailable(f"iVvy answered {status} without a JSON body", http_status=status)
        return answer
    if error is None:
        error = answer if isinstance(answer, dict) else {}
    code = error.get("errorCode")
    # The body's errorCode decides when it is an error status; the HTTP status otherwise.
    effective = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else status
    specific = error.get("specificCode")
    additional = error.get("additionalMessages")
    message = str(error.get("message", "")) or excerpt(raw)
    if effective < 400:
        raise IvvyUnavailable(f"iVvy answered {status} with an error body: {excerpt(error)}", http_status=status)
    if effective != status and http_status is not None:
        message += f" (HTTP status {status})"
    raise error_for_response(
        effective,
        message=message,
        specific_code=specific if isinstance(specific, int) and not isinstance(specific, bool) else None,
        additional_messages=[str(m) for m in additional] if isinstance(additional, list) else (),
        retry_after=parse_retry_after(headers),
        clock_skew_s=clock_skew,
        stale_pause_s=stale_pause_s,
    )


def clock_skew_s(headers: Mapping[str, str], now: datetime) -> float | None:
    """iVvy's clock (its Date header) minus ``now``, in seconds; None without a readable Date.

    The Date has whole seconds and is taken when the answer was made: good to a second or two,
    plenty for a tolerance of five minutes.
    """
    value = next((v for k, v in headers.items() if k.lower() == "date"), None)
    if value is None:
        return None
    try:
        return (parse_http_date(value) - now).total_seconds()
    except (TypeError, ValueError, IndexError):
        return None


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def excerpt(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
