"""compose.yaml's topology without Docker: two relays and two receivers on ONE PostgreSQL.

A message goes through relay A, its pixel is loaded through receiver B, and a
dashboard user watching receiver A's live stream sees the open: the event
crossed processes through the database (PostgreSQL LISTEN/NOTIFY). Another
message goes through relay B, its click through receiver A.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import httpx
import pytest
from sqlalchemy import Engine, text

from shared import db
from shared.users import add_user
from tests.support.dashboardkit import csrf_from
from tests.support.receiverkit import start_receiver, wait_for
from tests.support.relaykit import SIMPLE, RelayProcess
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

SECRET = "scale-out-secret-0123456789abcdef"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"
TRACKED = SIMPLE.replace(b"Subject: hello\r\n", b"Subject: scale-out\r\nX-Track: all\r\n").replace(
    b"\r\n\r\nHello Bob.\r\n",
    b'\r\nContent-Type: text/html\r\n\r\n<html><body><a href="https://example.com/x">x</a>'
    b"</body></html>\r\n",
)


@pytest.fixture
def cluster(
    database_url: str, upstream: RecordingUpstream, tmp_path: Path
) -> Iterator[tuple[list[RelayProcess], list[str]]]:
    engine = db.make_engine(database_url)
    add_user(engine, "ops", "ops-password-123", role="admin")
    engine.dispose()
    common = {
        "TRACKRELAY_DATABASE_URL": database_url,
        "TRACKRELAY_SECRET_KEY": SECRET,
        "TRACKRELAY_PUBLIC_URL": "https://track.example",
        "TRACKRELAY_EVENT_FLUSH_INTERVAL": "0.05",
    }
    relays: list[RelayProcess] = []
    receivers: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for name in ("a", "b"):
            relays.append(
                RelayProcess(
                    tmp_path / f"relay-{name}",
                    TRACKRELAY_UPSTREAM=upstream.url,
                    TRACKRELAY_UPSTREAM_VERIFY_TLS="false",
                    TRACKRELAY_TLS_CERT=str(upstream.cert),
                    TRACKRELAY_TLS_KEY=str(upstream.key),
                    **common,
                )
            )
            env = {
                **common,
                "TRACKRELAY_VAR_DIR": str(tmp_path / f"receiver-{name}"),
                "TRACKRELAY_HTTP_PORT": "0",
            }
            proc, url = start_receiver(env, tmp_path / f"receiver-{name}.log")
            receivers.append(proc)
            urls.append(url)
        yield relays, urls
    finally:
        for relay in relays:
            relay.stop(signal.SIGKILL)
        for proc in receivers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


def _send_through(relay: RelayProcess) -> None:
    async def run() -> None:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.smtps, use_tls=True, validate_certs=False
        )
        async with smtp:
            await smtp.ehlo()
            await smtp.auth_plain(USER, PASSWORD)
            await smtp.sendmail(USER, ["bob@example.net"], TRACKED)

    asyncio.run(run())


def _login(http: httpx.Client) -> None:
    page = http.get("/dashboard/login")
    data = {"username": "ops", "password": "ops-password-123", "csrf_token": csrf_from(page.text)}
    response = http.post("/dashboard/login", data=data)
    assert response.status_code == 303
    assert response.headers["location"].endswith("/messages")


# LISTEN/NOTIFY is PostgreSQL's; the fixture empties the tables afterwards.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_relays_two_receivers_one_database(
    cluster: tuple[list[RelayProcess], list[str]], upstream: RecordingUpstream, database_url: str
) -> None:
    (relay_a, relay_b), (receiver_a, receiver_b) = cluster
    _send_through(relay_a)
    [delivered] = upstream.wait_for(1)
    pixel = re.search(rb"https://track\.example(/o/[A-Za-z0-9_-]+)", delivered.data)
    assert pixel, delivered.data

    forwarded = {"user-agent": CHROME, "x-forwarded-for": "198.51.100.23"}  # not the sender
    with (
        httpx.Client(base_url=receiver_a, timeout=15) as watcher,
        httpx.Client(base_url=receiver_b, headers=forwarded) as reader,
    ):
        _login(watcher)
        with watcher.stream("GET", "/dashboard/live") as stream:
            lines = stream.iter_lines()
            assert next(lines) == "retry: 3000"
            assert reader.get(pixel[1].decode()).status_code == 200  # through receiver B
            data = next(line for line in lines if line.startswith("data: "))
        note = json.loads(data.removeprefix("data: "))
        assert note["kind"] == "open"
        assert note["subject"] == "scale-out"

        _send_through(relay_b)
        second = upstream.wait_for(2)[1]
        click = re.search(rb"https://track\.example(/c/[A-Za-z0-9_-]+)", second.data)
        assert click, second.data
        response = httpx.get(receiver_a + click[1].decode(), headers=forwarded)
        assert (response.status_code, response.headers["location"]) == (
            302,
            "https://example.com/x",
        )

    engine = db.make_engine(database_url)
    try:
        wait_for(lambda: _count(engine, "events") == 2)
        assert _count(engine, "messages") == 2
    finally:
        engine.dispose()


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
