"""relay/aiosmtpd_adapter.py: every private part of aiosmtpd it relies on is
still there, with the same signature, and behaves as the adapter uses it.

These tests fail loudly on an aiosmtpd upgrade: re-read the adapter against
the new release, then move ``VERIFIED`` and the pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Iterator
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.aiosmtpd_adapter import VERIFIED, AdaptedSession, AdaptedSMTP, Command, unread
from relay.smtp import RelaySMTP
from tests.support.paths import ROOT, pinned


def test_the_installed_aiosmtpd_is_the_verified_one_and_pinned() -> None:
    assert aiosmtpd.__version__ == VERIFIED, (
        f"aiosmtpd {aiosmtpd.__version__} is installed, the adapter was verified on "
        f"{VERIFIED}: re-read relay/aiosmtpd_adapter.py against it"
    )
    assert pinned("aiosmtpd") == VERIFIED


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """For protocols made outside a running loop (aiosmtpd would make one)."""
    made = asyncio.new_event_loop()
    yield made
    made.close()


def _params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_private_names_exist_with_their_signatures(loop: asyncio.AbstractEventLoop) -> None:
    assert _params(SMTP._create_session) == ["self"]
    assert _params(SMTP._handle_client) == ["self"]
    assert inspect.iscoroutinefunction(SMTP._handle_client)
    assert _params(SMTP._reset_timeout) == ["self", "duration"]
    assert _params(SMTP._timeout_cb) == ["self"]  # the idle timer's callback (timed_out)
    assert "self._timeout_cb" in inspect.getsource(SMTP._reset_timeout)
    assert _params(SMTP._getaddr) == ["self", "arg"]
    assert _params(SMTP._call_handler_hook) == ["self", "command", "args"]
    assert inspect.iscoroutinefunction(SMTP._call_handler_hook)
    assert _params(SMTP._set_post_data_state) == ["self"]
    assert "_login_data" in inspect.getsource(Session.__init__)
    # aiosmtpd builds its command table from smtp_* methods at __init__
    protocol = SMTP(object(), loop=loop)
    assert {"EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT"} <= set(protocol._smtp_methods)
    assert protocol._timeout_handle is None
    # the stdlib and asyncio parts: the address parser and the reader's buffer
    assert isinstance(asyncio.StreamReader(loop=loop)._buffer, bytearray)  # type: ignore[attr-defined]


def test_our_own_private_names_are_not_aiosmtpds(loop: asyncio.AbstractEventLoop) -> None:
    """An aiosmtpd release that started using one of our attribute names would
    silently break the relay: only what the adapter means to override or set
    may share a name with aiosmtpd."""
    intended = {
        "_create_session",
        "_handle_client",
        "_reset_timeout",
        "_timeout_cb",
        "_getaddr",
        "_smtp_methods",
    }
    stock = SMTP(object(), loop=loop)
    theirs = set(dir(SMTP)) | set(vars(stock))
    assigned = set()
    for module in ("relay/smtp.py", "relay/aiosmtpd_adapter.py"):
        assigned |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", (ROOT / module).read_text()))
    defined = {
        name
        for name in set(vars(RelaySMTP)) | set(vars(AdaptedSMTP))
        if name.startswith("_") and not name.startswith("__")
    }
    assert "_idle_commands" in assigned
    assert "_tracked" in defined
    assert (assigned | defined) & theirs == intended


class _Recorder:
    def __init__(self) -> None:
        self.hooks: list[str | None] = []

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str | None
    ) -> str:
        self.hooks.append(arg)
        return "250 OK"


class _Probe(AdaptedSMTP):
    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.commands: list[str] = []
        self.sessions = 0
        self.served = asyncio.Event()
        self.wrap_commands(self._counted)

    def new_session(self) -> Session:
        self.sessions += 1
        return super().new_session()

    async def serve_client(self) -> None:
        self.served.set()
        await super().serve_client()

    def _counted(self, name: str, method: Command) -> Command:
        async def run(arg: str) -> None:
            self.commands.append(name)
            await method(arg)

        return run

    async def smtp_XTEST(self, arg: str) -> None:
        assert isinstance(self.reader, asyncio.StreamReader)
        self.envelope.mail_from = "x@example.com"
        self.end_transaction()
        assert self.envelope.mail_from is None
        assert await self.call_hook("NOOP", "via call_hook") == "250 OK"
        assert await self.call_hook("NOTHING") is MISSING
        self.write_now(b"250 written now\r\n")


def test_the_public_names_behave_on_a_real_connection() -> None:
    recorder = _Recorder()

    async def scenario() -> tuple[_Probe, list[bytes], float]:
        protocols: list[_Probe] = []

        def make() -> _Probe:
            protocols.append(_Probe(recorder, hostname="adapter.test", timeout=0.3))
            return protocols[-1]

        server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [await reader.readline()]
        writer.write(b"EHLO client.test\r\nXTEST\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass  # the EHLO reply
        lines.append(await reader.readline())
        protocol = protocols[0]
        protocol.suspend_timeout()
        await asyncio.sleep(0.6)  # twice the idle timeout: suspended, still open
        assert protocol.transport is not None
        assert not protocol.transport.is_closing()
        writer.write(b"NOOP\r\n")  # aiosmtpd's own reset does not restart it either
        lines.append(await reader.readline())
        await asyncio.sleep(0.4)
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        resumed = loop.time()
        protocol.resume_timeout()
        assert await reader.read() == b""  # the idle timeout closed the connection
        waited = loop.time() - resumed
        writer.close()
        server.close()
        await server.wait_closed()
        return protocol, lines, waited

    protocol, lines, waited = asyncio.run(scenario())
    assert lines[0].startswith(b"220 adapter.test")
    assert lines[1] == b"250 written now\r\n"
    assert lines[2] == b"250 OK\r\n"
    assert 0.2 < waited < 2
    assert protocol.served.is_set()
    assert protocol.sessions == 1
    assert protocol.commands == ["EHLO", "XTEST", "NOOP"]
    assert recorder.hooks == ["via call_hook", None]  # NOOP without an argument


def test_a_session_sets_login_data_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    session = AdaptedSession(asyncio.new_event_loop())
    session.loop.close()  # a Session only keeps it
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        session.login_data = b"ann"
        assert session.login_data == b"ann"
    assert caplog.records == []
    stock = Session(session.loop)
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        stock.login_data = b"ann"  # what aiosmtpd does, and why the adapter overrides it
    assert caplog.records


def test_unread_puts_bytes_back_in_front() -> None:
    async def go() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(b"world\r\n")
        unread(reader, b"hello ")
        return await reader.readline()

    assert asyncio.run(go()) == b"hello world\r\n"


class _Limits:
    def __init__(self, local_part_limit: int) -> None:
        self.local_part_limit = local_part_limit


ADDRESSES = [
    "",
    "<>",
    "<ann@example.com>",
    "<ann@example.com> SIZE=100 BODY=8BITMIME",
    "ann@example.com",
    ' <"odd local"@example.com>',
    "<@relay.example:ann@example.com>",
    "<ann@[127.0.0.1]>",
    "<ann@exämple.com> SMTPUTF8",
    "<ann",
    "<<ann@example.com>>",
    "no at sign",
    "<" + "x" * 80 + "@example.com>",
]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(ADDRESSES), st.text(max_size=60)), st.sampled_from([0, 64]))
def test_address_parse_matches_aiosmtpd(arg: str, limit: int) -> None:
    limits = _Limits(limit)
    try:
        stock = SMTP._getaddr(limits, arg)  # type: ignore[arg-type]
    except IndexError:  # the stdlib parser's crash on e.g. '"': a syntax error for us
        stock = (None, None)
    assert AdaptedSMTP._getaddr(limits, arg) == stock  # type: ignore[arg-type]


def test_the_address_parse_is_still_stocks_but_for_the_per_call_class() -> None:
    """The adapter's parse is aiosmtpd's; if aiosmtpd changes its own, re-copy it."""
    source = inspect.getsource(SMTP._getaddr)
    assert "class AddrSpec(Protocol)" in source
    assert "get_angle_addr(arg)" in source
    assert "get_addr_spec(arg)" in source
    assert "local_part_limit" in source
