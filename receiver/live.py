"""Live notifications: a first open, a click, a reply or a hard bounce reaches open
dashboards in seconds.

The event writer calls :meth:`LiveFeed.publish` with the rows of each
committed batch that may notify someone. The writer process has already
decided what each row is (shared/notable.py: ``row["notable"]``, one query per
batch in the transaction that stored it, the same answer webhooks and mail
get); the feed keeps what a person wants to hear about — the first counted
open per recipient copy and every counted click (verdict ``human`` or
``proxy``; machine opens, scanners and unknown clicks never make a toast) —,
enriches it with the message's subject and sender, and hands it to every
subscribed dashboard tab that may see that sender.

Fan-out: on PostgreSQL every receiver process LISTENs on one channel and
publishing is a ``NOTIFY``, so a hit recorded by one replica reaches tabs
connected to another; the publishing process hears its own NOTIFY like the
others, which keeps delivery in one path. On SQLite (one process) delivery is
in-process. Publishing fails soft: a notification lost is logged, a hit is
never lost because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlmodel import col, select

from shared.db import session_scope
from shared.isotime import moment
from shared.models import Link, Message, Recipient
from shared.notable import CLICK, FIRST_OPEN
from shared.users import may_send_as
from shared.verdicts import COUNTED

log = logging.getLogger(__name__)

CHANNEL = "trackrelay_live"
QUEUE_SIZE = 100
_MAX_TEXT = 300  # NOTIFY payloads are limited to 8000 bytes


class Subscription:
    """One dashboard tab: a queue of notifications it may see."""

    def __init__(self, patterns: list[str] | None) -> None:
        self.patterns = patterns  # None: an administrator, sees everything
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)

    def wants(self, note: Mapping[str, Any]) -> bool:
        return self.patterns is None or may_send_as(self.patterns, str(note.get("sender", "")))

    async def next(self, wait: float) -> dict[str, Any] | bool | None:
        """A notification; ``True`` when nothing came in ``wait`` seconds; None once closed."""
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return True


def _end(sub: Subscription) -> None:
    """Make the tab's stream finish (after what is already queued)."""
    try:
        sub.queue.put_nowait(None)
    except asyncio.QueueFull:  # a stuck tab: drop its oldest note to make room
        sub.queue.get_nowait()
        sub.queue.put_nowait(None)


class LiveFeed:
    """Publish committed events; subscribe dashboard tabs. Start/stop in the lifespan."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.on_postgresql = engine.url.get_backend_name() == "postgresql"
        self._subscriptions: set[Subscription] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._closed = False

    # --- lifespan ---

    async def start(self, ready_timeout: float = 5.0) -> None:
        """On PostgreSQL, start listening (waits until LISTEN is in place)."""
        if not self.on_postgresql or self._listener is not None:
            return
        self._listening = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(), name="live-feed-listener")
        try:
            await asyncio.wait_for(self._listening.wait(), ready_timeout)
        except TimeoutError:
            log.warning("live notifications: not listening yet; will keep trying")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        self.close_streams()

    def close_streams(self) -> None:
        """End every tab's stream now, and any opened later (the server is stopping).

        The HTTP server waits for open responses before it stops: without this an
        open dashboard tab holds shutdown until its grace period runs out and the
        stream is cancelled with a traceback. Browsers reconnect by themselves.
        """
        self._closed = True
        for sub in list(self._subscriptions):
            _end(sub)
        self._subscriptions.clear()

    # --- subscribing ---

    def subscribe(self, patterns: list[str] | None) -> Subscription:
        sub = Subscription(patterns)
        if self._closed:
            _end(sub)
        else:
            self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    # --- publishing ---

    async def publish(self, events: list[dict[str, Any]]) -> None:
        """The event writer's ``on_written`` hook: events already committed and marked."""
        if not any(map(worth_a_toast, events)):
            return
        try:
            notes = await asyncio.to_thread(notifications, self.engine, events)
            if notes and self.on_postgresql:
                await asyncio.to_thread(self._notify, notes)
            else:
                for note in notes:
                    self._deliver(note)
        except Exception:
            log.exception("live notifications: could not publish %d events", len(events))

    def _notify(self, notes: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            for note in notes:
                conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": CHANNEL, "payload": json.dumps(note)},
                )

    def _deliver(self, note: dict[str, Any]) -> None:
        for sub in list(self._subscriptions):
            if sub.wants(note):
                try:
                    sub.queue.put_nowait(note)
                except asyncio.QueueFull:
                    log.warning("live notifications: a slow tab missed one")

    async def _listen(self) -> None:
        url = self.engine.url.set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = 0.5
                    async for notify in conn.notifies():
                        try:
                            self._deliver(json.loads(notify.payload))
                        except ValueError:
                            log.warning("live notifications: bad payload ignored")
            except psycopg.Error as exc:
                log.warning("live notifications: listener lost (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


def worth_a_toast(event: Mapping[str, Any]) -> bool:
    """A first counted open or a counted click (the writer marked ``notable``); a reply
    or a hard bounce (the intake's writer, relay/answerstore.py, publishes those)."""
    notable = event.get("notable")
    if notable == "reply" or (notable == "bounce" and event.get("bounce_type") == "hard"):
        return True
    return notable in (FIRST_OPEN, CLICK) and event.get("verdict") in COUNTED


def notifications(engine: Engine, events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What is worth telling a person about, from a committed batch of marked events."""
    counted = sorted(
        filter(worth_a_toast, events), key=lambda e: moment(e.get("occurred_at"), strict=False)
    )
    if not counted:
        return []
    ids = {int(e["message_id"]) for e in counted}
    with session_scope(engine) as session:
        messages = {
            m.id: m for m in session.exec(select(Message).where(col(Message.id).in_(ids))).all()
        }
        recipients = {
            (r.message_id, r.position): r.address
            for r in session.exec(select(Recipient).where(col(Recipient.message_id).in_(ids)))
        }
        links = {
            (link.message_id, link.position): link.url
            for link in session.exec(select(Link).where(col(Link.message_id).in_(ids)))
        }
    notes: list[dict[str, Any]] = []
    for event in counted:
        message_id = int(event["message_id"])
        position = int(event.get("recipient_position") or 0)
        message = messages.get(message_id)
        url = links.get((message_id, int(event.get("link_position") or 0)), "")
        notes.append(
            {
                "kind": event["kind"],
                "message_id": str(message_id),  # 63-bit: beyond a JS number
                "subject": (message.subject if message else "")[:_MAX_TEXT],
                "sender": message.sender if message else "",
                "recipient": recipients.get((message_id, position), ""),
                "url": url[:_MAX_TEXT] if event["kind"] == "click" else "",
                "at": moment(event.get("occurred_at"), strict=False).isoformat(),
            }
        )
    return notes
