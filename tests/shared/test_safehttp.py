"""Webhooks reach only public addresses (shared/safehttp.py), checked at connect time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import Engine

from shared import safehttp, webhooks
from shared.config import Settings
from tests.shared.test_webhooks import attempts, fast, queue_events, running_worker, until
from tests.support.seedrows import add_message, event

SECRET_REPLY = "internal-secret \x1b[31m<b>" + "x" * 5000


@contextmanager
def internal_service() -> Iterator[tuple[int, list[str]]]:
    """An 'internal' HTTP service on loopback answering 500 with a long body."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = SECRET_REPLY.encode()
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "172.16.3.4",
        "192.168.1.1",
        "169.254.169.254",
        "fd00:ec2::254",
        "fe80::1",
        "::ffff:127.0.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert safehttp.refused(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert not safehttp.refused(address)


def _deliver_once(settings: Settings, engine: Engine) -> None:
    async def run() -> None:
        async with running_worker(settings, engine):
            await until(lambda: bool(attempts(engine)), "an attempt")

    asyncio.run(run())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_the_worker_never_connects_to_a_loopback_endpoint(
    engine: Engine, make_settings: Callable[..., Settings], host: str
) -> None:
    """'localhost' is refused on its RESOLVED address, as a rebinding name would be."""
    with internal_service() as (port, seen):
        webhooks.add_endpoint(engine, f"http://{host}:{port}/")
        queue_events(engine, [event(add_message(engine))])
        _deliver_once(fast(make_settings, webhook_allow_private=False), engine)
    assert seen == []
    attempt = attempts(engine)[0]
    assert attempt.reply_code is None
    assert "non-public address" in attempt.error
    assert "TRACKRELAY_WEBHOOK_ALLOW_PRIVATE" in attempt.error


def test_allowed_private_delivery_logs_a_short_escaped_excerpt(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    with internal_service() as (port, seen):
        webhooks.add_endpoint(engine, f"http://127.0.0.1:{port}/")
        queue_events(engine, [event(add_message(engine))])
        _deliver_once(fast(make_settings, webhook_allow_private=True), engine)
    assert seen[0] == "/"
    attempt = attempts(engine)[0]
    assert attempt.reply_code == 500
    assert attempt.error.startswith("HTTP 500: internal-secret \\x1b[31m<b>xxx")
    assert "\x1b" not in attempt.error
    assert len(attempt.error) < 120


def test_a_public_name_connects_to_the_address_it_checked(
    monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings]
) -> None:
    """DNS rebinding: the connection goes to the checked address, not a second lookup."""
    checked: list[str] = []
    real = safehttp.public_addresses

    async def resolve_public(host: str, port: int) -> list[str]:
        checked.append(host)
        return ["192.0.2.1"]  # TEST-NET-1, "public" for this test, never answers

    monkeypatch.setattr(safehttp, "public_addresses", resolve_public)
    connected: list[str] = []

    async def fake_connect(self: object, host: str, port: int, *args: object) -> None:
        connected.append(host)
        raise safehttp.httpcore.ConnectError("no route")

    monkeypatch.setattr(safehttp.httpcore.AnyIOBackend, "connect_tcp", fake_connect)

    async def run() -> None:
        async with safehttp.client(make_settings()) as client:
            with pytest.raises(httpx.ConnectError, match="no route"):
                await client.post("http://rebind.example/", content=b"{}")

    asyncio.run(run())
    assert checked == ["rebind.example"]
    assert connected == ["192.0.2.1"]
    assert real is not safehttp.public_addresses
