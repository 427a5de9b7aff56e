"""The intake listener (relay/intake.py) over real SMTP on loopback: copies of
incoming mail in, events out, nothing delivered; the database away -> journaled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select

from relay.server import RelayServer
from shared import db
from shared.config import Settings
from shared.models import Event, Message
from tests.support.paths import DATA
from tests.support.receiverkit import Outage, wait_for
from tests.support.relaykit import RawClient, relay_settings, running_relay, send
from tests.support.upstream import RecordingUpstream

ANSWERS = DATA / "answers"
THREE = ("ann@customer.example", "ben@customer.example", "cid@customer.example")
NO_ID = b"From: Alice <alice@sender.example>\r\nTo: ann@customer.example\r\n\r\nHi\r\n"


def as_answer(name: str, message_id: str, to: str, original: str, fixture_to: str) -> bytes:
    """A fixture re-pointed at a message the relay really sent and one of its recipients."""
    data = (ANSWERS / name).read_bytes()
    return data.replace(original.encode(), message_id.encode()).replace(
        fixture_to.encode(), to.encode()
    )


def intake(relay: RelayServer) -> aiosmtplib.SMTP:
    port = relay.ports["intake"]
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, validate_certs=False)


async def copy_to(relay: RelayServer, data: bytes, sender: str = "") -> str:
    async with intake(relay) as smtp:
        _, reply = await smtp.sendmail(sender, ["intake@trackrelay.example"], data)
        return reply


def _settings(
    make: Callable[..., Settings], upstream: RecordingUpstream, **more: object
) -> Settings:
    values: dict[str, object] = {"intake_port": 0, "intake_networks": "127.0.0.1/32", **more}
    return relay_settings(make, upstream, **values)


def _events(engine: Engine) -> list[tuple[int, str, str]]:
    with Session(engine) as session:
        rows = session.exec(
            select(Event.recipient_position, Event.kind, Event.bounce_type).order_by(Event.id)  # type: ignore[arg-type]
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _header(engine: Engine) -> str:
    with Session(engine) as session:
        return session.exec(select(Message.message_id_header)).one()


def test_a_bounce_an_out_of_office_and_a_reply_become_events_of_their_recipients(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    settings = _settings(make_settings, upstream)

    async def scenario() -> list[str]:
        async with running_relay(settings, engine) as relay:
            await send(relay, NO_ID, recipients=THREE)
            mid = _header(engine)
            sent = len(upstream.messages)
            bounce = as_answer(
                "corpus/mikel-mail/multipart_report_emails__report_530.eml",
                mid,
                THREE[0],
                "<200712232303.lBNN3jDq002941@mail12.rrrr.com.au>",
                "edwin@zzzzzzz.com",
            )
            ooo = as_answer(
                "outlook_ooo.eml", mid, THREE[1], "<proposal-march@sender.example>",
                "Heidi.Klum@customer.example",
            )  # fmt: skip
            reply = as_answer(
                "thunderbird_reply.eml", mid, THREE[2], "<proposal-march@sender.example>",
                "grace@customer.example",
            )  # fmt: skip
            replies = [await copy_to(relay, bounce), await copy_to(relay, ooo, THREE[1])]
            replies.append(await copy_to(relay, reply, THREE[2]))
            replies.append(await copy_to(relay, reply, THREE[2]))  # a second copy: nothing new
            stranger = (ANSWERS / "gmail_reply.eml").read_bytes()
            replies.append(await copy_to(relay, stranger, "ivan.petrov@gmail.com"))
            assert len(upstream.messages) == sent  # the intake never delivers
            assert relay.intake is not None
            assert relay.intake.unmatched == 1
            return replies

    replies = asyncio.run(scenario())
    assert all(r.startswith("2.0.0 OK") for r in replies)
    assert _events(engine) == [(1, "bounce", "hard"), (2, "auto_reply", ""), (3, "reply", "")]
    with Session(engine) as session:
        message = session.exec(select(Message)).one()
        assert (message.replies, message.auto_replies, message.bounces) == (1, 1, 1)


def test_the_relay_adds_the_message_id_that_the_reply_names(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    settings = _settings(make_settings, upstream)

    async def scenario() -> None:
        async with running_relay(settings, engine) as relay:
            await send(relay, NO_ID, recipients=THREE[:1])
            mid = _header(engine)
            assert mid.startswith("<trackrelay.")
            assert upstream.messages[0].data.startswith(f"Message-ID: {mid}\r\n".encode())

    asyncio.run(scenario())


def test_only_the_intake_networks_may_connect(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = _settings(make_settings, upstream, intake_networks="192.0.2.0/24")

    async def scenario() -> tuple[int, str]:
        async with running_relay(settings, db_engine) as relay:
            smtp = intake(relay)
            with pytest.raises(aiosmtplib.SMTPConnectError) as refused:
                await smtp.connect()
            return refused.value.code, refused.value.message

    code, message = asyncio.run(scenario())
    assert code == 554
    assert "5.7.1" in message


def test_starttls_is_offered_and_no_auth(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = _settings(make_settings, upstream)

    async def scenario() -> tuple[bool, bool]:
        async with running_relay(settings, db_engine) as relay:
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.ports["intake"], start_tls=False
            )
            async with smtp:
                await smtp.ehlo()
                return smtp.supports_extension("starttls"), smtp.supports_extension("auth")

    assert asyncio.run(scenario()) == (True, False)


def _journal(var: Path) -> list[Path]:
    return sorted((var / "journal").glob("intake-*.jsonl"))


def test_the_database_away_during_intake_journals_and_stores_once_after(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
    outage: Outage,
) -> None:
    settings = _settings(make_settings, upstream, database_url=outage.app_url)
    relay_engine = db.make_engine(outage.app_url)

    def count() -> int:
        with Session(engine) as session:
            return int(session.exec(select(func.count()).select_from(Event)).one())

    async def scenario() -> str:
        async with running_relay(settings, relay_engine) as relay:
            await send(relay, NO_ID, recipients=THREE)
            mid = _header(engine)
            reply = as_answer(
                "gmail_reply.eml", mid, THREE[0], "<proposal-march@sender.example>",
                "ivan.petrov@gmail.com",
            )  # fmt: skip
            outage.down()
            answer = await copy_to(relay, reply, THREE[0])
            assert count() == 0
            assert _journal(settings.var_dir)
            outage.up()
            await asyncio.to_thread(wait_for, lambda: count() == 1, 30)
            await asyncio.to_thread(wait_for, lambda: not _journal(settings.var_dir), 10)
            await copy_to(relay, reply, THREE[0])  # the same copy again: nothing new
            return answer

    try:
        answer = asyncio.run(scenario())
    finally:
        relay_engine.dispose()
    assert answer.startswith("2.0.0 OK")
    assert _events(engine) == [(1, "reply", "")]


def test_the_intake_is_one_of_the_relays_listeners_its_limits_ident_and_size(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """Opened like every listener (relay/server.py ``_listen``): the relay's session
    limits count its sessions with the others; its own ident, SIZE and 552 past it."""
    settings = _settings(make_settings, upstream, max_sessions=2, intake_max_size=1000)

    async def scenario() -> dict[str, object]:
        async with running_relay(settings, db_engine) as relay:
            port = relay.ports["intake"]
            async with await RawClient.connect(relay.ports["smtp"]) as held:
                async with await RawClient.connect(port) as copy:
                    ehlo = await copy.command(b"EHLO mta.test")
                    over = await RawClient.connect(port)  # the third session of the relay
                    await over.close()
                    big = await copy.command(b"MAIL FROM:<> SIZE=2000")
                return {
                    "held": held.greeting[:3],
                    "greeting": copy.greeting,
                    "ehlo": ehlo,
                    "over": over.greeting,
                    "big": big[:3],
                }

    got = asyncio.run(scenario())
    assert got["held"] == "220"
    assert "trackrelay intake" in str(got["greeting"])
    assert "250-SIZE 1000" in str(got["ehlo"])
    assert got["over"] == "421 4.7.0 Too many connections, try again later\r\n"
    assert got["big"] == "552"
