"""shared/smtpclient.py, the one SMTP client: TLS always, ONE AUTH attempt,
replies as values, a close that returns once the socket is closed.

The servers are real, on loopback: the recording upstream of tests/support/upstream.py
(STARTTLS, AUTH PLAIN/LOGIN for USER/PASSWORD, every attempt counted), a stock
aiosmtpd server without TLS, and small asyncio protocols where a server must
misbehave.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import httpx2
import pytest
from aiosmtpd.smtp import SMTP

from shared import smtpclient
from shared.config import Settings
from shared.smtpclient import Reply, SmtpClient, UpstreamUnavailable
from tests.support.oauth_server import CLIENT_ID, CLIENT_SECRET, DEVICE_GRANT, OAuthServer
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def test_a_multi_line_reply_is_rebuilt_for_the_client() -> None:
    reply = Reply(554, "5.7.1 first\n5.7.1 second\x00\u00e9")
    assert reply.line == "554-5.7.1 first\r\n554 5.7.1 second??"
    assert str(reply) == "554 5.7.1 first / 5.7.1 second\x00\u00e9"
    assert Reply(250, "").line == "250"
    assert Reply(250, "Ok").ok
    assert not reply.ok


def _client(make_settings: Callable[..., Settings], url: str) -> SmtpClient:
    settings = make_settings(upstream=url, upstream_verify_tls=False, upstream_timeout=5)
    return SmtpClient(settings, settings.upstream_target)


@pytest.mark.parametrize(
    ("asked", "password", "code", "attempts"),
    [
        ("PLAIN", PASSWORD, 235, [("PLAIN", USER)]),
        ("LOGIN", PASSWORD, 235, [("LOGIN", USER)]),
        ("PLAIN", "wrong", 535, [("PLAIN", USER)]),  # refused once: never LOGIN after PLAIN
        ("CRAM-MD5", "wrong", 535, [("PLAIN", USER)]),  # not offered: PLAIN, still once
    ],
)
def test_one_authentication_attempt(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    asked: str,
    password: str,
    code: int,
    attempts: list[tuple[str, str]],
) -> None:
    async def go() -> Reply:
        client = _client(make_settings, upstream.url)
        capabilities = await client.connect()
        assert sorted(capabilities.auth) == ["LOGIN", "PLAIN"]
        assert capabilities.smtputf8
        try:
            return await client.authenticate(asked, USER.encode(), password.encode())
        finally:
            await client.close()

    assert asyncio.run(go()).code == code
    assert upstream.auth_attempts == attempts


def test_a_whole_message_is_sent_after_one_login(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream
) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = USER, "bob@example.net", "hi"
    message.set_content("hello\n")

    async def go() -> tuple[Reply, Reply, Reply]:
        client = _client(make_settings, upstream.url)
        await client.connect()
        auth = await client.authenticate("PLAIN", USER.encode(), PASSWORD.encode())
        sent = await client.send_message(message)
        upstream.refuse["carol@example.net"] = "550 5.1.1 no such user"
        del message["To"]
        message["To"] = "carol@example.net"
        refused = await client.send_message(message)
        await client.close()
        return auth, sent, refused

    auth, sent, refused = asyncio.run(go())
    assert auth.ok
    assert sent.code == 250
    assert "queued as 1" in sent.text
    assert (refused.code, refused.text) == (550, "5.1.1 no such user")
    (received,) = upstream.messages
    assert received.mail_from == USER
    assert received.rcpt_tos == ["bob@example.net"]
    assert b"Subject: hi\r\n" in received.data


def _connect_fails(
    make_settings: Callable[..., Settings], server: Callable[[], asyncio.BaseProtocol], scheme: str
) -> UpstreamUnavailable:
    """What connecting to ``server`` (on loopback, by ``scheme``) raises."""

    async def go() -> UpstreamUnavailable:
        loop = asyncio.get_running_loop()
        listening = await loop.create_server(server, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        client = _client(make_settings, f"{scheme}://127.0.0.1:{port}")
        try:
            with pytest.raises(UpstreamUnavailable) as caught:
                await client.connect()
        finally:
            await client.close()
            listening.close()
            await listening.wait_closed()
        return caught.value

    return asyncio.run(go())


def test_tls_is_required_even_when_the_server_offers_none(
    make_settings: Callable[..., Settings],
) -> None:
    """smtp+starttls:// to a server without STARTTLS: no plaintext fallback,
    so no credentials ever cross the wire in the clear."""
    failure = _connect_fails(make_settings, lambda: SMTP(object()), "smtp+starttls")
    assert "STARTTLS" in str(failure)


def test_an_unreachable_server_raises_unavailable(
    make_settings: Callable[..., Settings],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed

    async def go() -> None:
        client = _client(make_settings, f"smtp://127.0.0.1:{port}")
        with pytest.raises(UpstreamUnavailable):
            await client.connect()
        assert not client.is_connected
        await client.close()

    asyncio.run(go())
    assert smtpclient.UNAVAILABLE.line == "451 4.4.1 Upstream server unavailable, try again later"


class _Refusing(asyncio.Protocol):
    """A server that is up but will not talk: 554 at the greeting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"554 5.3.2 not now\r\n")


def test_a_refused_greeting_is_unavailable_with_the_reply(
    make_settings: Callable[..., Settings],
) -> None:
    failure = _connect_fails(make_settings, _Refusing, "smtp")
    assert failure.reply == Reply(554, "5.3.2 not now")


class Lingering(asyncio.Protocol):
    """An implicit-TLS upstream that answers QUIT with 221 and then neither closes
    nor answers the relay's TLS close_notify (it keeps the connection open)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 lingering.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        for line in data.decode().splitlines():
            verb = line.split(" ", 1)[0].upper()
            reply = {"EHLO": "250-lingering.test\r\n250 AUTH PLAIN", "QUIT": "221 Bye"}
            self.transport.write(reply.get(verb, "235 2.7.0 Ok").encode() + b"\r\n")

    def eof_received(self) -> bool:
        return True  # keep the connection: no close_notify in reply


def test_close_returns_once_the_socket_is_closed(
    make_settings: Callable[..., Settings],
    tls_pair: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QUIT only begins the TLS close. close() returns when the socket is closed
    (aborted if the server never answers), or a stopping relay leaves the socket
    behind its event loop and the garbage collector reports it later."""
    monkeypatch.setattr(smtpclient, "CLOSE_WAIT", 0.2)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_pair)

    async def scenario() -> int:
        server = await asyncio.get_running_loop().create_server(
            Lingering, "127.0.0.1", 0, ssl=context
        )
        port = server.sockets[0].getsockname()[1]
        settings = make_settings(upstream=f"smtps://127.0.0.1:{port}", upstream_verify_tls=False)
        conn = SmtpClient(settings, settings.upstream_target)
        await conn.connect()
        reply = await conn.authenticate("PLAIN", USER.encode(), PASSWORD.encode())
        assert reply.ok
        assert conn.smtp.transport is not None
        sock = conn.smtp.transport.get_extra_info("socket")
        await conn.close()
        closed = sock.fileno()
        server.close()
        await server.wait_closed()
        return int(closed)

    assert asyncio.run(scenario()) == -1


def _live_token(oauth_server: OAuthServer, user: str = USER) -> str:
    start = httpx2.post(
        f"{oauth_server.url}/device", data={"scope": "mail"}, auth=(CLIENT_ID, CLIENT_SECRET)
    ).json()
    oauth_server.approve(start["user_code"], user)
    answer = httpx2.post(
        f"{oauth_server.url}/token",
        data={"grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )
    return str(answer.json()["access_token"])


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("live", [True, False])
def test_one_oauth_attempt_against_an_oauth_only_server(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    oauth_server: OAuthServer,
    mechanism: str,
    live: bool,
) -> None:
    """XOAUTH2 / OAUTHBEARER with a token the provider says is live; a dead one
    gets the server's 535 after the error challenge, and no second attempt."""
    upstream.oauth = oauth_server
    token = _live_token(oauth_server)
    if not live:
        oauth_server.revoke_user(USER)

    async def go() -> tuple[Reply, Reply]:
        client = _client(make_settings, upstream.url)
        await client.connect()
        try:
            auth = await client.authenticate(mechanism, USER.encode(), token.encode())
            return auth, await client.mail(USER, [])
        finally:
            await client.close()

    auth, mail = asyncio.run(go())
    assert upstream.auth_attempts == [(mechanism, USER)]
    if live:
        assert auth.code == 235
        assert mail.ok
    else:
        assert auth.line == "535 5.7.3 Authentication unsuccessful"
        assert mail.code == 530  # not logged in: the session is still usable


def test_password_auth_is_refused_like_microsoft(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, oauth_server: OAuthServer
) -> None:
    upstream.oauth = oauth_server

    async def go() -> Reply:
        client = _client(make_settings, upstream.url)
        await client.connect()
        try:
            assert "XOAUTH2" in client.capabilities.auth
            return await client.authenticate("PLAIN", USER.encode(), PASSWORD.encode())
        finally:
            await client.close()

    assert asyncio.run(go()).line.startswith("535 5.7.139 Authentication unsuccessful")
