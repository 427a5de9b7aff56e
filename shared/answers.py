"""What an incoming message says about a message we sent: a pure classifier.

A relay only sees the upstream's 250; whether the mail bounced, was answered,
answered by a machine, or reported as spam arrives later, as mail. Both ways
it arrives (the intake listener, relay/intake.py, and connected mailboxes over
IMAP) hand the message here, as bytes or as an ``email.message.Message``, and
get the same :class:`Finding` list back. Nothing here knows SMTP or a
database; it reads the header fields and the report parts only (the
``message/delivery-status``, ``message/feedback-report``, returned headers and
the text of a non-standard bounce), never keeps a body.

The rules, in the order they are tried (the first family that finds
something wins; the :class:`Finding` names the rule in ``reason``, one of
:data:`RULES`):

1. ``multipart/report; report-type=delivery-status`` (RFC 3464): one finding
   per recipient block; ``Action: failed`` with a 5.x.x status is a hard
   bounce, ``failed`` with 4.x.x (the MTA gave up on a temporary failure) and
   ``delayed`` are soft; ``delivered``/``relayed``/``expanded`` are no bounce.
   The recipient is ``Original-Recipient`` (the address as we gave it in RCPT),
   else ``Final-Recipient``. Some MTAs base64-encode the per-recipient fields
   inside the report (MimeKit's ``bounce.eml``): decoded.
2. ``report-type=feedback-report`` (ARF, RFC 5965): a complaint about the
   recipient in ``Original-Rcpt-To`` (else ``Removal-Recipient``).
3. A ``disposition-notification`` (RFC 8098 read receipt): nothing.
4. Non-standard bounces (no report part, or a report we cannot read), from a
   daemon (``MAILER-DAEMON``, ``postmaster``, null ``Return-Path``) or under a
   bounce subject: the wordings of Exchange/Outlook NDRs, qmail, Postfix,
   Exim and Gmail (:data:`NDR_WORDINGS`), the recipient and status taken from
   the text after the wording.
5. Auto-replies (RFC 3834 and its older cousins): ``Auto-Submitted`` other
   than ``no``, ``X-Autoreply``, ``X-Autorespond``, ``Precedence:
   auto_reply|bulk|junk``, an out-of-office subject in English, German,
   French, Spanish, Italian, Dutch or Portuguese (:data:`OUT_OF_OFFICE`). Never
   a reply.
6. A reply: ``In-Reply-To`` or ``References`` names Message-IDs.

The original Message-IDs a bounce or complaint refers to come from its
returned message (``message/rfc822`` or ``text/rfc822-headers``), a
``Message-ID:`` line in a non-standard bounce's text, and its own
``In-Reply-To``/``References``; an answer's come from ``In-Reply-To`` and
``References``. Which of them is ours, and which recipient the address is,
the caller decides (it knows the messages).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.header import Header, decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parseaddr

#: Finding kinds.
REPLY, AUTO_REPLY, BOUNCE, COMPLAINT = "reply", "auto_reply", "bounce", "complaint"
KINDS = (REPLY, AUTO_REPLY, BOUNCE, COMPLAINT)

#: Every rule that may decide, with what it means (a finding's ``reason``).
RULES: dict[str, str] = {
    "dsn-failed-permanent": "RFC 3464 report: Action failed, status 5.x.x (hard)",
    "dsn-failed-transient": "RFC 3464 report: Action failed after a 4.x.x status (soft)",
    "dsn-delayed": "RFC 3464 report: Action delayed (soft)",
    "dsn-status-permanent": "RFC 3464 report without Action: status 5.x.x (hard)",
    "dsn-status-transient": "RFC 3464 report without Action: status 4.x.x (soft)",
    "arf": "RFC 5965 feedback report (complaint)",
    "ndr-exchange": "Exchange/Outlook non-delivery report wording",
    "ndr-gmail": "Gmail delivery failure wording",
    "ndr-gmail-delayed": "Gmail delivery delayed wording (soft)",
    "ndr-qmail": "qmail-send failure wording",
    "ndr-postfix": "Postfix 'undeliverable' wording without a report part",
    "ndr-exim": "Exim 'could not be delivered' wording",
    "auto-submitted": "RFC 3834 Auto-Submitted other than 'no'",
    "x-autoreply": "X-Autoreply header",
    "x-autorespond": "X-Autorespond header",
    "precedence": "Precedence auto_reply, bulk or junk",
    "out-of-office-subject": "an out-of-office subject",
    "in-reply-to": "In-Reply-To names a Message-ID",
    "references": "References names a Message-ID",
}

#: Longest diagnostic text kept (a bounce's explanation, not its transcript).
MAX_DIAGNOSTIC = 500


@dataclass(frozen=True)
class Finding:
    """One thing an incoming message says about one sent message and recipient."""

    kind: str  # one of KINDS
    reason: str  # one of RULES
    message_ids: tuple[str, ...] = ()  # the original Message-IDs, "<...>", most likely first
    recipient: str = ""  # the address concerned (lower case); "" if the message does not say
    bounce_type: str = ""  # bounces: hard | soft
    status: str = ""  # bounces: the enhanced status code (5.1.1) or the SMTP code
    diagnostic: str = ""  # bounces: the remote server's words, one line


# --- entry point ----------------------------------------------------------------


def classify(message: bytes | Message) -> list[Finding]:
    """The findings of one incoming message (module docstring: the rules, in order)."""
    msg = parse(message) if isinstance(message, bytes) else message
    for family in (_delivery_report, _feedback_report, _non_standard_bounce, _answer):
        findings = family(msg)
        if findings is not None:
            return findings
    return []


def parse(data: bytes) -> Message:
    """``data`` as a message (compat32: tolerant of the broken mail MTAs send)."""
    return email.message_from_bytes(data, policy=email.policy.compat32)


# --- 1. RFC 3464 delivery status ------------------------------------------------


def _report_type(msg: Message) -> str:
    if msg.get_content_type() != "multipart/report":
        return ""
    return str(msg.get_param("report-type", "") or "").lower()


def _delivery_report(msg: Message) -> list[Finding] | None:
    if _report_type(msg) == "disposition-notification":
        return []  # a read receipt: says nothing about delivery
    blocks = [b for part in _parts(msg, "message/delivery-status") for b in _dsn_blocks(part)]
    per_recipient = [
        b
        for b in blocks
        if _address(b.get("Original-Recipient", "")) or _address(b.get("Final-Recipient", ""))
    ]
    if not per_recipient:
        return None  # not a report, or one we cannot read: the wordings may tell
    ids = _returned_ids(msg)
    findings = [f for b in per_recipient if (f := _dsn_finding(b, ids)) is not None]
    return findings


def _dsn_blocks(part: Message) -> Iterator[Message]:
    """The field blocks of a delivery-status part (a base64-encoded rest decoded)."""
    payload = part.get_payload()
    blocks = payload if isinstance(payload, list) else [parse(_bytes(part))]
    encoded = False
    for block in blocks:
        if not isinstance(block, Message):
            continue
        body = block.get_payload()
        if encoded and isinstance(body, str) and body.strip():
            yield from _decoded_blocks(body)
        else:
            yield block
        encoded = encoded or str(block.get("Content-Transfer-Encoding", "")).lower() == "base64"


def _decoded_blocks(text: str) -> Iterator[Message]:
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return
    for chunk in re.split(rb"\r?\n\s*\r?\n", raw):
        if chunk.strip():
            yield parse(chunk.strip() + b"\n")


def _dsn_finding(block: Message, ids: tuple[str, ...]) -> Finding | None:
    recipient = _address(block.get("Original-Recipient", "")) or _address(
        block.get("Final-Recipient", "")
    )
    action = str(block.get("Action", "")).strip().lower()
    status = _status(str(block.get("Status", "")))
    diagnostic = _one_line(str(block.get("Diagnostic-Code", "")))
    diagnostic = re.sub(r"^\s*[\w-]+\s*;\s*", "", diagnostic)  # "smtp; 550 ..." -> "550 ..."
    if action == "failed":
        hard = not status.startswith("4")
        reason = "dsn-failed-permanent" if hard else "dsn-failed-transient"
    elif action == "delayed":
        hard, reason = False, "dsn-delayed"
    elif not action and status[:1] in ("4", "5"):
        hard = status.startswith("5")
        reason = "dsn-status-permanent" if hard else "dsn-status-transient"
    else:
        return None  # delivered, relayed, expanded: no bounce
    return Finding(
        BOUNCE,
        reason,
        ids,
        recipient,
        bounce_type="hard" if hard else "soft",
        status=status,
        diagnostic=diagnostic[:MAX_DIAGNOSTIC],
    )


def _status(value: str) -> str:
    match = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", value)
    return match.group(1) if match else ""


# --- 2. RFC 5965 feedback report ------------------------------------------------


def _feedback_report(msg: Message) -> list[Finding] | None:
    parts = list(_parts(msg, "message/feedback-report"))
    if not parts and _report_type(msg) != "feedback-report":
        return None
    fields = [b for part in parts for b in _dsn_blocks(part)]
    recipient = ""
    for name in ("Original-Rcpt-To", "Removal-Recipient"):
        recipient = recipient or next(
            (_address(b.get(name, "")) for b in fields if b.get(name)), ""
        )
    return [Finding(COMPLAINT, "arf", _returned_ids(msg), recipient)]


# --- 4. non-standard bounces ----------------------------------------------------


@dataclass(frozen=True)
class Wording:
    """A bounce text that some MTA writes: where the recipient follows."""

    reason: str
    pattern: re.Pattern[str]  # the recipient's address is searched from its end
    hard: bool = True


def _w(reason: str, pattern: str, hard: bool = True) -> Wording:
    return Wording(reason, re.compile(pattern, re.IGNORECASE), hard)


#: Wordings of non-standard bounces, most specific first.
NDR_WORDINGS: tuple[Wording, ...] = (
    _w("ndr-gmail-delayed", r"delivery to the following recipients? has been delayed", False),
    _w("ndr-gmail", r"delivery to the following recipients? failed permanently"),
    _w("ndr-gmail", r"your message wasn't delivered to"),
    _w("ndr-exchange", r"delivery has failed to these recipients or (?:groups|distribution lists)"),
    _w("ndr-exchange", r"the following recipient\(s\) cannot be reached:"),
    _w("ndr-exchange", r"your message to [^\s]+ couldn't be delivered"),
    _w(
        "ndr-qmail",
        r"this is the qmail-send program at[\s\S]{0,400}?(?:permanent error|failed)[^\n]*\n",
    ),
    _w("ndr-exim", r"the following address\(es\) failed"),
    _w(
        "ndr-postfix",
        r"this is the mail system at host[\s\S]{0,300}?could not\s+be\s+delivered[^\n]*\n",
    ),
)

_DAEMON = re.compile(r"^(?:mailer-daemon|postmaster|mail-daemon|mailerdaemon)@", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (?:status notification|failure|has failed)|"
    r"returned mail|failure notice|mail delivery failed|could not be delivered|"
    r"non[- ]?delivery",
    re.IGNORECASE,
)
_ADDRESS = re.compile(r"<?([A-Za-z0-9._%+'=/-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})>?")
_SMTP_CODE = re.compile(r"\b([45])\d\d\b")
_ID_LINE = re.compile(r"^message-id:\s*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


def _from_daemon(msg: Message) -> bool:
    sender = parseaddr(_text(msg.get("From", "")))[1]
    if _DAEMON.match(sender) or msg.get("Return-Path", "").strip() == "<>":
        return True
    return bool(_BOUNCE_SUBJECT.search(_text(msg.get("Subject", ""))))


def _non_standard_bounce(msg: Message) -> list[Finding] | None:
    if not _from_daemon(msg):
        return None
    text = "\n".join(_texts(msg))
    for wording in NDR_WORDINGS:
        match = wording.pattern.search(text)
        if match is None:
            continue
        after = text[match.start() : match.end() + 2000]  # the address may be in the wording
        address = _ADDRESS.search(after)
        status = _status(after) or _smtp_code(after)
        hard = status[:1] == "5" if status else wording.hard
        ids = _ordered(_returned_ids(msg) + tuple(_ID_LINE.findall(text)))
        diagnostic = _diagnostic(after, address)
        return [
            Finding(
                BOUNCE,
                wording.reason,
                ids,
                address.group(1).lower() if address else "",
                bounce_type="hard" if hard else "soft",
                status=status,
                diagnostic=diagnostic,
            )
        ]
    return None


def _smtp_code(text: str) -> str:
    match = _SMTP_CODE.search(text)
    return match.group(0) if match else ""


def _diagnostic(after: str, address: re.Match[str] | None) -> str:
    """The first non-empty line after the recipient (the remote server's words)."""
    rest = after[address.end() :] if address else after
    for line in rest.splitlines():
        line = line.strip(" \t:")
        if line and not _ADDRESS.fullmatch(line):
            return _one_line(line)[:MAX_DIAGNOSTIC]
    return ""


# --- 5 and 6. answers -----------------------------------------------------------


#: Out-of-office subjects: phrases found anywhere, and words that must open the subject.
OUT_OF_OFFICE: dict[str, tuple[str, ...]] = {
    "en": (
        r"out of (?:the )?office",
        r"automatic reply",
        r"auto[- ]?reply",
        r"autoreply",
        r"auto[- ]?response",
        r"away from (?:the )?office",
        r"^on (?:vacation|holiday|leave)\b",
        r"^away\b",
    ),
    "de": (
        r"abwesenheitsnotiz",
        r"^abwesend",
        r"abwesenheit",
        r"automatische antwort",
        r"nicht im büro",
        r"außer haus",
    ),
    "fr": (
        r"réponse automatique",
        r"reponse automatique",
        r"^absence\b",
        r"^absent\b",
        r"message d'absence",
        r"hors du bureau",
    ),
    "es": (
        r"fuera de (?:la )?oficina",
        r"respuesta automática",
        r"respuesta automatica",
        r"^ausente\b",
    ),
    "it": (r"risposta automatica", r"fuori (?:sede|ufficio)", r"^assente\b", r"^in ferie\b"),
    "nl": (r"automatisch antwoord", r"^afwezig\b", r"buiten kantoor", r"^niet aanwezig\b"),
    "pt": (
        r"resposta automática",
        r"resposta automatica",
        r"fora do escritório",
        r"^ausência\b",
        r"^ausencia\b",
    ),
}
_OOO = re.compile("|".join(p for ps in OUT_OF_OFFICE.values() for p in ps), re.IGNORECASE)
_AUTO_PRECEDENCE = {"auto_reply", "bulk", "junk"}


def _auto_reason(msg: Message) -> str:
    """The auto-reply rule that fires, or ""."""
    auto = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto and not auto.startswith("no"):
        return "auto-submitted"
    if msg.get("X-Autoreply") is not None:
        return "x-autoreply"
    if msg.get("X-Autorespond") is not None:
        return "x-autorespond"
    if str(msg.get("Precedence", "")).strip().lower() in _AUTO_PRECEDENCE:
        return "precedence"
    if _OOO.search(_text(msg.get("Subject", "")).strip()):
        return "out-of-office-subject"
    return ""


def _answer(msg: Message) -> list[Finding] | None:
    in_reply_to = _ids(msg.get_all("In-Reply-To", []))
    references = _ids(msg.get_all("References", []))
    # The direct parent first, then References from the newest back.
    ids = _ordered(in_reply_to + tuple(reversed(references)))
    sender = parseaddr(_text(msg.get("From", "")))[1].lower()
    auto = _auto_reason(msg)
    if auto:
        return [Finding(AUTO_REPLY, auto, ids, sender)]
    if not ids:
        return None
    reason = "in-reply-to" if in_reply_to else "references"
    return [Finding(REPLY, reason, ids, sender)]


# --- reading helpers ------------------------------------------------------------


def _parts(msg: Message, content_type: str) -> Iterator[Message]:
    for part in msg.walk():
        if part.get_content_type() == content_type:
            yield part


def _returned_ids(msg: Message) -> tuple[str, ...]:
    """Message-IDs of the returned message (its headers), then the report's own references."""
    found: list[str] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message):
                found += _ids(inner.get_all("Message-ID", []))
        elif ctype == "text/rfc822-headers":
            headers = parse(_bytes(part))
            found += _ids(headers.get_all("Message-ID", []))
    found += _ids(msg.get_all("In-Reply-To", []))
    found += reversed(_ids(msg.get_all("References", [])))
    return _ordered(found)


def _ids(values: Iterable[object]) -> tuple[str, ...]:
    """Message-IDs in header values, as ``<id>`` (a bare ``id@host`` gets its brackets)."""
    out: list[str] = []
    for value in values:
        text = str(value)
        bracketed = re.findall(r"<([^<>\s]+)>", text)
        if not bracketed and "@" in text:
            bracketed = [text.strip()]
        out += [f"<{i}>" for i in bracketed if "@" in i]
    return tuple(out)


def _ordered(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


def _address(value: object) -> str:
    """``rfc822; <a@b.c>`` -> ``a@b.c``."""
    text = str(value or "")
    if ";" in text:
        text = text.split(";", 1)[1]
    addresses = [a for _, a in getaddresses([text.strip()]) if "@" in a]
    return addresses[0].strip().lower() if addresses else ""


def _bytes(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    return str(part.get_payload()).encode("utf-8", "replace")


def _texts(msg: Message) -> Iterator[str]:
    """The text/plain parts outside any returned message (the bounce's own words)."""
    stack = [msg]
    while stack:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "text/rfc822-headers"):
            if ctype == "text/rfc822-headers":
                yield _bytes(part).decode("utf-8", "replace")
            continue
        if part.is_multipart():
            stack[0:0] = [p for p in part.get_payload() if isinstance(p, Message)]
        elif ctype == "text/plain" or not part.get("Content-Type"):
            charset = part.get_content_charset() or "utf-8"
            try:
                yield _bytes(part).decode(charset, "replace")
            except LookupError:
                yield _bytes(part).decode("utf-8", "replace")


def _text(value: object) -> str:
    """A header value with RFC 2047 words decoded (as it was, if broken); raw UTF-8
    (which compat32 keeps as surrogate escapes) read as UTF-8."""
    if isinstance(value, Header):  # compat32's form of a value with raw 8-bit bytes
        return "".join(_chunk(b, c) for b, c in decode_header(value))
    text = str(value)
    if not text.isascii():
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(text)))
    except Exception:
        return text


def _chunk(data: bytes | str, charset: str | None) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode(charset or "ascii")
    except (LookupError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = ["KINDS", "NDR_WORDINGS", "OUT_OF_OFFICE", "RULES", "Finding", "classify"]
