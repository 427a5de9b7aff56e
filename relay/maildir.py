"""The dev-mode upstream: delivered copies become files in a Maildir.

With no real upstream (``TRACKRELAY_UPSTREAM=maildir:PATH``) the relay still
runs the whole road, tracking and recording included, and a developer reads
what would have gone out. It answers like an SMTP upstream (a
:class:`relay.upstream.Connection`), so nothing else in the relay knows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path

from relay.headers import Segment
from shared.smtpclient import Capabilities, Reply

log = logging.getLogger(__name__)

_sequence = count(1)


class MaildirSink:
    """Dev-mode upstream: each delivered copy becomes a file in a Maildir.

    Like a local MTA, each recipient gets its own file starting with
    ``Return-Path:`` and ``Delivered-To:`` lines; files are written in ``tmp``
    and renamed into ``new`` so a reader never sees half a message. The sink
    has no accounts (dev mode checks AUTH against local users instead).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.capabilities = Capabilities(smtputf8=True)
        self._sender: str | None = None
        self._recipients: list[str] = []

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply:
        return Reply(535, "5.7.8 The Maildir sink has no accounts")

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        self._sender, self._recipients = sender, []
        return Reply(250, "2.1.0 Ok")

    async def rcpt(self, recipient: str) -> Reply:
        if self._sender is None:
            return Reply(503, "5.5.1 Error: need MAIL command")
        self._recipients.append(recipient)
        return Reply(250, "2.1.5 Ok")

    async def data(self, content: Sequence[Segment]) -> Reply:
        sender, recipients = self._sender, self._recipients
        self._sender, self._recipients = None, []
        if sender is None or not recipients:
            return Reply(503, "5.5.1 Error: need RCPT command")
        try:
            names = await asyncio.to_thread(self._write, sender, recipients, content)
        except OSError as exc:
            log.error("cannot write to the Maildir %s: %s", self.path, exc)
            return Reply(451, "4.3.0 Cannot write to the Maildir sink")
        return Reply(250, f"2.0.0 Ok: delivered to {self.path} as {names[0]}")

    def _write(self, sender: str, recipients: list[str], content: Sequence[Segment]) -> list[str]:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        names = []
        for recipient in recipients:
            name = (
                f"{time.time_ns()}.P{os.getpid()}Q{next(_sequence)}"
                f"R{os.urandom(4).hex()}.{socket.gethostname()}"
            )
            head = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
            tmp = self.path / "tmp" / name
            with tmp.open("wb") as handle:
                handle.write(head)
                handle.writelines(content)
            tmp.rename(self.path / "new" / name)
            names.append(name)
        return names

    async def rset(self) -> None:
        self._sender, self._recipients = None, []

    async def close(self) -> None:
        return None
