"""relay/peers.py: a listener that serves only some networks and TLS client names,
checked on a real RelaySMTP listener on loopback with certificates of a test CA."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.peers import Peers, ask_for_certificates, certificate_names
from relay.smtp import RelaySMTP
from relay.tlscert import server_context
from shared.config import SettingsError
from tests.support.pki import Authority
from tests.support.relaykit import RawClient

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def test_an_address_outside_the_networks_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    peers = Peers.of("intake", LOOPBACK, serves="the intake networks")
    assert peers.refuse_address("127.0.0.5") is None
    with caplog.at_level(logging.WARNING, "relay.peers"):
        refusal = peers.refuse_address("192.0.2.7")
    assert refusal == "554 5.7.1 This port only serves the intake networks"
    assert "intake listener: refused 192.0.2.7" in caplog.text
    assert peers.refuse_address("not an address") is not None


def test_names_come_from_subject_alt_names_else_the_common_name() -> None:
    san = {
        "subject": ((("commonName", "cn.example"),),),
        "subjectAltName": (("DNS", "a.example"), ("IP Address", "192.0.2.1"), ("DNS", "b.example")),
    }
    assert certificate_names(san) == ["a.example", "b.example"]
    assert certificate_names({"subject": ((("commonName", "cn.example"),),)}) == ["cn.example"]
    assert certificate_names({}) == []
    assert certificate_names(None) == []


def test_certificate_names_match_case_insensitively_and_literally() -> None:
    peers = Peers.of("gateway", LOOPBACK, ["Mail.Protection.Outlook.com"])
    cert = {"subjectAltName": (("DNS", "mail.protection.outlook.COM"),)}
    assert peers.refuse_certificate("127.0.0.1", cert) is None
    wildcard = {"subjectAltName": (("DNS", "*.protection.outlook.com"),)}
    assert peers.refuse_certificate("127.0.0.1", wildcard) is not None
    assert peers.refuse_certificate("127.0.0.1", None) == (
        "554 5.7.1 A TLS client certificate is required here"
    )
    assert Peers.of("plain", LOOPBACK).refuse_certificate("127.0.0.1", None) is None


def test_an_unreadable_client_ca_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(SettingsError, match=r"^TRACKRELAY_X_CA: cannot read"):
        ask_for_certificates(context, tmp_path / "ca.pem", "TRACKRELAY_X_CA")


class _Greeter:
    """A handler with no hooks: aiosmtpd answers 250 to everything."""


@contextlib.asynccontextmanager
async def listening(peers: Peers, context: ssl.SSLContext, *, implicit: bool) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()

    def protocol() -> RelaySMTP:
        options = {} if implicit else {"tls_context": context, "require_starttls": True}
        return RelaySMTP(_Greeter(), listener=peers.listener, peers=peers, loop=loop, **options)

    server = await loop.create_server(protocol, "127.0.0.1", 0, ssl=context if implicit else None)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"))


def _server_context(ca: Authority) -> ssl.SSLContext:
    pair = ca.issue("relay.test", dns=("localhost",), ips=("127.0.0.1",))
    context = server_context(pair.cert, pair.key)
    ask_for_certificates(context, ca.cert, "TRACKRELAY_GATEWAY_CLIENT_CA")
    return context


async def _starttls(port: int, context: ssl.SSLContext) -> str:
    async with await RawClient.connect(port) as raw:
        await raw.command(b"EHLO client.test")
        assert (await raw.command(b"STARTTLS")).startswith("220")
        try:
            await raw.writer.start_tls(context, server_hostname="127.0.0.1")
            return await raw.command(b"EHLO client.test")
        except (ConnectionError, ssl.SSLError) as exc:
            return f"failed: {exc}"


def test_starttls_client_certificate_is_checked_after_the_handshake(
    ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_starttls_client_certificate_is_checked_after_the_handshake(ca, caplog))


async def _starttls_client_certificate_is_checked_after_the_handshake(
    ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    peers = Peers.of("gateway", LOOPBACK, ["tenant.mail.example"])
    good = ca.issue("tenant.mail.example", dns=("tenant.mail.example",))
    other = ca.issue("someone.example", dns=("someone.example",))
    async with listening(peers, _server_context(ca), implicit=False) as port:
        assert (await _starttls(port, good.client_context(ca.cert))).startswith("250")
        with caplog.at_level(logging.WARNING, "relay.peers"):
            refused = await _starttls(port, other.client_context(ca.cert))
        assert "554 5.7.1 TLS client certificate not accepted here" in refused
        assert "someone.example are not in the accepted client names" in caplog.text
        no_cert = ssl.create_default_context(cafile=str(ca.cert))
        assert "554 5.7.1 A TLS client certificate is required" in await _starttls(port, no_cert)


def test_mail_needs_starttls_first_where_names_are_checked(ca: Authority) -> None:
    asyncio.run(_mail_needs_starttls_first_where_names_are_checked(ca))


async def _mail_needs_starttls_first_where_names_are_checked(ca: Authority) -> None:
    peers = Peers.of("gateway", LOOPBACK, ["tenant.mail.example"])
    async with (
        listening(peers, _server_context(ca), implicit=False) as port,
        await RawClient.connect(port) as raw,
    ):
        await raw.command(b"EHLO client.test")
        assert (await raw.command(b"MAIL FROM:<a@example.com>")).startswith("530")


def test_implicit_tls_checks_the_certificate_before_the_greeting(ca: Authority) -> None:
    asyncio.run(_implicit_tls_checks_the_certificate_before_the_greeting(ca))


async def _implicit_tls_checks_the_certificate_before_the_greeting(ca: Authority) -> None:
    peers = Peers.of("gateway", LOOPBACK, ["tenant.mail.example"])
    good = ca.issue("tenant.mail.example", dns=("tenant.mail.example",))
    other = ca.issue("stranger.example", dns=("stranger.example",))
    async with listening(peers, _server_context(ca), implicit=True) as port:
        async with await RawClient.connect(port, ssl=good.client_context(ca.cert)) as raw:
            assert (await raw.command(b"EHLO client.test")).startswith("250")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=other.client_context(ca.cert)
        )
        greeting = await reader.readline()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        assert greeting.startswith(b"554 5.7.1 TLS client certificate not accepted")


def test_a_certificate_from_an_unknown_ca_fails_the_handshake(
    ca: Authority, tmp_path: Path
) -> None:
    asyncio.run(_a_certificate_from_an_unknown_ca_fails_the_handshake(ca, tmp_path))


async def _a_certificate_from_an_unknown_ca_fails_the_handshake(
    ca: Authority, tmp_path: Path
) -> None:
    peers = Peers.of("gateway", LOOPBACK, ["tenant.mail.example"])
    forged = Authority(tmp_path / "other", "Other CA").issue(
        "tenant.mail.example", dns=("tenant.mail.example",)
    )
    async with listening(peers, _server_context(ca), implicit=False) as port:
        reply = await _starttls(port, forged.client_context(ca.cert))
        assert reply.startswith("failed: ")


def test_an_outside_address_gets_554_instead_of_the_greeting(ca: Authority) -> None:
    asyncio.run(_an_outside_address_gets_554_instead_of_the_greeting(ca))


async def _an_outside_address_gets_554_instead_of_the_greeting(ca: Authority) -> None:
    peers = Peers.of("gateway", (ipaddress.ip_network("192.0.2.0/24"),))
    async with listening(peers, _server_context(ca), implicit=False) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readline()
        assert await reader.read() == b""  # then closed
        writer.close()
        await writer.wait_closed()
        assert greeting == b"554 5.7.1 This port only serves the listed networks\r\n"
