"""Who may use the console: tokens, the login cookie and CSRF tokens.

Two roles: ``admin`` (``LEADSTAGE_CONSOLE_TOKEN``: read, replay, discard) and ``read``
(``LEADSTAGE_CONSOLE_READ_TOKEN``: read only). Scripts send the token as ``Authorization: Bearer``.
A browser logs in once with a form; the cookie it gets is not the token but a session signed with
a key made at start-up (a restart logs everyone out), HttpOnly (no script reads it) and
SameSite=Strict (no other site sends it), Secure behind a declared TLS proxy. Logging out revokes
the session in this process, so a copy of the cookie stops working too.

A request authenticated by the cookie must carry the session's CSRF token to change anything
(``X-CSRF-Token`` header, or a ``csrf`` form field): the cookie is sent by the browser on its own,
the CSRF token only by the console's own pages. A bearer header is never sent by a browser on its
own, so it needs none.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final, Literal

from worker.core.errors import ConfigError
from worker.core.settings import Secret, Settings

Role = Literal["admin", "read"]

COOKIE: Final = "leadstage_console"
CSRF_HEADER: Final = "X-CSRF-Token"
#: How long a login lasts.
SESSION_S: Final = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    role: Role
    csrf: str
    nonce: str
    expires: int


class Gate:
    """Checks tokens and sessions for one console process."""

    def __init__(self, settings: Settings) -> None:
        if settings.console_token is None:
            raise ConfigError(
                "LEADSTAGE_CONSOLE_TOKEN is not set: the console is off without it "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
            )
        self._tokens: list[tuple[Secret, Role]] = [(settings.console_token, "admin")]
        if settings.console_read_token is not None:
            self._tokens.append((settings.console_read_token, "read"))
        self._key = secrets.token_bytes(32)
        #: Sessions logged out before they expire: nonce -> expiry (forgotten once expired).
        self._revoked: dict[str, int] = {}
        self.secure_cookie = settings.console_tls_proxy

    def role_of_token(self, presented: str) -> Role | None:
        """The role of a presented token; every configured token is compared, in constant time."""
        found: Role | None = None
        for token, role in self._tokens:
            if hmac.compare_digest(presented.encode(), token.get().encode()):
                found = role
        return found

    def role_of_bearer(self, authorization: str) -> Role | None:
        scheme, _, presented = authorization.partition(" ")
        return self.role_of_token(presented.strip()) if scheme.lower() == "bearer" else None

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def new_session(self, role: Role) -> str:
        """A cookie value: role, expiry and a nonce, signed."""
        body = f"{role}.{int(time.time()) + SESSION_S}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign(body)}"

    def session(self, cookie: str) -> Session | None:
        """The session of a cookie value; None when forged, altered or expired."""
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        role, expires, nonce = [*body.split("."), "", "", ""][:3]
        if role not in ("admin", "read") or not expires.isdigit() or int(expires) < time.time():
            return None
        if nonce in self._revoked:
            return None
        return Session("admin" if role == "admin" else "read", self._sign("csrf." + nonce), nonce, int(expires))

    def revoke(self, session: Session) -> None:
        """Log a session out: its cookie, even if kept somewhere, is no session any more."""
        now = time.time()
        self._revoked = {nonce: expires for nonce, expires in self._revoked.items() if expires >= now}
        self._revoked[session.nonce] = session.expires

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())
