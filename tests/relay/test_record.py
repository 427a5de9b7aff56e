"""What the relay writes to the database (relay/record.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, Engine, func, insert, text
from sqlmodel import Session, select
from starlette.applications import Starlette

from receiver import api
from relay.prepared import Copy, LinkRow, MessageRecord, Prepared
from relay.record import Delivery, Record, Recorder, RecordStore, _Rows, to_record
from relay.server import RelayServer
from relay.upstream import Reply
from shared import apitokens, db, eventstate
from shared.config import Settings
from shared.db import session_scope
from shared.models import Link, Message, OutboxItem, Recipient
from shared.outbox import enqueue_messages_sent
from shared.policies import add_suppression
from shared.spool import SQLITE_WRITE_TIMEOUT
from shared.tokens import Signer, new_message_id
from shared.users import add_user
from shared.webhooks import add_endpoint
from tests.support.injection_checks import without_added_id
from tests.support.receiverkit import ServerThread, wait_for
from tests.support.relaykit import (
    SIMPLE,
    client,
    record_one,
    relay_one,
    relay_settings,
    running_recorder,
    running_relay,
    send,
    signed_in,
    sqlite_engine,
)
from tests.support.seedrows import write_events
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


async def send_three(settings: Settings, engine: Engine) -> str:
    async with signed_in(settings, engine) as smtp:
        _, reply = await smtp.sendmail(
            USER, ["a@example.net", "gone@example.net", "b@example.net"], SIMPLE
        )
        return reply


def test_message_and_recipients_are_recorded(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    upstream.refuse["gone@example.net"] = "550 5.1.1 gone"
    reply = asyncio.run(send_three(relay_settings(make_settings, upstream), engine))
    with Session(engine) as session:
        [message] = session.exec(select(Message)).all()
        rows = session.exec(select(Recipient).order_by(Recipient.position)).all()
    assert (message.sender, message.auth_user, message.client_ip) == (USER, USER, "127.0.0.1")
    assert message.size_in == len(SIMPLE)
    assert message.status == "partial"
    assert message.upstream_reply == f"250 {reply}"
    assert [(r.address, r.status, r.reply_code) for r in rows] == [
        ("a@example.net", "accepted", 250),
        ("b@example.net", "accepted", 250),
        ("gone@example.net", "refused", 550),
    ]
    assert rows[2].reply_text == "5.1.1 gone"


def test_database_failure_never_fails_the_client(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = db.make_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # never migrated
    with caplog.at_level(logging.ERROR, logger="relay.record"):
        reply = asyncio.run(send_three(relay_settings(make_settings, upstream), broken))
    assert reply.startswith("2.0.0")
    assert len(upstream.messages) == 1
    assert "DATABASE WRITE FAILED" in caplog.text


TRACKED = (
    b"From: alice@example.com\r\nTo: a@example.net, b@example.net\r\nSubject: hi\r\n"
    b"X-Track: all\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://example.com/x">x</a></body></html>\r\n'
)


def test_recipient_positions_match_the_tokens_when_one_is_untracked(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    """The untracked (suppressed) first recipient's copy goes out last; its row
    must still get position 1, or the second recipient's hits would be shown as
    the first recipient's."""
    settings = relay_settings(make_settings, upstream, public_url="https://t.example.net")
    add_suppression(engine, "a@example.net")

    relay_one(settings, engine, TRACKED, recipients=("a@example.net", "b@example.net"))
    copies = {tuple(m.rcpt_tos): m.data for m in upstream.messages}
    untracked = TRACKED.replace(b"X-Track: all\r\n", b"")
    assert without_added_id(untracked, copies[("a@example.net",)]) == untracked
    token = re.search(rb"https://t\.example\.net/o/([\w-]+)\.gif", copies[("b@example.net",)])
    assert token
    position = Signer(settings.signing_keys()).verify_open(token[1].decode()).recipient
    with Session(engine) as session:
        rows = session.exec(select(Recipient).order_by(Recipient.position)).all()
    assert [(r.position, r.address, r.tracked) for r in rows] == [
        (1, "a@example.net", False),
        (2, "b@example.net", True),
    ]
    assert position == 2


def test_log_lines_name_the_message_as_the_dashboard_does(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One id per message across the relay's log lines (the tracking decision and
    the delivery), the same number the dashboard and API show, so grep finds both."""
    settings = relay_settings(make_settings, upstream, public_url="https://t.example.net")

    async def scenario() -> None:
        async with running_relay(settings, engine) as relay:
            await send(relay, TRACKED, recipients=("a@example.net",))
            await send(relay, SIMPLE, recipients=("a@example.net",))

    with caplog.at_level(logging.INFO, logger="relay"):
        asyncio.run(scenario())
    with Session(engine) as session:
        ids = [m.id for m in session.exec(select(Message)).all()]
    for mid in ids:
        names = {r.name for r in caplog.records if re.search(rf"message {mid}\b", r.getMessage())}
        assert names >= {"relay.pipeline", "relay.record"}, (mid, caplog.text)


# --- the group-commit writer ---


class KeepingStore(RecordStore):
    """The real store that also keeps a copy of every record it is handed, so a
    test can write the same records the way the relay wrote them before."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.seen: list[Record] = []

    def write(self, records: list[Record], replay: bool) -> int:
        self.seen += json.loads(json.dumps(records))
        return super().write(records, replay)


def orm_write(engine: Engine, record: Record) -> None:
    """How relay/record.py wrote a record before the group-commit writer (the ORM
    unit of work): the oracle the writer's rows are compared with."""
    message = Message.model_validate(record["message"])
    message.sender_key = message.sender.lower()  # the keys readers and erasure use
    with session_scope(engine) as session:
        recipients = [Recipient.model_validate(r) for r in record["recipients"]]
        for recipient in recipients:
            recipient.address_key = recipient.address.lower()
        session.add(message)
        session.add_all(recipients)
        session.flush()
        if record["links"]:
            session.execute(insert(Link), record["links"])
        enqueue_messages_sent(session, [(message, recipients)])


STORED = {  # every column but autoincrement ids and the outbox rows' own times
    "messages": "SELECT * FROM messages ORDER BY id",
    "recipients": "SELECT message_id, position, address, tracked, status, reply_code, reply_text"
    " FROM recipients ORDER BY message_id, position",
    "links": "SELECT message_id, position, url FROM links ORDER BY message_id, position",
    "outbox": "SELECT channel, target, endpoint_id, event_type, idempotency_key, message_id,"
    " recipient, payload, status, attempts, locked_until, delivered_at, last_error"
    " FROM outbox ORDER BY id",
}


def stored_rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """The rows as the driver returns them (SQLite: dates as the stored text)."""
    found = {}
    with engine.connect() as conn:
        for table, sql in STORED.items():
            found[table] = [dict(row._mapping) for row in conn.exec_driver_sql(sql)]
    for row in found["outbox"]:
        body = json.loads(row["payload"])
        body.pop("created_at")  # when the row was written
        row["payload"] = body
    return found


def clear(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("outbox", "links", "recipients", "messages"):
            conn.exec_driver_sql(f"DELETE FROM {table}")


def test_rows_are_those_the_orm_wrote(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    """A tracked message with links, a refused recipient and a webhook: every
    stored value, as the driver returns it, equals what the ORM stored."""
    add_endpoint(engine, "https://hooks.example/x")
    upstream.refuse["gone@example.net"] = "550 5.1.1 gone"
    settings = relay_settings(make_settings, upstream, public_url="https://t.example.net")
    store = KeepingStore(engine)

    async def scenario() -> None:
        server = RelayServer(settings, engine)
        server.handler.recorder.store.close()
        server.handler.recorder.store = store
        await server.start()
        try:
            await send(server, TRACKED, recipients=("a@example.net", "gone@example.net"))
        finally:
            await server.stop(grace=5)

    asyncio.run(scenario())
    written = stored_rows(engine)
    with engine.connect() as conn:
        rollups = {
            "daily_stats": [
                tuple(r)
                for r in conn.exec_driver_sql(
                    "SELECT sent, track_opens, track_clicks FROM daily_stats"
                )
            ],
            "senders": [
                tuple(r) for r in conn.exec_driver_sql("SELECT sender_key, messages FROM senders")
            ],
        }
    [record] = store.seen
    clear(engine)
    orm_write(engine, record)
    expected = stored_rows(engine)
    assert [len(written[t]) for t in STORED] == [1, 2, 1, 2]  # message.sent, delivery.failed
    for table in STORED:
        assert written[table] == expected[table], table
    # ... and the message is in its day's rollup and the senders menu.
    assert rollups["daily_stats"] == [(1, 1, 1)]
    assert rollups["senders"] == [(written["messages"][0]["sender_key"], 1)]


def test_concurrent_sessions_share_commits_and_each_message_gets_its_own_rows(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    add_endpoint(engine, "https://hooks.example/x", ["message.sent"])
    upstream.data_delay = 0.2  # the sessions' DATA replies come back together
    settings = relay_settings(make_settings, upstream)
    sessions = 20

    async def scenario() -> Recorder:
        async with running_relay(settings, engine) as relay:
            barrier = asyncio.Barrier(sessions)

            async def session(i: int) -> None:
                async with client(relay) as smtp:
                    await smtp.ehlo()
                    await smtp.auth_plain(USER, PASSWORD)
                    await barrier.wait()
                    data = SIMPLE.replace(b"Subject: hello", b"Subject: s%d" % i)
                    await smtp.sendmail(USER, [f"r{i}@example.net"], data)

            await asyncio.gather(*(session(i) for i in range(sessions)))
            return relay.handler.recorder

    recorder = asyncio.run(scenario())
    with Session(engine) as session:
        subjects = {m.id: m.subject for m in session.exec(select(Message))}
        recipients = [(r.message_id, r.address) for r in session.exec(select(Recipient))]
        keys = list(session.exec(select(OutboxItem.idempotency_key)))
    assert sorted(subjects.values()) == sorted(f"s{i}" for i in range(sessions))
    assert sorted(f"{subjects[mid]}:{address}" for mid, address in recipients) == sorted(
        f"s{i}:r{i}@example.net" for i in range(sessions)
    )
    assert sorted(keys) == sorted(f"message.sent:{mid}" for mid in subjects)
    assert recorder.counts.written == sessions
    assert recorder.counts.batches < sessions  # records shared transactions


def _prepared(links: list[int]) -> tuple[Prepared, Delivery]:
    """A relayed message's record with links at these positions."""
    mid = new_message_id()
    message = MessageRecord(id=mid, sender=USER, subject=f"m{mid}", size_in=10, size_out=10)
    found = [LinkRow(mid, p, f"https://example.com/{p}") for p in links]
    ok = Reply(250, "2.0.0 Ok")
    prepared = Prepared([Copy(["a@example.net"], b"x")], message, found, set())
    return prepared, Delivery({"a@example.net": ok}, [], ok)


def _count(engine: Engine, model: type, **where: Any) -> int:
    with Session(engine) as session:
        query = select(func.count()).select_from(model).filter_by(**where)
        return int(session.exec(query).one())


def test_a_refused_record_is_set_aside_and_the_rest_of_its_batch_stored(
    make_settings: Callable[..., Settings], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    recorder = Recorder(settings, engine)
    good, bad, other = _prepared([1, 2]), _prepared([1, 1]), _prepared([])  # bad: a link twice

    async def scenario() -> None:
        async with running_recorder(recorder):  # queued together: one batch
            await asyncio.gather(*(recorder.record(*item) for item in (good, bad, other)))

    with caplog.at_level(logging.WARNING, logger="relay.record"):
        asyncio.run(scenario())
    assert "writing them one by one" in caplog.text
    ids = [item[0].message.id for item in (good, bad, other)]
    assert [_count(engine, Message, id=mid) for mid in ids] == [1, 0, 1]
    assert [_count(engine, Recipient, message_id=mid) for mid in ids] == [1, 0, 1]
    assert [_count(engine, Link, message_id=mid) for mid in ids] == [2, 0, 0]
    rejected = settings.var_dir / "journal" / "rejected-relay.jsonl"
    assert [json.loads(line)["message"]["id"] for line in rejected.read_text().splitlines()] == [
        ids[1]
    ]
    assert not recorder.degraded
    assert recorder.counts.journaled == 0


def test_stop_writes_what_is_still_queued(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    recorder = Recorder(make_settings(), engine)
    items = [_prepared([1]) for _ in range(5)]

    async def scenario() -> int:
        await recorder.start()
        tasks = [asyncio.create_task(recorder.record(*item)) for item in items]
        await asyncio.sleep(0)  # every record is queued, none written yet
        await recorder.stop()
        stored = await asyncio.to_thread(_count, engine, Message)
        await asyncio.gather(*tasks)
        return stored

    assert asyncio.run(scenario()) == len(items)


def test_the_writer_alone_waits_briefly_for_a_locked_sqlite_file(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Set once per connection of the writer's own engine; everyone else keeps 30 s."""
    engine = sqlite_engine(tmp_path)
    recorder = Recorder(make_settings(), engine)
    try:
        with recorder.store.engine.connect() as conn:
            timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        assert timeout == int(SQLITE_WRITE_TIMEOUT * 1000)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        recorder.store.close()
        engine.dispose()


def test_a_replay_stores_each_record_once_and_sets_aside_what_cannot_be_read(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    """A journal left by a dead relay, with a record already stored (a crash
    between commit and delete), one repeated and one unreadable line."""
    settings = make_settings()
    stored, waiting = _prepared([1]), _prepared([1, 2])
    journal = settings.var_dir / "journal"

    async def scenario() -> Recorder:
        first = Recorder(settings, engine)
        await first.record(*stored)  # no writer started: written at once
        await first.stop()
        journal.mkdir(parents=True, exist_ok=True)
        records = [to_record(*stored), to_record(*waiting), {"message": {}}, to_record(*waiting)]
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (journal / "relay-999999-1-dead.jsonl").write_text(lines)
        recorder = Recorder(settings, engine)
        async with running_recorder(recorder):
            await asyncio.to_thread(wait_for, lambda: not list(journal.glob("relay-*")), 20)
        return recorder

    recorder = asyncio.run(scenario())
    ids = [stored[0].message.id, waiting[0].message.id]
    assert [_count(engine, Message, id=mid) for mid in ids] == [1, 1]
    assert [_count(engine, Link, message_id=mid) for mid in ids] == [1, 2]
    assert recorder.counts.replayed == 1
    assert not recorder.degraded
    rejected = (journal / "rejected-relay.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in rejected] == [{"message": {}}]


CONTROLS = (
    b"From: =?utf-8?q?Eve=00Null?= <alice@example.com>\r\nTo: bob@example.net\r\n"
    b"Subject: =?utf-8?q?nul=00inside?= and raw \x00 and \x1b[31m too\r\n"
    b"Message-ID: <nul\x00@example.com>\r\n\r\nA body with a \x00 byte stays as it was.\r\n"
)


def test_nul_and_control_characters_in_headers_are_stored_sanitised(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    """PostgreSQL text cannot hold NUL: the record was refused and the message never showed.
    What is stored is sanitised (shared/storable.py); what is relayed is not touched."""
    settings = relay_settings(make_settings, upstream)

    relay_one(settings, engine, CONTROLS, recipients=("bob@example.net",))
    assert b"raw \x00 and \x1b[31m" in upstream.messages[-1].data  # relayed byte for byte
    add_user(engine, "root", "password123", "admin")
    key, _ = apitokens.create_token(engine, "root", "test")
    app = Starlette(routes=[api.mount])
    app.state.engine = engine
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as http:
        listed = http.get("/api/v1/messages", headers={"Authorization": f"Bearer {key}"})
    assert listed.status_code == 200
    (message,) = listed.json()["messages"]
    assert message["subject"] == "nul\ufffdinside and raw \ufffd and \ufffd[31m too"
    assert message["from"].startswith("Eve\ufffdNull")


class HitWhileCommitting(RecordStore):
    """The real store, and a hit of each message written by another connection (as
    the receiver's writer writes it) after the record's statements, before its
    commit: the hit's ``eventstate.apply`` cannot see the message's row yet."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.failures: list[BaseException] = []
        self.writers: list[threading.Thread] = []

    def _statements(self, conn: Connection, batch: list[_Rows]) -> int:
        stored = super()._statements(conn, batch)
        hits = [_hit(rows.id, rows.message["created_at"]) for rows in batch]
        writer = threading.Thread(target=self._write, args=(hits,))
        writer.start()
        self.writers.append(writer)
        until = time.monotonic() + 2  # SQLite: the hit waits for the file's write lock
        while writer.is_alive() and time.monotonic() < until and not _waits(self.shared):
            writer.join(0.02)
        return stored

    def _write(self, hits: list[dict[str, Any]]) -> None:
        try:
            write_events(self.shared, hits)
        except BaseException as exc:
            self.failures.append(exc)


def _hit(message_id: int, created: Any) -> dict[str, Any]:
    return {
        "event_key": secrets.token_hex(16),
        "message_id": message_id,
        "recipient_position": 1,
        "link_position": 0,
        "kind": "open",
        "occurred_at": created + timedelta(seconds=5),
        "ip": "198.51.100.0",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
        "method": "GET",
        "verdict": "human",
        "reasons": "ua:browser",
    }


def _waits(engine: Engine) -> bool:
    """PostgreSQL: a session of this database waits for one of the state's stripes."""
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        sql = (
            "SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"
            f" AND classid = {eventstate.STATE_LOCK_CLASS}"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return conn.execute(text(sql)).first() is not None


_FIGURES = (
    "SELECT m.opens, m.first_open_at, r.opens, d.opened, d.human_opens FROM messages AS m"
    " JOIN recipients AS r ON r.message_id = m.id AND r.position = 1"
    " JOIN daily_stats AS d ON d.sender_key = m.sender_key WHERE m.id = :id"
)


def test_a_hit_written_while_its_record_commits_is_in_the_state(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    """The hit's transaction cannot see the message; the record's must count it
    (no ``trackrelay db rebuild-state`` needed): as a rebuild counts it."""
    recorder = Recorder(make_settings(), engine)
    recorder.store.close()
    store = recorder.store = HitWhileCommitting(engine)
    prepared, delivery = _prepared([])
    prepared.message.track_opens = True

    record_one(recorder, prepared, delivery)
    for writer in store.writers:
        writer.join()
    assert store.failures == []
    assert recorder.counts.written == 1
    mid = prepared.message.id
    with engine.connect() as conn:
        figures = tuple(conn.execute(text(_FIGURES), {"id": mid}).one())
    assert figures[0] == 1
    assert figures[1] is not None
    assert figures[2:] == (1, 1, 1)
    eventstate.rebuild(engine)
    with engine.connect() as conn:
        assert tuple(conn.execute(text(_FIGURES), {"id": mid}).one()) == figures


@pytest.mark.postgres
def test_a_record_goes_on_while_events_is_vacuumed_or_indexed(
    make_settings: Callable[..., Settings], pg_database: str
) -> None:
    """VACUUM, ANALYZE and ``CREATE INDEX CONCURRENTLY`` hold SHARE UPDATE EXCLUSIVE
    on ``events`` (for minutes on a year of hits); the record's ordering against
    hits is advisory, so a record does not wait for them."""
    engine = db.make_engine(pg_database)
    recorder = Recorder(make_settings(), engine)
    prepared, delivery = _prepared([])
    prepared.message.track_opens = True
    failures: list[BaseException] = []

    def record() -> None:
        try:
            record_one(recorder, prepared, delivery)
        except BaseException as exc:
            failures.append(exc)

    holder = engine.connect()
    try:
        holder.execute(text("LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE"))
        thread = threading.Thread(target=record)
        thread.start()
        thread.join(60)
        went_on = not thread.is_alive()
    finally:
        holder.rollback()
        holder.close()
    thread.join()
    engine.dispose()
    assert went_on, "the record waited for the lock VACUUM takes"
    assert failures == []
    assert recorder.counts.written == 1
