"""Helpers for relay tests: settings pointing at the recording upstream, a relay
running in the test's event loop, and aiosmtplib clients for its listeners.

Fixtures (registered through ``pytest_plugins`` in tests/conftest.py):
``db_engine`` (a migrated SQLite file) and ``processes`` (``trackrelay relay``
processes killed, with their worker children, when the test ends)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import Engine

from relay.prepared import Prepared, Submission
from relay.record import Delivery, Recorder
from relay.server import RelayServer
from relay.track import Tracker
from shared import db
from shared.config import Settings
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

CLIENTS = Path(__file__).parents[1] / "data" / "clients"  # copies of ../shared/clients
MESSAGE = CLIENTS / "message.eml"  # carries "X-Track: open, click" as its first line
MakeSettings = Callable[..., Settings]  # the make_settings fixture of tests/conftest.py
SIMPLE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Message-ID: <1@example.com>\r\n\r\nHello Bob.\r\n.dot line\r\n..two dots\r\n"
)


class RecordingTracker(Tracker):
    """The real Tracker that also keeps what each client submitted, byte for byte,
    so a test can compare the delivered copies with what the client sent."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        super().__init__(settings, engine)
        self.submitted: list[bytes] = []

    async def prepare(self, submission: Submission) -> Prepared:
        self.submitted.append(submission.data)
        return await super().prepare(submission)


def relay_settings(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "upstream": upstream.url,
        "upstream_verify_tls": False,
        "smtp_port": 0,
        "smtps_port": 0,
        "tls_cert": upstream.cert,
        "tls_key": upstream.key,
        "upstream_timeout": 10,
    }
    values.update(overrides)
    return make_settings(**values)


def trusted_settings(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, **overrides: Any
) -> Settings:
    """relay_settings with a plain listener for 127.0.0.1, the relay logging in to the
    upstream with its own account."""
    return relay_settings(
        make_settings,
        upstream,
        plain_port=0,
        trusted_networks="127.0.0.1/32",
        upstream_user=USER,
        upstream_password=PASSWORD,
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, engine: Engine, tracker: Tracker | None = None
) -> AsyncIterator[RelayServer]:
    server = RelayServer(settings, engine, tracker=tracker)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=5)


@contextlib.asynccontextmanager
async def running_recorder(recorder: Recorder) -> AsyncIterator[Recorder]:
    """The Recorder's writer started, and stopped on the way out (what is queued is
    written), as the relay runs it."""
    await recorder.start()
    try:
        yield recorder
    finally:
        await recorder.stop()


def record_one(recorder: Recorder, prepared: Prepared, delivery: Delivery) -> None:
    """Start the writer, record one relayed message, stop: in an event loop of its own."""

    async def scenario() -> None:
        async with running_recorder(recorder):
            await recorder.record(prepared, delivery)

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def signed_in(
    settings: Settings,
    engine: Engine,
    listener: str = "smtp",
    *,
    tracker: Tracker | None = None,
    user: str = USER,
    password: str = PASSWORD,
) -> AsyncIterator[aiosmtplib.SMTP]:
    """A relay started on SETTINGS and a client of one LISTENER, past EHLO and AUTH PLAIN."""
    async with running_relay(settings, engine, tracker) as relay, client(relay, listener) as smtp:
        await smtp.ehlo()
        await smtp.auth_plain(user, password)
        yield smtp


def relay_one(
    settings: Settings,
    engine: Engine,
    message: bytes = SIMPLE,
    *,
    tracker: Tracker | None = None,
    **options: Any,
) -> str:
    """Start a relay on SETTINGS, send MESSAGE through it (``send``'s OPTIONS), stop:
    in an event loop of its own; the DATA reply's text."""

    async def scenario() -> str:
        async with running_relay(settings, engine, tracker) as relay:
            return (await send(relay, message, **options)).message

    return asyncio.run(scenario())


def client(relay: RelayServer, listener: str = "smtp", **options: Any) -> aiosmtplib.SMTP:
    """An aiosmtplib client for a listener: STARTTLS on smtp, TLS on smtps."""
    tls = {"smtp": {"start_tls": True}, "smtps": {"use_tls": True}, "plain": {"start_tls": False}}
    values = {"validate_certs": False, "timeout": 20, **tls[listener], **options}
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports[listener], **values)


async def send(
    relay: RelayServer,
    message: bytes = SIMPLE,
    *,
    sender: str = USER,
    recipients: tuple[str, ...] = ("bob@example.net",),
    listener: str = "smtp",
    mechanism: str = "PLAIN",
    user: str = USER,
    password: str = PASSWORD,
) -> aiosmtplib.SMTPResponse:
    """Log in with ONE mechanism and send one message; returns the DATA reply."""
    async with client(relay, listener) as smtp:
        await smtp.ehlo()
        if mechanism == "PLAIN":
            await smtp.auth_plain(user, password)
        elif mechanism == "LOGIN":
            await smtp.auth_login(user, password)
        _, reply = await smtp.sendmail(sender, list(recipients), message)
        return aiosmtplib.SMTPResponse(250, reply)


def sqlite_engine(directory: Path) -> Engine:
    url = f"sqlite:///{directory / 'relay.db'}"
    db.upgrade(url)
    return db.make_engine(url)


@pytest.fixture
def db_engine(tmp_path: Path) -> Engine:
    """SQLite only, for tests where the relay's transport is the subject, not the
    database (``engine`` from tests/conftest.py runs on PostgreSQL too)."""
    return sqlite_engine(tmp_path)


class RawClient:
    """A byte-level SMTP client, for what aiosmtplib would normalise or refuse to send.

    Use it as ``async with await RawClient.connect(...) as raw:``: it is closed
    whatever happens, also when the server vanished (a transport left open is
    reported by the garbage collector in some later test).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting = ""

    @classmethod
    async def connect(cls, port: int, **options: Any) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, **options)
        raw = cls(reader, writer)
        raw.greeting = await raw.reply()
        return raw

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await self.reader.readline()).decode()
            if not line:
                raise ConnectionError("closed: " + "".join(lines))
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    async def command(self, line: bytes) -> str:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (ConnectionError, ssl.SSLError):
            pass  # the server is gone: closed all the same
        except TimeoutError:  # a TLS shutdown the vanished peer never answers
            self.writer.transport.abort()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class RelayProcess:
    """``trackrelay relay`` (or another ``command``) as users run it, ports read from its banner."""

    def __init__(
        self, tmp_path: Path, command: str = "relay", log: Path | None = None, **env: str
    ) -> None:
        values = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
        values.update(
            TRACKRELAY_VAR_DIR=str(tmp_path / "var"),
            TRACKRELAY_SMTP_PORT="0",
            TRACKRELAY_SMTPS_PORT="0",
            TRACKRELAY_SECRET_KEY="cli-test-secret-0123456789abcdef",
            TRACKRELAY_PUBLIC_URL="https://t.example.test",
        )
        values.update(env)
        with open(log or os.devnull, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trackrelay", command],
                env=values,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.process.stdout is not None
        self.banner = []
        for line in self.process.stdout:
            self.banner.append(line)
            if line.startswith("Stop with"):
                break
        text = "".join(self.banner)
        match = re.search(r"port (\d+) with STARTTLS, or port (\d+) with SSL/TLS", text)
        assert match, text
        self.smtp, self.smtps = int(match[1]), int(match[2])
        plain = re.search(r"plain SMTP without AUTH on port (\d+)", text)
        self.plain = int(plain[1]) if plain else 0
        http = re.search(r"^\s+receiver: (http://\S+?)/?\s", text, re.M)
        self.http = http[1] if http else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(20)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def children(pid: int) -> list[int]:
    """The pids of a process's children (from /proc): a relay's workers."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    """Append each RelayProcess the test starts: at the end each is SIGKILLed,
    its worker children first."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        for pid in children(relay.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        relay.stop(signal.SIGKILL)
