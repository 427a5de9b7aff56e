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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, or_, select, update
from sqlmodel import col

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
    """Delete what is older than ``retention_days``; return counts per table."""
    if retention_days <= 0:
        return {}
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    counts: dict[str, int] = {}
    with session_scope(engine) as session:
        conn = session.connection()
        old = select(col(Message.id)).where(col(Message.created_at) < cutoff)
        counts["events"] = _delete(
            conn,
            Event,
            or_(col(Event.occurred_at) < cutoff, col(Event.message_id).in_(old)),
        )
        counts["recipients"] = _delete(conn, Recipient, col(Recipient.message_id).in_(old))
        counts["links"] = _delete(conn, Link, col(Link.message_id).in_(old))
        counts["messages"] = _delete(conn, Message, col(Message.created_at) < cutoff)
        finished = and_(
            col(OutboxItem.created_at) < cutoff,
            col(OutboxItem.status).in_(("delivered", "failed")),
        )
        counts["delivery_attempts"] = _delete(
            conn,
            DeliveryAttempt,
            or_(
                col(DeliveryAttempt.started_at) < cutoff,
                col(DeliveryAttempt.outbox_id).in_(select(col(OutboxItem.id)).where(finished)),
            ),
        )
        counts["outbox"] = _delete(conn, OutboxItem, finished)
    if any(counts.values()):
        log.info(
            "purged data older than %d days: %s",
            retention_days,
            ", ".join(f"{n} {t}" for t, n in counts.items()),
        )
    return counts


def _delete(conn: Connection, model: Any, where: Any) -> int:
    return int(conn.execute(delete(model).where(where)).rowcount or 0)


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
    """Remove every record about recipient ``address``."""
    addr = normalize_address(address)
    # Recipient rows and message texts keep what the mail said: an IDN domain
    # may be there in its Unicode form as well as in the canonical one.
    forms = spellings(addr)
    result = Erasure(addr)
    counts = result.counts
    with session_scope(engine) as session:
        conn = session.connection()
        mine = conn.execute(
            select(col(Recipient.message_id), col(Recipient.position)).where(
                func.lower(col(Recipient.address)).in_(forms)
            )
        ).all()
        pairs = [(int(m), int(p)) for m, p in mine]
        sole = _sole_recipient_messages(conn, {m for m, _ in pairs})
        counts["events"] = sum(
            _delete(conn, Event, or_(*chunk)) for chunk in _chunks(_event_filters(pairs, sole))
        )
        counts["recipients"] = _delete(
            conn, Recipient, func.lower(col(Recipient.address)).in_(forms)
        )
        counts["messages scrubbed"] = _scrub_messages(conn, forms)
        mentions = or_(
            func.lower(col(OutboxItem.recipient)).in_(forms),
            *(func.lower(col(OutboxItem.payload)).contains(f, autoescape=True) for f in forms),
            func.lower(col(OutboxItem.target)).in_(forms),
        )
        outbox_ids = select(col(OutboxItem.id)).where(mentions)
        counts["delivery_attempts"] = _delete(
            conn, DeliveryAttempt, col(DeliveryAttempt.outbox_id).in_(outbox_ids)
        )
        counts["outbox"] = _delete(conn, OutboxItem, mentions)
        counts["consents"] = _delete(conn, Consent, func.lower(col(Consent.address)).in_(forms))
        suppressed = func.lower(col(Suppression.address)).in_(forms)
        if forget_suppression:
            counts["suppressions"] = _delete(conn, Suppression, suppressed)
        else:
            found = conn.execute(select(func.count()).select_from(Suppression).where(suppressed))
            result.suppression_kept = bool(found.scalar_one())
    log.info("erased %s: %s", addr, counts)
    return result


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


def _event_filters(pairs: list[tuple[int, int]], sole: set[int]) -> list[Any]:
    filters = [
        and_(col(Event.message_id) == m, col(Event.recipient_position) == p) for m, p in pairs
    ]
    filters += [
        and_(col(Event.message_id) == m, col(Event.recipient_position) == 0) for m in sorted(sole)
    ]
    return filters


def _chunks(items: Iterable[Any]) -> list[list[Any]]:
    items = list(items)
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


# Free text that may quote a recipient. ``sender``/``auth_user`` are the
# sender's own identity and stay: erasure is about a recipient.
_TEXT_COLUMNS = ("from_header", "subject", "decision", "upstream_reply")


def _scrub_messages(conn: Connection, forms: list[str]) -> int:
    """Replace the address where a message's text quotes it (e.g. a 550 reply)."""
    table = Message.__table__  # type: ignore[attr-defined]
    columns = [table.c[name] for name in _TEXT_COLUMNS]
    hits = conn.execute(
        select(table.c.id, *columns).where(
            or_(*(func.lower(c).contains(f, autoescape=True) for c in columns for f in forms))
        )
    ).all()
    pattern = re.compile("|".join(map(re.escape, forms)), re.IGNORECASE)
    for row in hits:
        values = {c.name: pattern.sub(ERASED, row._mapping[c.name]) for c in columns}
        conn.execute(update(table).where(table.c.id == row.id).values(**values))
    return len(hits)
