"""End to end through the relay: client -> relay -> recording upstream, over loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from relay.prepared import Copy, Prepared, Submission
from relay.track import Tracker
from shared.config import Settings
from shared.models import Message
from shared.users import add_user
from tests.support.injection_checks import without_added_id
from tests.support.relaykit import (
    MESSAGE,
    SIMPLE,
    MakeSettings,
    RawClient,
    client,
    relay_one,
    relay_settings,
    running_relay,
    send,
    signed_in,
    trusted_settings,
)
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


@pytest.mark.parametrize(("listener", "mechanism"), [("smtp", "PLAIN"), ("smtps", "LOGIN")])
def test_passthrough_delivers_byte_identical(
    listener: str,
    mechanism: str,
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
) -> None:
    # Without its X-Track line: a message that asks for nothing goes out byte-identical.
    tracked = MESSAGE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert tracked.startswith(b"X-Track: open, click\r\n")
    message = tracked.removeprefix(b"X-Track: open, click\r\n")

    settings = relay_settings(make_settings, upstream)
    reply = relay_one(settings, db_engine, message, listener=listener, mechanism=mechanism)
    assert reply.startswith("2.0.0 Ok: queued as 1")
    [got] = upstream.messages
    assert got.data == message
    assert (got.mail_from, got.rcpt_tos) == (USER, ["bob@example.net"])
    assert upstream.auth_attempts == [(mechanism, USER)]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_wrong_password_is_one_upstream_attempt_and_its_verdict(
    mechanism: str, make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> aiosmtplib.SMTPAuthenticationError:
        async with (
            running_relay(relay_settings(make_settings, upstream), db_engine) as relay,
            client(relay) as smtp,
        ):
            await smtp.ehlo()
            auth = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
                await auth(USER, "wrong password")
            return caught.value

    error = asyncio.run(scenario())
    assert (error.code, error.message) == (535, "5.7.8 Authentication credentials invalid")
    assert upstream.auth_attempts == [(mechanism, USER)]


def test_auth_failures_are_rate_limited(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(make_settings, upstream, auth_failures_per_user=2)

    async def scenario() -> list[int]:
        codes = []
        async with running_relay(settings, db_engine) as relay:
            for _ in range(3):
                async with client(relay) as smtp:
                    await smtp.ehlo()
                    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
                        await smtp.auth_plain(USER, "guess")
                    codes.append(caught.value.code)
        return codes

    assert asyncio.run(scenario()) == [535, 535, 454]
    assert len(upstream.auth_attempts) == 2  # the third guess never reached the upstream


def test_no_auth_before_starttls(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> tuple[str, str]:
        async with running_relay(relay_settings(make_settings, upstream), db_engine) as relay:
            raw = await RawClient.connect(relay.ports["smtp"])
            ehlo = await raw.command(b"EHLO client.test")
            auth = await raw.command(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHg=")
            await raw.close()
            return ehlo, auth

    ehlo, auth = asyncio.run(scenario())
    assert "STARTTLS" in ehlo
    assert "AUTH" not in ehlo
    assert auth.startswith("538 ")
    assert upstream.auth_attempts == []


def test_never_an_open_relay(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> int:
        async with (
            running_relay(relay_settings(make_settings, upstream), db_engine) as relay,
            client(relay) as smtp,
        ):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await smtp.sendmail("spam@example.org", ["victim@example.net"], SIMPLE)
            return caught.value.code

    assert asyncio.run(scenario()) == 530
    assert upstream.messages == []
    assert upstream.connections == 1


def test_refused_recipient_reaches_the_client_verbatim(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    upstream.refuse["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: Recipient unknown"

    async def scenario() -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        async with signed_in(relay_settings(make_settings, upstream), db_engine) as smtp:
            return await smtp.sendmail(USER, ["bob@example.net", "nobody@example.net"], SIMPLE)

    errors, _ = asyncio.run(scenario())
    assert errors["nobody@example.net"].code == 550
    assert errors["nobody@example.net"].message == "5.1.1 <nobody@example.net>: Recipient unknown"
    [got] = upstream.messages
    assert got.rcpt_tos == ["bob@example.net"]


def test_multiline_refusal_on_data_is_rebuilt(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    upstream.data_reply = (
        "554-5.7.1 Message rejected by policy\r\n554 5.7.1 See https://example.net/why"
    )

    async def scenario() -> str:
        async with running_relay(relay_settings(make_settings, upstream), db_engine) as relay:
            raw = await RawClient.connect(relay.ports["smtps"], ssl=_insecure())
            await raw.command(b"EHLO client.test")
            await raw.command(b"AUTH PLAIN " + _plain(USER, PASSWORD))
            await raw.command(b"MAIL FROM:<alice@example.com>")
            await raw.command(b"RCPT TO:<bob@example.net>")
            await raw.command(b"DATA")
            reply = await raw.command(SIMPLE + b".")
            await raw.close()
            return reply

    assert asyncio.run(scenario()) == (
        "554-5.7.1 Message rejected by policy\r\n554 5.7.1 See https://example.net/why\r\n"
    )


def test_upstream_gone_before_data_gives_451_and_nothing_is_lost(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> aiosmtplib.SMTPDataError:
        async with signed_in(relay_settings(make_settings, upstream), db_engine) as smtp:
            await smtp.mail(USER)
            await smtp.rcpt("bob@example.net")
            await asyncio.to_thread(upstream.stop)
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await smtp.data(SIMPLE)
            return caught.value

    error = asyncio.run(scenario())
    assert (error.code, error.message) == (
        451,
        "4.4.1 Upstream server unavailable, try again later",
    )
    assert upstream.messages == []


def test_upstream_unreachable_local_mode(
    make_settings: MakeSettings, tls_pair: tuple[Path, Path], db_engine: Engine
) -> None:
    dead = RecordingUpstream(*tls_pair).start()
    dead.stop()  # its port is now closed
    settings = relay_settings(
        make_settings, dead, auth_mode="local", upstream_user=USER, upstream_password=PASSWORD
    )
    add_user(db_engine, "carol", "carol-password", addresses=["carol@example.com"])

    async def scenario() -> int:
        async with signed_in(settings, db_engine, user="carol", password="carol-password") as smtp:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await smtp.sendmail("carol@example.com", ["bob@example.net"], SIMPLE)
            return caught.value.code

    assert asyncio.run(scenario()) == 451


def test_local_mode_checks_the_sender_and_logs_in_with_the_relay_account(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(
        make_settings, upstream, auth_mode="local", upstream_user=USER, upstream_password=PASSWORD
    )
    add_user(db_engine, "carol", "carol-password", addresses=["carol@example.com"])

    async def scenario() -> tuple[int, str]:
        async with running_relay(settings, db_engine) as relay, client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_login("carol", "carol-password")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await smtp.mail("ceo@example.com")
            _, reply = await smtp.sendmail("carol@example.com", ["bob@example.net"], SIMPLE)
            return caught.value.code, reply

    code, reply = asyncio.run(scenario())
    assert code == 553
    assert reply.startswith("2.0.0")
    assert [m.mail_from for m in upstream.messages] == ["carol@example.com"]
    assert upstream.auth_attempts == [("PLAIN", USER)]


@pytest.mark.parametrize("check", [False, True])
def test_local_mode_may_require_the_from_header_to_be_the_users_too(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine, check: bool
) -> None:
    """TRACKRELAY_LOCAL_CHECK_FROM_HEADER: a user of the shared account cannot put
    another user's address in From: (off by default: only MAIL FROM is checked)."""
    settings = relay_settings(
        make_settings,
        upstream,
        auth_mode="local",
        upstream_user=USER,
        upstream_password=PASSWORD,
        local_check_from_header=check,
    )
    add_user(db_engine, "carol", "carol-password", addresses=["carol@example.com"])
    forged = SIMPLE.replace(b"Alice <alice@example.com>", b"CEO <ceo@example.com>")
    folded = SIMPLE.replace(
        b"Alice <alice@example.com>", b"=?utf-8?q?Carol?=\r\n\t<Carol@Example.com>"
    )

    async def scenario() -> list[tuple[int, str]]:
        replies = []
        async with running_relay(settings, db_engine) as relay, client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_login("carol", "carol-password")
            for message in (forged, folded):
                try:
                    _, text = await smtp.sendmail("carol@example.com", ["bob@example.net"], message)
                    replies.append((250, text))
                except aiosmtplib.SMTPDataError as exc:
                    replies.append((exc.code, exc.message))
            await smtp.noop()  # the session goes on
        return replies

    forged_reply, folded_reply = asyncio.run(scenario())
    assert folded_reply[0] == 250
    if check:
        assert forged_reply == (
            553,
            "5.7.1 From: <ceo@example.com> is not an address user carol may send as",
        )
        assert len(upstream.messages) == 1
    else:
        assert forged_reply[0] == 250
        assert len(upstream.messages) == 2


def test_slow_upload_is_not_cut_by_the_idle_timeout(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = trusted_settings(make_settings, upstream, idle_timeout=0.4)
    lines = [b"Subject: slow\r\n", b"\r\n"] + [b"line %d\r\n" % i for i in range(8)]

    async def scenario() -> str:
        async with running_relay(settings, db_engine) as relay:
            raw = await RawClient.connect(relay.ports["plain"])
            await raw.command(b"EHLO app.test")
            await raw.command(b"MAIL FROM:<app@example.com>")
            await raw.command(b"RCPT TO:<bob@example.net>")
            await raw.command(b"DATA")
            for line in lines:  # each pause is shorter than the timeout, the total longer
                raw.writer.write(line)
                await asyncio.sleep(0.15)
            reply = await raw.command(b".")
            await raw.close()
            return reply

    assert asyncio.run(scenario()).startswith("250 ")
    sent = b"".join(lines)
    assert without_added_id(sent, upstream.messages[0].data) == sent


def test_slow_upstream_after_the_final_dot_delivers_once(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    upstream.data_delay = 1.0
    settings = relay_settings(make_settings, upstream, idle_timeout=0.3)

    async def scenario() -> str:
        async with running_relay(settings, db_engine) as relay:
            reply = await send(relay)
            await asyncio.sleep(0.5)
            return reply.message

    assert asyncio.run(scenario()).startswith("2.0.0")
    assert len(upstream.messages) == 1


def test_recipient_limit(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> tuple[int, str]:
        async with signed_in(relay_settings(make_settings, upstream), db_engine) as smtp:
            await smtp.mail(USER)
            for i in range(100):
                await smtp.rcpt(f"r{i}@example.net")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as caught:
                await smtp.rcpt("r100@example.net")
            await smtp.data(SIMPLE)
            return caught.value.code, caught.value.message

    assert asyncio.run(scenario()) == (452, "4.5.3 Too many recipients")
    assert len(upstream.messages[0].rcpt_tos) == 100


def test_null_sender_and_client_size_parameter(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> None:
        async with signed_in(relay_settings(make_settings, upstream), db_engine) as smtp:
            await smtp.sendmail(
                "", ["bob@example.net"], SIMPLE, mail_options=["SIZE=123", "BODY=8BITMIME"]
            )

    asyncio.run(scenario())
    [got] = upstream.messages
    assert got.mail_from == "<>"
    assert got.mail_options == ["BODY=8BITMIME"]


@pytest.mark.parametrize("upstream_utf8", [True, False])
def test_smtputf8_only_when_the_upstream_has_it(
    upstream_utf8: bool, make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    upstream.smtputf8 = upstream_utf8
    message = "From: Jörg <jörg@exämple.com>\r\nSubject: grüße\r\n\r\nhi\r\n".encode()

    async def scenario() -> tuple[bool, int]:
        async with (
            running_relay(relay_settings(make_settings, upstream), db_engine) as relay,
            client(relay) as smtp,
        ):
            await smtp.ehlo()
            advertised = smtp.supports_extension("smtputf8")
            await smtp.auth_plain(USER, PASSWORD)
            if not advertised:  # aiosmtplib would not even try: send it raw
                sender = "FROM:<jörg@exämple.com>".encode()
                reply = await smtp.execute_command(b"MAIL", sender, b"SMTPUTF8")
                return advertised, reply.code
            options = ["SMTPUTF8"]
            await smtp.sendmail(
                "jörg@exämple.com", ["bob@example.net"], message, mail_options=options
            )
            return advertised, 250

    assert asyncio.run(scenario()) == ((True, 250) if upstream_utf8 else (False, 555))
    if upstream_utf8:
        assert upstream.messages[0].mail_from == "jörg@exämple.com"


def test_long_line_gets_500(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> aiosmtplib.SMTPDataError:
        async with signed_in(relay_settings(make_settings, upstream), db_engine) as smtp:
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await smtp.sendmail(
                    USER, ["bob@example.net"], b"Subject: x\r\n\r\n" + b"a" * 1000 + b"\r\n"
                )
            await smtp.sendmail(
                USER, ["bob@example.net"], b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n"
            )
            return caught.value

    assert asyncio.run(scenario()).code == 500
    assert len(upstream.messages) == 1  # the session went on; the refused one never left


def test_message_of_25_mb_and_the_size_limit(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    line = b"0123456789" * 7 + b"abcdef\r\n"
    big = b"Subject: big\r\n\r\n" + line * (25 * 1024 * 1024 // len(line))
    settings = relay_settings(make_settings, upstream, max_message_size=26 * 1024 * 1024)

    async def scenario() -> tuple[int, int, int, int]:
        async with running_relay(settings, db_engine) as relay:
            reply = await send(relay, big)
            async with client(relay) as smtp:
                await smtp.ehlo()
                size = int(smtp.esmtp_extensions["size"])
                await smtp.auth_plain(USER, PASSWORD)
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as declared:
                    await smtp.sendmail(USER, ["bob@example.net"], big + big)  # adds SIZE=
                await smtp.mail(USER)  # no SIZE declared: refused while streaming
                await smtp.rcpt("bob@example.net")
                with pytest.raises(aiosmtplib.SMTPDataError) as streamed:
                    await smtp.data(big + big)
            return size, reply.code, declared.value.code, streamed.value.code

    assert asyncio.run(scenario()) == (26 * 1024 * 1024, 250, 552, 552)
    assert len(upstream.messages) == 1
    assert without_added_id(big, upstream.messages[0].data) == big


def test_smuggling_payload_is_one_message(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    payload = (
        b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<ceo@example.com>\r\n"
        b"RCPT TO:<victim@example.net>\r\nDATA\r\nSubject: forged\r\n\r\nforged\r\n\r.\r\n"
    )

    async def scenario() -> str:
        async with running_relay(trusted_settings(make_settings, upstream), db_engine) as relay:
            raw = await RawClient.connect(relay.ports["plain"])
            await raw.command(b"EHLO app.test")
            await raw.command(b"MAIL FROM:<app@example.com>")
            await raw.command(b"RCPT TO:<bob@example.net>")
            await raw.command(b"DATA")
            reply = await raw.command(payload + b".")
            await raw.close()
            return reply

    assert asyncio.run(scenario()).startswith("250 ")
    [got] = upstream.messages
    assert got.rcpt_tos == ["bob@example.net"]
    assert b"forged" in got.data


class PerRecipient(Tracker):
    """A tracker that asks for one copy per recipient (per-recipient attribution)."""

    async def prepare(self, submission: Submission) -> Prepared:
        prepared = await super().prepare(submission)
        copies = [
            Copy([rcpt], [submission.data.replace(b"Hello", b"Hello " + rcpt.encode())])
            for rcpt in submission.recipients
        ]
        return Prepared(copies, prepared.message, [], set(submission.recipients))


def test_per_recipient_copies_and_mixed_outcomes(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(make_settings, upstream)
    recipients = ["a@example.net", "b@example.net", "c@example.net"]

    async def scenario() -> str:
        async with signed_in(
            settings, db_engine, tracker=PerRecipient(settings, db_engine)
        ) as smtp:
            await smtp.mail(USER)
            for rcpt in recipients:
                await smtp.rcpt(rcpt)
            # b is refused only in its own transaction (after the live RCPT check)
            upstream.refuse["b@example.net"] = "550 5.2.1 Mailbox disabled"
            reply = await smtp.data(SIMPLE)
            return reply.message

    assert asyncio.run(scenario()).startswith("2.0.0")
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.net"], ["c@example.net"]]
    assert [m.data.split(b"\r\n")[-4] for m in upstream.messages] == [
        b"Hello a@example.net Bob.",
        b"Hello c@example.net Bob.",
    ]


class BrokenTracker(Tracker):
    """The real Tracker with a rewriting bug: the steps of every message raise."""

    def prepare_sync(self, sub: Submission, snapshot: object) -> Prepared:
        raise RuntimeError("rewriting bug")


def test_an_injection_failure_forwards_the_original_minus_the_trigger_headers(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """Fail open (DESIGN.md section 5), through the relay: the upstream receives the
    client's bytes with only the trigger header lines deleted, the client gets the
    upstream's 250, and the failure is counted and recorded."""
    settings = relay_settings(make_settings, upstream)
    tracker = BrokenTracker(settings, db_engine)
    triggers = b"X-Track: open, click\r\nX-PM-TrackLinks: HtmlOnly\r\nX-Mailgun-Track: yes\r\n"
    data = SIMPLE.replace(b"Subject: hello\r\n", b"Subject: hello\r\n" + triggers)
    assert data != SIMPLE

    assert relay_one(settings, db_engine, data, tracker=tracker).startswith("2.0.0 Ok")
    [got] = upstream.messages
    assert got.data == SIMPLE
    counted = tracker.metrics
    assert (counted.prepared, counted.failures, counted.tracked) == (1, 1, 0)
    with Session(db_engine) as session:
        [message] = session.exec(select(Message)).all()
    assert json.loads(message.decision) == {"tracked": False, "reasons": ["injection failed"]}
    assert (message.status, message.subject, message.size_out) == ("sent", "hello", len(SIMPLE))


class SlowTracker(Tracker):
    """The real Tracker, held at the start of every prepare until released."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def prepare(self, submission: Submission) -> Prepared:
        self.started.set()
        await self.release.wait()
        return await super().prepare(submission)


def test_a_client_gone_while_its_message_is_prepared_gets_nothing_sent(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client sends the final dot and leaves before the relay answers: the
    upstream connection is closed with the session, nothing is delivered (the
    client got no 250 and sends the message again), and it is one warning, not
    a crash of the handler."""
    settings = trusted_settings(make_settings, upstream)

    async def scenario() -> None:
        tracker = SlowTracker(settings, db_engine)
        async with running_relay(settings, db_engine, tracker=tracker) as relay:
            port = relay.ports["plain"]
            async with await RawClient.connect(port) as raw:
                await raw.command(b"EHLO client.example")
                assert (await raw.command(b"MAIL FROM:<" + USER.encode() + b">")).startswith("250")
                assert (await raw.command(b"RCPT TO:<bob@example.org>")).startswith("250")
                assert (await raw.command(b"DATA")).startswith("354")
                raw.writer.write(SIMPLE + b".\r\n")
                await raw.writer.drain()
                await tracker.started.wait()
            await asyncio.sleep(0.2)  # the relay sees the close
            tracker.release.set()
            await asyncio.sleep(0.3)

    with caplog.at_level("WARNING", logger="relay.handler"):
        asyncio.run(scenario())
    assert upstream.messages == []
    assert "the client left before it was sent" in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _plain(user: str, password: str) -> bytes:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode())


def test_size_follows_the_upstreams_with_room_for_tracking(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """The upstream announces SIZE 100000: the relay announces 5 % less (what tracking adds)."""
    upstream.size = 100_000
    settings = relay_settings(make_settings, upstream)
    body = b"Subject: sized\r\n\r\n" + b"x" * 76 + b"\r\n"

    async def scenario() -> tuple[int, int, int]:
        async with running_relay(settings, db_engine) as relay:
            async with client(relay) as smtp:
                await smtp.ehlo()
                size = int(smtp.esmtp_extensions["size"])
                await smtp.auth_plain(USER, PASSWORD)
                fits = body * (90_000 // len(body))
                await smtp.sendmail(USER, ["bob@example.net"], fits)
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await smtp.sendmail(USER, ["bob@example.net"], body * (97_000 // len(body)))
            return size, len(upstream.messages), refused.value.code

    assert asyncio.run(scenario()) == (95_000, 1, 552)


BIG_HEAD = (
    b"From: Ann <alice@example.com>\r\nTo: bob@example.net\r\nSubject: big and tracked\r\n"
    b"X-Track: opens, clicks\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b'<html><body><p>The file, and <a href="https://example.com/page">a page</a>.</p>'
    b"</body></html>"
)
BIG_ATTACHMENT = (
    b"\r\n--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n"
    b'Content-Disposition: attachment; filename="dots.txt"\r\n'
    b"Content-Transfer-Encoding: 7bit\r\n\r\n"
)
BIG_TAIL = b"--b1--\r\n"


def dotted_body(start: int, boundaries: list[int], size: int) -> tuple[bytes, list[str]]:
    """~``size`` bytes of lines, many starting with a dot, that begin at offset
    ``start`` of the message; at each offset in ``boundaries`` (where the DATA
    encoder cuts the message into blocks) in turn: a dot line starts there, the
    cut falls between the CR and the LF before a dot line, or a line of a lone
    dot starts there. Returns the body and what sits at each boundary."""
    filler = [b"", b".", b"..", b"x", b".start", b"a.b", b". ", b"...."]
    lines: list[bytes] = []
    pos, n, placed = start, 0, []
    for kind, cut in enumerate(boundaries):
        if not start + 300 <= cut < start + size - 1000:
            continue
        while cut - pos >= 300:
            line = filler[n % len(filler)] + b"y" * (n * 7919 % 230) + b"\r\n"
            lines.append(line)
            pos, n = pos + len(line), n + 1
        if kind % 3 == 1:  # the cut falls between CR and LF
            line = b"z" * (cut - pos - 1) + b"\r\n"
            placed.append("CR|LF.")
        else:
            line = b"z" * (cut - pos - 2) + b"\r\n"
            placed.append("CRLF|." if kind % 3 == 0 else "CRLF|.CRLF")
        lines.append(line)
        pos += len(line)
        line = b".\r\n" if kind % 3 == 2 else b".dot line after the cut\r\n"
        lines.append(line)
        pos += len(line)
    while pos - start < size:
        line = filler[n % len(filler)] + b"w" * (n * 104729 % 990) + b"\r\n"
        lines.append(line)
        pos, n = pos + len(line), n + 1
    return b"".join(lines), placed


def test_a_30_mb_tracked_message_arrives_byte_for_byte(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """The relay's large-message path (BytesIO reader, views of the received
    bytes, block-by-block DATA encoder with flow control) delivers exactly the
    rendering of the small message with the same HTML part, the 30 MB of dotted
    lines unchanged, dot-stuffed correctly wherever the encoder cuts them."""
    from relay.datawriter import DATA_CHUNK
    from shared.policies import snapshot_of

    # The tracked copy is [head, head, new HTML part, the rest as one view]: the
    # encoder's blocks of the big view start where the HTML body ends.
    cuts = [len(BIG_HEAD) + k * DATA_CHUNK for k in range(1, 40)]
    body, placed = dotted_body(len(BIG_HEAD) + len(BIG_ATTACHMENT), cuts, 30 * 1024 * 1024)
    assert {"CRLF|.", "CR|LF.", "CRLF|.CRLF"} <= set(placed)
    big = BIG_HEAD + BIG_ATTACHMENT + body + BIG_TAIL
    settings = relay_settings(make_settings, upstream, max_message_size=40 * 1024 * 1024)
    ids: list[int] = []

    class Capturing(Tracker):
        async def prepare(self, submission: Submission) -> Prepared:
            ids.append(submission.message_id)
            return await super().prepare(submission)

    tracker = Capturing(settings, db_engine)

    assert relay_one(settings, db_engine, big, tracker=tracker).startswith("2.0.0 Ok")
    [got] = upstream.messages
    # Expected: the small message with the same HTML part, as the tracker renders it
    # for this message id, with its one-line attachment body replaced by the big one.
    small = BIG_HEAD + BIG_ATTACHMENT + b"x\r\n" + BIG_TAIL
    sub = Submission(ids[0], USER, ["bob@example.net"], small, USER, "127.0.0.1")
    rendered = tracker.prepare_sync(sub, snapshot_of([])).copies[0].data
    assert b"X-Track" not in rendered
    assert b"/c/" in rendered
    assert b"/o/" in rendered
    before, after = rendered.split(BIG_ATTACHMENT + b"x\r\n")
    assert got.data == before + BIG_ATTACHMENT + body + after


def test_an_address_the_parser_chokes_on_is_a_syntax_error(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """``MAIL FROM:"`` crashes the stdlib address parser: a 553 5.1.3, the session goes on."""

    async def scenario() -> list[str]:
        async with running_relay(trusted_settings(make_settings, upstream), db_engine) as relay:
            raw = await RawClient.connect(relay.ports["plain"])
            await raw.command(b"EHLO app.test")
            replies = [
                await raw.command(b'MAIL FROM:"'),
                await raw.command(b"MAIL FROM:<app@example.com>"),
                await raw.command(b'RCPT TO:"'),
            ]
            await raw.close()
            return replies

    bad_from, good, bad_to = asyncio.run(scenario())
    assert bad_from.startswith("553 5.1.3 ")
    assert good.startswith("250 ")
    assert bad_to.startswith("553 5.1.3 ")


def test_recipients_past_the_limit_leave_the_accepted_ones_their_data(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """2,000 RCPTs: the first 100 accepted, the rest 452 (RFC 5321 4.5.3.1.10), and
    the 452s do not use up the command budget, so DATA delivers to the hundred."""
    settings = relay_settings(make_settings, upstream, max_commands_without_mail=100)
    recipients = [f"r{i}@example.net" for i in range(2000)]

    async def scenario() -> tuple[dict[str, tuple[int, str]], str]:
        async with signed_in(settings, db_engine) as smtp:
            refused, reply = await smtp.sendmail(USER, recipients, SIMPLE)
            return {k: (v.code, v.message) for k, v in refused.items()}, reply

    refused, reply = asyncio.run(scenario())
    assert reply.startswith("2.0.0")
    assert set(refused) == set(recipients[100:])
    assert set(refused.values()) == {(452, "4.5.3 Too many recipients")}
    assert [m.rcpt_tos for m in upstream.messages] == [recipients[:100]]


def test_a_nul_or_invalid_utf8_in_an_address_is_a_plain_refusal(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``MAIL FROM:<a\\x00@x>`` and a RCPT that is not UTF-8 under SMTPUTF8: a 5xx
    in words, no Python exception quoted to the client, no traceback in the log."""

    async def scenario() -> list[str]:
        async with running_relay(trusted_settings(make_settings, upstream), db_engine) as relay:
            raw = await RawClient.connect(relay.ports["plain"])
            await raw.command(b"EHLO app.test")
            replies = [
                await raw.command(b"MAIL FROM:<a\x00@x.example>"),
                await raw.command(b"MAIL FROM:<app@example.com> SMTPUTF8"),
                await raw.command(b"RCPT TO:<b\xff\xfe@example.net>"),
                await raw.command(b"RCPT TO:<b\x00@example.net>"),
                await raw.command(b"RSET"),
                await raw.command(b"MAIL FROM:<\xc3\x28@example.com> SMTPUTF8"),
            ]
            await raw.close()
            return replies

    with caplog.at_level(logging.DEBUG):
        bad_nul, mail, bad_utf8, bad_rcpt_nul, _, bad_mail_utf8 = asyncio.run(scenario())
    assert mail.startswith("250 ")
    for reply in (bad_nul, bad_utf8, bad_rcpt_nul, bad_mail_utf8):
        assert reply[:1] == "5", reply
        assert "Error" not in reply, reply
        assert "(" not in reply, reply
    assert bad_nul.startswith("553 5.1.3 ")
    assert bad_utf8.startswith("553 5.6.7 ")
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert upstream.messages == []


def test_the_final_reply_is_awaited_the_upstream_data_timeout(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """RFC 5321 4.5.3.2.6: the reply to the final dot may take 10 minutes. An upstream
    slower than TRACKRELAY_UPSTREAM_DATA_TIMEOUT gets a 451 (its reply may yet be a
    250: the one case a client's retry can deliver twice); one within it is waited
    for, though slower than the command timeout and the client's idle timeout."""
    upstream.data_delay = 1.0
    slow = relay_settings(
        make_settings, upstream, upstream_timeout=0.3, upstream_data_timeout=3, idle_timeout=0.3
    )
    hasty = relay_settings(make_settings, upstream, upstream_timeout=10, upstream_data_timeout=0.3)

    async def scenario(settings: Settings) -> tuple[int, str]:
        async with running_relay(settings, db_engine) as relay:
            try:
                return 250, (await send(relay)).message
            except aiosmtplib.SMTPDataError as exc:
                return exc.code, exc.message

    code, text = asyncio.run(scenario(slow))
    assert code == 250
    assert len(upstream.messages) == 1
    code, text = asyncio.run(scenario(hasty))
    assert (code, text) == (451, "4.4.1 Upstream server unavailable, try again later")


def test_a_background_task_that_fails_is_logged_by_its_owner(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """handler.spawn reads each task's outcome: an exception is logged once, by name."""
    settings = relay_settings(make_settings, upstream)

    async def broken_cleaning() -> None:
        raise LookupError("unknown encoding: unknown-8bit")

    async def go() -> None:
        async with running_relay(settings, db_engine) as relay:
            task = relay.handler.spawn(broken_cleaning())
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)  # the done callback
            assert relay.handler._tasks == set()

    with caplog.at_level(logging.ERROR, logger="relay.handler"):
        asyncio.run(go())
    assert "background task" in caplog.text
    assert "broken_cleaning" in caplog.text
    assert "unknown encoding: unknown-8bit" in caplog.text
