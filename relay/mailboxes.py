"""Local auth mode: mail from a connected address goes out through its mailbox connection.

A relay user who connected an address (shared/mailbox.py: an OAuth grant for
Microsoft 365, Google or a configured provider) sends as that address through
the provider's own submission server (``smtp`` of its ``[oauth.NAME]`` table),
logging in with ONE XOAUTH2 attempt with a live access token, instead of the
shared smarthost account (TRACKRELAY_UPSTREAM_USER).

An app-password connection (``method = password``) logs in with ONE AUTH
(PLAIN, or LOGIN when only that is offered) of its login and password
instead. There is nothing to refresh: the provider refusing the password
(535) marks the connection broken at once (shared/mailbox.py
``mark_broken``: the banner, the ``mailbox.disconnected`` webhook).

A connection that cannot send, because its grant was revoked or expired, or
because the provider refused the token or the app password, answers MAIL with
``454 4.7.0`` and a short reason naming the dashboard's Mailbox page: a 4xx,
so the client keeps the message and nothing is lost. It is answered before
any connection to the provider is opened (relay/upstream.py asks for the
token first).

A token refused at AUTH is refreshed and tried once more in the same
session (an access token the provider retired early is cured so); when the
provider refuses that fresh token too, it is no expiry (Microsoft 365's
``535 5.7.139 ... SmtpClientAuthentication is disabled``, consent given by
another account than the address): the connection is marked broken with the
provider's own words (shared/mailbox.py ``mark_broken``: the banner, the
``mailbox.disconnected`` webhook and mail, once) and not refreshed again.

A transient failure (the provider's token endpoint or its submission server
cannot be reached now) is ``451 4.4.1`` with a short reason naming the
provider and no word of reconnecting: reconnecting would not help.

Not in dev mode (a Maildir sink: no mail leaves the machine), not for
sessions without AUTH (trusted networks), never in passthrough mode.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from relay.upstream import LoginRefused, Reply, SmtpUpstream, UpstreamUnavailable
from shared import mailbox
from shared.config import Settings
from shared.mailbox import MailboxBroken, MailboxMisconfigured, MailboxUnavailable, Route

log = logging.getLogger(__name__)

WHERE = "reconnect it on the Mailbox page of the dashboard"


def _short(reason: str) -> str:
    """REASON on one line, at most 160 characters: what each reply below carries."""
    return " ".join(reason.split())[:160]


def refusal(address: str, reason: str) -> Reply:
    """``454 4.7.0``: the client keeps the message; the reason, short, and where to fix it."""
    return Reply(
        454, f"4.7.0 Mailbox connection of {address} cannot send ({_short(reason)}): {WHERE}"
    )


def unavailable(route: Route, reason: str) -> Reply:
    """``451 4.4.1``: a transient failure, the provider named; try again, nothing to fix."""
    return Reply(
        451,
        f"4.4.1 Mailbox provider {route.provider_name} of {route.address} cannot be reached "
        f"now ({_short(reason)}); try again later",
    )


def misconfigured(route: Route, reason: str) -> Reply:
    """``454 4.7.0``: the provider refuses the relay's own client; for the operator."""
    return Reply(
        454,
        f"4.7.0 Mailbox provider {route.provider_name} of {route.address} refuses the relay "
        f"({_short(reason)}): tell the relay's operator",
    )


class Answered(UpstreamUnavailable):
    """Raised by the token source with the reply the client gets, final."""


async def find(settings: Settings, engine: Engine, username: str, sender: str) -> Route | None:
    """The connection this user's MAIL FROM goes out through (local mode only).

    UpstreamUnavailable when the database cannot say: sending through the
    shared account instead would send as the person from the wrong mailbox.
    """
    if mailbox.unused(settings) or not settings.oauth:  # one rule with the dashboard's warning
        return None
    try:
        found = await asyncio.to_thread(mailbox.route, engine, settings, username, sender)
    except SQLAlchemyError as exc:
        log.warning("cannot look up the mailbox connection of %r: %s", sender, exc)
        raise UpstreamUnavailable("the mailbox connections cannot be read") from None
    if found is None:
        return None
    if found.provider is None:
        # never the shared account instead: that would send as the person from elsewhere
        reason = f"its provider [oauth.{found.provider_name}] is not in the config"
        raise UpstreamUnavailable(reason, refusal(found.address, reason))
    if found.method == "password" and not found.provider.app_passwords:
        reason = f"its provider [oauth.{found.provider_name}] no longer takes app passwords"
        raise UpstreamUnavailable(reason, refusal(found.address, reason))
    return found


def connect(settings: Settings, engine: Engine, route: Route) -> SmtpUpstream:
    """A connection to the provider's submission server that logs in with XOAUTH2
    (or PLAIN with the app password)."""

    async def token(refused: Reply | None) -> tuple[bytes, bytes]:
        try:
            if refused is not None:  # the provider refused the last one: refresh it now
                await asyncio.to_thread(mailbox.token_refused, engine, route.id)
            access = await asyncio.to_thread(mailbox.access_token, engine, settings, route.id)
        except MailboxBroken as exc:
            raise Answered(str(exc), refusal(route.address, str(exc))) from None
        except MailboxMisconfigured as exc:
            raise Answered(str(exc), misconfigured(route, str(exc))) from None
        except MailboxUnavailable as exc:
            reason = f"its token endpoint: {exc}"
            raise Answered(str(exc), unavailable(route, reason)) from None
        except SQLAlchemyError as exc:
            log.warning("cannot read the mailbox connection of %s: %s", route.address, exc)
            reason = "the mailbox connection cannot be read"
            raise Answered(reason, unavailable(route, reason)) from None
        return access.address.encode(), access.token.encode()

    assert route.provider is not None  # find() answered the others
    mechanism = "PLAIN" if route.method == "password" else "XOAUTH2"
    return SmtpUpstream(
        settings,
        route.provider.smtp_target,
        token_source=token,
        mechanism=mechanism,
        mailbox=route.id,
    )


async def failed(
    settings: Settings, engine: Engine, route: Route, error: UpstreamUnavailable
) -> Reply:
    """The reply for a mailbox connection that could not open; a refusal of the app
    password, or of a fresh token (relay/upstream.py tried it once more), marks the
    connection broken."""
    reply = error.reply
    if isinstance(error, Answered) and reply is not None:
        return reply
    assert route.provider is not None  # find() answered the others
    if not isinstance(error, LoginRefused) or reply is None or reply.code < 500:
        why = str(reply) if reply is not None else str(error) or type(error).__name__
        return unavailable(route, f"{route.provider.smtp_target}: {why}")
    if route.method == "password":  # nothing to refresh: broken
        reason = f"the provider refused the app password: {reply}"
    else:
        reason = f"the provider refused a fresh token: {reply}"
    notify = bool(settings.notify_from)
    try:
        await asyncio.to_thread(mailbox.mark_broken, engine, route.id, reason, notify_email=notify)
    except SQLAlchemyError as exc:  # not stored: the next try finds out again
        log.warning("cannot mark the mailbox connection of %s broken: %s", route.address, exc)
    return refusal(route.address, reason)
