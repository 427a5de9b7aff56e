"""The relay with its database down: mail flows, records are journaled, replayed once.

"Down" is real, as in test_events.py: PostgreSQL behind a TCP proxy the test
stops; SQLite locked by another connection (``BEGIN EXCLUSIVE``).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func
from sqlmodel import Session, select

from shared import db
from shared.config import Settings
from shared.models import Message, OutboxItem, Recipient
from shared.webhooks import add_endpoint
from tests.support.receiverkit import Outage, wait_for
from tests.support.relaykit import SIMPLE, relay_settings, running_relay, send
from tests.support.upstream import RecordingUpstream


def _count(engine: Engine, model: type) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


def _journal(var: Path) -> list[Path]:
    return sorted((var / "journal").glob("relay-*.jsonl"))


def _journaled(var: Path) -> int:
    """Records waiting (a replay attempt seals the file: later ones start another)."""
    return sum(len(path.read_text().splitlines()) for path in _journal(var))


def test_mail_flows_while_the_database_is_down_and_records_arrive_once(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
    outage: Outage,
) -> None:
    add_endpoint(engine, "https://hooks.example/x", ["message.sent"])
    settings = relay_settings(make_settings, upstream, database_url=outage.app_url)
    relay_engine = db.make_engine(outage.app_url)

    async def scenario() -> list[str]:
        replies = []
        async with running_relay(settings, relay_engine) as relay:
            replies.append((await send(relay)).message)
            outage.down()
            for i in range(3):
                reply = await send(relay, SIMPLE + b"copy %d\r\n" % i, recipients=("a@x.example",))
                replies.append(reply.message)
            assert _count(engine, Message) == 1  # the test reads past the outage
            assert _journaled(settings.var_dir) == 3
            assert relay.handler.recorder.degraded
            outage.up()
            await asyncio.to_thread(wait_for, lambda: _count(engine, Message) == 4, 30)
            await asyncio.to_thread(wait_for, lambda: not _journal(settings.var_dir), 10)
            # the flag clears on the loop just after the journal file is deleted
            await asyncio.to_thread(wait_for, lambda: not relay.handler.recorder.degraded, 10)
        return replies

    try:
        replies = asyncio.run(scenario())
    finally:
        relay_engine.dispose()
    assert all(r.startswith("2.0.0 Ok: queued as") for r in replies)
    assert len(upstream.messages) == 4  # every message left while the database was down
    assert _count(engine, Message) == 4
    assert _count(engine, Recipient) == 4
    with Session(engine) as session:
        keys = session.exec(select(OutboxItem.idempotency_key)).all()
    assert len(keys) == len(set(keys)) == 4  # one message.sent per message


def test_a_restarted_relay_replays_the_journal_exactly_once(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
    outage: Outage,
    tmp_path: Path,
) -> None:
    settings = relay_settings(make_settings, upstream, database_url=outage.app_url)
    relay_engine = db.make_engine(outage.app_url)

    async def send_while_down() -> None:
        async with running_relay(settings, relay_engine) as relay:
            outage.down()
            for i in range(5):
                await send(relay, SIMPLE + b"n %d\r\n" % i)

    async def start_and_wait(count: int) -> None:
        async with running_relay(settings, relay_engine):
            await asyncio.to_thread(wait_for, lambda: _count(engine, Message) == count, 30)
            await asyncio.to_thread(wait_for, lambda: not _journal(settings.var_dir), 10)

    try:
        asyncio.run(send_while_down())  # stopped with the database still down
        assert _journaled(settings.var_dir) == 5
        saved = tmp_path / "saved"
        shutil.copytree(settings.var_dir / "journal", saved)
        outage.up()
        assert _count(engine, Message) == 0
        asyncio.run(start_and_wait(5))
        # A crash between the commit and deleting the file: the same records come back.
        shutil.copytree(saved, settings.var_dir / "journal", dirs_exist_ok=True)
        assert _journaled(settings.var_dir) == 5
        asyncio.run(start_and_wait(5))
    finally:
        relay_engine.dispose()
    assert len(upstream.messages) == 5
    assert _count(engine, Recipient) == 5
