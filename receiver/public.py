"""The tracking host's front page: what it is, who runs it, and "stop tracking me".

Anyone who finds this host in a mail's source can open ``/`` and read, in plain
words, what it records and who to contact. The "stop tracking me" form adds an
address to the suppression list (``suppressions``, source ``public``), which
the relay honours for all later mail.

The form needs no login and no session. CSRF protection is a signed double
submit: a random value in a ``SameSite=Strict`` cookie, and the same value
signed with the secret key (itsdangerous, its own salt) in the form; a POST
must carry both, matching. A confirmation step (the address signed into the
second form, valid for an hour) keeps a stray click from acting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Engine
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from receiver.dashboard.headers import SecurityHeaders
from shared import addresses, policies
from shared.config import Settings
from shared.errors import UserError

log = logging.getLogger(__name__)

templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))

CSRF_COOKIE = "trackrelay_csrf"
CSRF_MAX_AGE = 2 * 3600
CONFIRM_MAX_AGE = 3600
MAX_ADDRESS = 320
_ADDRESS = re.compile(r"^[^@\s<>(),;:\"\[\]\\]+@[^@\s<>(),;:\"\[\]\\]+\.[^@\s<>(),;:\"\[\]\\]+$")


class PublicForms:
    """The signing of the public forms, keyed from the secret key, and their brake.

    Each client address may send ``TRACKRELAY_PUBLIC_FORM_LIMIT`` POSTs per
    ``TRACKRELAY_PUBLIC_FORM_WINDOW`` seconds (both steps count), so nobody
    fills the suppression list with arbitrary addresses. Counts live in memory,
    per receiver process, like the sign-in brake.
    """

    def __init__(self, settings: Settings) -> None:
        secret = settings.secret_key.get_secret_value()
        self.csrf = URLSafeTimedSerializer(secret, salt="trackrelay.public.csrf")
        self.confirm = URLSafeTimedSerializer(secret, salt="trackrelay.public.confirm")
        self.secure_cookie = settings.base_url.startswith("https://")
        self.limit = settings.public_form_limit
        self.window = settings.public_form_window
        self._posts: dict[str, deque[float]] = {}

    def wait(self, ip: str) -> float:
        """Seconds this address must wait before another POST (0: count this one, go on)."""
        now = time.monotonic()
        times = self._posts.setdefault(ip, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return times[0] + self.window - now
        times.append(now)
        if len(self._posts) > 10_000:  # forget the oldest addresses, bounded memory
            for key in list(self._posts)[:5_000]:
                del self._posts[key]
        return 0.0


def normalize_address(value: str) -> str | None:
    """A plausible mail address in the form the relay looks up, or None.

    The canonical form (lower case, IDNA domain) is ``shared.addresses``': an
    address stored any other way would never match at the relay.
    """
    address = value.strip()
    if len(address) > MAX_ADDRESS or not _ADDRESS.match(address):
        return None
    try:
        return addresses.normalize_address(address)
    except UserError:
        return None


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    settings: Settings = request.app.state.settings
    forms: PublicForms = request.app.state.public_forms
    cookie = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
    context |= {
        "operator_name": settings.operator_name,
        "operator_contact": settings.operator_contact,
        "base_url": settings.base_url,
        "full_ip": settings.store_full_ip,
        "csrf_token": forms.csrf.dumps(cookie),
    }
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(
        CSRF_COOKIE,
        cookie,
        max_age=CSRF_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=forms.secure_cookie,
    )
    return response


async def home(request: Request) -> Response:
    return _page(request, "public/index.html")


async def _checked_form(request: Request) -> FormData | Response:
    """The POSTed form after the CSRF check, or the 400/403 page to answer."""
    forms: PublicForms = request.app.state.public_forms
    wait = forms.wait(request.client.host if request.client else "")
    if wait > 0:
        minutes = max(1, math.ceil(wait / 60))
        return _page(
            request,
            "public/index.html",
            429,
            error=f"Too many requests from your address. Try again in {minutes} minute"
            f"{'s' if minutes > 1 else ''}.",
        )
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return _page(request, "public/index.html", 400, error="Please use the form below.")
    try:
        form = await request.form(max_files=0, max_fields=10, max_part_size=4096)
    except HTTPException:  # malformed or oversized form
        return _page(request, "public/index.html", 400, error="Please use the form below.")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    try:
        signed = forms.csrf.loads(str(form.get("csrf", "")), max_age=CSRF_MAX_AGE)
    except BadSignature:
        signed = None
    if not cookie or not isinstance(signed, str) or not secrets.compare_digest(signed, cookie):
        return _page(
            request,
            "public/index.html",
            403,
            error="This form expired or did not come from this page (cookies must be on). "
            "Please try again below.",
        )
    return form


async def stop_tracking(request: Request) -> Response:
    form = await _checked_form(request)
    if isinstance(form, Response):
        return form
    address = normalize_address(str(form.get("address", "")))
    if address is None:
        return _page(
            request,
            "public/index.html",
            400,
            error="That does not look like an email address. Please check it and try again.",
            address=str(form.get("address", ""))[:MAX_ADDRESS],
        )
    forms: PublicForms = request.app.state.public_forms
    return _page(
        request, "public/confirm.html", address=address, confirm=forms.confirm.dumps(address)
    )


async def confirm_stop_tracking(request: Request) -> Response:
    form = await _checked_form(request)
    if isinstance(form, Response):
        return form
    forms: PublicForms = request.app.state.public_forms
    try:
        address = forms.confirm.loads(str(form.get("confirm", "")), max_age=CONFIRM_MAX_AGE)
    except BadSignature:
        return _page(
            request,
            "public/index.html",
            400,
            error="This confirmation expired or was changed. Please enter your address again.",
        )
    engine: Engine = request.app.state.engine
    try:
        await asyncio.to_thread(policies.add_suppression, engine, str(address), "public")
    except Exception:
        log.exception("could not record a suppression")
        return _page(
            request,
            "public/index.html",
            503,
            error="We could not save this right now. Please try again in a few minutes.",
        )
    log.info("suppressed %s at the recipient's request", address)
    return _page(request, "public/done.html", address=address)


#: The dashboard's security headers (receiver/dashboard/headers.py, their owner):
#: the pages' style is receiver/static/public.css, so the same CSP holds.
_HEADERS = [Middleware(SecurityHeaders)]

routes = [
    Route("/", home, methods=["GET"], name="public_home", middleware=_HEADERS),
    Route(
        "/stop-tracking",
        stop_tracking,
        methods=["POST"],
        name="stop_tracking",
        middleware=_HEADERS,
    ),
    Route(
        "/stop-tracking/confirm",
        confirm_stop_tracking,
        methods=["POST"],
        name="confirm_stop_tracking",
        middleware=_HEADERS,
    ),
]
