"""Store what answers say: match each finding to a message and a recipient, write it
as an event, in the transaction that keeps the state columns and the outbox.

The intake listener (relay/intake.py) classifies a copy of incoming mail
(shared/answers.py) and hands :class:`AnswerWriter` one item per copy: the
findings, when it arrived and what identifies it. Like the relay's message
records (relay/record.py) the item goes through shared/groupcommit.py
(``SpooledWriter``) and shared/spool.py: ``await put(item)`` returns once it is committed or
journaled (``<var_dir>/journal/intake-<pid>-....jsonl`` while the database is
away, replayed when it is back), and only then does the listener answer 250.

One transaction per batch (:meth:`AnswerStore.write`):

1. the messages the findings name: ``messages.message_id_header`` IN the
   Message-IDs (``ix_messages_message_id_header``, migration 0007); a finding
   takes the first
   of its Message-IDs that is a message we sent (shared/answers.py orders them,
   the direct parent first); several messages with one Message-ID (a client
   that sent it twice): the newest;
2. the recipient: the one whose address the finding names (the From of a
   reply, the Original/Final-Recipient of a bounce). Per-recipient copies
   share one Message-ID, so the address decides. Any other address ("a reply
   from someone else", a bounce for an alias) is recorded at position 0,
   without the address: nothing of the answer but its kind, time and rule
   (``reasons``), and for a bounce its type, status and diagnostic, is stored;
   never a body;
3. the events inserted ignoring repeats: ``event_key`` is a hash of the copy's
   own identity (its Message-ID, else its header block), the kind, message and
   position, so a copy sent twice (two rules Bcc the intake, a replay) adds
   nothing; then, for the rows the insert added only,
   ``shared.eventstate.apply`` (recipient and message state) and
   ``shared.outbox.enqueue_for_events`` (webhooks ``message.replied`` ...,
   shared/notable.py marks each answer notable).

A copy whose findings match no message leaves nothing but a count
(:attr:`AnswerStore.unmatched`, in /metrics).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select

from shared import eventstate
from shared.answers import Finding
from shared.config import Settings
from shared.db import impatient_engine, insert_ignoring
from shared.groupcommit import SpooledWriter
from shared.isotime import iso, moment
from shared.models import Event, Message, Recipient
from shared.outbox import enqueue_for_events
from shared.spool import SQLITE_WRITE_TIMEOUT, Invalid, Store, first_line

log = logging.getLogger(__name__)

MAX_BATCH = 100
REPLAY_SLICE = 100
SCAN_INTERVAL = 1.0

#: One copy of incoming mail: {"key": str, "received_at": ISO text, "findings": [dict]}.
Item = dict[str, Any]

MESSAGES = Message.__table__  # type: ignore[attr-defined]
RECIPIENTS = Recipient.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]

_BY_ID = select(MESSAGES.c.id, MESSAGES.c.message_id_header, MESSAGES.c.created_at).where(
    MESSAGES.c.message_id_header.in_(bindparam("ids", expanding=True))
)
_RECIPIENTS = select(RECIPIENTS.c.message_id, RECIPIENTS.c.position, RECIPIENTS.c.address).where(
    RECIPIENTS.c.message_id.in_(bindparam("mids", expanding=True))
)


def item(key: str, received_at: datetime, findings: Iterable[Finding]) -> Item:
    """The item of one copy (JSON-ready: it is also the journal's record)."""
    return {"key": key, "received_at": iso(received_at), "findings": [asdict(f) for f in findings]}


def event_key(copy_key: str, kind: str, message_id: int, position: int) -> str:
    digest = hashlib.sha256(f"{copy_key}\0{kind}\0{message_id}\0{position}".encode()).hexdigest()
    return f"a-{digest[:48]}"


class AnswerStore(Store[Item]):
    """The database side of the intake writer (blocking: the spool runs it in a thread)."""

    def __init__(self, engine: Engine, notify_email: bool = False) -> None:
        self.shared = engine
        self.engine = impatient_engine(engine, SQLITE_WRITE_TIMEOUT)
        self.notify_email = notify_email
        self.unmatched = 0  # copies whose findings named no message we sent
        self.matched = 0  # answers stored (new events)
        # Called (in the writer's thread) with the rows of each commit, marked notable:
        # trackrelay/serve.py hands them to the dashboards' live feed.
        self.on_written: Callable[[list[dict[str, Any]]], None] | None = None

    def write(self, items: list[Item], replay: bool) -> int:
        try:
            findings = [
                (i["key"], moment(i["received_at"]), f) for i in items for f in i["findings"]
            ]
            ids = {str(mid) for _, _, f in findings for mid in f["message_ids"]}
        except Exception as exc:
            raise Invalid(f"an unreadable answer: {exc!r}") from exc
        with self.engine.begin() as conn:
            messages = self._messages(conn, ids)
            addresses = self._addresses(conn, set(messages.values()))
            rows, matched_keys = [], set()
            for key, at, f in findings:
                row = _event(key, at, f, messages, addresses)
                if row is not None:
                    rows.append(row)
                    matched_keys.add(key)
            new = self._insert(conn, rows)
            if new:
                eventstate.apply(
                    conn,
                    [
                        (r["message_id"], r["recipient_position"], r["kind"], r["verdict"],
                         r["occurred_at"], r["bounce_type"])
                        for r in new
                    ],
                )  # fmt: skip
                enqueue_for_events(conn, new, notify_email=self.notify_email)
        self.unmatched += len({i["key"] for i in items} - matched_keys)
        self.matched += len(new)
        if new and self.on_written is not None:
            try:
                self.on_written(new)
            except Exception:  # fail soft: a lost live note never loses an answer
                log.exception("the live feed could not take %d answer(s)", len(new))
        return len(new)

    @staticmethod
    def _messages(conn: Connection, ids: set[str]) -> dict[str, int]:
        """Message-ID -> the newest message that has it."""
        if not ids:
            return {}
        found: dict[str, tuple[Any, int]] = {}
        for mid, header, created in conn.execute(_BY_ID, {"ids": sorted(ids)}):
            if header not in found or created > found[header][0]:
                found[header] = (created, mid)
        return {header: mid for header, (_, mid) in found.items()}

    @staticmethod
    def _addresses(conn: Connection, mids: set[int]) -> dict[tuple[int, str], int]:
        """(message, lower-cased address) -> the first position with that address."""
        if not mids:
            return {}
        out: dict[tuple[int, str], int] = {}
        for mid, position, address in conn.execute(_RECIPIENTS, {"mids": sorted(mids)}):
            out.setdefault((mid, address.lower()), position)
        return out

    @staticmethod
    def _insert(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert ignoring repeats; the rows the insert added."""
        if not rows:
            return []
        statement = insert_ignoring(EVENTS, "event_key", conn.dialect.name).returning(
            EVENTS.c.event_key
        )
        added = set(conn.execute(statement, rows).scalars())
        unique = {r["event_key"]: r for r in rows}  # two findings of one copy: one row
        return [r for k, r in unique.items() if k in added]

    def to_record(self, item: Item) -> Item:
        return item

    def from_record(self, record: Item) -> Item:
        return record

    def close(self) -> None:
        if self.engine is not self.shared:
            self.engine.dispose()

    # --- what the intake says (shared/spool.py Store hooks) ---

    def unavailable(self, error: Exception, items: list[Item], first: bool) -> None:
        if first:
            log.error(
                "DATABASE WRITE FAILED for %d incoming answer(s): %s; journaling them",
                len(items),
                first_line(error),
            )

    def journaled(self, items: list[Item]) -> None:
        log.warning("%d incoming answer(s) journaled (database unavailable)", len(items))

    def lost(self, items: list[Item], error: BaseException | None) -> None:
        for answer in items:
            log.error(
                "INTAKE JOURNAL WRITE FAILED: answer %s is lost", _key(answer), exc_info=error
            )

    def set_aside(self, records: list[Item], error: BaseException, unreadable: bool) -> None:
        for record in records:
            log.error("answer %s cannot be stored: %s", _key(record), first_line(error))

    def replayed_all(self, stored: int) -> None:
        log.info("database back: %d journaled answer(s) written", stored)


def _event(
    key: str,
    at: datetime,
    finding: dict[str, Any],
    messages: dict[str, int],
    addresses: dict[tuple[int, str], int],
) -> dict[str, Any] | None:
    """The events row of one finding, or None if it names no message we sent."""
    mid = next((messages[i] for i in finding["message_ids"] if i in messages), None)
    if mid is None:
        return None
    kind = finding["kind"]
    position = addresses.get((mid, str(finding["recipient"]).lower()), 0)
    return {
        "event_key": event_key(key, kind, mid, position),
        "message_id": mid,
        "recipient_position": position,
        "link_position": 0,
        "kind": kind,
        "occurred_at": at,
        "ip": "",
        "user_agent": "",
        "method": "SMTP",
        "verdict": "unknown",
        "reasons": finding["reason"],
        "bounce_type": finding.get("bounce_type", ""),
        "status_code": str(finding.get("status", ""))[:16],
        "diagnostic": finding.get("diagnostic", ""),
    }


def _key(answer: Any) -> str:
    with contextlib.suppress(Exception):
        return str(answer["key"])
    return "?"


class AnswerWriter(SpooledWriter[Item, AnswerStore]):
    """Stores answers in batches; journals them while the database is down
    (shared/groupcommit.py ``SpooledWriter``, as the relay's message records)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        super().__init__(
            AnswerStore(engine, notify_email=bool(settings.notify_from)),
            settings.var_dir / "journal",
            "intake",
            max_batch=MAX_BATCH,
            replay_slice=REPLAY_SLICE,
            scan_interval=SCAN_INTERVAL,
            name="trackrelay-intake-writer",
        )
