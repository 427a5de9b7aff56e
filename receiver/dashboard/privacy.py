"""Administrators' privacy pages: consent modes and consents, erasing a recipient.

The consent page has three small forms (the global mode, a mode per recipient
domain, one recipient's consent); each shows its own message under its own
input, so an error names the form it came from. Erasing asks twice: the first
POST only shows what will happen, the second (``confirm``) erases and shows
what :func:`shared.privacy.erase` removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response

from receiver.dashboard.forms import Errors, checked, filed_under, message, text
from receiver.dashboard.web import (
    engine_of,
    flash,
    form_of,
    form_page,
    page,
    redirect,
    render_form,
    then_redirect,
)
from shared import consent, privacy
from shared.addresses import normalize_address
from shared.errors import UserError
from shared.identity import Viewer

MODE_LABELS = {
    "opt-out": "Track unless the recipient asked not to be (opt-out)",
    "opt-in": "Track only recipients who gave their consent (opt-in)",
}
SHOWN = 500
FORGET_HINT = "erase again with “Also remove the suppression” ticked to remove it too"


async def _consent_page(request: Request, form: dict[str, str], errors: Errors) -> Response:
    """The page of the three consent forms; ``form``: what one of them sent."""
    engine = engine_of(request)
    modes = await asyncio.to_thread(consent.list_modes, engine)
    rows = await asyncio.to_thread(consent.list_consents, engine)
    search = request.query_params.get("q", "").strip().lower()[:320]
    if search:
        rows = [row for row in rows if search in row.address]
    context: dict[str, Any] = {
        "global_mode": modes.pop(consent.GLOBAL),
        "domains": sorted(modes.items()),
        "consents": rows[:SHOWN],
        "total": len(rows),
        "q": search,
        "labels": MODE_LABELS,
        "form": {"domain": "", "domain_mode": "opt-in", "address": "", **form},
        "nav": "privacy",
        "tab": "consent",
    }
    return render_form(request, "dashboard/consent.html", context, errors)


async def _consent_form(
    request: Request,
    read: Callable[[dict[str, str]], dict[str, str]],
    save: Callable[[Engine, dict[str, str]], object],
    said: Callable[[dict[str, str]], str],
) -> Response:
    """One of the consent page's forms: ``said`` is the flash when ``save`` went through."""
    engine = engine_of(request)
    nothing_typed: dict[str, str] = {}  # these forms only post (GET /privacy shows them)

    return await form_page(
        request,
        nothing_typed,
        show=lambda form, errors: _consent_page(request, form, errors),
        read=lambda posted: (read(posted), Errors()),
        save=lambda form: save(engine, form),
        done=then_redirect(request, "/privacy", lambda form, _: said(form)),
    )


@page(admin=True)
async def consent_page(request: Request, viewer: Viewer) -> Response:
    return await _consent_page(request, {}, Errors())


def _mode_field(form: dict[str, str]) -> str:
    """Which form set a mode: the global one (no domain) or a domain's."""
    return "global" if form["domain"] == consent.GLOBAL else "domain"


def _set_mode(engine: Engine, form: dict[str, str]) -> None:
    with filed_under(_mode_field(form)):
        consent.set_mode(engine, form["domain_mode"], form["domain"])


def _mode_set(form: dict[str, str]) -> str:
    where = (
        "every recipient domain without its own"
        if _mode_field(form) == "global"
        else consent.normalize_domain(form["domain"])
    )
    return f"Consent mode for {where}: {form['domain_mode']}."


@page(admin=True)
async def consent_mode(request: Request, viewer: Viewer) -> Response:
    """The global mode (no ``domain``) or one domain's."""
    return await _consent_form(
        request,
        lambda posted: {
            "domain": text(posted, "domain") or consent.GLOBAL,
            "domain_mode": posted.get("mode", ""),
        },
        _set_mode,
        _mode_set,
    )


def _add_consent(engine: Engine, form: dict[str, str]) -> None:
    address = form["address"]
    with filed_under("address"):
        if not consent.add_consent(engine, address, "dashboard"):
            raise UserError(f"The consent of {address.lower()} is already recorded.")


@page(admin=True)
async def consent_add(request: Request, viewer: Viewer) -> Response:
    return await _consent_form(
        request,
        lambda posted: {"address": text(posted, "address")},
        _add_consent,
        lambda form: f"Consent of {form['address'].lower()} recorded.",
    )


async def _flashed(
    request: Request, action: Callable[[Engine, str], bool], value: str
) -> bool | None:
    """``action(engine, value)``'s answer; None when it refused (its reason flashed)."""
    try:
        return await asyncio.to_thread(action, engine_of(request), value)
    except UserError as exc:
        flash(request, message(exc), "error")
        return None


@page(admin=True)
async def consent_mode_clear(request: Request, viewer: Viewer) -> Response:
    domain = text(await form_of(request), "domain")
    if await _flashed(request, consent.clear_mode, domain):
        flash(request, f"{domain} follows the global mode again.")
    return redirect(request, "/privacy")


@page(admin=True)
async def consent_remove(request: Request, viewer: Viewer) -> Response:
    address = text(await form_of(request), "address")
    removed = await _flashed(request, consent.remove_consent, address)
    if removed:
        flash(request, f"Consent of {address} withdrawn.")
    elif removed is not None:
        flash(request, f"No consent was recorded for {address}.", "error")
    return redirect(request, "/privacy")


# --- erasure ---


def _recipient(value: str) -> str:
    address = normalize_address(value)
    if address.startswith("@"):
        raise UserError("erase one recipient address at a time, not a whole domain", "address")
    return address


@dataclass
class EraseForm:
    address: str = ""
    forget: bool = False
    confirmed: bool = False  # the second POST, from the page that asked


def _read_erase(posted: dict[str, str]) -> tuple[EraseForm, Errors]:
    form = EraseForm(text(posted, "address"), checked(posted, "forget"))
    errors = Errors()
    if (address := errors.check(_recipient, form.address)) is not None:
        form.address = address
        form.confirmed = posted.get("confirm") == "yes"
    return form, errors


@page(admin=True)
async def erase(request: Request, viewer: Viewer) -> Response:
    """The address form; its first POST asks to confirm, the second erases."""
    engine = engine_of(request)

    async def show(
        form: EraseForm, errors: Errors, result: list[str] | None = None, confirm: bool = False
    ) -> Response:
        context = {
            "address": form.address,
            "forget": form.forget,
            "confirm": confirm,
            "result": result,
            "nav": "privacy",
            "tab": "erase",
        }
        return render_form(request, "dashboard/erase.html", context, errors)

    def save(form: EraseForm) -> list[str] | None:
        if not form.confirmed:
            return None  # ask once more
        erased = privacy.erase(engine, form.address, forget_suppression=form.forget)
        return erased.lines(FORGET_HINT)

    async def done(form: EraseForm, result: list[str] | None) -> Response:
        return await show(form, Errors(), result, confirm=result is None)

    return await form_page(request, EraseForm(), show=show, read=_read_erase, save=save, done=done)
