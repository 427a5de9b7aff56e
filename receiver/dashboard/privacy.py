"""Administrators' privacy pages: consent modes and consents, erasing a recipient.

The consent page has three small forms (the global mode, a mode per recipient
domain, one recipient's consent); each shows its own message under its own
input, so an error names the form it came from. Erasing asks twice: the first
POST only shows what will happen, the second (``confirm``) erases and shows
what :func:`shared.privacy.erase` removed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver.dashboard.forms import Errors, checked, message, text
from receiver.dashboard.web import engine_of, flash, form_of, page, redirect, render
from shared import consent, privacy
from shared.addresses import normalize_address
from shared.identity import Viewer
from shared.users import UserError

MODE_LABELS = {
    "opt-out": "Track unless the recipient asked not to be (opt-out)",
    "opt-in": "Track only recipients who gave their consent (opt-in)",
}
SHOWN = 500
FORGET_HINT = "erase again with “Also remove the suppression” ticked to remove it too"


async def _consent_page(
    request: Request, errors: Errors | None = None, form: dict[str, str] | None = None
) -> Response:
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
        "errors": errors or Errors(),
        "form": {"domain": "", "domain_mode": "opt-in", "address": "", **(form or {})},
        "nav": "privacy",
        "tab": "consent",
    }
    return render(request, "dashboard/consent.html", context, 400 if errors else 200)


@page(admin=True)
async def consent_page(request: Request, viewer: Viewer) -> Response:
    return await _consent_page(request)


@page(admin=True)
async def consent_mode(request: Request, viewer: Viewer) -> Response:
    """The global mode (no ``domain``) or one domain's."""
    posted = await form_of(request)
    domain = text(posted, "domain") or consent.GLOBAL
    mode = posted.get("mode", "")
    field = "global" if domain == consent.GLOBAL else "domain"
    errors = Errors()
    try:
        await asyncio.to_thread(consent.set_mode, engine_of(request), mode, domain)
    except UserError as exc:
        errors[field] = message(exc)
        return await _consent_page(request, errors, {"domain": domain, "domain_mode": mode})
    where = (
        "every recipient domain without its own"
        if field == "global"
        else consent.normalize_domain(domain)
    )
    flash(request, f"Consent mode for {where}: {mode}.")
    return redirect(request, "/privacy")


@page(admin=True)
async def consent_mode_clear(request: Request, viewer: Viewer) -> Response:
    domain = text(await form_of(request), "domain")
    try:
        cleared = await asyncio.to_thread(consent.clear_mode, engine_of(request), domain)
    except UserError as exc:
        flash(request, message(exc), "error")
    else:
        if cleared:
            flash(request, f"{domain} follows the global mode again.")
    return redirect(request, "/privacy")


@page(admin=True)
async def consent_add(request: Request, viewer: Viewer) -> Response:
    address = text(await form_of(request), "address")
    errors = Errors()
    try:
        added = await asyncio.to_thread(
            consent.add_consent, engine_of(request), address, "dashboard"
        )
    except UserError as exc:
        errors["address"] = message(exc)
        return await _consent_page(request, errors, {"address": address})
    if not added:
        errors["address"] = f"The consent of {address.lower()} is already recorded."
        return await _consent_page(request, errors, {"address": address})
    flash(request, f"Consent of {address.lower()} recorded.")
    return redirect(request, "/privacy")


@page(admin=True)
async def consent_remove(request: Request, viewer: Viewer) -> Response:
    address = text(await form_of(request), "address")
    try:
        removed = await asyncio.to_thread(consent.remove_consent, engine_of(request), address)
    except UserError as exc:
        flash(request, message(exc), "error")
    else:
        if removed:
            flash(request, f"Consent of {address} withdrawn.")
        else:
            flash(request, f"No consent was recorded for {address}.", "error")
    return redirect(request, "/privacy")


# --- erasure ---


def _recipient(value: str) -> str:
    address = normalize_address(value)
    if address.startswith("@"):
        raise UserError("erase one recipient address at a time, not a whole domain", "address")
    return address


@page(admin=True)
async def erase(request: Request, viewer: Viewer) -> Response:
    context: dict[str, Any] = {"nav": "privacy", "tab": "erase", "errors": Errors()}
    context.update(address="", confirm=False, forget=False, result=None)
    if request.method == "POST":
        posted = await form_of(request)
        context.update(address=text(posted, "address"), forget=checked(posted, "forget"))
        address = context["errors"].check(_recipient, context["address"])
        if address is not None:
            context["address"] = address
            if posted.get("confirm") != "yes":
                context["confirm"] = True  # ask once more
            else:
                result = await asyncio.to_thread(
                    lambda: privacy.erase(
                        engine_of(request), address, forget_suppression=context["forget"]
                    )
                )
                context["result"] = result.lines(FORGET_HINT)
    status = 400 if context["errors"] else 200
    return render(request, "dashboard/erase.html", context, status)
