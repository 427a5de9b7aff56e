"""Administrators' pages for what talks to other systems: webhooks and API tokens.

A webhook's signing secret and an API token are shown exactly once, on the
page that answers the form that created them: never stored in the session
cookie (signed, not encrypted), never shown again (the token is kept only as
a hash; the secret is kept, because signing needs it, but not displayed).
That page is ``no-store`` like every dashboard page, so Back does not bring
it up from the cache, and its form carries a one-time value, so reloading it
(which re-sends the form) lands on the list instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from receiver.dashboard.forms import Errors, checked, filed_under, text
from receiver.dashboard.web import (
    engine_of,
    flash,
    form_of,
    form_page,
    not_found,
    page,
    path_id,
    redirect,
    remove_page,
    render,
    render_form,
    settings_of,
)
from shared import apitokens, webhooks
from shared.errors import UserError
from shared.identity import Viewer
from shared.models import WebhookEndpoint
from shared.outbox import EVENT_TYPES
from shared.users import list_users

log = logging.getLogger(__name__)

EVENT_LABELS = {
    "message.sent": "A message was relayed",
    "message.opened": "First open of a message, per recipient",
    "message.machine_opened": "Opened by a machine (privacy prefetch, scanners)",
    "link.clicked": "A link was clicked",
    "delivery.failed": "The mail server refused a recipient",
    "message.replied": "A recipient replied (the intake listener)",
    "message.auto_replied": "An automatic reply: out of office, vacation",
    "message.bounced": "A bounce: hard (the address does not work) or soft",
    "message.complained": "A recipient reported the message as spam",
    "mailbox.disconnected": "A mailbox connection broke (reconnect it)",
}
assert set(EVENT_LABELS) == set(EVENT_TYPES)
LOG_ROWS = 50


# --- webhooks ---


def _event_types(endpoint: WebhookEndpoint) -> list[str]:
    return [] if endpoint.event_types == "*" else endpoint.event_types.split(",")


def _blank_endpoint() -> dict[str, Any]:
    return {"url": "", "description": "", "types": list(EVENT_TYPES)}


def _read_endpoint(posted: dict[str, str]) -> tuple[dict[str, Any], Errors]:
    form = {
        "url": text(posted, "url"),
        "description": text(posted, "description")[:500],
        "types": [t for t in EVENT_TYPES if checked(posted, f"type:{t}")],
    }
    errors = Errors()
    if not form["types"]:
        errors["types"] = "Choose at least one event type to send."
    errors.check(webhooks.check_url, form["url"])
    return form, errors


@page(admin=True)
async def webhooks_list(request: Request, viewer: Viewer) -> Response:
    """The endpoints beside the form that adds one; the page after adding shows its secret."""
    engine = engine_of(request)

    async def show(
        form: dict[str, Any], errors: Errors, created: WebhookEndpoint | None = None
    ) -> Response:
        rows = await asyncio.to_thread(webhooks.list_endpoints, engine)
        context = {
            "endpoints": [(e, _event_types(e)) for e in rows],
            "event_labels": EVENT_LABELS,
            "form": form,
            "created": created,
            "nav": "webhooks",
        }
        return render_form(request, "dashboard/webhooks.html", context, errors)

    def save(form: dict[str, Any]) -> WebhookEndpoint:
        every = len(form["types"]) == len(EVENT_TYPES)
        types = ["*"] if every else form["types"]
        return webhooks.add_endpoint(engine, form["url"], types, description=form["description"])

    async def done(_: dict[str, Any], created: WebhookEndpoint) -> Response:
        return await show(_blank_endpoint(), Errors(), created)

    return await form_page(
        request,
        _blank_endpoint(),
        show=show,
        read=_read_endpoint,
        save=save,
        done=done,
        once="That form was already sent: the endpoint exists, its secret was shown then.",
    )


async def _endpoint(request: Request) -> WebhookEndpoint | None:
    try:
        return await asyncio.to_thread(
            webhooks.get_endpoint, engine_of(request), path_id(request, "endpoint_id")
        )
    except webhooks.WebhookError:
        return None


@page(admin=True)
async def webhook_detail(request: Request, viewer: Viewer) -> Response:
    endpoint = await _endpoint(request)
    if endpoint is None:
        return not_found(request)
    attempts = await asyncio.to_thread(
        webhooks.delivery_log, engine_of(request), endpoint.id, LOG_ROWS
    )
    context = {
        "endpoint": endpoint,
        "types": _event_types(endpoint),
        "event_labels": EVENT_LABELS,
        "attempts": attempts,
        "log_rows": LOG_ROWS,
        "nav": "webhooks",
    }
    return render(request, "dashboard/webhook.html", context)


@page(admin=True)
async def webhook_active(request: Request, viewer: Viewer) -> Response:
    endpoint = await _endpoint(request)
    if endpoint is None or endpoint.id is None:
        return not_found(request)
    active = (await form_of(request)).get("active") == "1"
    await asyncio.to_thread(webhooks.set_active, engine_of(request), endpoint.id, active)
    if active:
        flash(request, f"Sending to {endpoint.url} again, starting with what waited.")
    else:
        flash(request, f"Paused {endpoint.url}. Events are kept and sent when you resume.")
    return redirect(request, f"/webhooks/{endpoint.id}")


@page(admin=True)
async def webhook_test(request: Request, viewer: Viewer) -> Response:
    endpoint = await _endpoint(request)
    if endpoint is None or endpoint.id is None:
        return not_found(request)
    try:
        code, latency = await webhooks.send_test(
            settings_of(request), engine_of(request), endpoint.id
        )
    except httpx.HTTPError as exc:
        log.info("test event to %s failed: %r", endpoint.url, exc)
        reason = str(exc) or type(exc).__name__
        flash(request, f"Could not deliver the test event: {reason}.", "error")
    else:
        if 200 <= code < 300:
            flash(request, f"Test event delivered: the endpoint answered {code} in {latency} ms.")
        else:
            flash(
                request,
                f"The endpoint answered {code} ({latency} ms). It must answer 2xx to "
                "acknowledge an event; anything else is retried.",
                "error",
            )
    return redirect(request, f"/webhooks/{endpoint.id}")


@page(admin=True)
async def webhook_delete(request: Request, viewer: Viewer) -> Response:
    endpoint = await _endpoint(request)
    if endpoint is None or endpoint.id is None:
        return not_found(request)
    endpoint_id, engine = endpoint.id, engine_of(request)
    return await remove_page(
        request,
        endpoint,
        lambda _: webhooks.remove_endpoint(engine, endpoint_id),
        lambda e: f"Removed {e.url} with its queue and delivery log.",
        "/webhooks",
    )


# --- API tokens ---


def _read_token(posted: dict[str, str]) -> tuple[dict[str, str], Errors]:
    form = {"name": text(posted, "name"), "username": text(posted, "username")}
    errors = Errors()
    if not form["name"]:
        errors["name"] = "Give the token a name, so you know later what uses it."
    elif len(form["name"]) > 255:
        errors["name"] = "Keep the name under 255 characters."
    return form, errors


@page(admin=True)
async def tokens_list(request: Request, viewer: Viewer) -> Response:
    """The tokens beside the form that creates one; the page after creating shows it."""
    engine = engine_of(request)

    async def show(
        form: dict[str, str], errors: Errors, created: tuple[str, Any] | None = None
    ) -> Response:
        rows = await asyncio.to_thread(apitokens.list_tokens, engine)
        people = await asyncio.to_thread(list_users, engine)
        context = {
            "tokens": rows,
            "users": [user for user, _ in people],
            "form": form,
            "created": created,
            "nav": "tokens",
        }
        return render_form(request, "dashboard/tokens.html", context, errors)

    def save(form: dict[str, str]) -> tuple[str, Any]:
        with filed_under("username"):  # the only thing that can fail: that user
            return apitokens.create_token(engine, form["username"], form["name"])

    async def done(form: dict[str, str], created: tuple[str, Any]) -> Response:
        return await show({**form, "name": ""}, Errors(), created)

    return await form_page(
        request,
        {"name": "", "username": viewer.username},
        show=show,
        read=_read_token,
        save=save,
        done=done,
        once="That form was already sent: the token exists, it was shown then.",
    )


@page(admin=True)
async def token_revoke(request: Request, viewer: Viewer) -> Response:
    token_id = path_id(request, "token_id")
    try:
        token = await asyncio.to_thread(apitokens.revoke_token, engine_of(request), str(token_id))
    except UserError:
        return not_found(request)
    flash(request, f"Token {token.name} ({token.prefix}…) revoked: it stops working at once.")
    return redirect(request, "/tokens")
