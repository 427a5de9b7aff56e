"""Migration 0004 adds the kept state and fills it in for the mail already stored."""

from __future__ import annotations

import ast

from alembic import command
from sqlalchemy import text

from shared import db, eventstate
from tests.support.seedrows import state

SENT = "2026-11-30 12:00:00+00:00"
LATER = "2026-11-30 13:00:00+00:00"
MUCH_LATER = "2026-12-02 08:00:00+00:00"


MESSAGE = (
    "INSERT INTO messages (id, created_at, sender, from_header, subject, message_id_header,"
    " auth_user, client_ip, size_in, size_out, track_opens, track_clicks, per_recipient,"
    " decision, parts_modified, status, upstream_reply) VALUES (:id, :at, :sender, '', '', '',"
    " '', '', 0, 0, :tracked, :tracked, :tracked, '', '', 'sent', '')"
)
RECIPIENT = (
    "INSERT INTO recipients (message_id, position, address, tracked, status, reply_code,"
    " reply_text) VALUES (:m, :p, :a, :tracked, 'accepted', 250, '')"
)
EVENT = (
    "INSERT INTO events (event_key, message_id, recipient_position, link_position, kind,"
    " occurred_at, ip, user_agent, method, verdict, reasons)"
    " VALUES (:k, :m, :p, :link, :kind, :at, '', '', 'GET', :verdict, '')"
)


def test_existing_mail_gets_its_state(empty_url: str) -> None:
    db.upgrade(empty_url, "0003")
    engine = db.make_engine(empty_url)
    hits = [
        (1, 1, "open", "machine", SENT),
        (1, 1, "open", "human", LATER),
        (1, 2, "open", "proxy", MUCH_LATER),
        (1, 1, "click", "human", MUCH_LATER),
        (1, 0, "open", "scanner", LATER),
        (2, 1, "open", "self", LATER),
        (3, 1, "open", "human", LATER),  # not tracked for opens: counted, not "opened"
    ]
    with engine.begin() as conn:
        for id_, sender, tracked in (
            (1, "Ann@Example.com", True),
            (2, "ann@example.com", True),
            (3, "zoë@Bücher.example", False),
        ):
            conn.execute(
                text(MESSAGE), {"id": id_, "at": SENT, "sender": sender, "tracked": tracked}
            )
        for m, p, address in (
            (1, 1, "Bob@Client.test"),
            (1, 2, "carol@x.test"),
            (2, 1, "Ünal@x.test"),
            (3, 1, "d@x.test"),
        ):
            conn.execute(text(RECIPIENT), {"m": m, "p": p, "a": address, "tracked": True})
        for i, (m, p, kind, verdict, at) in enumerate(hits):
            link = 1 if kind == "click" else 0
            conn.execute(
                text(EVENT),
                {
                    "k": f"k{i}",
                    "m": m,
                    "p": p,
                    "link": link,
                    "kind": kind,
                    "at": at,
                    "verdict": verdict,
                },
            )
    engine.dispose()

    command.upgrade(db.alembic_config(empty_url), "head")

    engine = db.make_engine(empty_url)
    with engine.connect() as conn:
        messages = {
            row.id: row
            for row in conn.execute(
                text(
                    "SELECT id, sender_key, opens, machine_opens, self_opens, clicks,"
                    " first_open_at, last_click_at FROM messages"
                )
            )
        }
        bob = conn.execute(
            text(
                "SELECT address_key, opens, machine_opens, clicks, first_open_at"
                " FROM recipients WHERE message_id = 1 AND position = 1"
            )
        ).one()
        keys = (
            conn.execute(text("SELECT address_key FROM recipients ORDER BY message_id, position"))
            .scalars()
            .all()
        )
        days = {row.sender_key: row for row in conn.execute(text("SELECT * FROM daily_stats"))}
        senders = dict(conn.execute(text("SELECT sender_key, messages FROM senders")).all())
        if engine.dialect.name == "postgresql":
            id_type = conn.execute(
                text(
                    "SELECT data_type FROM information_schema.columns"
                    " WHERE table_name = 'events' AND column_name = 'id'"
                )
            ).scalar_one()
            assert id_type == "bigint"
    engine.dispose()
    assert messages[1].sender_key == "ann@example.com"
    assert messages[3].sender_key == "zoë@bücher.example"  # Python's lower(), not SQLite's
    assert (messages[1].opens, messages[1].machine_opens, messages[1].clicks) == (2, 2, 1)
    assert (messages[2].opens, messages[2].self_opens) == (0, 1)
    assert messages[1].first_open_at is not None
    assert messages[1].last_click_at is not None
    assert (bob.address_key, bob.opens, bob.machine_opens, bob.clicks) == (
        "bob@client.test",
        1,
        1,
        1,
    )
    assert keys == ["bob@client.test", "carol@x.test", "ünal@x.test", "d@x.test"]
    ann = days["ann@example.com"]
    assert (ann.sent, ann.track_opens, ann.opened, ann.clicked) == (2, 2, 1, 1)
    assert (ann.human_opens, ann.machine_opens, ann.opens_self, ann.opens_scanner) == (2, 2, 1, 1)
    zoe = days["zoë@bücher.example"]
    assert (zoe.sent, zoe.track_opens, zoe.opened, zoe.human_opens) == (1, 0, 0, 1)
    assert senders == {"ann@example.com": 2, "zoë@bücher.example": 1}


ANSWER = (
    "INSERT INTO events (event_key, message_id, recipient_position, link_position, kind,"
    " occurred_at, ip, user_agent, method, verdict, reasons)"
    " VALUES (:k, :m, :p, 0, :kind, :at, '', '', '', 'unknown', '')"
)


def test_the_backfill_equals_a_rebuild_at_head(empty_url: str) -> None:
    """Migration 0004 keeps its own SQL (shared/eventstate.py may change later): through
    every migration, mail stored before 0004 has the state ``rebuild-state`` gives it."""
    db.upgrade(empty_url, "0003")
    engine = db.make_engine(empty_url)
    days = (SENT, LATER, MUCH_LATER)
    senders = ("Ann@Example.com", "bo@example.com", "zoë@Bücher.example")
    verdicts = ("human", "proxy", "machine", "scanner", "self", "unknown")
    with engine.begin() as conn:
        for m in range(1, 13):
            tracked = m % 5 != 0
            conn.execute(
                text(MESSAGE),
                {"id": m, "at": days[m % 3], "sender": senders[m % 3], "tracked": tracked},
            )
            for p in range(1, 1 + m % 3 + 1):
                conn.execute(
                    text(RECIPIENT), {"m": m, "p": p, "a": f"r{p}@x.test", "tracked": tracked}
                )
        k = 0
        for m in range(1, 12):  # message 12: no event at all
            for j in range(m % 4 + 1):
                kind = "click" if j % 3 == 2 else "open"
                params = {"k": f"k{k}", "m": m, "p": j % 3, "kind": kind, "at": days[j % 3]}
                k += 1
                link = 1 if kind == "click" else 0
                conn.execute(text(EVENT), {**params, "link": link, "verdict": verdicts[k % 6]})
        for m, p, kind in ((1, 1, "reply"), (1, 2, "reply"), (2, 0, "reply"), (4, 1, "bounce")):
            k += 1
            conn.execute(text(ANSWER), {"k": f"k{k}", "m": m, "p": p, "kind": kind, "at": LATER})
    engine.dispose()

    db.upgrade(empty_url)

    engine = db.make_engine(empty_url)
    migrated = state(engine)
    assert any(row["opens"] for row in migrated["messages"])
    assert any(row["replies"] for row in migrated["messages"])
    assert len(migrated["senders"]) == 3
    eventstate.rebuild(engine)
    assert state(engine) == migrated
    engine.dispose()


def test_0004_imports_nothing_of_the_project() -> None:
    tree = ast.parse((db.MIGRATIONS / "versions" / "0004_scale_state.py").read_text())
    imported = {
        name
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom)
            else []
        )
    }  # fmt: skip
    assert imported == {"collections.abc", "sqlalchemy", "sqlmodel", "alembic"}
