"""The console's aiohttp application: pages, the JSON API, login, and the checks on every request.

``create_app(settings, redis)`` builds it (``ConfigError`` without ``LEADSTAGE_CONSOLE_TOKEN``);
``run_console(settings, host, port)`` serves it until SIGINT/SIGTERM. Every request but the login
page and the static assets needs a token (``worker.console.auth``): the API answers 401
problem+json without one, the pages send the browser to the login form. Every answer carries a
Content-Security-Policy that allows only the console's own scripts and styles, so a value shown
on a page (an error message, a change's name) can never run as script.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final
from urllib.parse import quote

import jinja2
from aiohttp import web

from producers.problems import Problem, from_http_exception, misconfigured, unavailable
from producers.serving import log_malformed_requests_as_warnings, serving
from worker.console import api
from worker.console.auth import COOKIE, CSRF_HEADER, SESSION_S, Gate, Session
from worker.console.openapi import API
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import ConfigError, PermanentError, RedisUnavailable
from worker.core.hosts import is_loopback
from worker.core.logs import get_logger
from worker.core.processes import until_signalled
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster_of
from worker.core.redis_url import printable_url
from worker.core.settings import Settings

__all__ = ["create_app", "exposure_warning", "run_console"]

log = get_logger("leadstage.console")

#: How often the pages ask the API again (short polling: no connection held per open page).
REFRESH_MS: Final = 2000
_STATIC_TYPES: Final = {"console.css": "text/css", "console.js": "text/javascript"}
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class _State:
    settings: Settings
    gate: Gate
    templates: jinja2.Environment
    static: dict[str, bytes]


_STATE: Final = web.AppKey("leadstage_console", _State)
#: Who is asking (set by ``_authorize``): the role, and the session of a logged-in page.
ROLE: Final = web.RequestKey("leadstage_console_role", str)
SESSION: Final = web.RequestKey("leadstage_console_session", Session)


def exposure_warning(settings: Settings, host: str) -> str | None:
    """The warning for an address beyond loopback without a declared TLS proxy, else None."""
    if is_loopback(host) or settings.console_tls_proxy:
        return None
    return (
        f"the console listens on {host}, beyond loopback, and no TLS proxy is declared: tokens and the "
        "login cookie would cross the network in clear. Put a TLS-terminating proxy in front and set "
        "LEADSTAGE_CONSOLE_TLS_PROXY=1, or listen on 127.0.0.1."
    )


def create_app(settings: Settings, redis: RedisClient) -> web.Application:
    """The console over ``redis`` (the caller's client: it closes it)."""
    gate = Gate(settings)
    log_malformed_requests_as_warnings()
    package = resources.files("worker.console")
    templates = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    static = {name: package.joinpath("static", name).read_bytes() for name in _STATIC_TYPES}
    app = web.Application(client_max_size=256 * 1024, middlewares=[_middleware])
    app[_STATE] = _State(settings, gate, templates, static)
    api.add_routes(app, api.new_state(settings, redis))
    app.router.add_get("/", _page("overview.html"))
    app.router.add_get("/failures", _page("failures.html"))
    app.router.add_get("/changes", _page("change.html"))
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/static/{name}", _static)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_public(request: web.Request) -> bool:
    return request.path == "/login" or request.path.startswith("/static/")


async def _authorize(request: web.Request, gate: Gate) -> web.StreamResponse | None:
    """Record the request's role (and session); an answer when it may not go on."""
    changing = request.method not in ("GET", "HEAD")
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        role = gate.role_of_bearer(authorization)
        if role is None:
            raise Problem(401, "Unauthorized", "the bearer token is not valid", headers={"WWW-Authenticate": "Bearer"})
        request[ROLE] = role
    else:
        session = gate.session(request.cookies.get(COOKIE, ""))
        if session is None:
            if request.path.startswith(API):
                raise Problem(
                    401,
                    "Unauthorized",
                    "send Authorization: Bearer with LEADSTAGE_CONSOLE_TOKEN",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            target = request.path_qs if request.method == "GET" else "/"
            return web.Response(status=303, headers={"Location": "/login?next=" + quote(target, safe="")})
        request[ROLE], request[SESSION] = session.role, session
        if changing and not gate.csrf_ok(session, await _presented_csrf(request)):
            raise Problem(403, "Forbidden", f"a request of a logged-in page needs its CSRF token ({CSRF_HEADER})")
    if changing and request.path.startswith(API) and request[ROLE] != "admin":
        raise Problem(403, "Forbidden", "the read-only token may not change anything")
    return None


async def _presented_csrf(request: web.Request) -> str | None:
    """The header, or the ``csrf`` field of a form (a page's plain form, such as logging out)."""
    if CSRF_HEADER in request.headers:
        return request.headers[CSRF_HEADER]
    if request.content_type == "application/x-www-form-urlencoded":
        value = (await request.post()).get("csrf")  # aiohttp keeps the parsed form for the handler
        return value if isinstance(value, str) else None
    return None


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    state = request.app[_STATE]
    try:
        refused = None if _is_public(request) else await _authorize(request, state.gate)
        response = refused or await handler(request)
    except Problem as problem:
        response = problem.response()
    except ConfigError as exc:  # a PermanentError, but of the server's Redis, not of the request
        response = misconfigured(exc).response()
    except PermanentError as exc:
        response = api.bad_request(str(exc)).response()
    except RedisUnavailable as exc:
        response = unavailable(str(exc)).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = from_http_exception(exc).response()
    except Exception:  # one bad request must not take the console down; logged with its traceback
        log.exception("console.error", method=request.method, path=request.path)
        response = Problem(500, "Internal Server Error", "unexpected error; see the server log").response()
    response.headers.update(_SECURITY_HEADERS)
    # The pages poll every REFRESH_MS: their successful reads are logged at debug, the rest at info.
    quiet = request.method == "GET" and response.status < 400 and request.path.startswith(API)
    (log.debug if quiet else log.info)(
        "console.request",
        method=request.method,
        path=request.path,
        status=response.status,
        role=request.get(ROLE),
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        remote=request.remote,
    )
    return response


def _render(request: web.Request, template: str, *, status: int = 200, **context: object) -> web.Response:
    state = request.app[_STATE]
    session = request.get(SESSION)
    body = state.templates.get_template(template).render(
        role=request.get(ROLE),
        csrf=session.csrf if session else "",
        redis=printable_url(state.settings.redis_url),
        refresh_ms=REFRESH_MS,
        path=request.path,
        accounts=sorted(state.settings.accounts) or [DEFAULT_ACCOUNT],
        query=request.query,
        **context,
    )
    return web.Response(status=status, text=body, content_type="text/html")


def _page(template: str) -> Handler:
    async def page(request: web.Request) -> web.StreamResponse:
        return _render(request, template)

    return page


#: What a path in the Location header keeps as it is; anything else (non-ASCII) is percent-encoded.
_PATH_SAFE: Final = "/?&=%:@!$'()*+,;-._~"


def _safe_next(target: str) -> str:
    """Only a path of this console: never another site (``//host``, ``https://``), and nothing a
    Location header cannot carry (a control character; CR LF would inject a header), percent-encoded."""
    local = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return quote(target, safe=_PATH_SAFE) if local and target.isprintable() else "/"


async def _login_form(request: web.Request) -> web.StreamResponse:
    return _render(request, "login.html", next=_safe_next(request.query.get("next", "/")), error=None)


async def _login(request: web.Request) -> web.StreamResponse:
    gate = request.app[_STATE].gate
    form = await request.post()
    token, target = form.get("token"), _safe_next(str(form.get("next", "/")))
    role = gate.role_of_token(token) if isinstance(token, str) else None
    if role is None:
        log.warning("console.login_refused", remote=request.remote)
        return _render(request, "login.html", status=401, next=target, error="That token is not valid.")
    response = web.Response(status=303, headers={"Location": target})
    response.set_cookie(
        COOKIE,
        gate.new_session(role),
        max_age=SESSION_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=gate.secure_cookie,
    )
    log.info("console.login", role=role, remote=request.remote)
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    session = request.get(SESSION)
    if session is not None:
        request.app[_STATE].gate.revoke(session)
    response = web.Response(status=303, headers={"Location": "/login"})
    response.del_cookie(COOKIE, path="/")
    return response


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    static = request.app[_STATE].static
    if name not in static:
        raise web.HTTPNotFound()
    return web.Response(body=static[name], content_type=_STATIC_TYPES[name])


def run_console(settings: Settings, host: str, port: int) -> int:
    """Serve the console on host:port until SIGINT/SIGTERM; returns the exit status."""
    Gate(settings)  # refuse to start without a token, before anything else
    warning = exposure_warning(settings, host)
    if warning is not None:
        log.warning("console.exposed", host=host, detail=warning)
    asyncio.run(_serve(settings, host, port))
    return 0


async def _serve(settings: Settings, host: str, port: int) -> None:
    # Signals are handled from the start, so that whoever waits for the listening line may stop us.
    await until_signalled(_listen(settings, host, port))
    log.info("console.stopped")


async def _listen(settings: Settings, host: str, port: int) -> None:
    """Serve until cancelled (by a signal); the server and the Redis client are closed on the way out."""
    redis_client = connect_redis_or_cluster_of(settings)
    try:
        async with serving(create_app(settings, redis_client), host, port, shutdown_timeout=5.0) as bound:
            # The bound address, not the asked one: --port 0 takes a free port, and says which.
            log.info("console.listening", host=bound[0], port=bound[1], redis=printable_url(settings.redis_url))
            await asyncio.Event().wait()
    finally:
        await redis_client.aclose()
