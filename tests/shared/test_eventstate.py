"""shared/eventstate.py: the state columns and rollups follow the events, on both databases.

The oracle for the rollup is how the overview counted before it had one: per
message, from its events (counted opens and clicks make a message opened or
clicked when it was tracked so; opens by verdict are hits).
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from receiver.eventrecord import event_keys, new_event
from receiver.eventrows import BatchStore
from shared import eventstate
from shared.db import insert_ignoring, make_engine
from shared.models import Event
from shared.verdicts import AUTOMATED, COUNTED, VERDICTS
from tests.support.seedrows import T0, add_message, event, state, write_events

EVENTS = Event.__table__  # type: ignore[attr-defined]


def one(engine: Engine, sql: str, **params: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text(sql), params).one()._mapping)


def insert_new(engine: Engine, rows: list[dict[str, Any]]) -> int:
    """Insert ``rows`` ignoring stored keys and apply only the new ones, as a writer does."""
    with engine.begin() as conn:
        statement = insert_ignoring(EVENTS, "event_key", engine.dialect.name)
        new: set[str] = set()
        inserted = []
        for row in rows:
            if conn.execute(statement.returning(EVENTS.c.event_key), row).first() is not None:
                new.add(row["event_key"])
                inserted.append(row)
        facts = [
            (
                r["message_id"],
                r["recipient_position"],
                r["kind"],
                r["verdict"],
                r["occurred_at"],
                r.get("bounce_type", ""),
            )
            for r in inserted
        ]
        eventstate.apply(conn, facts)
    return len(new)


def test_opens_and_clicks_fill_recipient_and_message_state(engine: Engine) -> None:
    message = add_message(engine, recipients=("Bob@Client.test", "carol@other.test"))
    t = message.created_at
    write_events(
        engine,
        [
            event(message, "open", 1, "human", t + timedelta(minutes=5)),
            event(message, "open", 1, "proxy", t + timedelta(minutes=1)),
            event(message, "open", 1, "machine", t),  # never a first open
            event(message, "open", 2, "self", t + timedelta(minutes=2)),
            event(message, "open", 0, "scanner", t + timedelta(minutes=3)),
            event(message, "click", 1, "human", t + timedelta(minutes=7), link=1),
            event(message, "click", 1, "scanner", t + timedelta(minutes=8), link=1),
            event(message, "open", 2, "unknown", t + timedelta(minutes=9)),
        ],
    )
    m = one(engine, "SELECT * FROM messages WHERE id = :id", id=message.id)
    assert (m["opens"], m["machine_opens"], m["self_opens"]) == (2, 2, 1)
    assert (m["clicks"], m["machine_clicks"], m["self_clicks"]) == (1, 1, 0)
    assert m["sender_key"] == "alice@example.com"
    bob = one(
        engine, "SELECT * FROM recipients WHERE message_id = :id AND position = 1", id=message.id
    )
    carol = one(
        engine, "SELECT * FROM recipients WHERE message_id = :id AND position = 2", id=message.id
    )
    assert (bob["opens"], bob["machine_opens"], bob["clicks"], bob["machine_clicks"]) == (
        2,
        1,
        1,
        1,
    )
    assert bob["address_key"] == "bob@client.test"
    assert (carol["opens"], carol["self_opens"]) == (0, 1)
    assert carol["first_open_at"] is None
    assert bob["first_open_at"] == m["first_open_at"]
    assert bob["first_open_at"] < bob["last_open_at"] == m["last_open_at"]
    assert m["first_click_at"] == m["last_click_at"]
    day = one(engine, "SELECT * FROM daily_stats")
    assert (day["sent"], day["track_opens"], day["opened"], day["clicked"]) == (1, 1, 1, 1)
    assert (day["human_opens"], day["machine_opens"]) == (2, 2)
    opens = {v: day[f"opens_{v}"] for v in VERDICTS}
    assert opens == {"human": 1, "proxy": 1, "machine": 1, "scanner": 1, "self": 1, "unknown": 1}
    # A second counted open makes no second "opened" message.
    write_events(engine, [event(message, "open", 2, "human", t + timedelta(hours=1))])
    day = one(engine, "SELECT * FROM daily_stats")
    assert (day["opened"], day["human_opens"], day["opens_human"]) == (1, 3, 2)


def test_a_replayed_batch_counts_once(engine: Engine) -> None:
    message = add_message(engine)
    store = BatchStore(engine, store_full_ip=False)
    agent = "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0"
    batch = event_keys.assign(
        [new_event("open", message.id, 1, 0, "192.0.2.1", agent, "GET") for _ in range(3)]
    )
    store.write(batch)
    before = state(engine)
    written = store.write(batch, replay=True)  # the journal replays what was committed
    assert (written.inserted, written.duplicates) == (0, 3)
    assert state(engine) == before
    one_more = event_keys.assign([new_event("open", message.id, 2, 0, "192.0.2.1", agent, "GET")])
    store.write([batch[0], *one_more])  # a live batch meeting a stored key: only the new one
    m = one(engine, "SELECT opens, machine_opens, self_opens FROM messages")
    assert sum(m.values()) == 4


def test_answers_set_first_times_and_count_recipients(engine: Engine) -> None:
    message = add_message(engine, recipients=("a@x.test", "b@x.test", "c@x.test"))
    t = message.created_at
    answers = [
        {**event(message, "bounce", 1, "unknown", t + timedelta(hours=2)), "bounce_type": "soft"},
        {**event(message, "bounce", 1, "unknown", t + timedelta(hours=3)), "bounce_type": "hard"},
        {**event(message, "reply", 2, "unknown", t + timedelta(hours=5))},
        {**event(message, "reply", 2, "unknown", t + timedelta(hours=4))},
        {**event(message, "auto_reply", 0, "unknown", t + timedelta(hours=1))},
    ]
    assert insert_new(engine, answers[:3]) == 3
    assert insert_new(engine, answers) == 2
    m = one(engine, "SELECT * FROM messages")
    assert (m["bounces"], m["replies"], m["auto_replies"], m["complaints"]) == (1, 1, 1, 0)
    a = one(engine, "SELECT * FROM recipients WHERE position = 1")
    b = one(engine, "SELECT * FROM recipients WHERE position = 2")
    assert a["bounce_type"] == "hard"  # a hard bounce wins over a soft one
    assert a["bounced_at"] < b["replied_at"] == m["first_reply_at"]
    day = one(engine, "SELECT replied, bounced FROM daily_stats")
    assert day == {"replied": 1, "bounced": 1}
    before = state(engine)
    eventstate.rebuild(engine)
    assert state(engine) == before


def test_hits_before_their_record_are_counted_when_it_comes(engine: Engine) -> None:
    """A journaled record is stored after its first hits: they count then."""
    early = event(add_message(engine), "open", 1, "human")  # a message to borrow the shape
    message_id = 4242
    hit = {**early, "message_id": message_id, "event_key": secrets.token_hex(8)}
    write_events(engine, [hit])  # no message yet: nothing to add to
    assert one(engine, "SELECT count(*) AS n FROM daily_stats")["n"] == 1
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (id, created_at, sender, sender_key, from_header, subject,"
                " message_id_header, auth_user, client_ip, size_in, size_out, track_opens,"
                " track_clicks, per_recipient, decision, parts_modified, status, upstream_reply)"
                " VALUES (:id, :t, 'Late@Example.com', 'late@example.com', '', '', '', '', '',"
                " 0, 0, :yes, :yes, :yes, '', '', 'sent', '')"
            ),
            {"id": message_id, "t": T0 + timedelta(days=1), "yes": True},
        )
        conn.execute(
            text(
                "INSERT INTO recipients (message_id, position, address, address_key, tracked,"
                " status, reply_code, reply_text) VALUES (:id, 1, 'r@x.test', 'r@x.test', :yes,"
                " 'accepted', 250, '')"
            ),
            {"id": message_id, "yes": True},
        )
        eventstate.recorded(conn, [message_id])
    m = one(engine, "SELECT opens, first_open_at FROM messages WHERE id = :id", id=message_id)
    assert m["opens"] == 1
    assert m["first_open_at"] is not None
    day = one(engine, "SELECT * FROM daily_stats WHERE sender_key = 'late@example.com'")
    assert (day["sent"], day["opened"], day["opens_human"]) == (1, 1, 1)
    assert one(engine, "SELECT messages FROM senders WHERE sender_key = 'late@example.com'") == {
        "messages": 1
    }


def _random_mix(engine: Engine, seed: int) -> list[list[dict[str, Any]]]:
    rnd = random.Random(seed)
    senders = ("Alice@Example.com", "bob@example.com", "", "news@Büro.example")
    messages = []
    for i in range(24):
        recipients = tuple(f"r{i}-{p}@client.test" for p in range(rnd.randint(1, 3)))
        messages.append(
            (
                add_message(
                    engine,
                    sender=rnd.choice(senders),
                    recipients=recipients,
                    created_at=T0 + timedelta(days=rnd.randint(0, 4), hours=rnd.randint(0, 23)),
                    tracked=rnd.random() < 0.8,
                ),
                len(recipients),
            )
        )
    rows: list[dict[str, Any]] = []
    for _ in range(500):
        message, count = rnd.choice(messages)
        kind = rnd.choice(
            ("open",) * 6 + ("click",) * 3 + ("reply", "auto_reply", "bounce", "complaint")
        )
        at = message.created_at + timedelta(minutes=rnd.randint(1, 60 * 24 * 9))
        if kind in ("open", "click"):
            row = event(message, kind, rnd.randint(0, 4), rnd.choice(VERDICTS), at, link=1)
        else:  # answers come for a recipient the message has, or for the message
            row = event(message, kind, rnd.randint(0, count), "unknown", at)
            row["bounce_type"] = rnd.choice(("hard", "soft", "")) if kind == "bounce" else ""
        rows.append(row)
    batches = []
    start = 0
    while start < len(rows):
        size = rnd.randint(1, 60)
        batch = rows[start : start + size]
        batch += rnd.sample(rows[: start + 1], k=min(3, start + 1))  # repeats of stored keys
        batches.append(batch)
        start += size
    return batches


def _oracle(engine: Engine) -> dict[tuple[str, str], Counter[str]]:
    """The rollup as the overview counted before: per message, from its events."""
    with engine.connect() as conn:
        messages = {
            row.id: row
            for row in conn.execute(
                text("SELECT id, sender, created_at, track_opens, track_clicks FROM messages")
            )
        }
        events = conn.execute(
            text("SELECT message_id, recipient_position, kind, verdict FROM events")
        ).all()
    figures: dict[tuple[str, str], Counter[str]] = {}
    per_message: dict[int, Counter[str]] = {m: Counter() for m in messages}
    for message_id, _position, kind, verdict in events:
        c = per_message[message_id]
        c[kind, verdict] += 1
        if kind in eventstate.ANSWERS:
            c[kind] += 1
    for message_id, row in messages.items():
        created = (
            row.created_at
            if isinstance(row.created_at, datetime)
            else datetime.fromisoformat(row.created_at)
        )
        key = (
            row.sender.lower(),
            created.astimezone(UTC).date().isoformat()
            if created.tzinfo
            else created.date().isoformat(),
        )
        f = figures.setdefault(key, Counter())
        c = per_message[message_id]
        counted_opens = sum(c["open", v] for v in COUNTED)
        counted_clicks = sum(c["click", v] for v in COUNTED)
        f["sent"] += 1
        f["track_opens"] += bool(row.track_opens)
        f["opened"] += bool(row.track_opens) and counted_opens > 0
        f["track_clicks"] += bool(row.track_clicks)
        f["clicked"] += bool(row.track_clicks) and counted_clicks > 0
        f["human_opens"] += counted_opens
        f["machine_opens"] += sum(c["open", v] for v in AUTOMATED)
        f["replied"] += c["reply"] > 0
        f["bounced"] += c["bounce"] > 0
        for v in VERDICTS:
            f[f"opens_{v}"] += c["open", v]
    return figures


@pytest.mark.parametrize("size", [None, 7], ids=["whole tables", "slices"])
def test_rebuild_equals_incremental_and_the_old_overview_on_a_random_mix(
    engine: Engine, size: int | None
) -> None:
    for batch in _random_mix(engine, seed=13):
        insert_new(engine, batch)
    incremental = state(engine)
    assert sum(row["opens"] for row in incremental["messages"]) > 0
    assert sum(row["replies"] for row in incremental["messages"]) > 0
    with engine.begin() as conn:  # the state gone wrong: rows with and without events
        conn.execute(text("UPDATE messages SET opens = opens + 1, first_reply_at = NULL"))
        conn.execute(text("UPDATE recipients SET clicks = 2, bounce_type = 'soft'"))
    eventstate.rebuild(engine, size)
    assert state(engine) == incremental
    rollup = {
        (row["sender_key"], str(row["day"])): Counter(
            {k: v for k, v in row.items() if k not in ("sender_key", "day") and v}
        )
        for row in incremental["daily_stats"]
    }
    assert rollup == {k: +v for k, v in _oracle(engine).items()}
    senders = {row["sender_key"]: row["messages"] for row in incremental["senders"]}
    assert senders == dict(Counter(m["sender_key"] for m in incremental["messages"]))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_postgresql_probes_a_records_messages_for_hits_on_the_events_index(
    database_url: str,
) -> None:
    """``recorded``'s probe: one index probe per message, never a scan of the events
    (a plan check, not a time)."""
    engine = make_engine(database_url)
    try:
        messages = [add_message(engine) for _ in range(3)]
        write_events(engine, [event(m, "open") for m in messages for _ in range(5)])
        scope = eventstate._ids([m.id for m in messages])
        sql = "EXPLAIN " + eventstate._EARLY.format(m=scope.of("m.id"))
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE messages; ANALYZE events")
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.execute(scope.statement(sql), scope.params))
    finally:
        engine.dispose()
    on_events = [line.strip(" ->") for line in plan.splitlines() if " on events " in line]
    assert on_events, plan
    assert all(line.startswith("Index Only Scan using ix_events_message") for line in on_events)
    assert "Index Cond: (message_id = m.id)" in plan, plan
