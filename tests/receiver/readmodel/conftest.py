"""Many messages quickly, as the relay's record leaves them (sender_key set)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, insert

from shared.identity import Viewer
from shared.models import Event, Message, Recipient
from tests.support.seedrows import T0

ADMIN = Viewer(1, "root", "admin", ())
BULK = Viewer(2, "bulk", "sender", ("@bulk.example",))


def add_many(
    engine: Engine, count: int, start: int = 1, same_time_every: int = 3, sender: str = ""
) -> list[int]:
    """``count`` messages with two recipients each, from bulk@bulk.example (odd
    ones) and other@else.example, or all from ``sender``; every
    ``same_time_every`` share one created_at (ties the id must break). Their
    ids, newest first."""
    messages, recipients = [], []
    for n in range(start, start + count):
        at = T0 + timedelta(minutes=n // same_time_every)
        who = sender or ("bulk@bulk.example" if n % 2 else "other@else.example")
        messages.append(
            {"id": n * 7919 % 1_000_003 + n * 1_000_003, "created_at": at, "sender": who,
             "sender_key": who, "subject": f"Report {n:05}", "track_opens": True,
             "track_clicks": True}
        )  # fmt: skip
    for m in messages:
        for position in (1, 2):
            address = f"r{position}-{m['id']}@client.example"
            recipients.append({"message_id": m["id"], "position": position, "address": address})
    with engine.begin() as conn:
        conn.execute(insert(Message), messages)
        conn.execute(insert(Recipient), recipients)
    ordered = sorted(messages, key=lambda m: (m["created_at"], m["id"]), reverse=True)
    return [m["id"] for m in ordered]


def add_hits(engine: Engine, message_ids: list[int], per_message: int) -> None:
    rows = [
        {"event_key": f"k{mid}-{i}", "message_id": mid, "recipient_position": 1, "kind": "open",
         "occurred_at": T0 + timedelta(days=1, seconds=i), "verdict": "human"}
        for mid in message_ids
        for i in range(per_message)
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(Event), rows)
