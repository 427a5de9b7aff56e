"""Signed-cookie sessions and CSRF tokens for the dashboard.

Why not Starlette's ``SessionMiddleware`` as is: its ``Secure`` flag is fixed
at start-up, but the same receiver is reached over plain HTTP in development
and over HTTPS behind a proxy in production. Here the flag follows the
request's scheme (uvicorn's ``proxy_headers`` turns ``X-Forwarded-Proto`` into
the scheme), the cookie is confined to the dashboard's path (pixel and click
requests never carry it), and the signing key is derived from the secret key
with its own label, so a session cookie can never be mistaken for a tracking
token or the other way round.

Sessions stay stateless (receivers scale out without a shared store), except
for one number: each carries its user's ``session_version``, which the
dashboard checks on every request against the users row it reads anyway
(receiver/dashboard/web.py ``current_viewer``); sign-out, a new password and
removing the user raise or drop it, so every cookie of that user ends on the
server, not only in the browser that signed out. Login
replaces the whole session with a fresh random ``sid`` and CSRF token, so a
cookie planted before login never becomes an authenticated one (no fixation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

import itsdangerous
from itsdangerous.exc import BadSignature
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import Session
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "trackrelay_session"
MAX_AGE = 12 * 60 * 60  # a working day; after that, log in again
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def session_key(secret: str) -> str:
    """A key for session cookies only, derived from the deployment secret."""
    return hmac.new(secret.encode(), b"trackrelay/dashboard-session", hashlib.sha256).hexdigest()


class SessionMiddleware:
    """``request.session`` backed by a signed, timestamped cookie."""

    def __init__(self, app: ASGIApp, secret_key: str, max_age: int = MAX_AGE) -> None:
        self.app = app
        self.signer = itsdangerous.TimestampSigner(session_key(secret_key))
        self.max_age = max_age

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        raw = connection.cookies.get(COOKIE_NAME)
        loaded = self._load(raw) if raw else None
        scope["session"] = Session(loaded or {})
        path = scope.get("root_path") or "/"

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                session: Session = scope["session"]
                headers = MutableHeaders(scope=message)
                if session.accessed:
                    headers.add_vary_header("Cookie")
                if session.modified:
                    headers.append("Set-Cookie", self._cookie(scope, session, path))
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _load(self, raw: str) -> dict[str, Any] | None:
        try:
            data = self.signer.unsign(raw.encode(), max_age=self.max_age)
            value = json.loads(base64.b64decode(data))
        except (BadSignature, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _cookie(self, scope: Scope, session: Session, path: str) -> str:
        flags = f"Path={path}; HttpOnly; SameSite=Lax"
        if scope.get("scheme") in ("https", "wss"):
            flags += "; Secure"
        if not session:
            return f"{COOKIE_NAME}=; {flags}; Max-Age=0"
        data = self.signer.sign(base64.b64encode(json.dumps(session).encode())).decode()
        return f"{COOKIE_NAME}={data}; {flags}; Max-Age={self.max_age}"


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, created on first use."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok(session: dict[str, Any], submitted: str | None) -> bool:
    expected = session.get("csrf")
    if not isinstance(expected, str) or not expected or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


def start_session(session: dict[str, Any], user_id: int, username: str, version: int) -> None:
    """Log in: drop everything from before (no fixation), new sid and CSRF token.

    ``version`` is the user's ``session_version``: the dashboard accepts the
    session only while the user's row still has it (sign-out raises it).
    ``username`` guards against an id given again to a new user after a removal.
    """
    session.clear()
    session["sid"] = secrets.token_urlsafe(16)
    session["uid"] = user_id
    session["user"] = username
    session["ver"] = version
    session["csrf"] = secrets.token_urlsafe(32)


# --- the "self" mark: a signed-in dashboard user's own opens and clicks ---

SELF_COOKIE = "trackrelay_self"
SELF_PATHS = ("/o", "/c")  # the tracking URLs only; the dashboard cookie never goes there


def self_key(secret: str) -> str:
    return hmac.new(secret.encode(), b"trackrelay/self-mark", hashlib.sha256).hexdigest()


class SelfMark:
    """A cookie set at sign-in for ``/o`` and ``/c`` only, verified by its signature alone.

    The classifier's ``self`` verdict needs to know that a hit comes from a
    signed-in dashboard user, but the session cookie is confined to
    ``/dashboard`` and the tracking fast path never runs the session middleware
    (nor may it ask the database). So sign-in also sets this small timestamped
    cookie on each tracking path; a hit carrying a valid one is the user's own.
    It says nothing about who (it grants nothing), lives as long as a session,
    and sign-out clears it in that browser. Over HTTPS it is ``SameSite=None``,
    so the user's own mail open in webmail (a cross-site image) carries it too.
    """

    def __init__(self, secret_key: str, max_age: int = MAX_AGE) -> None:
        self.signer = itsdangerous.TimestampSigner(self_key(secret_key))
        self.max_age = max_age
        self._name = SELF_COOKIE.encode() + b"="

    def cookies(self, https: bool, clear: bool = False) -> list[str]:
        """``Set-Cookie`` values for every tracking path (cleared with ``clear``)."""
        flags = "HttpOnly; SameSite=None; Secure" if https else "HttpOnly; SameSite=Lax"
        value = "" if clear else self.signer.sign(b"1").decode()
        age = 0 if clear else self.max_age
        return [f"{SELF_COOKIE}={value}; Path={p}; {flags}; Max-Age={age}" for p in SELF_PATHS]

    def carried(self, cookie_header: bytes) -> bool:
        """True when a ``Cookie`` header holds a valid, unexpired mark (one HMAC, no I/O)."""
        start = cookie_header.find(self._name)
        if start < 0:
            return False
        start += len(self._name)
        end = cookie_header.find(b";", start)
        value = cookie_header[start:] if end < 0 else cookie_header[start:end]
        try:
            self.signer.unsign(value.strip(), max_age=self.max_age)
        except BadSignature:
            return False
        return True
