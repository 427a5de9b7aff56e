"""What every dashboard page shares: templates, the signed-in viewer, CSRF, errors.

Every endpoint is wrapped by :func:`page`, which is where the safety rules live
in one place: no viewer → the login page; a POST without the session's CSRF
token (or from a foreign Origin) → 403 before the handler runs; an admin page
for a sender → 403. Templates autoescape everything, so text from mail
(subjects, addresses, user agents, URLs) is always shown as text.

Every page with a form answers through :func:`form_page`: a GET shows the
form, a POST is read, checked and saved, and then either the browser moves on
(a flash and a 303, or the page that shows what was made) or the same page
comes back with what was typed and each message by its field, status 400
(:func:`render_form`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import jinja2
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from receiver.dashboard.filters import BadInput
from receiver.dashboard.forms import Errors
from receiver.sessions import CSRF_FIELD, CSRF_HEADER, csrf_ok, csrf_token
from shared import mailbox
from shared.config import Settings
from shared.db import session_scope
from shared.errors import UserError
from shared.identity import Viewer
from shared.isotime import aware, iso
from shared.models import User
from shared.users import user_addresses

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

Handler = Callable[[Request, Viewer], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]
F = TypeVar("F")  # what a form holds (a dataclass, a dict, a string)
R = TypeVar("R")  # what saving it gave


def _format_time(value: datetime | None, style: str = "full") -> str:
    value = aware(value)
    if value is None:
        return ""
    if style == "day":
        return value.strftime("%-d %b %Y")
    if style == "short":
        return value.strftime("%-d %b, %H:%M")
    return value.strftime("%-d %b %Y, %H:%M UTC")


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def _is_web_url(value: object) -> bool:
    """Only http(s) URLs become links; anything else (javascript:…) stays text."""
    return isinstance(value, str) and urlsplit(value).scheme.lower() in ("http", "https")


def _make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,  # every template, whatever its extension
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _format_time
    env.filters["plural"] = _plural
    env.filters["iso"] = lambda v: iso(v, zulu=False) or ""
    env.tests["web_url"] = _is_web_url
    return Jinja2Templates(env=env, context_processors=[_common])


def base_path(request: Request) -> str:
    """Where the dashboard is mounted (``/dashboard``), whatever the app around it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _common(request: Request) -> dict[str, Any]:
    session = request.scope.get("session", {})
    flashes = session.pop("flash", []) if session.get("flash") else []
    return {
        "base": base_path(request),
        "viewer": getattr(request.state, "viewer", None),
        "broken_mailboxes": getattr(request.state, "broken_mailboxes", []),
        "csrf_field": CSRF_FIELD,
        "csrf_token": csrf_token(session),
        "once_token": secrets.token_urlsafe(12),
        "flashes": flashes,
    }


templates = _make_templates()


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, status: int = 200
) -> Response:
    response = templates.TemplateResponse(request, name, context or {}, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


def render_form(request: Request, name: str, context: dict[str, Any], errors: Errors) -> Response:
    """A page with a form and its messages: 400 when there are any, else 200."""
    return render(request, name, {**context, "errors": errors}, 400 if errors else 200)


async def form_page(
    request: Request,
    initial: F,
    *,
    show: Callable[[F, Errors], Awaitable[Response]],
    read: Callable[[dict[str, str]], tuple[F, Errors]],
    save: Callable[[F], R],
    done: Callable[[F, R], Awaitable[Response]],
    once: str = "",
) -> Response:
    """A form page: a GET shows ``initial``; a POST is read, saved, answered.

    ``read`` turns the posted fields into the form and the messages of the
    fields that do not pass; only when none is left is ``save`` run (in a
    thread: it writes). A :class:`UserError` it raises joins the messages under
    the field it names, and ``show`` brings the page back with them (use
    :func:`render_form`: 400). Success is ``done``: a flash and a redirect, or
    the page showing what was made. ``once`` (a flash) marks a form that makes
    something shown only once: sent again (a reload, see
    :func:`submitted_before`) it redirects to the page with that flash instead.
    """
    if request.method == "GET":
        return await show(initial, Errors())
    posted = await form_of(request)
    if once and submitted_before(posted, request):
        flash(request, once)
        return RedirectResponse(request.url.path, status_code=303)
    form, errors = read(posted)
    if not errors:
        try:
            result = await asyncio.to_thread(save, form)
        except UserError as exc:
            errors.add(exc)
        else:
            if once:
                remember_submitted(posted, request)
            return await done(form, result)
    return await show(form, errors)


def then_redirect(
    request: Request, path: str, said: Callable[[F, R], str]
) -> Callable[[F, R], Awaitable[Response]]:
    """The usual ``done`` of :func:`form_page`: flash what ``said`` says, then 303 to ``path``."""

    async def done(form: F, result: R) -> Response:
        flash(request, said(form, result))
        return redirect(request, path)

    return done


async def remove_page(
    request: Request,
    row: R | None,
    remove: Callable[[R], object],
    said: Callable[[R], str],
    back: str,
) -> Response:
    """A "remove" button's POST: 404 for a row not found (or removed meanwhile:
    the owner raises a UserError), else remove it in a thread, flash, 303 to ``back``."""
    if row is None:
        return not_found(request)
    try:
        await asyncio.to_thread(remove, row)
    except UserError:
        return not_found(request)
    flash(request, said(row))
    return redirect(request, back)


def error_page(request: Request, status: int, title: str, text: str) -> Response:
    return render(
        request, "dashboard/error.html", {"title": title, "text": text, "status": status}, status
    )


def not_found(request: Request) -> Response:
    return error_page(
        request, 404, "Not found", "There is nothing here, or it is not yours to see."
    )


#: Hidden field of a form that creates something shown once (a secret, a token).
ONCE_FIELD = "once"
#: Session key: the ``once`` values of the last such forms that succeeded.
SUBMITTED = "submitted"


def submitted_before(posted: dict[str, str], request: Request) -> bool:
    """True when this exact form was already sent and succeeded (a page reload).

    Reloading the page that answered a POST makes the browser send the form
    again; without this it would create a second endpoint or token. Forms
    without the field (scripts, older pages) are not deduplicated.
    """
    once = posted.get(ONCE_FIELD, "")
    return bool(once) and once in request.session.get(SUBMITTED, [])


def remember_submitted(posted: dict[str, str], request: Request) -> None:
    once = posted.get(ONCE_FIELD, "")
    if once:
        request.session[SUBMITTED] = [*request.session.get(SUBMITTED, [])[-9:], once]


def flash(request: Request, text: str, kind: str = "ok") -> None:
    request.session["flash"] = [*request.session.get("flash", []), [kind, text]]


def redirect(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(base_path(request) + path, status_code=303)


async def form_of(request: Request) -> dict[str, str]:
    """The posted form's text fields (files are not taken anywhere)."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def path_id(request: Request, name: str) -> int:
    """A database id from the path; out-of-range numbers find nothing (404)."""
    value = int(request.path_params[name])
    return value if value < 2**31 else 0


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _load_viewer(engine: Engine, user_id: int, username: str, version: int) -> Viewer | None:
    """The user of a session, unless it was ended (another version) or the user is gone."""
    with session_scope(engine) as session:
        user = session.get(User, user_id)
    if user is None or user.id is None:
        return None
    if user.username != username or user.session_version != version:
        return None
    return Viewer(user.id, user.username, user.role, tuple(user_addresses(engine, user.id)))


async def current_viewer(request: Request) -> Viewer | None:
    """The signed-in user, read fresh each request: removed users and ended sessions
    (sign-out anywhere, a new password) lose access at once."""
    uid, username, version = (request.session.get(k) for k in ("uid", "user", "ver"))
    if not isinstance(uid, int) or not isinstance(username, str) or not isinstance(version, int):
        request.state.viewer = None
        return None
    viewer = await asyncio.to_thread(_load_viewer, engine_of(request), uid, username, version)
    if viewer is None:
        request.session.clear()
    else:  # the banner of every page: one query on mailbox_connections' user_id index
        broken = await asyncio.to_thread(mailbox.broken_of, engine_of(request), viewer.user_id)
        request.state.broken_mailboxes = broken
    request.state.viewer = viewer
    return viewer


def same_origin(request: Request) -> bool:
    """A browser's Origin header, when sent, must name this very host."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def csrf_valid(request: Request) -> bool:
    if not same_origin(request):
        return False
    submitted = request.headers.get(CSRF_HEADER)
    if submitted is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        submitted = value if isinstance(value, str) else None
    return csrf_ok(request.session, submitted)


def csrf_failed(request: Request) -> Response:
    return error_page(
        request,
        403,
        "This form has expired",
        "The page was open too long or came from somewhere else. Go back, reload it and try again.",
    )


def page(*, admin: bool = False) -> Callable[[Handler], Endpoint]:
    """Wrap a handler: sign-in, CSRF on POST, the admin rule."""

    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            viewer = await current_viewer(request)
            if viewer is None:
                if request.method != "GET":
                    return error_page(request, 401, "Signed out", "Sign in again to continue.")
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return redirect(request, f"/login?next={quote(target, safe='')}")
            if request.method == "POST" and not await csrf_valid(request):
                return csrf_failed(request)
            if admin and not viewer.is_admin:
                return error_page(
                    request, 403, "Administrators only", "Ask an administrator to make this change."
                )
            try:
                return await handler(request, viewer)
            except BadInput as exc:
                return error_page(request, 400, "Bad request", str(exc))

        return endpoint

    return wrap
