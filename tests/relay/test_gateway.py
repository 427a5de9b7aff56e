"""Gateway mode (relay/gateway.py, relay/stamp.py, the gateway listener of relay/server.py)
against a simulated Exchange Online tenant on loopback.

The tenant is what Microsoft documents for an add-on service: its outbound
connector connects to the gateway with STARTTLS and a TLS client certificate
(here ``mail.protection.outlook.com``, issued by a test CA the gateway is told
to trust), and the gateway returns the mail to the tenant's own listener (a
recording server without AUTH, as an inbound connector scoped to the
gateway's address would take it), which checks the stamp.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import Engine
from sqlmodel import select

from relay import stamp
from relay.server import RelayServer
from shared import policies
from shared.config import Settings, SettingsError, load_settings
from shared.db import session_scope
from shared.models import Message
from tests.support.pki import Authority, Pair
from tests.support.relaykit import MakeSettings, relay_settings, running_relay
from tests.support.upstream import RecordingUpstream

TENANT_NAME = "mail.protection.outlook.com"
SECRET = "test-secret-key-0123456789abcdef"  # tests/conftest.py's TEST_SECRET
HTML = (
    b"From: Alice <alice@contoso.example>\r\nTo: bob@fabrikam.example\r\n"
    b"Subject: numbers\r\nMessage-ID: <q3@contoso.example>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><p>See <a href="https://contoso.example/report">the report</a>.</p>'
    b"</body></html>\r\n"
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("tenant-pki"), "Tenant CA")


@pytest.fixture
def tenant(tls_pair: tuple[Path, Path]) -> Iterator[RecordingUpstream]:
    """The tenant's inbound side (``<tenant>.mail.protection.outlook.com``)."""
    server = RecordingUpstream(*tls_pair, require_auth=False).start()
    yield server
    server.stop()


def gateway_settings(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    **overrides: Any,
) -> Any:
    values: dict[str, Any] = {
        "gateway_port": 0,
        "gateway_networks": "127.0.0.0/8",
        "gateway_domains": "contoso.example",
        "gateway_client_names": TENANT_NAME,
        "gateway_client_ca": ca.cert,
        "gateway_upstream": tenant.url,
        **overrides,
    }
    return relay_settings(make_settings, upstream, **values)


def connector(relay: RelayServer, certificate: Pair | None) -> aiosmtplib.SMTP:
    """The tenant's outbound connector: STARTTLS, presenting ``certificate``."""
    if certificate is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = certificate.client_context()
    return aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.ports["gateway"],
        start_tls=True,
        tls_context=context,
        timeout=20,
    )


async def hand_over(
    relay: RelayServer,
    certificate: Pair | None,
    message: bytes = HTML,
    sender: str = "alice@contoso.example",
    recipients: tuple[str, ...] = ("bob@fabrikam.example",),
) -> str:
    async with connector(relay, certificate) as smtp:
        _, reply = await smtp.sendmail(sender, list(recipients), message)
        return reply


def handed_over(
    settings: Settings,
    engine: Engine,
    ca: Authority,
    message: bytes = HTML,
    recipients: tuple[str, ...] = ("bob@fabrikam.example",),
    dns: tuple[str, ...] = (TENANT_NAME,),
) -> str:
    """The tenant's connector, with its certificate (names DNS), hands MESSAGE over to
    a gateway started for it; the reply."""
    certificate = ca.issue(TENANT_NAME, dns=dns)

    async def scenario() -> str:
        async with running_relay(settings, engine) as relay:
            return await hand_over(relay, certificate, message, recipients=recipients)

    return asyncio.run(scenario())


def stamp_of(data: bytes) -> tuple[str, bytes]:
    """The stamp value on the first line, and the bytes after it."""
    first, _, rest = data.partition(b"\r\n")
    name, _, value = first.decode().partition(": ")
    assert name == stamp.HEADER, first
    return value, rest


def _records(engine: Engine) -> list[Message]:
    with session_scope(engine) as session:
        return list(session.exec(select(Message)).all())


def test_tenant_mail_is_tracked_per_policy_and_returns_stamped(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    policies.set_policy(db_engine, "@contoso.example", mode="always")
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    reply = handed_over(settings, db_engine, ca, dns=(TENANT_NAME, f"*.{TENANT_NAME}"))
    assert reply.startswith("2.0.0 Ok: queued")  # the tenant's own reply
    assert upstream.messages == []  # the gateway returns to the tenant, not the upstream
    [returned] = tenant.messages
    assert returned.mail_from == "alice@contoso.example"
    assert returned.rcpt_tos == ["bob@fabrikam.example"]
    value, rest = stamp_of(returned.data)
    assert stamp.Stamp([SECRET.encode()]).verify(value, "<q3@contoso.example>")
    assert b"https://contoso.example/report" not in rest  # the link now goes through /c/
    assert b"/o/" in rest  # the pixel
    [record] = _records(db_engine)
    assert record.listener == "gateway"
    assert record.track_opens
    assert record.track_clicks


def test_the_return_path_is_shown_the_relays_certificate(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    """An inbound connector identifies the gateway by its certificate (TlsSenderCertificateName)."""
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    tenant.ask_for_certificates(settings.tls_cert)  # the relay's own (self-signed) certificate
    handed_over(settings, db_engine, ca)
    [returned] = tenant.messages
    assert returned.peercert is not None
    assert ("commonName", "127.0.0.1") in [n for rdn in returned.peercert["subject"] for n in rdn]


def test_per_recipient_copies_return_as_separate_stamped_transactions(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    policies.set_policy(db_engine, "@contoso.example", mode="always", per_recipient=True)
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    both = ("bob@fabrikam.example", "carol@fabrikam.example")
    handed_over(settings, db_engine, ca, recipients=both)
    assert sorted(m.rcpt_tos[0] for m in tenant.messages) == sorted(both)
    assert all(len(m.rcpt_tos) == 1 for m in tenant.messages)
    signer = stamp.Stamp([SECRET.encode()])
    pixels = set()
    for returned in tenant.messages:
        value, rest = stamp_of(returned.data)
        assert signer.verify(value, "<q3@contoso.example>")
        pixels.add(rest.split(b"/o/", 1)[1][:40])
    assert len(pixels) == 2  # each copy its own tokens


def test_untracked_mail_returns_byte_identical_but_for_the_stamp(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(make_settings, upstream, tenant, ca)  # mode header: no header
    handed_over(settings, db_engine, ca)
    [returned] = tenant.messages
    _, rest = stamp_of(returned.data)
    assert rest == HTML
    [record] = _records(db_engine)
    assert record.listener == "gateway"
    assert not json.loads(record.decision)["tracked"]


def test_a_stamped_message_passes_unchanged_and_is_counted_once(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    """A loop (a rule without the stamp exception) or a second pass never tracks twice."""
    policies.set_policy(db_engine, "@contoso.example", mode="always")
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    certificate = ca.issue(TENANT_NAME, dns=(TENANT_NAME,))

    async def scenario() -> int:
        async with running_relay(settings, db_engine) as relay:
            await hand_over(relay, certificate)
            await hand_over(relay, certificate, tenant.messages[0].data)  # it comes back
            return relay.metrics.stamped_passed

    assert asyncio.run(scenario()) == 1
    first, second = tenant.messages
    assert second.data == first.data  # byte for byte: not tracked twice, not stamped twice
    assert len(_records(db_engine)) == 1


def test_an_invalid_stamp_is_removed_and_the_message_handled_normally(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    other = stamp.Stamp([b"another deployment's key"]).line("<q3@contoso.example>")
    forged = HTML.replace(b"Subject:", other + b"Subject:")
    handed_over(settings, db_engine, ca, forged)
    [returned] = tenant.messages
    value, rest = stamp_of(returned.data)
    assert stamp.Stamp([SECRET.encode()]).verify(value, "<q3@contoso.example>")
    assert rest == HTML  # the foreign stamp is gone, nothing else changed
    assert len(_records(db_engine)) == 1


def test_a_wrong_certificate_name_is_refused(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    stranger = ca.issue("mail.fabrikam.example", dns=("mail.fabrikam.example",))

    async def scenario() -> tuple[BaseException, BaseException]:
        async with running_relay(settings, db_engine) as relay:
            with pytest.raises(aiosmtplib.SMTPException) as wrong:
                await hand_over(relay, stranger)
            with pytest.raises(aiosmtplib.SMTPException) as none:
                await hand_over(relay, None)
            return wrong.value, none.value

    wrong, none = asyncio.run(scenario())
    assert "5.7.1 TLS client certificate not accepted here" in str(wrong)
    assert "5.7.1 A TLS client certificate is required here" in str(none)
    assert tenant.messages == []


def test_a_network_outside_the_list_is_refused(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(
        make_settings, upstream, tenant, ca, gateway_networks="40.92.0.0/15,52.100.0.0/14"
    )

    async def scenario() -> bytes:
        async with running_relay(settings, db_engine) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports["gateway"])
            greeting = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return greeting

    greeting = asyncio.run(scenario())
    assert greeting == b"554 5.7.1 This port only serves the organisation's mail servers\r\n"


def test_a_foreign_sender_domain_is_refused(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    """A mis-scoped connector must not make an open relay."""
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    certificate = ca.issue(TENANT_NAME, dns=(TENANT_NAME,))

    async def scenario() -> list[str]:
        replies = []
        async with (
            running_relay(settings, db_engine) as relay,
            connector(relay, certificate) as smtp,
        ):
            for sender in ("mallory@elsewhere.example", "", "alice@contoso.example.evil"):
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await smtp.mail(sender)
                replies.append(f"{refused.value.code} {refused.value.message}")
        return replies

    replies = asyncio.run(scenario())
    assert all(r.startswith("550 5.7.1 <") for r in replies), replies
    assert "sender domain not served by this gateway" in replies[0]
    assert tenant.messages == []


def test_no_auth_unlimited_recipients_and_the_return_path_decides(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(make_settings, upstream, tenant, ca, max_recipients=2)
    certificate = ca.issue(TENANT_NAME, dns=(TENANT_NAME,))
    many = tuple(f"r{i}@fabrikam.example" for i in range(5))
    tenant.refuse["gone@fabrikam.example"] = "550 5.1.1 no such user"

    async def scenario() -> tuple[str, str, str]:
        async with running_relay(settings, db_engine) as relay:
            async with connector(relay, certificate) as smtp:
                _, ehlo = await smtp.ehlo()
                auth = await smtp.execute_command(b"AUTH", b"PLAIN", b"AGFAYg==")
            await hand_over(relay, certificate, recipients=many)
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await hand_over(relay, certificate, recipients=("gone@fabrikam.example",))
            return ehlo, f"{auth.code} {auth.message}", str(refused.value.recipients[0])

    ehlo, auth, refused = asyncio.run(scenario())
    assert "AUTH" not in ehlo
    assert auth.startswith("5")
    assert tenant.messages[0].rcpt_tos == list(many)  # over TRACKRELAY_MAX_RECIPIENTS: fine
    assert "550" in refused
    assert "no such user" in refused  # the tenant's own refusal, verbatim


def test_a_return_path_that_is_down_gives_451_and_nothing_is_recorded(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(make_settings, upstream, tenant, ca)
    certificate = ca.issue(TENANT_NAME, dns=(TENANT_NAME,))
    tenant.stop()

    async def scenario() -> aiosmtplib.SMTPResponse:
        async with (
            running_relay(settings, db_engine) as relay,
            connector(relay, certificate) as smtp,
        ):
            await smtp.ehlo()
            return await smtp.mail("alice@contoso.example")

    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        asyncio.run(scenario())
    assert refused.value.code == 451
    assert _records(db_engine) == []


def test_the_gateway_needs_its_networks_and_domains(make_settings: MakeSettings) -> None:
    with pytest.raises(SettingsError, match=r"^TRACKRELAY_GATEWAY_NETWORKS: "):
        load_settings(var_dir=make_settings().var_dir, gateway_port=2526)
    with pytest.raises(SettingsError, match=r"^TRACKRELAY_GATEWAY_DOMAINS: "):
        load_settings(
            var_dir=make_settings().var_dir, gateway_port=2526, gateway_networks="10.0.0.0/8"
        )


def test_require_tls_insists_on_starttls_before_mail(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tenant: RecordingUpstream,
    ca: Authority,
    db_engine: Engine,
) -> None:
    settings = gateway_settings(
        make_settings,
        upstream,
        tenant,
        ca,
        gateway_client_names="",
        gateway_client_ca=None,
        gateway_require_tls=True,
    )

    async def scenario() -> tuple[str, str]:
        async with running_relay(settings, db_engine) as relay:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.ports["gateway"], start_tls=False, timeout=20
            ) as plain:
                await plain.ehlo()
                refused = await plain.execute_command(b"MAIL", b"FROM:<alice@contoso.example>")
            reply = await hand_over(relay, None)  # STARTTLS, no certificate: no names asked
            return f"{refused.code} {refused.message}", reply

    refused, reply = asyncio.run(scenario())
    assert refused.startswith("530")
    assert reply.startswith("2.0.0")
    assert len(tenant.messages) == 1
