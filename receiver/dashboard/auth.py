"""Signing in and out, with a brake on password guessing.

Failed sign-ins are counted per client address and per username over the
configured window (the same limits the relay applies to SMTP AUTH). Once a
limit is reached the password is not even checked until the window moves on,
so guessing costs the attacker time, not us CPU. Counts live in memory: each
receiver process brakes on its own, which bounds guesses to N times the limit.

In passthrough mode (``TRACKRELAY_AUTH_MODE=passthrough`` with a real
upstream) people sign in with their mail account, as in their mail client:
when no local account has that username, the password is checked with ONE
SMTP AUTH at the upstream (shared.smtpclient, TLS required) and a
sender account is made on first success (shared.users.mailbox_user). Local
accounts, administrators first of all, never go to the upstream.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from receiver.dashboard.web import (
    base_path,
    csrf_failed,
    csrf_valid,
    current_viewer,
    engine_of,
    page,
    redirect,
    render,
    settings_of,
)
from receiver.sessions import SelfMark, start_session
from shared.config import Settings
from shared.identity import Viewer
from shared.models import User
from shared.smtpclient import SmtpClient, UpstreamUnavailable
from shared.users import authenticate, end_sessions, mailbox_user, may_use_mailbox_login

CANNOT_CHECK = "Your mail server cannot check the password right now. Try again in a minute."


class LoginThrottle:
    def __init__(self, per_ip: int, per_user: int, window: float) -> None:
        self.limits = {"ip": per_ip, "user": per_user}
        self.window = window
        self._failures: dict[tuple[str, str], deque[float]] = {}

    @classmethod
    def for_settings(cls, settings: Settings) -> LoginThrottle:
        return cls(
            settings.auth_failures_per_ip,
            settings.auth_failures_per_user,
            settings.auth_failure_window,
        )

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def wait(self, ip: str, username: str) -> float:
        """Seconds until another attempt is allowed (0 when it is now)."""
        now = time.monotonic()
        waits = [0.0]
        for kind, value in (("ip", ip), ("user", username.lower())):
            times = self._recent((kind, value), now)
            if len(times) >= self.limits[kind]:
                waits.append(times[0] + self.window - now)
        return max(waits)

    def failed(self, ip: str, username: str) -> None:
        now = time.monotonic()
        for key in (("ip", ip), ("user", username.lower())):
            self._recent(key, now).append(now)
        if len(self._failures) > 10_000:  # forget the oldest keys, bounded memory
            for key in list(self._failures)[:5_000]:
                del self._failures[key]

    def succeeded(self, username: str) -> None:
        self._failures.pop(("user", username.lower()), None)


def throttle_of(request: Request) -> LoginThrottle:
    state = request.app.state
    if not hasattr(state, "login_throttle"):
        state.login_throttle = LoginThrottle.for_settings(settings_of(request))
    throttle: LoginThrottle = state.login_throttle
    return throttle


def _safe_next(request: Request, target: str) -> str:
    """Only paths inside the dashboard: never an open redirect, never a header break."""
    base = base_path(request)
    parts = urlsplit(target)
    unsafe = "\\" in target or any(ord(c) <= 32 or ord(c) == 127 for c in target)
    if parts.scheme or parts.netloc or not target.startswith(base + "/") or unsafe:
        return base + "/messages"
    return target


async def login(request: Request) -> Response:
    if request.method == "GET":
        if await current_viewer(request) is not None:
            return redirect(request, "/messages")
        return _login_page(request)
    if not await csrf_valid(request):
        return csrf_failed(request)
    form = await request.form()
    username = str(form.get("username", "")).strip()[:255]
    password = str(form.get("password", ""))
    ip = request.client.host if request.client else ""
    throttle = throttle_of(request)
    wait = throttle.wait(ip, username)
    if wait > 0:
        minutes = max(1, math.ceil(wait / 60))
        plural = "s" if minutes > 1 else ""
        error = f"Too many failed attempts. Try again in {minutes} minute{plural}."
        return _login_page(request, error, username, 429)
    user: User | None = await asyncio.to_thread(
        authenticate, engine_of(request), username, password
    )
    if user is None and username and password and mailbox_logins(settings_of(request)):
        try:
            user = await _mailbox_login(request, username, password)
        except ConnectionError:
            return _login_page(request, CANNOT_CHECK, username, 503)
    if user is None or user.id is None:
        throttle.failed(ip, username)
        return _login_page(request, "That username and password do not match.", username, 401)
    throttle.succeeded(username)
    start_session(request.session, user.id, user.username, user.session_version)
    response = redirect(request, "/messages")
    response.headers["location"] = _safe_next(request, str(request.query_params.get("next", "")))
    _mark_self(request, response)
    return response


def _mark_self(request: Request, response: Response, clear: bool = False) -> None:
    """The cookie that makes this browser's own opens and clicks ``self`` (sessions.SelfMark)."""
    mark: SelfMark = request.app.state.self_mark
    for cookie in mark.cookies(request.url.scheme == "https", clear=clear):
        response.headers.append("set-cookie", cookie)


def _login_page(
    request: Request, error: str = "", username: str = "", status: int = 200
) -> Response:
    context = {
        "error": error,
        "username": username,
        "mailbox_logins": mailbox_logins(settings_of(request)),
    }
    return render(request, "dashboard/login.html", context, status=status)


def mailbox_logins(settings: Settings) -> bool:
    """Whether the sign-in form also takes mail-account credentials."""
    return settings.auth_mode == "passthrough" and not settings.upstream_target.is_sink


async def _mailbox_login(request: Request, username: str, password: str) -> User | None:
    """The user when the upstream accepts these credentials; ConnectionError if it can't say."""
    engine = engine_of(request)
    if not await asyncio.to_thread(may_use_mailbox_login, engine, username):
        return None
    settings = settings_of(request)
    client = SmtpClient(settings, settings.upstream_target)
    try:
        await client.connect()
        reply = await client.authenticate("PLAIN", username.encode(), password.encode())
    except UpstreamUnavailable as exc:
        raise ConnectionError(str(exc)) from None
    finally:
        await client.close()
    if reply.code >= 400 and reply.code < 500:
        raise ConnectionError(str(reply))  # 454: a temporary failure, not a wrong password
    if not reply.ok:
        return None
    return await asyncio.to_thread(mailbox_user, engine, username)


@page()
async def logout(request: Request, viewer: Viewer) -> Response:
    """Sign out: this cookie is cleared, and every session of the user ends on the server."""
    await asyncio.to_thread(end_sessions, engine_of(request), viewer.user_id)
    request.session.clear()
    response = redirect(request, "/login")
    response.headers["Clear-Site-Data"] = '"cache"'
    _mark_self(request, response, clear=True)
    return response


async def home(request: Request) -> Response:
    return redirect(request, "/messages")
