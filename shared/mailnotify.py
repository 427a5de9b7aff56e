"""The sender's notification mail: "your message was opened / clicked / replied to /
bounced" (a hard bounce), and "your mailbox connection stopped working".

Off by default: it needs ``TRACKRELAY_NOTIFY_FROM`` and a sender policy with
``notify`` on (a broken mailbox connection needs only the setting). It goes
straight to the configured upstream with the relay's own account
(``TRACKRELAY_UPSTREAM_USER``/``_PASSWORD``), never through the relay, so it
is never tracked itself; in dev mode it lands in the Maildir sink like every
other message. It is queued and retried through the same outbox as
the webhooks (channel ``email``), so a notification survives restarts.

It is sent with shared.smtpclient, the one SMTP client: TLS always, and ONE
AUTH attempt (``aiosmtplib.send(username=...)`` would try every mechanism the
server offers against the relay's real account).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mailbox
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from shared.config import Settings
from shared.smtpclient import Reply, SmtpClient, UpstreamUnavailable

log = logging.getLogger(__name__)


class MailError(Exception):
    """The notification could not be handed to the upstream (retryable)."""


class NotConfigured(MailError):
    """Notification mail is not set up (retrying cannot help)."""


class MailRefused(MailError):
    """The upstream answered with an error code (5xx: permanent)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code


def compose(settings: Settings, to: str, event_type: str, body: str) -> EmailMessage:
    """The notification for one outbox payload (a JSON string)."""
    data: dict[str, Any] = json.loads(body)["data"]
    if event_type == "mailbox.disconnected":
        return _mailbox_broken(settings, to, data["connection"], json.loads(body)["id"])
    message = data.get("message") or {}
    recipient = (data.get("recipient") or {}).get("address") or "a recipient"
    subject = message.get("subject") or "(no subject)"
    event = data.get("event") or {}
    when = event.get("occurred_at") or ""
    if event_type == "message.replied":
        headline = f"Replied: {subject}"
        text = f"{recipient} replied to your message “{subject}” at {when}."
    elif event_type == "message.bounced":
        headline = f"Bounced: {subject}"
        why = " ".join(filter(None, (event.get("status"), event.get("diagnostic"))))
        text = f"Your message “{subject}” to {recipient} bounced at {when}: {why or 'no reason'}."
    elif event_type == "link.clicked":
        link = (data.get("link") or {}).get("url") or "a link"
        headline = f"Clicked: {subject}"
        text = f"{recipient} clicked {link} in your message “{subject}” at {when}."
    else:
        headline = f"Opened: {subject}"
        text = f"{recipient} opened your message “{subject}” at {when}."
    mail = _headers(settings, to, headline, json.loads(body)["id"])
    mail.set_content(
        f"{text}\n\n"
        "Opens are counted when the recipient's mail program loads images; "
        "some programs block them, and image proxies may load them on the "
        "recipient's behalf.\n"
        f"\n-- \ntrackrelay, {settings.base_url}/dashboard/\n"
    )
    return mail


def _mailbox_broken(
    settings: Settings, to: str, connection: dict[str, Any], key: str
) -> EmailMessage:
    """A mailbox connection broke: its mail waits in the client until it is reconnected."""
    address = connection.get("address") or to
    mail = _headers(settings, to, f"Reconnect your mailbox: {address}", key)
    mail.set_content(
        f"Your mailbox connection for {address} stopped working: "
        f"{connection.get('reason') or 'the provider no longer accepts it'}.\n\n"
        "Mail you send from that address through the relay is refused for now "
        "(your mail program keeps it and can send it again). Reconnect it on the "
        "Mailbox page:\n\n"
        f"    {settings.base_url}/dashboard/mailbox\n"
        f"\n-- \ntrackrelay, {settings.base_url}/dashboard/\n"
    )
    return mail


def _headers(settings: Settings, to: str, subject: str, key: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = settings.notify_from
    mail["To"] = to
    mail["Subject"] = subject
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain=settings.notify_from.rpartition("@")[2] or None)
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Trackrelay-Idempotency-Key"] = key
    return mail


async def send(settings: Settings, to: str, event_type: str, body: str) -> int:
    """Send one notification through the upstream; return the reply code."""
    if not settings.notify_from:
        raise NotConfigured("TRACKRELAY_NOTIFY_FROM is not set")
    mail = compose(settings, to, event_type, body)
    upstream = settings.upstream_target
    if upstream.is_sink:
        assert upstream.path is not None
        await asyncio.to_thread(_to_maildir, str(upstream.path), mail.as_bytes())
        log.info("notification to %s written to %s", to, upstream.path)
        return 250
    reply = await _deliver(settings, mail)
    if not reply.ok:
        raise MailRefused(reply.code, reply.text)
    log.info("notification to %s sent: %s", to, reply)
    return 250


async def _deliver(settings: Settings, mail: EmailMessage) -> Reply:
    """Log in once if the relay has an account, then send: the first refusal or
    the DATA reply; MailError when the upstream cannot be reached."""
    user = settings.upstream_user
    password = settings.upstream_password.get_secret_value()
    client = SmtpClient(settings, settings.upstream_target)
    try:
        await client.connect()
        if user and password:
            reply = await client.authenticate("PLAIN", user.encode(), password.encode())
            if not reply.ok:
                return reply
        return await client.send_message(mail)
    except UpstreamUnavailable as exc:
        if exc.reply is not None:
            return exc.reply  # up, but refusing us: its code says whether to retry
        raise MailError(str(exc)) from exc
    finally:
        await client.close()


def _to_maildir(path: str, data: bytes) -> None:
    mailbox.Maildir(path, create=True).add(data)
