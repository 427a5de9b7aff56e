"""Session limits and the greeting timeout (relay/limits.py, relay/smtp.py), over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from sqlalchemy import Engine

from relay.limits import SessionLimits
from tests.support.relaykit import MakeSettings, RawClient, relay_settings, running_relay
from tests.support.upstream import RecordingUpstream


async def _open(port: int, ip: str) -> RawClient:
    return await RawClient.connect(port, local_addr=(ip, 0))


async def _closed(raw: RawClient) -> bool:
    """True when the server closed the connection (EOF) within 10 s."""
    try:
        return await asyncio.wait_for(raw.reader.read(), 10) == b""
    except TimeoutError:
        return False


def test_sessions_past_the_limits_are_greeted_421_and_others_still_served(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Idle connections past TRACKRELAY_MAX_SESSIONS_PER_IP, then past
    TRACKRELAY_MAX_SESSIONS: a 421 4.7.0 greeting, a close and a WARNING naming the
    peer; another address is still served, and a freed slot is usable again."""
    settings = relay_settings(make_settings, upstream, max_sessions=5, max_sessions_per_ip=3)

    async def scenario() -> dict[str, object]:
        async with (
            contextlib.AsyncExitStack() as stack,
            running_relay(settings, db_engine) as relay,
        ):
            port = relay.ports["smtp"]
            held = [
                await stack.enter_async_context(await _open(port, "127.0.0.1")) for _ in range(3)
            ]
            over_ip = await stack.enter_async_context(await _open(port, "127.0.0.1"))
            other = await stack.enter_async_context(await _open(port, "127.0.0.2"))
            ehlo = await other.command(b"EHLO other.test")
            held.append(await stack.enter_async_context(await _open(port, "127.0.0.3")))
            over_all = await stack.enter_async_context(await _open(port, "127.0.0.4"))
            closed = [await _closed(over_ip), await _closed(over_all)]
            await held[0].close()
            await asyncio.sleep(0.1)  # its connection_lost has run
            again = await stack.enter_async_context(await _open(port, "127.0.0.1"))
            return {
                "held": [raw.greeting[:3] for raw in held],
                "over_ip": over_ip.greeting,
                "over_all": over_all.greeting,
                "other": (other.greeting[:3], ehlo[:3]),
                "closed": closed,
                "again": (again.greeting[:3], (await again.command(b"NOOP"))[:3]),
                "active": relay.limits.active,
            }

    with caplog.at_level(logging.WARNING, logger="relay.limits"):
        got = asyncio.run(scenario())
    assert got["held"] == ["220"] * 4
    assert got["over_ip"] == "421 4.7.0 Too many connections from your address, try again later\r\n"
    assert got["over_all"] == "421 4.7.0 Too many connections, try again later\r\n"
    assert got["other"] == ("220", "250")
    assert got["closed"] == [True, True]
    assert got["again"] == ("220", "250")
    assert got["active"] == 5
    lines = [r.getMessage() for r in caplog.records]
    assert any("127.0.0.1" in line and "TRACKRELAY_MAX_SESSIONS_PER_IP=3" in line for line in lines)
    assert any("127.0.0.4" in line and "TRACKRELAY_MAX_SESSIONS=5" in line for line in lines)


@pytest.mark.parametrize("listener", ["smtp", "smtps"])
def test_the_first_command_must_come_within_the_greeting_timeout(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine, listener: str
) -> None:
    """A connection that says nothing (not even its TLS handshake on the implicit-TLS
    port) is closed after TRACKRELAY_GREETING_TIMEOUT; one that spoke has the longer
    idle timeout, and its slot is free again after the silent one left."""
    settings = relay_settings(
        make_settings,
        upstream,
        greeting_timeout=0.3,
        idle_timeout=30,
        max_sessions=1,
    )

    async def scenario() -> tuple[bool, str, str]:
        async with running_relay(settings, db_engine) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports[listener])
            try:
                silent_closed = await asyncio.wait_for(reader.read(), 10) is not None
            finally:
                writer.close()
            async with await RawClient.connect(relay.ports["smtp"]) as raw:
                await raw.command(b"EHLO client.test")
                await asyncio.sleep(0.6)  # longer than the greeting timeout
                return silent_closed, raw.greeting[:3], (await raw.command(b"NOOP"))[:3]

    assert asyncio.run(scenario()) == (True, "220", "250")


def test_limits_count_and_release_per_address() -> None:
    limits = SessionLimits(total=3, per_ip=2, clock=lambda: 0.0)
    assert [limits.admit("a", "smtp"), limits.admit("a", "smtp")] == [None, None]
    assert limits.admit("a", "smtp") is not None
    assert limits.admit("b", "smtp") is None
    assert limits.admit("c", "smtp") is not None
    limits.release("a")
    assert limits.admit("c", "smtp") is None
    assert limits.active == 3


def test_an_ipv6_client_counts_by_its_64() -> None:
    limits = SessionLimits(total=10, per_ip=2, clock=lambda: 0.0)
    assert limits.admit("2001:db8:1:2::1", "smtp") is None
    assert limits.admit("2001:db8:1:2:ffff::9", "smtp") is None
    assert limits.admit("2001:db8:1:2::abcd", "smtp") is not None
    assert limits.admit("2001:db8:1:3::1", "smtp") is None  # another /64
    assert limits.admit("::ffff:192.0.2.1", "smtp") is None
    assert limits.admit("192.0.2.1", "smtp") is None
    assert limits.admit("192.0.2.1", "smtp") is not None  # the mapped one counted too
    limits.release("2001:db8:1:2::1")
    assert limits.admit("2001:db8:1:2::77", "smtp") is None


def test_refusals_are_logged_once_a_minute_per_address(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limits = SessionLimits(total=5, per_ip=1, clock=lambda: now[0])
    limits.admit("192.0.2.1", "smtp")
    with caplog.at_level(logging.WARNING, logger="relay.limits"):
        for _ in range(100):
            limits.admit("192.0.2.1", "smtp")
        limits.admit("192.0.2.2", "smtp")
        limits.admit("192.0.2.2", "smtp")  # another address: its own line
        now[0] = 61.0
        limits.admit("192.0.2.1", "smtp")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "refused 192.0.2.1" in lines[0]
    assert "refused 192.0.2.2" in lines[1]
    assert lines[2].endswith("(99 more refused since the last line)")
