"""The Mailbox page: each person's mailbox connections, connected in the browser.

"Connect" is the authorization code grant with PKCE (RFC 7636, S256) through
shared/oauth.py: the POST (CSRF-checked like every form) keeps the state, the
code verifier, the provider and the address in the signed session cookie and
sends the browser to the provider; the provider sends it back to
:data:`CALLBACK` (register ``TRACKRELAY_PUBLIC_URL`` + that path with the
provider), where the state must be the session's (single use: taken out of the
session at once; expires after :data:`PENDING_TTL`), the code is traded for a
token and the grant stored by shared/mailbox.py for the signed-in user. Every
failure (consent declined, a foreign or stale state, the provider refusing the
code, the provider unreachable, an address the person may not send as) is a
message on the page, never a traceback.

The session cookie is signed, not encrypted: the verifier in it is the
person's own browser's (RFC 7636 protects the code on its way back, and the
code is worthless without the client secret and the verifier).

"Connect with an app password" (providers whose table has ``app_passwords =
true``; :data:`PASSWORD_PATH`) posts the address, the login at the provider
and the password, CSRF-checked like the rest; shared/mailbox.py
``connect_password`` tries it once at the provider's smtp and keeps it sealed.
A refusal is shown in the form; the password is never sent back in a page.

Administrators see every connection and may disconnect any. A disconnect the
provider cannot be asked about now keeps the connection and offers, on that
connection's row, "Forget without revoking" (:data:`UNREVOKED` in the
session: the one connection it is offered for). Each connection shows its
last error and when.

Outside local auth mode (or in dev mode) the relay sends nothing through
connections: the page says so (shared/mailbox.py ``unused``), and the
message after connecting does not claim the mail now goes through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from receiver.dashboard.forms import Errors, text
from receiver.dashboard.headers import csp_with_form_targets
from receiver.dashboard.web import (
    engine_of,
    flash,
    form_of,
    form_page,
    not_found,
    page,
    path_id,
    redirect,
    render_form,
    settings_of,
    then_redirect,
)
from shared import mailbox, oauth
from shared.config import Settings
from shared.errors import UserError
from shared.identity import Viewer
from shared.models import MailboxConnection
from shared.oauth import OAuthRefused, ProviderUnavailable
from shared.oauthproviders import OAuthProvider

log = logging.getLogger(__name__)

#: Where the provider sends the person back (under the dashboard's mount).
CALLBACK = "/mailbox/callback"
#: Session key of the sign-in under way at a provider.
PENDING = "mailbox_pending"
#: Seconds a sign-in at the provider may take.
PENDING_TTL = 600.0
#: Where "Connect with an app password" posts (under the dashboard's mount).
PASSWORD_PATH = "/mailbox/password"  # noqa: S105 (a path)
#: Session key of the connection whose revocation failed: "Forget without revoking" shows.
UNREVOKED = "mailbox_unrevoked"
LABELS = {"microsoft": "Microsoft 365", "google": "Google"}


def redirect_uri(settings: Settings) -> str:
    """What the provider sends the browser back to: the receiver's public URL."""
    return f"{settings.base_url}/dashboard{CALLBACK}"


def _configured(settings: Settings) -> list[OAuthProvider]:
    """Every configured provider: Microsoft 365, Google, the rest by name."""
    found = [p for p in settings.oauth.values() if isinstance(p, OAuthProvider)]
    order = {"microsoft": 0, "google": 1}
    found.sort(key=lambda p: (order.get(p.preset or "", 2), p.name))
    return found


def providers(settings: Settings) -> list[tuple[str, str]]:
    """(name, button label) of each provider with an OAuth sign-in."""
    return [(p.name, _name(p)) for p in _configured(settings) if not p.password_only]


def password_providers(settings: Settings) -> list[tuple[str, str]]:
    """(name, label) of each provider taking app passwords (``app_passwords``)."""
    return [(p.name, _name(p)) for p in _configured(settings) if p.app_passwords]


def _name(found: OAuthProvider) -> str:
    return LABELS.get(found.preset or "", found.name)


def _label(settings: Settings, name: str) -> str:
    return {p.name: _name(p) for p in _configured(settings)}.get(name, name)


def _authorization_origins(settings: Settings) -> list[str]:
    """Where Connect sends the browser: each provider's authorization endpoint's origin
    (a provider found by discovery is asked once per process; one not answering is left
    out, and its Connect says so)."""
    origins = []
    for found in settings.oauth.values():
        if isinstance(found, OAuthProvider) and found.password_only:
            continue  # no sign-in page to go to
        try:
            url = oauth.endpoints(found, timeout=5.0)["authorization_endpoint"]
        except ProviderUnavailable:
            continue
        parts = urlsplit(url)
        if parts.scheme and parts.netloc:
            origins.append(f"{parts.scheme}://{parts.netloc}")
    return origins


def _sendable(viewer: Viewer) -> list[str]:
    """The exact addresses the person sends as (a ``@domain`` one is typed instead)."""
    return [a for a in viewer.addresses if not a.startswith("@")]


@dataclass
class ConnectForm:
    address: str
    provider: str


def _read_connect(settings: Settings, posted: dict[str, str]) -> tuple[ConnectForm, Errors]:
    form = ConnectForm(text(posted, "address"), text(posted, "provider"))
    errors = Errors()
    if form.provider not in dict(providers(settings)):
        errors["provider"] = "That provider is not configured here."
    if not form.address:
        errors["address"] = "Say which of your addresses to connect."
    return form, errors


@dataclass
class PasswordForm:
    address: str
    provider: str
    login: str
    password: str = ""  # never rendered


def _read_password(settings: Settings, posted: dict[str, str]) -> tuple[PasswordForm, Errors]:
    form = PasswordForm(
        text(posted, "address"),
        text(posted, "provider"),
        text(posted, "login"),
        posted.get("password", ""),
    )
    errors = Errors()
    if form.provider not in dict(password_providers(settings)):
        errors["provider"] = "That provider takes no app passwords here."
    if not form.address:
        errors["address"] = "Say which of your addresses to connect."
    if not form.password:
        errors["password"] = "Paste the app password the provider gave you."  # noqa: S105
    return form, errors


async def _show(
    request: Request,
    viewer: Viewer,
    form: ConnectForm,
    errors: Errors,
    password_form: PasswordForm,
    password_errors: Errors,
) -> Response:
    """The Mailbox page, with either form's messages (400 when there are any)."""
    engine, settings = engine_of(request), settings_of(request)
    own = await asyncio.to_thread(mailbox.connections_of, engine, viewer.user_id)
    everyone = await asyncio.to_thread(mailbox.list_connections, engine) if viewer.is_admin else []
    context: dict[str, Any] = {
        "connections": own,
        "everyone": everyone,
        "providers": providers(settings),
        "password_providers": password_providers(settings),
        "labels": {p.name: _name(p) for p in _configured(settings)},
        "sendable": _sendable(viewer),
        "form": form,
        "password_form": password_form,
        "password_errors": password_errors,
        "password_path": PASSWORD_PATH,
        "redirect_uri": redirect_uri(settings),
        "unused": mailbox.unused(settings),
        "unrevoked": request.session.get(UNREVOKED),
        "nav": "mailbox",
    }
    response = render_form(request, "dashboard/mailbox.html", context, errors)
    if password_errors:
        response.status_code = 400
    origins = await asyncio.to_thread(_authorization_origins, settings)
    response.headers["Content-Security-Policy"] = csp_with_form_targets(origins)
    return response


def _initial(settings: Settings, viewer: Viewer) -> tuple[ConnectForm, PasswordForm]:
    sendable = _sendable(viewer)
    address = sendable[0] if sendable else ""
    first = password_providers(settings)
    return ConnectForm(address, ""), PasswordForm(address, first[0][0] if first else "", "")


@page()
async def mailbox_page(request: Request, viewer: Viewer) -> Response:
    """The person's connections, the Connect buttons; everyone's for administrators.

    A POST is "Connect": checked, then the browser goes to the provider."""
    engine, settings = engine_of(request), settings_of(request)
    initial, password_initial = _initial(settings, viewer)

    async def show(form: ConnectForm, errors: Errors) -> Response:
        return await _show(request, viewer, form, errors, password_initial, Errors())

    def save(form: ConnectForm) -> oauth.Authorization:
        address = mailbox.check_owner(engine, viewer.username, form.address)
        form.address = address
        found = mailbox.provider(settings, form.provider)
        try:
            return oauth.authorization_request(found, redirect_uri(settings))
        except (OAuthRefused, ProviderUnavailable) as exc:
            raise UserError(
                f"{_label(settings, form.provider)} cannot be asked now: {exc}"
            ) from None

    async def done(form: ConnectForm, started: oauth.Authorization) -> Response:
        request.session[PENDING] = {
            "state": started.state,
            "verifier": started.verifier,
            "provider": form.provider,
            "address": form.address,
            "until": time.time() + PENDING_TTL,
        }
        return RedirectResponse(started.url, status_code=303)

    return await form_page(
        request,
        initial,
        show=show,
        read=lambda posted: _read_connect(settings, posted),
        save=save,
        done=done,
    )


@page()
async def mailbox_password(request: Request, viewer: Viewer) -> Response:
    """ "Connect with an app password": tried once at the provider, then kept sealed."""
    engine, settings = engine_of(request), settings_of(request)
    initial, password_initial = _initial(settings, viewer)

    async def show(form: PasswordForm, errors: Errors) -> Response:
        form.password = ""  # never echoed back
        return await _show(request, viewer, initial, Errors(), form, errors)

    def save(form: PasswordForm) -> MailboxConnection:
        return mailbox.connect_password(
            engine, settings, viewer.username, form.address, form.provider,
            form.password, login=form.login,
        )  # fmt: skip

    def said(form: PasswordForm, row: MailboxConnection) -> str:
        return _connected(settings, f"{row.address} to {_label(settings, form.provider)}"
                          " with an app password")  # fmt: skip

    return await form_page(
        request,
        password_initial,
        show=show,
        read=lambda posted: _read_password(settings, posted),
        save=save,
        done=then_redirect(request, "/mailbox", said),
    )


@page()
async def mailbox_callback(request: Request, viewer: Viewer) -> Response:
    """The provider's redirect: state checked, code exchanged, grant stored; the result said."""
    pending = request.session.pop(PENDING, None)  # single use, whatever happens next
    query = dict(request.query_params)
    engine, settings = engine_of(request), settings_of(request)
    if not isinstance(pending, dict) or not query.get("state"):
        return _failed(request, "This sign-in did not start on this page (or was finished "
                       "already). Press Connect again.")  # fmt: skip
    if float(pending.get("until", 0)) < time.time():
        return _failed(request, "The sign-in at the provider took too long. Press Connect again.")
    name, address = str(pending["provider"]), str(pending["address"])
    label = _label(settings, name)
    started = oauth.Authorization(
        "", str(pending["state"]), str(pending["verifier"]), redirect_uri(settings)
    )

    def finish() -> MailboxConnection:
        found = mailbox.provider(settings, name)
        token = oauth.exchange_code(found, started, query)
        return mailbox.store(engine, settings, viewer.username, address, name, token)

    try:
        await asyncio.to_thread(finish)
    except OAuthRefused as exc:
        return _failed(request, _refused(label, exc))
    except ProviderUnavailable as exc:
        log.info("mailbox callback: %s unavailable: %s", name, exc)
        return _failed(request, f"{label} could not be reached to finish the sign-in. Try again.")
    except UserError as exc:
        return _failed(request, f"Not connected: {exc}")
    flash(request, _connected(settings, f"{address} to {label}"))
    return redirect(request, "/mailbox")


def _connected(settings: Settings, what: str) -> str:
    """What connecting did: the mail goes through the mailbox, or why it does not."""
    unused = mailbox.unused(settings)
    if unused:
        return f"Connected {what}. Note: {unused[0].upper()}{unused[1:]}."
    return f"Connected {what}: its mail now goes out through that mailbox."


def _refused(label: str, exc: OAuthRefused) -> str:
    if exc.error == "access_denied":
        return f"Not connected: access was declined at {label}."
    if exc.error == "invalid_state":
        return (
            "Not connected: this answer does not belong to the sign-in started here. "
            "Press Connect again."
        )
    why = f"{exc.error}: {exc.description[:200]}" if exc.description else exc.error
    return f"Not connected: {label} refused ({why})."


def _failed(request: Request, text: str) -> Response:
    flash(request, text, "error")
    return redirect(request, "/mailbox")


async def _connection(request: Request, viewer: Viewer) -> MailboxConnection | None:
    """The connection in the path, when it is the viewer's (or the viewer is an admin)."""
    row = await asyncio.to_thread(
        mailbox.get_connection, engine_of(request), path_id(request, "connection_id")
    )
    if row is None or (row.user_id != viewer.user_id and not viewer.is_admin):
        return None
    return row


@page()
async def mailbox_disconnect(request: Request, viewer: Viewer) -> Response:
    """Revoke the grant at the provider and forget the connection (``force``: forget
    it even when the provider cannot be asked now)."""
    row = await _connection(request, viewer)
    if row is None:
        return not_found(request)
    engine, settings = engine_of(request), settings_of(request)
    force = (await form_of(request)).get("force") == "1"
    try:
        said = await asyncio.to_thread(
            lambda: mailbox.disconnect(engine, settings, row.address, force=force)
        )
    except mailbox.NotRevoked as exc:
        request.session[UNREVOKED] = row.id
        flash(request, f"{row.address}: {exc}.", "error")
    except UserError as exc:
        flash(request, f"{row.address}: {exc}", "error")
    else:
        request.session.pop(UNREVOKED, None)
        flash(request, f"{row.address}: {said}.")
    return redirect(request, "/mailbox")


@page()
async def mailbox_sent(request: Request, viewer: Viewer) -> Response:
    """The Sent-folder mode of one connection: clean or leave."""
    row = await _connection(request, viewer)
    if row is None or row.id is None:
        return not_found(request)
    connection_id, engine = row.id, engine_of(request)

    async def show(form: dict[str, str], errors: Errors) -> Response:
        flash(request, next(iter(errors.values()), ""), "error")
        return redirect(request, "/mailbox")

    def read(posted: dict[str, str]) -> tuple[dict[str, str], Errors]:
        form, errors = {"sent": text(posted, "sent")}, Errors()
        if form["sent"] not in ("clean", "leave"):
            errors["sent"] = "Choose clean or leave for the Sent folder."
        return form, errors

    def said(form: dict[str, str], _: None) -> str:
        if form["sent"] == "clean":
            return f"{row.address}: the Sent folder keeps one untracked copy of each message."
        return f"{row.address}: the Sent folder is left as the provider fills it."

    return await form_page(
        request,
        {"sent": row.sent},
        show=show,
        read=read,
        save=lambda form: mailbox.set_sent(engine, connection_id, form["sent"]),
        done=then_redirect(request, "/mailbox", said),
    )
