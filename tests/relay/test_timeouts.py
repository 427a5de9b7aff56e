"""Every timeout that closes a session says so first (RFC 5321 3.8, 4.5.3.2), over loopback.

Greeting, idle between commands, a stalled DATA upload: ``421 4.4.2 <host>
Timeout, closing transmission channel``, then the end of the connection. A slow
but steady upload is not cut, and the upstream's reply to the final dot is
waited for under its own timeout (TRACKRELAY_UPSTREAM_DATA_TIMEOUT), never the
upload's (TRACKRELAY_DATA_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
from sqlalchemy import Engine

from relay.smtp import TIMEOUT_REPLY
from shared.config import Settings
from tests.support.injection_checks import without_added_id
from tests.support.relaykit import MakeSettings, RawClient, relay_settings, running_relay
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def _trusted(
    make_settings: MakeSettings, upstream: RecordingUpstream, **overrides: object
) -> Settings:
    """A plain listener for 127.0.0.1, the relay logging in with its own account."""
    return relay_settings(
        make_settings,
        upstream,
        plain_port=0,
        trusted_networks="127.0.0.1/32",
        upstream_user=USER,
        upstream_password=PASSWORD,
        **overrides,
    )


def _expected(settings: Settings) -> str:
    return TIMEOUT_REPLY.format(host=settings.smtp_hostname) + "\r\n"


async def _rest(raw: RawClient) -> str:
    """Everything the relay still sends until it closes (within 10 s, else a failure)."""
    return (await asyncio.wait_for(raw.reader.read(), 10)).decode()


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.parametrize("listener", ["smtp", "smtps", "plain"])
def test_a_silent_connection_gets_421_at_the_greeting_timeout(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine, listener: str
) -> None:
    """Greeted, then silent: the 421 (over TLS on the implicit-TLS port), then EOF."""
    settings = _trusted(make_settings, upstream, greeting_timeout=0.3, idle_timeout=30)

    async def scenario() -> tuple[str, str]:
        async with running_relay(settings, db_engine) as relay:
            tls = {"ssl": _insecure()} if listener == "smtps" else {}
            async with await RawClient.connect(relay.ports[listener], **tls) as raw:
                return raw.greeting[:4], await _rest(raw)

    assert asyncio.run(scenario()) == ("220 ", _expected(settings))


def test_an_idle_session_gets_421_at_the_idle_timeout(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """After EHLO (and after half a command line): the 421, then EOF."""
    settings = _trusted(make_settings, upstream, idle_timeout=0.4)

    async def scenario(partial: bytes) -> str:
        async with (
            running_relay(settings, db_engine) as relay,
            await RawClient.connect(relay.ports["plain"]) as raw,
        ):
            assert (await raw.command(b"EHLO app.test"))[:3] == "250"
            raw.writer.write(partial)
            return await _rest(raw)

    assert asyncio.run(scenario(b"")) == _expected(settings)
    assert asyncio.run(scenario(b"MAIL FROM:<app@exa")) == _expected(settings)


def test_a_stalled_upload_gets_421_and_a_steady_slow_one_is_delivered(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """TRACKRELAY_IDLE_TIMEOUT guards each read of DATA: a line every so often
    (each pause shorter than it, all of them longer) is delivered; a client that
    stops mid-DATA gets the 421 and EOF, and nothing reaches the upstream."""
    settings = _trusted(make_settings, upstream, idle_timeout=0.5, data_timeout=60)
    lines = [b"Subject: slow\r\n", b"\r\n"] + [b"line %d\r\n" % i for i in range(8)]

    async def scenario(stall: bool) -> str:
        async with (
            running_relay(settings, db_engine) as relay,
            await RawClient.connect(relay.ports["plain"]) as raw,
        ):
            await raw.command(b"EHLO app.test")
            await raw.command(b"MAIL FROM:<app@example.com>")
            await raw.command(b"RCPT TO:<bob@example.net>")
            assert (await raw.command(b"DATA"))[:3] == "354"
            for line in lines:
                raw.writer.write(line)
                await raw.writer.drain()
                await asyncio.sleep(0.15)
            if stall:
                return await _rest(raw)
            return await raw.command(b".")

    assert asyncio.run(scenario(stall=True)) == _expected(settings)
    assert upstream.messages == []
    assert asyncio.run(scenario(stall=False)).startswith("250 ")
    sent = b"".join(lines)
    assert [without_added_id(sent, m.data) for m in upstream.messages] == [sent]


def test_the_upload_timeout_does_not_cover_the_upstreams_reply(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """An upstream slower to answer the final dot than TRACKRELAY_DATA_TIMEOUT and
    TRACKRELAY_IDLE_TIMEOUT (within TRACKRELAY_UPSTREAM_DATA_TIMEOUT): one 250, one copy."""
    upstream.data_delay = 1.5
    settings = _trusted(
        make_settings, upstream, data_timeout=0.4, idle_timeout=0.4, upstream_data_timeout=30
    )

    async def scenario() -> str:
        async with (
            running_relay(settings, db_engine) as relay,
            await RawClient.connect(relay.ports["plain"]) as raw,
        ):
            await raw.command(b"EHLO app.test")
            await raw.command(b"MAIL FROM:<app@example.com>")
            await raw.command(b"RCPT TO:<bob@example.net>")
            await raw.command(b"DATA")
            return await raw.command(b"Subject: x\r\n\r\nbody\r\n.")

    assert asyncio.run(scenario()).startswith("250 ")
    assert len(upstream.messages) == 1
