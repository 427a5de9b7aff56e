"""The intake writer's store (relay/answerstore.py): match findings to a message and a
recipient, one event each, state columns and webhooks in the same transaction."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, select

from relay.answerstore import AnswerStore, item
from shared.answers import Finding
from shared.db import session_scope
from shared.models import Event, Message, OutboxItem, Recipient, WebhookEndpoint
from tests.support.seedrows import add_message

AT = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def reply(key: str, message: Message, address: str, kind: str = "reply") -> dict[str, object]:
    return item(key, AT, [Finding(kind, "in-reply-to", (message.message_id_header,), address)])


def events(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        t = Event.__table__  # type: ignore[attr-defined]
        rows = conn.execute(
            select(t.c.message_id, t.c.recipient_position, t.c.kind, t.c.reasons,
                   t.c.bounce_type, t.c.status_code, t.c.diagnostic).order_by(t.c.id)
        )  # fmt: skip
        return [tuple(r) for r in rows]


def test_each_finding_finds_its_message_and_the_recipient_by_address(engine: Engine) -> None:
    m = add_message(engine, recipients=("bob@client.test", "Carol@Other.test", "dan@x.test"))
    other = add_message(engine)
    store = AnswerStore(engine)
    ids = ("<not-ours@x.test>", m.message_id_header)
    written = store.write(
        [
            item("copy-1", AT, [Finding("reply", "in-reply-to", ids, "carol@other.test")]),
            item("copy-2", AT, [Finding("auto_reply", "auto-submitted", ids, "bob@client.test")]),
            item(
                "copy-3",
                AT,
                [
                    Finding(
                        "bounce",
                        "dsn-failed-permanent",
                        ids,
                        "dan@x.test",
                        "hard",
                        "5.1.1",
                        "550 5.1.1 no such user",
                    )
                ],
            ),
            item("copy-4", AT, [Finding("reply", "references", ids, "eve@elsewhere.test")]),
        ],
        replay=False,
    )
    assert written == 4
    assert events(engine) == [
        (m.id, 2, "reply", "in-reply-to", "", "", ""),
        (m.id, 1, "auto_reply", "auto-submitted", "", "", ""),
        (m.id, 3, "bounce", "dsn-failed-permanent", "hard", "5.1.1", "550 5.1.1 no such user"),
        (m.id, 0, "reply", "references", "", "", ""),  # someone else: no address kept
    ]
    with session_scope(engine) as session:
        rcpts = {r.position: r for r in session.exec(select(Recipient).where(
            Recipient.message_id == m.id)).scalars()}  # type: ignore[arg-type]  # fmt: skip
        message = session.get(Message, m.id)
        assert message is not None
        assert (message.replies, message.auto_replies, message.bounces) == (1, 1, 1)
        assert rcpts[2].replied_at is not None
        assert rcpts[1].auto_replied_at is not None
        assert rcpts[1].replied_at is None
        assert (rcpts[3].bounced_at is not None, rcpts[3].bounce_type) == (True, "hard")
        untouched = session.get(Message, other.id)
        assert untouched is not None
        assert untouched.replies == 0
    assert store.unmatched == 0


def test_a_copy_sent_twice_is_stored_once_and_a_stranger_leaves_a_count(engine: Engine) -> None:
    m = add_message(engine)
    store = AnswerStore(engine)
    copy = item(
        "copy-1", AT, [Finding("reply", "in-reply-to", (m.message_id_header,), "bob@client.test")]
    )
    assert store.write([copy, copy], replay=False) == 1
    assert store.write([copy], replay=True) == 0
    stranger = item("copy-2", AT, [Finding("reply", "in-reply-to", ("<x@y.test>",), "a@b.test")])
    assert store.write([stranger], replay=False) == 0
    assert len(events(engine)) == 1
    assert store.unmatched == 1


def test_answers_become_webhooks(engine: Engine) -> None:
    m = add_message(engine)
    with session_scope(engine) as session:
        session.add(WebhookEndpoint(url="https://hooks.test/x", secret="s" * 32))
    store = AnswerStore(engine)
    store.write(
        [
            item(
                "c1",
                AT,
                [Finding("reply", "in-reply-to", (m.message_id_header,), "bob@client.test")],
            ),
            item(
                "c2", AT, [Finding("complaint", "arf", (m.message_id_header,), "carol@other.test")]
            ),
            item(
                "c3",
                AT,
                [
                    Finding(
                        "bounce",
                        "ndr-qmail",
                        (m.message_id_header,),
                        "carol@other.test",
                        "soft",
                        "4.2.2",
                        "mailbox full",
                    )
                ],
            ),
        ],
        replay=False,
    )
    with session_scope(engine) as session:
        rows = session.exec(select(OutboxItem)).scalars().all()  # type: ignore[call-overload]
        types = sorted(r.event_type for r in rows)
        assert types == ["message.bounced", "message.complained", "message.replied"]
        bounced = next(r for r in rows if r.event_type == "message.bounced")
        assert '"bounce_type":"soft"' in bounced.payload
        assert '"status":"4.2.2"' in bounced.payload
