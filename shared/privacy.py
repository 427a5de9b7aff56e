"""Keep tracking data no longer than needed, and forget a person on request.

* :func:`purge` deletes events and message details older than
  ``TRACKRELAY_RETENTION_DAYS`` (0 keeps them forever); :func:`purge_loop` runs
  it periodically from a lifespan. Links keep redirecting afterwards: a click
  token carries its destination URL (shared/tokens.py), not a database key.
* :func:`erase` removes every record about one recipient: recipient rows,
  the events of their per-recipient tokens (and of message-level tokens when
  they were the only recipient), their consent, notifications that mention
  them, and their address wherever a message's text columns quote it (an
  upstream's refusal often does). Their tokens already sent stay harmless: a
  later hit is recorded against a position with no address behind it. A
  suppression is kept unless asked, because it is what keeps them untracked.

Both are synchronous (CLI); the loop runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Integer,
    and_,
    column,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
    values,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from shared import eventstate
from shared.addresses import normalize_address, spellings
from shared.config import Settings
from shared.db import session_scope
from shared.models import (
    Consent,
    DeliveryAttempt,
    Event,
    Link,
    Message,
    OutboxItem,
    Recipient,
    Suppression,
    utcnow,
)

log = logging.getLogger(__name__)

ERASED = "[erased]"
_CHUNK = 500


def purge(engine: Engine, retention_days: int, now: datetime | None = None) -> dict[str, int]:
    """Delete what is older than ``retention_days``; return counts per table.

    Nothing due costs one query of indexed probes (:func:`_due`). Otherwise
    every step deletes ``PURGE_BATCH`` rows (messages with their recipients,
    links and events) per committed transaction, oldest first, through the
    indexes on times, message ids and outbox ids, so the writers wait at most
    one batch for a lock. The senders' rows lose the purged messages in the
    batch that deletes them (shared/eventstate.py ``removing``); the daily
    rollups keep their counts: they name no recipient.
    """
    if retention_days <= 0:
        return {}
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    counts: dict[str, int] = dict.fromkeys(
        ("events", "recipients", "links", "messages", "delivery_attempts", "outbox"), 0
    )
    due = _due(engine, cutoff)
    if due["messages"]:
        _purge_messages(engine, cutoff, counts)
    if due["events"]:
        _purge_events(engine, cutoff, counts)
    if due["outbox"] or due["delivery_attempts"]:
        _purge_outbox(engine, cutoff, counts)
    if any(counts.values()):
        log.info(
            "purged data older than %d days: %s",
            retention_days,
            ", ".join(f"{n} {t}" for t, n in counts.items()),
        )
    return counts


def _delete(conn: Connection, model: Any, where: Any) -> int:
    return int(conn.execute(delete(model).where(where)).rowcount or 0)


#: Rows (messages, events, outbox rows) deleted per committed transaction.
PURGE_BATCH = 500


def _finished(cutoff: datetime) -> Any:
    return and_(
        col(OutboxItem.created_at) < cutoff,
        col(OutboxItem.status).in_(("delivered", "failed")),
    )


def _due(engine: Engine, cutoff: datetime) -> dict[str, bool]:
    """What has rows to purge: one query, each part a probe of one index."""
    probes = {
        "messages": select(col(Message.id)).where(col(Message.created_at) < cutoff),
        "events": select(col(Event.id)).where(col(Event.occurred_at) < cutoff),
        "outbox": select(col(OutboxItem.id)).where(col(OutboxItem.created_at) < cutoff),
        "delivery_attempts": select(col(DeliveryAttempt.id)).where(
            col(DeliveryAttempt.started_at) < cutoff
        ),
    }
    query = select(*(exists(probe.limit(1)).label(name) for name, probe in probes.items()))
    with engine.connect() as conn:
        row = conn.execute(query).one()
    return {name: bool(row._mapping[name]) for name in probes}


@contextlib.contextmanager
def _batch(engine: Engine) -> Iterator[Connection]:
    """One committed transaction of a purge or an erasure, planned without JIT.

    PostgreSQL estimates the events of a message from a sampled ``n_distinct``
    of ``events.message_id``, and events cluster by message, so the sample
    sees few of them: 65,561 distinct ids where the 1M seed has 570,306, and
    a batch of 500 ids looks like 73,778 events where it has a few hundred.
    Past ``jit_above_cost`` every statement was then compiled to machine code
    before it ran: 500 ms of the 510 ms an erasure's events DELETE took at 1M
    (BENCHMARKS.md "Scale"), 10-25 ms of each recount statement. A batch
    reads its rows through indexes and never enough for compiled expressions
    to pay; ``SET LOCAL`` ends with the transaction.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL jit = off")
        yield conn


def _batches(engine: Engine, ids: Any, step: Callable[[Connection, list[Any]], None]) -> None:
    """Run ``step`` on ``PURGE_BATCH`` ids at a time, one committed transaction each,
    until ``ids`` (a SELECT of ids, oldest first) finds none."""
    while True:
        with _batch(engine) as conn:
            batch = list(conn.execute(ids.limit(PURGE_BATCH)).scalars())
            if not batch:
                return
            step(conn, batch)


def _purge_messages(engine: Engine, cutoff: datetime, counts: dict[str, int]) -> None:
    def step(conn: Connection, ids: list[int]) -> None:
        eventstate.removing(conn, ids)
        counts["events"] += _delete(conn, Event, col(Event.message_id).in_(ids))
        counts["recipients"] += _delete(conn, Recipient, col(Recipient.message_id).in_(ids))
        counts["links"] += _delete(conn, Link, col(Link.message_id).in_(ids))
        counts["messages"] += _delete(conn, Message, col(Message.id).in_(ids))

    old = select(col(Message.id)).where(col(Message.created_at) < cutoff)
    _batches(engine, old.order_by(col(Message.created_at)), step)


def _purge_events(engine: Engine, cutoff: datetime, counts: dict[str, int]) -> None:
    """Old hits of messages kept (or never recorded); their messages are counted again."""

    def step(conn: Connection, ids: list[int]) -> None:
        deleted = conn.execute(
            delete(Event).where(col(Event.id).in_(ids)).returning(col(Event.message_id))
        )
        touched = set(deleted.scalars())
        counts["events"] += len(ids)
        eventstate.recount(conn, sorted(touched))

    old = select(col(Event.id)).where(col(Event.occurred_at) < cutoff)
    _batches(engine, old.order_by(col(Event.occurred_at)), step)


def _purge_outbox(engine: Engine, cutoff: datetime, counts: dict[str, int]) -> None:
    def attempts(conn: Connection, ids: list[int]) -> None:
        counts["delivery_attempts"] += _delete(
            conn, DeliveryAttempt, col(DeliveryAttempt.id).in_(ids)
        )

    def rows(conn: Connection, ids: list[int]) -> None:
        counts["delivery_attempts"] += _delete(
            conn, DeliveryAttempt, col(DeliveryAttempt.outbox_id).in_(ids)
        )
        counts["outbox"] += _delete(conn, OutboxItem, col(OutboxItem.id).in_(ids))

    old = select(col(DeliveryAttempt.id)).where(col(DeliveryAttempt.started_at) < cutoff)
    _batches(engine, old.order_by(col(DeliveryAttempt.started_at)), attempts)
    finished = select(col(OutboxItem.id)).where(_finished(cutoff))
    _batches(engine, finished.order_by(col(OutboxItem.created_at)), rows)


async def purge_loop(settings: Settings, engine: Engine, stop_event: asyncio.Event) -> None:
    """Purge now and then every ``purge_interval`` seconds until ``stop_event``."""
    while not stop_event.is_set():
        if settings.retention_days:
            try:
                await asyncio.to_thread(purge, engine, settings.retention_days)
            except Exception:
                log.exception("retention purge failed; retrying in %ss", settings.purge_interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), settings.purge_interval)


@dataclass
class Erasure:
    """What :func:`erase` removed, to print for the operator."""

    address: str
    counts: dict[str, int] = field(default_factory=dict)
    suppression_kept: bool = False

    def lines(self, forget_hint: str = "add --forget-suppression to remove it too") -> list[str]:
        """The report; ``forget_hint`` says how to drop a kept suppression (CLI by default)."""
        out = [f"erased {self.address}:"]
        out += [f"  {table}: {n}" for table, n in self.counts.items()]
        if self.suppression_kept:
            out.append(
                f"  suppressions: kept (it is what keeps this address untracked; {forget_hint})"
            )
        return out


def erase(engine: Engine, address: str, *, forget_suppression: bool = False) -> Erasure:
    """Remove every record about recipient ``address``.

    Their recipient rows are found by ``address_key`` (indexed, lower-cased)
    and handled ``ERASE_BATCH`` at a time, one committed transaction each: the
    events of their positions (and the message-level ones of messages they
    alone received), the rows, the texts of those messages that quote them,
    the notifications about those messages that mention them; the state of
    those messages is counted again from the events left (shared/eventstate.py
    ``recount``). An erasure cut short is finished by running it again. The
    daily rollups keep their counts: a count per sender and day names no
    recipient, so it is not personal data about them.
    """
    addr = normalize_address(address)
    # Recipient rows and message texts keep what the mail said: an IDN domain
    # may be there in its Unicode form as well as in the canonical one.
    forms = spellings(addr)
    result = Erasure(addr)
    counts = result.counts
    for name in ("events", "recipients", "messages scrubbed", "delivery_attempts", "outbox"):
        counts[name] = 0
    while _erase_batch(engine, forms, counts):
        pass
    with session_scope(engine) as session:
        conn = session.connection()
        # Mail notifications sent TO this address (a user being notified).
        # (channel, target) leads a unique index; a webhook's target is its endpoint.
        to_them = and_(col(OutboxItem.channel) == "email", col(OutboxItem.target).in_(forms))
        _erase_notifications(conn, to_them, counts)
        counts["consents"] = _delete(conn, Consent, func.lower(col(Consent.address)).in_(forms))
        suppressed = func.lower(col(Suppression.address)).in_(forms)
        if forget_suppression:
            counts["suppressions"] = _delete(conn, Suppression, suppressed)
        else:
            found = conn.execute(select(func.count()).select_from(Suppression).where(suppressed))
            result.suppression_kept = bool(found.scalar_one())
    log.info("erased %s: %s", addr, counts)
    return result


#: Recipient rows erased per committed transaction.
ERASE_BATCH = 500


def _erase_batch(engine: Engine, forms: list[str], counts: dict[str, int]) -> bool:
    """Erase up to ``ERASE_BATCH`` recipient rows of ``forms``; False when none were left."""
    with _batch(engine) as conn:
        mine = conn.execute(
            select(col(Recipient.id), col(Recipient.message_id), col(Recipient.position))
            .where(col(Recipient.address_key).in_(forms))
            .limit(ERASE_BATCH)
        ).all()
        if not mine:
            return False
        messages = sorted({int(m) for _, m, _ in mine})
        sole = _sole_recipient_messages(conn, set(messages))
        pairs = [(int(m), int(p)) for _, m, p in mine] + [(m, 0) for m in sorted(sole)]
        counts["events"] += _delete(
            conn, Event, and_(col(Event.message_id).in_(messages), _positions(conn, pairs))
        )
        ids = [row[0] for row in mine]
        counts["recipients"] += _delete(conn, Recipient, col(Recipient.id).in_(ids))
        eventstate.recount(conn, messages)
        counts["messages scrubbed"] += _scrub_messages(conn, messages, forms)
        mentions = or_(
            func.lower(col(OutboxItem.recipient)).in_(forms),
            *(func.lower(col(OutboxItem.payload)).contains(f, autoescape=True) for f in forms),
        )
        about = and_(col(OutboxItem.message_id).in_(messages), mentions)
        _erase_notifications(conn, about, counts)
    return True


def _positions(conn: Connection, pairs: list[tuple[int, int]]) -> ColumnElement[bool]:
    """Events at these (message id, recipient position) pairs, as a semi-join on a
    VALUES list: SQLite renders a row-value IN list that way itself; PostgreSQL
    expands one into an OR of every pair, checked on every event of the batch's
    messages (37-300 ms for 522 pairs over 9,767 events at 1M, 5-12 ms hashed)."""
    key = tuple_(col(Event.message_id), col(Event.recipient_position))
    if conn.dialect.name != "postgresql":
        return key.in_(pairs)
    rows = values(column("m", BigInteger), column("p", Integer), name="pairs").data(pairs)
    return key.in_(select(rows))


def _erase_notifications(conn: Connection, which: Any, counts: dict[str, int]) -> None:
    ids = list(conn.execute(select(col(OutboxItem.id)).where(which)).scalars())
    for chunk in _chunks(ids):
        counts["delivery_attempts"] += _delete(
            conn, DeliveryAttempt, col(DeliveryAttempt.outbox_id).in_(chunk)
        )
        counts["outbox"] += _delete(conn, OutboxItem, col(OutboxItem.id).in_(chunk))


def _sole_recipient_messages(conn: Connection, message_ids: set[int]) -> set[int]:
    """Messages whose only recipient is the one erased: their message-level hits are theirs."""
    sole: set[int] = set()
    for chunk in _chunks(sorted(message_ids)):
        rows = conn.execute(
            select(col(Recipient.message_id))
            .where(col(Recipient.message_id).in_(chunk))
            .group_by(col(Recipient.message_id))
            .having(func.count() == 1)
        )
        sole.update(int(m) for m in rows.scalars())
    return sole


def _chunks(items: Iterable[Any]) -> list[list[Any]]:
    items = list(items)
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


# Free text that may quote a recipient. ``sender``/``auth_user`` are the
# sender's own identity and stay: erasure is about a recipient.
_TEXT_COLUMNS = ("from_header", "subject", "decision", "upstream_reply")


def _scrub_messages(conn: Connection, message_ids: list[int], forms: list[str]) -> int:
    """Replace the address where the text of a message to them quotes it (e.g. a 550 reply)."""
    table = Message.__table__  # type: ignore[attr-defined]
    columns = [table.c[name] for name in _TEXT_COLUMNS]
    hits = conn.execute(
        select(table.c.id, *columns).where(
            table.c.id.in_(message_ids),
            or_(*(func.lower(c).contains(f, autoescape=True) for c in columns for f in forms)),
        )
    ).all()
    pattern = re.compile("|".join(map(re.escape, forms)), re.IGNORECASE)
    for row in hits:
        scrubbed = {c.name: pattern.sub(ERASED, row._mapping[c.name]) for c in columns}
        conn.execute(update(table).where(table.c.id == row.id).values(**scrubbed))
    return len(hits)
