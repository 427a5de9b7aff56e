"""The whole loop as a user runs it: ``trackrelay serve`` in a real process.

A user is added with the CLI, swaks sends a tracked message (text + HTML +
PDF) to two recipients, the per-recipient copies are read from the dev
Maildir sink, every pixel is loaded and one rewritten link followed over
real HTTP, and the database (SQLite and PostgreSQL) ends with exactly the
opens and the click those requests made, attributed to the right recipient
and link. SIGTERM then stops the process cleanly.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from shared import db
from shared.config import Settings
from shared.models import Event, Link, Message, Recipient
from shared.tokens import Signer
from tests.support.relaykit import CLIENTS

SECRET = "serve-test-secret-0123456789abcdef"
USER, PASSWORD = "alice", "loop password 1"
RECIPIENTS = ["ann@example.net", "bob@example.org"]
TRACKED = (
    b"From: dev@example.com\r\nTo: ann@example.net\r\nSubject: port\r\nX-Track: opens\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>hi</body></html>\r\n"
)
CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)


def free_port() -> int:
    """A port for the receiver: the public URL must name it before the process starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``python -m trackrelay`` with a private var dir and database."""

    def __init__(self, tmp_path: Path, database_url: str, *, http_port: int | None = None) -> None:
        self.var = tmp_path / "var"
        self.http_port = free_port() if http_port is None else http_port
        self.public_url = f"http://127.0.0.1:{self.http_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
        self.env.update(
            TRACKRELAY_VAR_DIR=str(self.var),
            TRACKRELAY_DATABASE_URL=database_url,
            TRACKRELAY_SECRET_KEY=SECRET,
            TRACKRELAY_SMTP_PORT="0",
            TRACKRELAY_SMTPS_PORT="0",
            TRACKRELAY_HTTP_PORT=str(self.http_port),
        )
        if self.http_port:
            self.env["TRACKRELAY_PUBLIC_URL"] = self.public_url
        self.stderr_path = tmp_path / "stderr.log"
        self.process: subprocess.Popen[str] | None = None
        self.banner: list[str] = []

    def cli(self, *args: str, stdin: str = "") -> str:
        done = subprocess.run(
            [sys.executable, "-m", "trackrelay", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self) -> None:
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trackrelay", "serve"],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.banner.append(line)
            if line.startswith("Stop with"):
                break
        text = "".join(self.banner)
        match = re.search(r"port (\d+) with STARTTLS", text)
        assert match, text + self.stderr
        self.smtp_port = int(match[1])

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(30)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """A process the test did not stop (it failed first) is killed."""
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL)


@pytest.fixture
def serve(tmp_path: Path, database_url: str) -> Iterator[ServeProcess]:
    with ServeProcess(tmp_path, database_url) as process:
        yield process


def html_of(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "utf-8")
    raise AssertionError("no text/html part")


def wait_for(probe: Callable[[], object], timeout: float = 15.0) -> object:
    """Poll ``probe`` until it returns something truthy (a deadline, not a duration)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


@pytest.mark.clients
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_send_open_click_loop(
    serve: ServeProcess, database_url: str, make_settings: Callable[..., Settings]
) -> None:
    serve.cli("user", "add", USER, "--password-stdin", "--address", "@example.com", stdin=PASSWORD)
    serve.start()
    # What a new user needs from the banner: where to point the client, as whom,
    # where the mail lands and where the dashboard is.
    banner = "".join(serve.banner)
    dev_password = (serve.var / "dev_password").read_text().strip()
    assert f"user: dev  password: {dev_password}" in banner, banner
    assert f"{serve.var / 'outbox' / 'new'}" in banner, banner
    assert f"dashboard: {serve.public_url}/dashboard/  (sign in as dev" in banner, banner

    swaks = subprocess.run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(serve.smtp_port), "--tls",
            "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", "alice@example.com", "--to", ",".join(RECIPIENTS),
            "--header", "Subject: the loop", "--add-header", "X-Track: opens, clicks",
            "--attach-type", "text/plain", "--attach-body", f"@{CLIENTS / 'body.txt'}",
            "--attach-type", "text/html", "--attach-body", f"@{CLIENTS / 'body.html'}",
            "--attach-type", "application/pdf", "--attach", f"@{CLIENTS / 'report.pdf'}",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr

    # One copy per recipient in the Maildir sink, each with its own tokens.
    signer = Signer(make_settings(secret_key=SECRET).signing_keys())
    copies: dict[str, str] = {}
    for path in sorted((serve.var / "outbox" / "new").iterdir()):
        data = path.read_bytes()
        assert b"X-Track" not in data
        delivered_to = re.search(rb"^Delivered-To: (\S+)\r\n", data, re.M)
        assert delivered_to
        copies[delivered_to[1].decode()] = html_of(data)
    assert sorted(copies) == RECIPIENTS
    base = re.escape(serve.public_url)
    pixels, links = {}, {}
    for position, address in enumerate(RECIPIENTS, start=1):
        html = copies[address]
        [pixel] = re.findall(base + r"/o/([\w-]+)\.gif", html)
        clicks = re.findall(base + r"/c/([\w-]+)", html)
        opened = signer.verify_open(pixel)
        assert opened.recipient == position
        assert {signer.verify_click(t).recipient for t in clicks} == {position}
        pixels[address] = f"{serve.public_url}/o/{pixel}.gif"
        links[address] = [f"{serve.public_url}/c/{t}" for t in clicks]
        message_id = opened.message_id

    # The recipients' mail clients load the pixels; Bob clicks the second link.
    with httpx.Client(headers={"User-Agent": CHROME}, follow_redirects=False) as http:
        for address in RECIPIENTS:
            response = http.get(pixels[address])
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/gif"
        response = http.get(links["bob@example.org"][1])
    assert response.status_code == 302
    assert response.headers["location"] == "https://example.org/docs"
    metrics = httpx.get(f"{serve.public_url}/metrics").text
    assert "\ntrackrelay_relay_messages_tracked_total 1\n" in metrics, metrics
    assert "\ntrackrelay_relay_messages_injection_failures_total 0\n" in metrics, metrics

    engine = db.make_engine(database_url)
    try:
        rows = wait_for(lambda: _events(engine) if len(_events(engine)) >= 3 else None)
        assert rows, f"events not written in time: {_events(engine)}\n{serve.stderr}"
        assert sorted(rows) == [
            ("click", message_id, 2, 2),
            ("open", message_id, 1, 0),
            ("open", message_id, 2, 0),
        ]
        with engine.connect() as conn:
            recipients = conn.execute(
                select(Recipient.position, Recipient.address, Recipient.tracked)  # type: ignore[call-overload]
                .where(Recipient.message_id == message_id)
                .order_by(Recipient.position)
            ).all()
            link_urls = dict(
                conn.execute(
                    select(Link.position, Link.url).where(Link.message_id == message_id)  # type: ignore[call-overload]
                ).all()
            )
            subject = conn.execute(
                select(Message.subject).where(Message.id == message_id)  # type: ignore[call-overload]
            ).scalar_one()
            # The hits came from the IP that submitted the message: the sender's own.
            verdicts = set(conn.execute(select(Event.verdict)).scalars())  # type: ignore[call-overload]
    finally:
        engine.dispose()
    assert [tuple(r) for r in recipients] == [(1, RECIPIENTS[0], True), (2, RECIPIENTS[1], True)]
    assert link_urls == {
        1: "https://example.com/report?id=42&utm_source=mail",
        2: "https://example.org/docs",
    }
    assert subject == "the loop"
    assert verdicts == {"self"}
    assert "sender's own (verdict 'self')" in "".join(serve.banner)

    assert serve.stop() == 0
    assert "Traceback" not in serve.stderr, serve.stderr


def _events(engine: Engine) -> list[tuple[str, int, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Event.kind, Event.message_id, Event.recipient_position, Event.link_position)  # type: ignore[call-overload]
        ).all()
    return [tuple(r) for r in rows]


def test_http_port_0_links_point_at_the_port_really_bound(
    tmp_path: Path, database_url: str, make_settings: Callable[..., Settings]
) -> None:
    """Without a public URL the links use http://HOST:HTTP_PORT; with port 0 that
    must be the port the receiver got, not ``:0``."""
    serve = ServeProcess(tmp_path, database_url, http_port=0)
    serve.start()
    try:
        match = re.search(
            r"links in mail point at: http://127\.0\.0\.1:(\d+)\n", "".join(serve.banner)
        )
        assert match, serve.banner
        assert match[1] != "0", serve.banner
        base = f"http://127.0.0.1:{match[1]}"
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        password = (serve.var / "dev_password").read_text().strip()
        with smtplib.SMTP("127.0.0.1", serve.smtp_port, timeout=30) as smtp:
            smtp.starttls(context=ssl._create_unverified_context())
            smtp.login("dev", password)
            smtp.sendmail("dev@example.com", ["ann@example.net"], TRACKED)
        [path] = (serve.var / "outbox" / "new").iterdir()
        pixel = re.search(r'src="([^"]+/o/[^"]+)"', path.read_text())
        assert pixel, path.read_text()
        assert pixel[1].startswith(base + "/o/"), path.read_text()
        assert httpx.get(pixel[1]).status_code == 200
    finally:
        assert serve.stop() == 0
    assert "Traceback" not in serve.stderr, serve.stderr


def test_sigterm_with_a_dashboard_tab_open_stops_cleanly(tmp_path: Path, database_url: str) -> None:
    """An open dashboard keeps a live-notification stream (SSE); stopping must end
    it, not leave uvicorn to cancel it with a traceback after its grace period."""
    serve = ServeProcess(tmp_path, database_url)
    serve.start()
    password = (serve.var / "dev_password").read_text().strip()
    opened = threading.Event()
    with httpx.Client(base_url=serve.public_url, timeout=30) as tab:
        login = tab.get("/dashboard/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login)
        assert csrf
        signed_in = tab.post(
            "/dashboard/login",
            data={"username": "dev", "password": password, "csrf_token": csrf[1]},
        )
        assert signed_in.status_code == 303

        def listen() -> None:
            with tab.stream("GET", "/dashboard/live") as stream:
                assert stream.status_code == 200
                for _ in stream.iter_text():
                    opened.set()

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert opened.wait(30)
        assert serve.stop() == 0
        listener.join(30)
    assert "Traceback" not in serve.stderr, serve.stderr
    assert "ERROR" not in serve.stderr, serve.stderr
