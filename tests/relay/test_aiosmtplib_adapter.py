"""relay/aiosmtplib_adapter.py: what the relay's DATA writer relies on below
aiosmtplib's public API is still there and behaves as used.

These tests fail loudly on an aiosmtplib upgrade: re-read the adapter against
the new release, then move ``VERIFIED`` and the pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import inspect

import aiosmtplib
import pytest
from aiosmtplib.protocol import FlowControlMixin, SMTPProtocol

from relay.aiosmtplib_adapter import VERIFIED, RawData
from tests.support.paths import pinned


def test_the_installed_aiosmtplib_is_the_verified_one_and_pinned() -> None:
    assert aiosmtplib.__version__ == VERIFIED, (
        f"aiosmtplib {aiosmtplib.__version__} is installed, the adapter was verified on "
        f"{VERIFIED}: re-read relay/aiosmtplib_adapter.py against it"
    )
    assert pinned("aiosmtplib") == VERIFIED


def test_the_names_relied_on_exist_with_their_signatures() -> None:
    assert issubclass(SMTPProtocol, FlowControlMixin)
    assert inspect.iscoroutinefunction(FlowControlMixin._drain_helper)
    assert list(inspect.signature(FlowControlMixin._drain_helper).parameters) == ["self"]
    assert list(inspect.signature(SMTPProtocol.write).parameters) == ["self", "data"]
    assert inspect.iscoroutinefunction(SMTPProtocol.read_response)
    assert list(inspect.signature(SMTPProtocol.read_response).parameters) == ["self", "timeout"]
    assert aiosmtplib.SMTP().protocol is None  # until connected


class _Transport(asyncio.WriteTransport):
    """A transport whose buffer is as full as the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 100)

    def is_closing(self) -> bool:
        return self.closing


def _connected() -> tuple[SMTPProtocol, _Transport, RawData]:
    protocol = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    smtp = aiosmtplib.SMTP()
    smtp.protocol = protocol
    return protocol, transport, RawData(smtp)


def test_drained_waits_while_writing_is_paused_and_not_after() -> None:
    async def go() -> None:
        protocol, transport, raw = _connected()
        reply = raw.expect_reply(10)
        raw.write(b"chunk")
        assert transport.written == [b"chunk"]
        assert await raw.drained(reply)  # below the high-water mark: at once
        transport.buffered = 1000
        protocol.pause_writing()
        waiting = asyncio.ensure_future(raw.drained(reply))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # paused: it waits
        protocol.resume_writing()
        assert await asyncio.wait_for(waiting, 1)
        # the reply, once it comes, is read even though it came mid-upload
        protocol.pause_writing()
        waiting = asyncio.ensure_future(raw.drained(reply))
        await asyncio.sleep(0)
        protocol.data_received(b"554 5.6.0 refused early\r\n")
        assert not await asyncio.wait_for(waiting, 1)
        assert (await reply).code == 554
        protocol.connection_lost(None)

    asyncio.run(go())


def test_a_lost_connection_ends_the_wait_with_disconnected() -> None:
    async def go() -> None:
        protocol, transport, raw = _connected()
        reply = raw.expect_reply(10)
        transport.buffered = 1000
        protocol.pause_writing()
        waiting = asyncio.ensure_future(raw.drained(reply))
        await asyncio.sleep(0)
        protocol.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await asyncio.wait_for(waiting, 1)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await reply
        transport.closing = True
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            raw.write(b"more")

    asyncio.run(go())


def test_a_closed_connection_has_no_raw_data() -> None:
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        RawData(aiosmtplib.SMTP())
