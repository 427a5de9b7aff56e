"""A clean Sent folder: one pristine copy of a tracked message, never the tracked ones.

Providers keep a copy of what is submitted over SMTP: Microsoft 365 each one
(per-recipient tracked copies put N copies in Sent Items), Gmail the first of
each Message-ID (recipient 1's pixel, which the sender's own look in Gmail's
web interface would load: a false open). After the relay delivered a tracked
message through a mailbox connection whose ``sent`` is ``clean``
(relay/handler.py spawns :func:`clean` once the record is stored), this:

1. logs in with the connection's grant (relay/imapsession.py) and selects
   the Sent folder (the ``\\Sent`` special-use folder, else ``Sent``);
2. looks, every :attr:`Settings.imap_sent_interval` seconds for
   :attr:`Settings.imap_sent_window` (less when every tracked copy delivered
   is gone and the client's own copy is there), for messages with the message's Message-ID
   (``SEARCH HEADER``, then the exact header compared) and reads them with
   ``BODY.PEEK[]``: a copy is **tracked** when it holds an open or click token
   of the relay (shared/tokens.py, verified with the secret keys) for THIS
   message; those, and nothing else, are removed: by the provider's
   ``sent_delete`` (shared/oauthproviders.py) flagged ``\\Deleted`` and
   expunged by UID (``expunge``; ``UID EXPUNGE``, so nobody else's deleted mail
   goes with them), or first moved to the ``\\Trash`` folder (``trash``,
   :func:`_to_trash`: Gmail);
3. removes tracked copies only while a copy without tokens is there: the
   client's own (Thunderbird saves one over IMAP after the relay's 250) as
   soon as it is seen; else, at the window's end, it first appends the
   original as the client sent it (all recipients, no pixel, the original
   links), with its own Date as internal date and ``\\Seen``, and removes the
   tracked copies once the server took it. A refused APPEND (quota, size)
   leaves them, logged with the server's words; a connection lost (or a
   relay killed) at any point leaves at least one copy.

Blocking (IMAPClient): run in a thread. Failures are logged, never raised to
the client, who had its 250 before this began.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import parsedate_to_datetime

from imapclient import IMAPClient
from imapclient.imapclient import DELETED, SENT, TRASH
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from relay import imapsession
from relay.prepared import Prepared
from shared import mailbox
from shared.config import Settings
from shared.tokens import InvalidToken, Signer

log = logging.getLogger(__name__)

FALLBACK_SENT = "Sent"
THREADS = 4  # cleanings at once; more wait their turn
_TOKEN = re.compile(r"/([oc])/([A-Za-z0-9_-]{20,})")
TRACKED, PRISTINE, FOREIGN = "tracked", "pristine", "foreign"


@dataclass(frozen=True)
class Job:
    """One tracked message delivered through a connection."""

    connection_id: int
    message_id: int  # the record's id: what its tokens carry
    message_id_header: str  # "<...>"
    original: bytes  # as the client sent it
    copies: int  # tracked copies delivered (the most a provider can have saved)
    address: str = ""  # the sender (for the log)


def job(connection_id: object, original: bytes, prepared: Prepared) -> Job | None:
    """The job for a message just relayed, if it went through a connection and was tracked."""
    record = prepared.message
    if not isinstance(connection_id, int) or not (record.track_opens or record.track_clicks):
        return None
    tracked = sum(1 for c in prepared.copies if prepared.tracked_recipients & set(c.recipients))
    if not tracked or not record.message_id_header:
        return None
    if not _header_id(original):  # the relay added the Message-ID (relay/pipeline.py)
        original = b"Message-ID: " + record.message_id_header.encode() + b"\r\n" + original
    return Job(connection_id, record.id, record.message_id_header, original, tracked, record.sender)


@dataclass
class Outcome:
    removed: int = 0
    added: bool = False
    client_copy: bool = False
    kept: int = 0  # tracked copies left in place (the original could not be added)
    why: str = ""  # why they were kept


def kind(signer: Signer, message_id: int, data: bytes) -> str:
    """tracked: holds a token of ours for this message; foreign: tokens for another
    message only; pristine: no token of ours at all."""
    seen_other = False
    for text in _texts(email.message_from_bytes(data, policy=email.policy.compat32)):
        for letter, token in _TOKEN.findall(text):
            try:
                found = (signer.verify_open if letter == "o" else signer.verify_click)(token)
            except InvalidToken:
                continue
            if found.message_id == message_id:
                return TRACKED
            seen_other = True
    return FOREIGN if seen_other else PRISTINE


def _texts(msg: Message) -> list[str]:
    out = []
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            out.append(_decode(payload, part.get_content_charset() or "utf-8"))
    return out


def _decode(payload: bytes, charset: str) -> str:
    """The part's text in its charset; one Python has no codec for (``unknown-8bit``,
    a typo) as the email package itself reads such a part's bytes
    (``email.utils.collapse_rfc2231_value``'s fallback: ASCII, the rest replaced):
    the tokens looked for are ASCII, so none is missed."""
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("ascii", "replace")


def _header_id(data: bytes) -> str:
    msg = email.message_from_bytes(data.split(b"\r\n\r\n", 1)[0], policy=email.policy.compat32)
    return " ".join(str(msg.get("Message-ID", "")).split())


def _date(data: bytes) -> datetime | None:
    msg = email.message_from_bytes(data.split(b"\r\n\r\n", 1)[0], policy=email.policy.compat32)
    try:
        return parsedate_to_datetime(str(msg.get("Date", "")))
    except (TypeError, ValueError):
        return None


def sent_folder(client: IMAPClient) -> str:
    found = client.find_special_folder(SENT)
    return str(found) if found else FALLBACK_SENT


def trash_folder(client: IMAPClient) -> str | None:
    """The ``\\Trash`` special-use folder (RFC 6154), None if the server names none.

    By its flag only, never guessed from a name (what IMAPClient's
    ``find_special_folder`` would do): what is put there is deleted for good."""
    for flags, _, name in client.list_folders():
        if TRASH in flags:
            return str(name)
    return None


def copies(client: IMAPClient, signer: Signer, job: Job, first: int = 1) -> dict[int, str]:
    """UID -> kind of every message in the selected folder with the job's Message-ID
    (and a UID from FIRST on)."""
    found = client.search(["UID", f"{first}:*", "HEADER", "Message-ID", job.message_id_header])
    uids = [uid for uid in found if uid >= first]  # N:* matches the last UID even below N
    if not uids:
        return {}
    fetched = client.fetch(uids, ["BODY.PEEK[]"])
    out = {}
    for uid, data in fetched.items():
        body = data.get(b"BODY[]", b"")
        if _header_id(body) == job.message_id_header:
            out[uid] = kind(signer, job.message_id, body)
    return out


def _expunge(client: IMAPClient, uids: list[int]) -> None:
    client.add_flags(uids, [DELETED], silent=True)
    client.uid_expunge(uids)


def _to_trash(
    client: IMAPClient, uids: list[int], folder: str, trash: str, signer: Signer, job: Job
) -> None:
    """Gmail's way to delete: a message expunged in "[Gmail]/Sent Mail" only loses
    that label and stays in All Mail (with recipient 1's pixel); one expunged in
    "[Gmail]/Trash" is gone. So the tracked UIDS go to TRASH (``MOVE``, RFC 6851,
    where announced; else ``COPY`` + ``\\Deleted`` + ``UID EXPUNGE``) and are
    expunged there: only those moved, the ones with a UID from Trash's UIDNEXT
    before the move, the job's Message-ID and a token of this message; whatever
    else is in Trash stays. FOLDER is selected again after."""
    first = int(client.folder_status(trash, ["UIDNEXT"])[b"UIDNEXT"])
    if client.has_capability("MOVE"):
        client.move(uids, trash)
    else:
        client.copy(uids, trash)
        _expunge(client, uids)
    client.select_folder(trash)
    moved = sorted(uid for uid, k in copies(client, signer, job, first).items() if k == TRACKED)
    if moved:
        _expunge(client, moved)
    client.select_folder(folder)
    if len(moved) < len(uids):
        log.warning(
            "%d tracked copies of message %d moved to %s and not found there to delete",
            len(uids) - len(moved), job.message_id, trash,
        )  # fmt: skip


def sweep(
    client: IMAPClient,
    folder: str,
    settings: Settings,
    job: Job,
    stop: threading.Event,
    trash: str | None = None,
) -> Outcome:
    """Steps 2 and 3 in FOLDER (selected); STOP set: look no more (the relay stops);
    TRASH given: tracked copies go through that folder (``sent_delete = "trash"``).

    The looking goes on until the window ends, unless every tracked copy is gone
    and the client's own copy is there: a client saves its copy after the
    relay's 250 (Thunderbird), often after the provider filed its copies, and
    adding the original before it arrived would leave two.

    Sent is never left without a copy: tracked copies are removed only while a
    copy without tokens is in the folder: the client's, seen in this look, or
    the original, appended first at the window's end. An APPEND the server
    refuses (quota, size) leaves the tracked copies where they are
    (``Outcome.kept``, ``Outcome.why``); a connection lost between the APPEND
    and the removal leaves both."""
    signer = Signer(settings.signing_keys())
    outcome = Outcome()
    deadline = time.monotonic() + settings.imap_sent_window
    while True:
        found = copies(client, signer, job)
        outcome.client_copy = PRISTINE in found.values()
        if outcome.client_copy:
            _remove(client, found, folder, trash, signer, job, outcome)
        done = outcome.removed >= job.copies and outcome.client_copy
        if done or time.monotonic() >= deadline or stop.wait(settings.imap_sent_interval):
            break
    found = copies(client, signer, job)  # a last look: the client's copy may just have come
    outcome.client_copy = PRISTINE in found.values()
    tracked = [uid for uid, k in found.items() if k == TRACKED]
    if tracked and not outcome.client_copy:
        try:
            client.append(folder, job.original, flags=[b"\\Seen"], msg_time=_date(job.original))
        except IMAPClient.Error as exc:  # NO: over quota, too large; the copies stay
            outcome.kept = len(tracked)
            outcome.why = f"the original could not be added: {exc}"
            return outcome
        outcome.added = True
    if tracked:
        _remove(client, found, folder, trash, signer, job, outcome)
    return outcome


def _remove(
    client: IMAPClient,
    found: dict[int, str],
    folder: str,
    trash: str | None,
    signer: Signer,
    job: Job,
    outcome: Outcome,
) -> None:
    """The tracked ones of FOUND, removed (a copy without tokens is in the folder)."""
    tracked = sorted(uid for uid, k in found.items() if k == TRACKED)
    if not tracked:
        return
    if trash is None:
        _expunge(client, tracked)
    else:
        _to_trash(client, tracked, folder, trash, signer, job)
    outcome.removed += len(tracked)


def clean(
    settings: Settings, engine: Engine, job: Job, stop: threading.Event | None = None
) -> Outcome | None:
    """The whole of it for one message; None when it could not be done (logged).

    Never raises: whatever goes wrong (the wire, the database, a message the
    parser chokes on) is logged with the address and the message."""
    try:
        return _clean(settings, engine, job, stop or threading.Event())
    except Exception:
        log.exception(
            "Sent folder of %s not cleaned (message %d): an unexpected error",
            job.address or f"connection {job.connection_id}", job.message_id,
        )  # fmt: skip
        return None


def _clean(settings: Settings, engine: Engine, job: Job, stop: threading.Event) -> Outcome | None:
    try:
        connection = mailbox.imap_connection(engine, settings, job.connection_id)
    except SQLAlchemyError as exc:
        log.warning(
            "Sent folder of %s not cleaned (message %d): the connection cannot be read: %s",
            job.address, job.message_id, exc,
        )  # fmt: skip
        return None
    if connection is None or connection.sent != "clean" or not job.message_id_header:
        return None
    try:
        client = imapsession.open_session(settings, engine, connection.id, connection.provider)
    except (
        mailbox.MailboxBroken,
        mailbox.MailboxUnavailable,
        imapsession.ImapUnavailable,
        imapsession.ImapRefused,
        SQLAlchemyError,
    ) as exc:
        log.warning("Sent folder of %s not cleaned: %s", connection.address, exc)
        return None
    try:
        trash = trash_folder(client) if connection.provider.sent_delete == "trash" else None
        if connection.provider.sent_delete == "trash" and trash is None:
            log.warning(
                "Sent folder of %s not cleaned: [oauth.%s] sent_delete = \"trash\", but the "
                "server names no \\Trash folder (special-use); nothing removed",
                connection.address, connection.provider.name,
            )  # fmt: skip
            return None
        folder = sent_folder(client)
        client.select_folder(folder)
        outcome = sweep(client, folder, settings, job, stop, trash)
    except imapsession.WIRE_ERRORS as exc:
        log.warning(
            "Sent folder of %s not cleaned (message %d): %s; whatever was removed, a copy "
            "without tokens was there",
            connection.address, job.message_id, exc,
        )  # fmt: skip
        return None
    finally:
        imapsession.close(client)
    if outcome.kept:
        log.warning(
            "Sent folder of %s: message %d, %s; its %d tracked %s kept",
            connection.address, job.message_id, outcome.why, outcome.kept,
            "copy" if outcome.kept == 1 else "copies",
        )  # fmt: skip
        return outcome
    log.info(
        "Sent folder of %s: message %d, %d tracked %s removed, %s",
        connection.address,
        job.message_id,
        outcome.removed,
        "copy" if outcome.removed == 1 else "copies",
        "the original added" if outcome.added else "the client's copy kept"
        if outcome.client_copy else "nothing added",
    )  # fmt: skip
    return outcome


class Cleaner:
    """The relay's Sent folder cleanings, on their own few threads: a cleaning looks for
    up to TRACKRELAY_IMAP_SENT_WINDOW seconds, and must never hold the threads the
    relay's sessions use (asyncio's default executor)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.stopping = threading.Event()  # set: cleanings look no more (the relay stops)
        self._pool: ThreadPoolExecutor | None = None

    async def clean(self, job: Job) -> Outcome | None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="trackrelay-sent")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, clean, self.settings, self.engine, job, self.stopping
        )

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
