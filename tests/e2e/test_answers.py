"""Replies, an out-of-office and a bounce, the whole way: ``trackrelay serve`` in a real
process, a message sent through it to three recipients (the recording upstream
behind it), then three copies of incoming mail sent to its intake listener —
a real-format bounce from the corpus for the first recipient (its original
Message-ID and recipient rewritten to the message the relay sent), an Outlook
out-of-office from the second, a Thunderbird reply from the third — and what
the events API, the message resource, the webhooks and the dashboard (signed in
over HTTP: the list's reply arrow and bounced badge, its filters, the message
page's timeline) say, with the API's filters agreeing, on SQLite and PostgreSQL.
(The database away during intake: tests/relay/test_intake.py.)
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import httpx
import pytest
from sqlalchemy import select

from shared import apitokens, db, webhooks
from shared.models import Message
from shared.users import add_user
from tests.e2e.test_serve import ServeProcess, free_port, wait_for
from tests.support.paths import DATA
from tests.support.upstream import PASSWORD, USER, RecordingUpstream
from tests.support.webhook_server import WebhookServer, webhook_server

ANSWERS = DATA / "answers"
THREE = ["ann@customer.example", "ben@customer.example", "cid@customer.example"]
# No Message-ID: the relay adds the one the answers name.
SENT = (
    b"From: Alice <alice@sender.example>\r\nTo: ann@customer.example, ben@customer.example,"
    b" cid@customer.example\r\nSubject: Proposal for March\r\n\r\nHere it is.\r\n"
)


def answer(name: str, message_id: str, original: str, old: str, new: str) -> bytes:
    data = (ANSWERS / name).read_bytes()
    return data.replace(original.encode(), message_id.encode()).replace(old.encode(), new.encode())


@pytest.fixture
def hooks() -> Iterator[WebhookServer]:
    with webhook_server() as server:
        yield server


@pytest.fixture
def serve(tmp_path: Path, database_url: str, upstream: RecordingUpstream) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path, database_url)
    process.intake_port = free_port()  # type: ignore[attr-defined]
    process.env.update(
        TRACKRELAY_UPSTREAM=upstream.url,
        TRACKRELAY_UPSTREAM_VERIFY_TLS="false",
        TRACKRELAY_TLS_CERT=str(upstream.cert),
        TRACKRELAY_TLS_KEY=str(upstream.key),
        TRACKRELAY_INTAKE_PORT=str(process.intake_port),  # type: ignore[attr-defined]
        TRACKRELAY_INTAKE_NETWORKS="127.0.0.1/32",
        TRACKRELAY_WEBHOOK_POLL_INTERVAL="0.1",
        TRACKRELAY_WEBHOOK_ALLOW_PRIVATE="true",  # the webhook server is on loopback
    )
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop(signal.SIGKILL)


async def _send(port: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, validate_certs=False)
    async with smtp:
        await smtp.ehlo()
        await smtp.auth_plain(USER, PASSWORD)
        await smtp.sendmail(USER, THREE, SENT)


async def _copy(intake: int, sender: str, data: bytes) -> str:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=intake, start_tls=True, validate_certs=False)
    async with smtp:
        _, reply = await smtp.sendmail(sender, ["copies@sender.example"], data)
        return reply


def test_a_bounce_an_out_of_office_and_a_reply_from_the_intake_listener(
    serve: ServeProcess, database_url: str, upstream: RecordingUpstream, hooks: WebhookServer
) -> None:
    engine = db.make_engine(database_url)
    add_user(engine, "root", "root-password-123", role="admin")
    token, _ = apitokens.create_token(engine, "root", "e2e")
    webhooks.add_endpoint(engine, hooks.url)
    serve.start()

    asyncio.run(_send(serve.smtp_port))
    with engine.connect() as conn:
        [(message_id, header)] = conn.execute(select(Message.id, Message.message_id_header)).all()  # type: ignore[call-overload]
    assert re.fullmatch(r"<trackrelay\.[0-9a-f]{16}@sender\.example>", header)
    assert all(m.data.startswith(f"Message-ID: {header}\r\n".encode()) for m in upstream.messages)
    copies = [
        (
            "",
            answer(
                "corpus/mikel-mail/multipart_report_emails__report_530.eml",
                header,
                "<200712232303.lBNN3jDq002941@mail12.rrrr.com.au>",
                "edwin@zzzzzzz.com",
                THREE[0],
            ),
        ),
        (
            THREE[1],
            answer("outlook_ooo.eml", header, "<proposal-march@sender.example>",
                   "Heidi.Klum@customer.example", THREE[1]),
        ),
        (
            THREE[2],
            answer("thunderbird_reply.eml", header, "<proposal-march@sender.example>",
                   "grace@customer.example", THREE[2]),
        ),
    ]  # fmt: skip
    replies = asyncio.run(_replies(serve.intake_port, copies))  # type: ignore[attr-defined]
    assert all(r.startswith("2.0.0 OK") for r in replies)
    sent_upstream = len(upstream.messages)

    api = httpx.Client(
        base_url=serve.public_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    with api:
        feed = wait_for(lambda: _events(api, 3), 20)
        assert feed, serve.stderr
        assert [(e["kind"], e["recipient_position"]) for e in feed] == [  # type: ignore[union-attr]
            ("bounce", 1),
            ("auto_reply", 2),
            ("reply", 3),
        ]
        bounce = feed[0]  # type: ignore[index]
        assert (bounce["bounce_type"], bounce["status"]) == ("hard", "5.3.0")
        assert "Unknown E-Mail Address" in bounce["diagnostic"]
        detail = api.get(f"/api/v1/messages/{message_id}").json()
        by_address = {r["address"]: r for r in detail["recipients"]}
        assert by_address[THREE[0]]["bounced_at"] is not None
        assert by_address[THREE[0]]["bounce_type"] == "hard"
        assert by_address[THREE[1]]["auto_replied_at"] is not None
        assert by_address[THREE[1]]["replied_at"] is None  # an out-of-office is no reply
        assert by_address[THREE[2]]["replied_at"] is not None
        metrics = api.get("/metrics").text
        assert "trackrelay_intake_copies_total 3" in metrics
        _the_api_filters_find_it(api, message_id)
    _the_dashboard_shows_it(serve.public_url, message_id)

    wanted = {"message.bounced", "message.auto_replied", "message.replied"}
    assert wait_for(lambda: wanted <= _hook_types(hooks), 20), _hook_types(hooks)
    for request in hooks.requests:
        body = json.loads(request.body)
        if body["type"] == "message.replied":
            assert body["data"]["recipient"]["address"] == THREE[2]
            assert body["data"]["message"]["message_id_header"] == header
    assert len(upstream.messages) == sent_upstream  # the intake delivered nothing
    assert serve.stop() == 0
    engine.dispose()


def _the_api_filters_find_it(api: httpx.Client, message_id: int) -> None:
    def found(**params: str) -> bool:
        reply = api.get("/api/v1/messages", params=params)
        assert reply.status_code == 200, reply.text
        return str(message_id) in {m["id"] for m in reply.json()["messages"]}

    assert found(replied="true")
    assert found(bounced="true")
    assert not found(replied="false")
    assert not found(bounced="false")
    [listed] = api.get("/api/v1/messages", params={"replied": "true"}).json()["messages"]
    assert (listed["replies"], listed["auto_replies"], listed["bounces"]) == (1, 1, 1)
    assert listed["bounce_type"] == "hard"


def _the_dashboard_shows_it(url: str, message_id: int) -> None:
    with httpx.Client(base_url=url, timeout=10) as tab:
        login = tab.get("/dashboard/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login)
        assert csrf
        data = {"username": "root", "password": "root-password-123", "csrf_token": csrf[1]}
        assert tab.post("/dashboard/login", data=data).status_code == 303

        def row(**params: str) -> str | None:
            html = tab.get("/dashboard/messages", params=params).text
            start = html.find(f'data-message-id="{message_id}"')
            return None if start < 0 else html[start : html.index("</tr>", start)]

        listed = row()
        assert listed is not None
        assert "hit-reply is-hit" in listed  # the arrow is dark: cid replied
        assert 'aria-label="Replied"' in listed  # one reply: ben's out-of-office is none
        assert "Bounced · hard" in listed
        assert 'title="1 of 3 recipients bounced (hard)"' in listed
        assert row(state="replied") is not None
        assert row(state="bounced") is not None
        assert row(state="not_replied") is None
        page = tab.get(f"/dashboard/messages/{message_id}").text
        for said in ("Replied", "Automatic reply", "Bounced (hard)", "5.3.0"):
            assert said in page, said


async def _replies(intake: int, copies: list[tuple[str, bytes]]) -> list[str]:
    return [await _copy(intake, sender, data) for sender, data in copies]


def _events(api: httpx.Client, count: int) -> list[dict[str, object]] | None:
    events = api.get("/api/v1/events").json()["events"]
    answers = [e for e in events if e["kind"] != "open" and e["kind"] != "click"]
    return answers if len(answers) >= count else None


def _hook_types(hooks: WebhookServer) -> set[str]:
    with hooks.lock:
        return {json.loads(r.body)["type"] for r in hooks.requests}
