"""Live notifications: what is worth a toast, in-process and across processes."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine

from receiver.app import create_app
from receiver.live import LiveFeed, notifications
from shared.config import Settings
from shared.notable import mark
from tests.support.dashboardkit import (
    M_CORP,
    M_OPENED,
    M_XSS,
    PASSWORD,
    add_open,
    csrf_from,
    seed,
)
from tests.support.receiverkit import ServerThread, start_receiver


def marked(engine: Engine, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows as the writer process reports them: marked by shared/notable.py."""
    with engine.begin() as conn:
        mark(conn, events)
    return list(events)


def test_first_open_and_clicks_only(engine: Engine) -> None:
    seed(engine)
    # M_OPENED already has a human open from recipient 1: another is not "first"
    again = add_open(engine, M_OPENED, "again")
    assert notifications(engine, marked(engine, again)) == []
    first = add_open(engine, M_XSS, "first")
    second = add_open(engine, M_XSS, "second")
    notes = notifications(engine, marked(engine, first, second))  # one batch, one toast
    assert len(notes) == 1
    note = notes[0]
    assert note["kind"] == "open"
    assert note["message_id"] == str(M_XSS)
    assert note["recipient"] == "dave@client.example"
    assert note["subject"] == "<script>alert(1)</script>"  # escaped by the page, not here
    machine = {**first, "event_key": "m", "verdict": "machine"}
    assert notifications(engine, marked(engine, machine)) == []
    click = {**first, "event_key": "c", "kind": "click", "message_id": M_OPENED, "link_position": 1}
    [clicked] = notifications(engine, marked(engine, click))
    assert clicked["url"] == "https://example.com/pricing?a=1&b=2"
    unknown = {**click, "event_key": "u", "verdict": "unknown"}  # a webhook, not a toast
    assert notifications(engine, marked(engine, unknown)) == []


def _receive(feeds: list[LiveFeed], engine: Engine, event: dict[str, Any]) -> list[Any]:
    """Publish on the first feed; collect what subscribers on the last feed get."""

    async def run() -> list[Any]:
        for feed in feeds:
            await feed.start()
        try:
            admin = feeds[-1].subscribe(None)
            sam = feeds[-1].subscribe(["sam@example.com"])
            dom = feeds[-1].subscribe(["@corp.example"])
            await feeds[0].publish([event])
            got = [await admin.next(10), await dom.next(10)]
            got.append(await sam.next(0.3))  # not sam's message: nothing (True)
            return got
        finally:
            for feed in feeds:
                await feed.stop()

    return asyncio.run(run())


def test_feed_delivers_to_those_who_may_see_it(engine: Engine) -> None:
    seed(engine)
    [event] = marked(engine, add_open(engine, M_CORP, "corp2", recipient=1))
    feeds = [LiveFeed(engine)]
    if feeds[0].on_postgresql:
        # a second receiver process on the same database: LISTEN/NOTIFY carries it
        feeds.append(LiveFeed(engine))
    admin, dom, sam = _receive(feeds, engine, event)
    assert isinstance(admin, dict)
    assert admin["message_id"] == str(M_CORP)
    assert dom == admin
    assert sam is True


def test_publish_fails_soft(engine: Engine) -> None:
    feed = LiveFeed(engine)
    bad = {
        "message_id": "not a number",
        "kind": "open",
        "verdict": "human",
        "notable": "first_open",
    }
    asyncio.run(feed.publish([bad]))  # logged, not raised


def test_server_sent_events_end_to_end(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    """A pixel hit written and published as the event writer would reaches the stream."""
    seed(engine)
    app = create_app(make_settings(), engine)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        page = client.get("/dashboard/login")
        client.post(
            "/dashboard/login",
            data={"username": "sam", "password": PASSWORD, "csrf_token": csrf_from(page.text)},
        )
        with client.stream("GET", "/dashboard/live") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            assert next(lines) == "retry: 3000"
            [event] = marked(engine, add_open(engine, M_XSS, "live-1"))
            started = time.monotonic()
            server.call(app.state.live_feed.publish([event]))
            data = next(line for line in lines if line.startswith("data: "))
            latency = time.monotonic() - started
        note = json.loads(data.removeprefix("data: "))
        assert note["message_id"] == str(M_XSS)
        assert note["kind"] == "open"
        print(f"publish -> SSE latency {latency * 1000:.0f} ms ({engine.url.get_backend_name()})")


def test_a_stopping_worker_ends_open_streams_at_once(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Several uvicorn workers: SIGTERM with a dashboard tab open stops cleanly and quickly.

    uvicorn runs the lifespan shutdown only after open responses end: without
    ending the live streams first, the worker waits out its 5 s grace period
    and then logs the stream's cancellation as a traceback.
    """
    seed(engine)
    env = {
        "TRACKRELAY_VAR_DIR": str(tmp_path / "var"),
        "TRACKRELAY_DATABASE_URL": database_url,
        "TRACKRELAY_SECRET_KEY": "live-test-secret-0123456789abcdef",
        "TRACKRELAY_HTTP_PORT": "0",
        "TRACKRELAY_RECEIVER_WORKERS": "2",
    }
    log = tmp_path / "receiver.log"
    proc, url = start_receiver(env, log)
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            page = client.get("/dashboard/login")
            client.post(
                "/dashboard/login",
                data={"username": "sam", "password": PASSWORD, "csrf_token": csrf_from(page.text)},
            )
            with client.stream("GET", "/dashboard/live") as stream:
                lines = stream.iter_lines()
                assert next(lines) == "retry: 3000"
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = list(lines)  # the server ends the stream
                ended = time.monotonic() - started
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()
    assert "Traceback" not in said, said
    assert "timeout graceful shutdown exceeded" not in said, said
    print(f"stream ended {ended * 1000:.0f} ms after SIGTERM; {len(rest)} more lines")


def test_a_reply_and_a_hard_bounce_make_a_toast_other_answers_do_not() -> None:
    from receiver.live import worth_a_toast

    assert worth_a_toast({"notable": "reply", "verdict": "unknown"})
    assert worth_a_toast({"notable": "bounce", "bounce_type": "hard", "verdict": "unknown"})
    assert not worth_a_toast({"notable": "bounce", "bounce_type": "soft", "verdict": "unknown"})
    assert not worth_a_toast({"notable": "auto_reply", "verdict": "unknown"})
    assert not worth_a_toast({"notable": "complaint", "verdict": "unknown"})
