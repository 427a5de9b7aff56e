"""The only place the relay touches aiosmtplib below its public ``SMTP`` API.

The relay writes DATA content itself (relay/datawriter.py says why: no
regex pass, no copies, flow control), straight to aiosmtplib's protocol
object. That object is not part of aiosmtplib's exported API
(``aiosmtplib.protocol.SMTPProtocol`` is not in ``aiosmtplib.__all__``), and
waiting for its write buffer to drain needs its private ``_drain_helper``
(the stdlib's FlowControlMixin, copied into aiosmtplib). What is relied on:

* ``SMTP.protocol`` is the connection's ``SMTPProtocol`` (None when closed);
* ``SMTPProtocol.write(bytes)`` writes to the transport, raising
  ``SMTPServerDisconnected`` once it is closing;
* ``SMTPProtocol.read_response(timeout=...)`` awaits the next reply; one
  must be awaited before the reply arrives, since aiosmtplib drops what
  comes while no reply is pending;
* ``_drain_helper()`` returns at once unless writing is paused, then waits
  for ``resume_writing``, and raises ``ConnectionResetError`` once the
  connection is lost.

Verified on aiosmtplib :data:`VERIFIED` (pinned in pyproject.toml);
tests/test_aiosmtplib_adapter.py checks each of these and fails on any other
version until someone has re-read this file against it.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

VERIFIED = "5.1.3"  # the aiosmtplib release this adapter was read against


class RawData:
    """Writing to an aiosmtplib connection below its command layer."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.protocol: SMTPProtocol = protocol

    def expect_reply(self, timeout: float) -> asyncio.Future[SMTPResponse]:
        """Start waiting for the next reply now (see the module docstring)."""
        return asyncio.ensure_future(self.protocol.read_response(timeout=timeout))

    def write(self, data: bytes) -> None:
        self.protocol.write(data)

    async def drained(self, reply: asyncio.Future[SMTPResponse]) -> bool:
        """Wait until the transport's buffer is below its high-water mark again;
        False if ``reply`` came first (an early refusal, the connection lost, or
        the reply timeout)."""
        protocol = self.protocol
        transport = cast(asyncio.WriteTransport | None, protocol.transport)  # uvloop's: no subclass
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            return True
        drain = asyncio.ensure_future(protocol._drain_helper())
        waiting: list[asyncio.Future[Any]] = [drain, reply]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
        if drain.done() and not drain.cancelled() and drain.exception() is not None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        return not reply.done()
