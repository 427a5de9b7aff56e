"""The only place the relay touches aiosmtpd's private parts.

aiosmtpd's public API has no hook for what a relay in front of a real server
needs (see relay/smtp.py for why each is needed): wrapping every command,
suspending and resetting the idle timeout, calling a handler hook, ending a
transaction, writing without awaiting the drain, reading the DATA stream
itself, admitting a client before its commands run, a session class of our
own. Reaching for those private names from the relay's protocol would tie
every line of it to one aiosmtpd release; here they sit behind public names,
so an upgrade has one file to re-verify.

Verified on aiosmtpd :data:`VERIFIED` (pinned in pyproject.toml);
tests/test_aiosmtpd_adapter.py checks that every name relied on exists with
the expected signature and behaves as used here, and fails on any other
version until someone has re-read this file against it.

What :class:`AdaptedSMTP` changes in aiosmtpd itself, no more:

* the MAIL/RCPT address parse (``_getaddr``) is the same parse without the
  ``typing.Protocol`` class the stock method defines on every call (~2 % of
  the relay's CPU on small messages), and answers (None, None), so 553 5.1.3,
  where the stdlib parser crashes (``MAIL FROM:"``) and aiosmtpd answered a
  500 naming the Python exception;
* the idle timeout can be suspended (:meth:`AdaptedSMTP.suspend_timeout`):
  while suspended, aiosmtpd's own per-command resets do nothing;
* when the idle (or greeting) timeout fires, aiosmtpd's ``_timeout_cb`` closes
  the transport without a word; here it calls :meth:`AdaptedSMTP.timed_out`,
  which subclasses override to say why first (aiosmtpd's close by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import SMTP, Session

VERIFIED = "1.4.6"  # the aiosmtpd release this adapter was read against

Command = Callable[[str], Awaitable[None]]


class AdaptedSession(Session):
    """aiosmtpd's Session, without the deprecation WARNING aiosmtpd logs each
    time it sets ``login_data`` (on every AUTH)."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back in front of what ``reader`` holds (asyncio has no
    public way; aiosmtpd clears that very buffer at STARTTLS)."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]


class AdaptedSMTP(SMTP):
    """aiosmtpd's SMTP protocol with its private parts under public names.

    Subclasses override :meth:`new_session` and :meth:`serve_client` (aiosmtpd
    calls ``_create_session`` and ``_handle_client``) and use the rest.
    """

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.timeout_suspended = False

    # --- what aiosmtpd calls ---

    def new_session(self) -> Session:
        """The session for a new connection (and for each STARTTLS)."""
        return AdaptedSession(self.loop)

    def _create_session(self) -> Session:
        return self.new_session()

    async def serve_client(self) -> None:
        """The connection's task: aiosmtpd's command loop."""
        await SMTP._handle_client(self)

    async def _handle_client(self) -> None:
        await self.serve_client()

    def _reset_timeout(self, duration: float | None = None) -> None:
        if not self.timeout_suspended:
            SMTP._reset_timeout(self, duration)

    def _timeout_cb(self) -> None:
        self.timed_out()

    def timed_out(self) -> None:
        """The idle timeout fired (the loop's callback): aiosmtpd closes the transport."""
        SMTP._timeout_cb(self)  # type: ignore[no-untyped-call,unused-ignore]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of a MAIL/RCPT address (see the module docstring)."""
        if not arg:
            return "", ""
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                addr = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                addr = spec.addr_spec
        except (HeaderParseError, IndexError):  # the stdlib parser fails so on '"'
            return None, None
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    # --- what subclasses use ---

    def wrap_commands(self, wrap: Callable[[str, Command], Command]) -> None:
        """Replace each SMTP command (``"MAIL"``, ``"DATA"``...) by ``wrap(name, command)``."""
        self._smtp_methods = {
            name: wrap(name, method) for name, method in self._smtp_methods.items()
        }

    def reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timeout, or one of ``duration`` seconds (unless suspended);
        aiosmtpd's next reset, at the next valid command, is the idle timeout again."""
        self._reset_timeout(duration)

    def suspend_timeout(self) -> None:
        """No idle timeout until :meth:`resume_timeout`."""
        self.timeout_suspended = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_timeout(self) -> None:
        self.timeout_suspended = False
        self._reset_timeout()

    async def call_hook(self, command: str, *args: Any) -> Any:
        """The handler's ``handle_<command>`` result, or ``MISSING``."""
        return await self._call_handler_hook(command, *args)

    def end_transaction(self) -> None:
        """A fresh envelope, as after DATA."""
        self._set_post_data_state()  # type: ignore[no-untyped-call,unused-ignore]

    @property
    def reader(self) -> asyncio.StreamReader:
        """The client's stream (DATA is read from it directly)."""
        reader: asyncio.StreamReader = self._reader
        return reader

    def write_now(self, data: bytes) -> None:
        """Queue ``data`` to the client without waiting for it to drain."""
        self._writer.write(data)
