"""Retention purge and erasure leave no trace: every table is read back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import timedelta

import pytest
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy import event as sa_event
from sqlmodel import SQLModel, col

from shared import consent, eventstate, privacy, webhooks
from shared.config import Settings
from shared.db import session_scope
from shared.models import Event, Message, Recipient, Suppression, utcnow
from shared.outbox import enqueue_for_events
from shared.tokens import Signer
from tests.support.seedrows import T0, add_message, event, write_events


def dump(engine: Engine) -> dict[str, list[str]]:
    """Every row of every table, as text (lower case)."""
    out: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            rows = conn.execute(text(f'SELECT * FROM "{table.name}"')).all()
            out[table.name] = [repr(tuple(row)).lower() for row in rows]
    return out


def mentions(engine: Engine, needle: str) -> dict[str, int]:
    found = {t: sum(needle.lower() in r for r in rows) for t, rows in dump(engine).items()}
    return {t: n for t, n in found.items() if n}


def test_purge_removes_old_rows_and_links_still_redirect(engine: Engine) -> None:
    webhooks.add_endpoint(engine, "https://example.com/h")
    old = add_message(engine, created_at=T0, recipients=("old@client.test",))
    new = add_message(engine, created_at=T0 + timedelta(days=300), recipients=("new@client.test",))
    old_hits = [event(old), event(old, kind="click", link=1)]
    write_events(engine, [*old_hits, event(new)])
    with session_scope(engine) as session:
        enqueue_for_events(session, old_hits)
    signer = Signer([b"k" * 32])
    token = signer.click_token(old.id, 1, 1, "https://example.com/report")

    counts = privacy.purge(engine, 100, now=T0 + timedelta(days=310))
    assert counts["messages"] == 1
    assert counts["events"] == 2
    assert counts["recipients"] == 1
    assert counts["outbox"] == 0  # not delivered yet: kept until it is
    assert not mentions(engine, "old@client.test").keys() - {"outbox"}
    assert mentions(engine, "new@client.test")
    with session_scope(engine) as session:
        assert session.get(Message, old.id) is None
    clicked = signer.verify_click(token)  # the redirect needs only the token
    assert (clicked.message_id, clicked.url) == (old.id, "https://example.com/report")

    assert privacy.purge(engine, 0) == {}  # 0 keeps everything
    assert mentions(engine, "new@client.test")


def test_purged_notifications_go_once_delivered(engine: Engine) -> None:
    webhooks.add_endpoint(engine, "https://example.com/h")
    message = add_message(engine, created_at=T0, recipients=("old@client.test",))
    hit = event(message)
    write_events(engine, [hit])
    with session_scope(engine) as session:
        enqueue_for_events(session, [hit])
        session.connection().execute(text("UPDATE outbox SET status = 'delivered'"))
    counts = privacy.purge(engine, 30, now=T0 + timedelta(days=400))
    assert counts["outbox"] == 1
    assert mentions(engine, "old@client.test") == {}


def test_purge_loop_runs_and_stops(
    engine: Engine, make_settings: Callable[..., Settings], database_url: str
) -> None:
    add_message(engine, created_at=T0, recipients=("old@client.test",))
    settings = make_settings(database_url=database_url, retention_days=1)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(privacy.purge_loop(settings, engine, stop))
        deadline = asyncio.get_running_loop().time() + 10
        while mentions(engine, "old@client.test"):
            assert asyncio.get_running_loop().time() < deadline, "purge did not run"
            await asyncio.sleep(0.02)
        stop.set()
        await task

    asyncio.run(run())


def test_erase_leaves_no_trace(engine: Engine) -> None:
    webhooks.add_endpoint(engine, "https://example.com/h")
    shared_mail = add_message(engine, recipients=("Bob@Client.test", "carol@other.test"))
    only_bob = add_message(engine, recipients=("bob@client.test",), subject="Just for you")
    refused = add_message(engine, recipients=("bob@client.test",), refused=("bob@client.test",))
    with session_scope(engine) as session:
        row = session.get(Message, refused.id)
        assert row is not None
        row.upstream_reply = "550 5.1.1 <bob@client.test>: no such user"
        session.add(row)
    hits = [
        event(shared_mail, recipient=1),
        event(shared_mail, recipient=2),
        event(shared_mail, recipient=0),  # message-level: cannot be told apart, stays
        event(only_bob, recipient=0),  # message-level of a one-recipient message: Bob's
        event(only_bob, kind="click", recipient=1, link=1),
    ]
    write_events(engine, hits)
    with session_scope(engine) as session:
        enqueue_for_events(session, hits)
    consent.add_consent(engine, "bob@client.test")
    with session_scope(engine) as session:
        session.add(Suppression(address="bob@client.test", source="public"))

    result = privacy.erase(engine, "BOB@client.test")
    assert result.counts["recipients"] == 3
    assert result.counts["events"] == 3
    assert result.counts["consents"] == 1
    assert result.counts["messages scrubbed"] == 1
    assert result.counts["outbox"] >= 2
    assert result.suppression_kept
    assert any("kept" in line for line in result.lines())
    assert mentions(engine, "bob@client.test") == {"suppressions": 1}
    with session_scope(engine) as session:
        left = session.exec(select(Event.recipient_position, Event.message_id)).all()
        positions = sorted((p, m == shared_mail.id) for p, m in left)
        recipients = session.exec(select(col(Recipient.address))).scalars().all()
    assert positions == [(0, True), (2, True)]  # Carol's hit and the shared one
    assert recipients == ["carol@other.test"]
    assert mentions(engine, "carol@other.test")

    again = privacy.erase(engine, "bob@client.test", forget_suppression=True)
    assert again.counts["suppressions"] == 1
    assert mentions(engine, "bob@client.test") == {}


def test_erase_and_purge_cover_answers(engine: Engine) -> None:
    """Replies, auto-replies, bounces and complaints (relay/answerstore.py) go with
    their recipient on erasure and with their message on purge."""
    from relay.answerstore import AnswerStore, item
    from shared.answers import Finding

    mail = add_message(engine, recipients=("bob@client.test", "carol@other.test"))
    old = add_message(engine, recipients=("dan@client.test",), created_at=T0 - timedelta(days=400))
    at = T0 + timedelta(hours=2)

    def answers(m: Message, address: str, key: str) -> list[dict[str, object]]:
        ids = (m.message_id_header,)
        kinds = [
            Finding("reply", "in-reply-to", ids, address),
            Finding("auto_reply", "auto-submitted", ids, address),
            Finding("bounce", "dsn-failed-permanent", ids, address, "hard", "5.1.1", "no user"),
            Finding("complaint", "arf", ids, address),
        ]
        return [item(f"{key}-{f.kind}", at, [f]) for f in kinds]

    store = AnswerStore(engine)
    store.write(
        answers(mail, "bob@client.test", "b") + answers(mail, "carol@other.test", "c"), False
    )
    store.write(answers(old, "dan@client.test", "d"), replay=False)
    result = privacy.erase(engine, "bob@client.test")
    assert result.counts["events"] == 4
    with session_scope(engine) as session:
        left = session.exec(select(Event.message_id, Event.recipient_position, Event.kind)).all()
    assert sorted((m == mail.id, p, k) for m, p, k in left) == sorted(
        [(True, 2, k) for k in ("reply", "auto_reply", "bounce", "complaint")]
        + [(False, 1, k) for k in ("reply", "auto_reply", "bounce", "complaint")]
    )
    counts = privacy.purge(engine, 100, now=T0 + timedelta(days=1))
    assert counts["events"] == 4  # dan's, with his message
    with session_scope(engine) as session:
        kinds = session.exec(select(Event.kind, Event.message_id)).all()
    assert sorted(k for k, m in kinds if m == mail.id) == sorted(
        ["reply", "auto_reply", "bounce", "complaint"]
    )
    assert not [m for _, m in kinds if m == old.id]


def _statements(engine: Engine) -> list[str]:
    """Every statement ``engine`` runs from now on."""
    seen: list[str] = []
    sa_event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    return seen


def test_purge_with_nothing_due_is_one_query(engine: Engine) -> None:
    add_message(engine, created_at=T0 + timedelta(days=300))
    seen = _statements(engine)
    assert sum(privacy.purge(engine, 100, now=T0 + timedelta(days=310)).values()) == 0
    assert len(seen) == 1


def test_purge_deletes_in_committed_batches(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(privacy, "PURGE_BATCH", 2)
    old = [add_message(engine, created_at=T0 + timedelta(hours=i)) for i in range(5)]
    kept = add_message(engine, created_at=T0 + timedelta(days=300))
    write_events(engine, [event(m) for m in old])
    stale = event(kept, at=T0)  # a hit older than the cutoff on a message kept
    write_events(engine, [stale, event(kept, recipient=2)])
    commits = []
    sa_event.listen(engine, "commit", lambda conn: commits.append(1))
    counts = privacy.purge(engine, 100, now=T0 + timedelta(days=310))
    assert (counts["messages"], counts["recipients"], counts["events"]) == (5, 10, 6)
    assert len(commits) >= 3 + 1  # five messages, two a batch; then the stale hit
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 1
        opens = conn.execute(text("SELECT opens FROM messages")).scalar_one()
    assert opens == 1  # the kept message's state lost the purged hit
    # The rollup keeps the purged days' counts: they name no recipient.
    with engine.connect() as conn:
        sent = conn.execute(text("SELECT sum(sent) FROM daily_stats")).scalar_one()
    assert sent == 6


def _senders(engine: Engine) -> dict[str, tuple[int, object]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT sender_key, messages, last_at FROM senders")).all()
    return {key: (n, last) for key, n, last in rows}


def test_purge_keeps_the_senders_rows_as_a_rebuild_counts_them(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(privacy, "PURGE_BATCH", 2)
    for i in range(3):  # all of Old's mail goes; some of Ann's (two batches hold Ann's)
        add_message(engine, sender="Old@Example.com", created_at=T0 + timedelta(hours=i))
        add_message(engine, sender="ann@example.com", created_at=T0 + timedelta(hours=i))
    newest = add_message(engine, sender="Ann@Example.com", created_at=T0 + timedelta(days=300))
    add_message(engine, sender="bo@example.com", created_at=T0 + timedelta(days=301))
    assert _senders(engine)["ann@example.com"][0] == 4

    privacy.purge(engine, 100, now=T0 + timedelta(days=310))
    purged = _senders(engine)
    assert {k: n for k, (n, _) in purged.items()} == {
        "old@example.com": 0,  # kept in the menu, with no message
        "ann@example.com": 1,
        "bo@example.com": 1,
    }
    erased = privacy.erase(engine, "bob@client.test")  # erasure deletes no message
    assert erased.counts["recipients"] == 2
    assert _senders(engine) == purged
    eventstate.rebuild(engine)
    assert _senders(engine) == purged
    with session_scope(engine) as session:
        assert session.get(Message, newest.id) is not None


def test_a_rebuild_repairs_the_senders_of_mail_purged_before(engine: Engine) -> None:
    add_message(engine, sender="old@example.com", created_at=T0)
    add_message(engine, sender="old@example.com", created_at=T0 + timedelta(days=1))
    with engine.begin() as conn:  # as a purge did before it kept the senders' rows
        conn.execute(text("DELETE FROM messages WHERE sender_key = 'old@example.com'"))
    assert _senders(engine)["old@example.com"][0] == 2
    eventstate.rebuild(engine)
    assert _senders(engine)["old@example.com"][0] == 0


def test_erase_finds_every_spelling_in_batches_and_counts_the_state_again(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(privacy, "ERASE_BATCH", 1)
    mails = [
        add_message(engine, recipients=("Dana@Client.test", "erin@client.test")),
        add_message(engine, recipients=("dana@client.test",)),
        add_message(engine, recipients=("DANA@CLIENT.TEST", "frank@client.test")),
    ]
    write_events(engine, [event(m, recipient=1) for m in mails])
    write_events(engine, [event(mails[0], recipient=2), event(mails[1], recipient=0)])
    result = privacy.erase(engine, "dana@client.test")
    assert (result.counts["recipients"], result.counts["events"]) == (3, 4)
    assert mentions(engine, "dana@client.test") == {}
    with engine.connect() as conn:
        opens = dict(conn.execute(text("SELECT id, opens FROM messages")).all())
    assert opens == {mails[0].id: 1, mails[1].id: 0, mails[2].id: 0}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_erase_and_purge_batches_are_planned_without_jit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's JIT compiled each statement of a batch (its estimate of a
    message's events is far too high): the batches turn it off, for themselves."""
    seen: list[str] = []
    real = eventstate.recount

    def recount(conn: Connection, message_ids: Sequence[int]) -> None:
        seen.append(conn.exec_driver_sql("SELECT current_setting('jit')").scalar_one())
        real(conn, message_ids)

    monkeypatch.setattr(eventstate, "recount", recount)
    kept = add_message(engine, recipients=("bob@client.test",), created_at=utcnow())
    write_events(engine, [event(kept, recipient=1, at=utcnow() - timedelta(days=40))])
    write_events(engine, [event(kept, recipient=1)])
    assert privacy.purge(engine, 30)["events"] == 1  # the old hit of a message kept
    assert privacy.erase(engine, "bob@client.test").counts["events"] == 1
    assert seen == ["off", "off"]
    with engine.connect() as conn:  # SET LOCAL: the pool's connections are as they were
        after, default = conn.exec_driver_sql(
            "SELECT current_setting('jit'), reset_val FROM pg_settings WHERE name = 'jit'"
        ).one()
    assert after == default
