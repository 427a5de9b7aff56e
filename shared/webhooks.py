"""Deliver the outbox: signed webhooks and the sender's notification mail.

Rows are written by shared/outbox.py in the same transaction as what they
announce. :class:`OutboxWorker` claims due rows, delivers them, and records
every attempt in the delivery log. Guarantees:

* **Nothing lost**: a row leaves ``pending``/``delivering`` only as
  ``delivered`` (a 2xx reply, or the mail server's 250) or ``failed`` (the
  retry period is over, or a permanent error).
* **At-least-once, no duplicate on a clean restart**: a claim is a lease
  (``locked_until``). ``stop()`` lets deliveries in flight finish, so a
  restart sends nothing twice; if a worker dies mid-delivery, its lease runs
  out and another worker sends the row again with the same idempotency key
  (in the body's ``id`` and the ``Idempotency-Key`` header) for the receiving
  side to drop.
* **Several workers**: on PostgreSQL claims use ``FOR UPDATE SKIP LOCKED``;
  on SQLite the claim's ``UPDATE`` re-checks the status, so one process with
  several tasks is safe too.
* Retries back off exponentially (``webhook_retry_base`` doubled per attempt,
  at most ``webhook_retry_max_interval``) with jitter, until
  ``webhook_retry_period`` after the row was created. A ``Retry-After`` on a
  429 or 503 reply (seconds or an HTTP date) is honoured when it asks for
  longer than the backoff would wait.
* ``410 Gone`` pauses the endpoint: the endpoint said it does not exist any
  more, so hammering it for three days helps nobody. Its rows (this one
  included) wait, as for any paused endpoint, until someone resumes it.

Signature: ``X-Trackrelay-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" with the endpoint's secret>``; :func:`verify_signature` is what a
receiving side runs (the README shows the same with the stdlib alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlmodel import col
from sqlmodel import select as model_select

from shared import mailnotify
from shared.config import Settings
from shared.db import session_scope
from shared.models import DeliveryAttempt, OutboxItem, WebhookEndpoint, utcnow
from shared.outbox import EVENT_TYPES, WEBHOOK_TEST, enqueue_for_events, payload
from shared.users import UserError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Trackrelay-Signature"
USER_AGENT = "trackrelay-webhooks/1"
TOLERANCE = 300  # seconds: a signature older than this is a replay


class WebhookError(UserError):
    """A webhook operation that cannot be done; the message is for people."""


class PermanentError(Exception):
    """A delivery that retrying cannot fix (marks the row failed at once)."""


# --- signatures ---


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for ``body`` at ``timestamp`` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance: int = TOLERANCE, now: float | None = None
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` less than ``tolerance`` s ago."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        t = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


# --- endpoints (CLI and dashboard) ---


def check_event_types(event_types: list[str]) -> str:
    names = [n.strip() for n in event_types if n.strip()] or ["*"]
    unknown = [n for n in names if n != "*" and n not in EVENT_TYPES]
    if unknown:
        raise WebhookError(
            f"unknown event type {unknown[0]!r}; choose from {', '.join(EVENT_TYPES)} or *",
            "event_types",
        )
    return ",".join(dict.fromkeys(names))


def check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(
            f"{url.strip()!r} is not a web address: it starts with https:// (or http://) "
            "and names a host",
            "url",
        )
    return url.strip()


def add_endpoint(
    engine: Engine,
    url: str,
    event_types: list[str] | None = None,
    *,
    secret: str | None = None,
    description: str = "",
) -> WebhookEndpoint:
    """Register an endpoint; its secret is generated unless given (show it once)."""
    endpoint = WebhookEndpoint(
        url=check_url(url),
        event_types=check_event_types(event_types or []),
        secret=secret or "whsec_" + secrets.token_urlsafe(32),
        description=description,
    )
    with session_scope(engine) as session:
        session.add(endpoint)
    log.info("webhook endpoint %s added: %s (%s)", endpoint.id, endpoint.url, endpoint.event_types)
    return endpoint


def list_endpoints(engine: Engine) -> list[WebhookEndpoint]:
    with session_scope(engine) as session:
        return list(
            session.exec(model_select(WebhookEndpoint).order_by(col(WebhookEndpoint.id))).all()
        )


def get_endpoint(engine: Engine, endpoint_id: int) -> WebhookEndpoint:
    with session_scope(engine) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise WebhookError(f"no webhook endpoint {endpoint_id}")
    return endpoint


def remove_endpoint(engine: Engine, endpoint_id: int) -> None:
    """Delete an endpoint with its undelivered rows and delivery log."""
    with session_scope(engine) as session:
        conn = session.connection()
        if session.get(WebhookEndpoint, endpoint_id) is None:
            raise WebhookError(f"no webhook endpoint {endpoint_id}")
        ids = select(col(OutboxItem.id)).where(col(OutboxItem.endpoint_id) == endpoint_id)
        conn.execute(delete(DeliveryAttempt).where(col(DeliveryAttempt.outbox_id).in_(ids)))
        conn.execute(delete(OutboxItem).where(col(OutboxItem.endpoint_id) == endpoint_id))
        conn.execute(delete(WebhookEndpoint).where(col(WebhookEndpoint.id) == endpoint_id))
    log.info("webhook endpoint %s removed", endpoint_id)


def set_active(engine: Engine, endpoint_id: int, active: bool) -> None:
    """Pause (no new rows, queued rows wait) or resume an endpoint."""
    with session_scope(engine) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        if endpoint is None:
            raise WebhookError(f"no webhook endpoint {endpoint_id}")
        endpoint.active = active
        session.add(endpoint)


@dataclass(frozen=True)
class LoggedAttempt:
    """One line of the delivery log, for the dashboard and the CLI."""

    outbox_id: int
    channel: str
    target: str
    event_type: str
    idempotency_key: str
    attempt: int
    started_at: datetime
    status: str
    reply_code: int | None
    latency_ms: int
    error: str
    row_status: str


def delivery_log(
    engine: Engine, endpoint_id: int | None = None, limit: int = 50
) -> list[LoggedAttempt]:
    """The newest attempts first (optionally of one endpoint)."""
    statement = (
        select(
            col(DeliveryAttempt.outbox_id),
            col(OutboxItem.channel),
            col(OutboxItem.target),
            col(OutboxItem.event_type),
            col(OutboxItem.idempotency_key),
            col(DeliveryAttempt.attempt),
            col(DeliveryAttempt.started_at),
            col(DeliveryAttempt.status),
            col(DeliveryAttempt.reply_code),
            col(DeliveryAttempt.latency_ms),
            col(DeliveryAttempt.error),
            col(OutboxItem.status).label("row_status"),
        )
        .join(OutboxItem, col(OutboxItem.id) == col(DeliveryAttempt.outbox_id))
        .order_by(col(DeliveryAttempt.id).desc())
        .limit(limit)
    )
    if endpoint_id is not None:
        statement = statement.where(col(OutboxItem.endpoint_id) == endpoint_id)
    with session_scope(engine) as session:
        rows = session.connection().execute(statement).all()
    return [LoggedAttempt(**row._mapping) for row in rows]


async def send_test(settings: Settings, engine: Engine, endpoint_id: int) -> tuple[int, int]:
    """POST a signed ``webhook.test`` event now; return (status code, latency ms).

    Not queued: the operator wants the answer at once. Raises httpx errors.
    """
    endpoint = await asyncio.to_thread(get_endpoint, engine, endpoint_id)
    key = f"{WEBHOOK_TEST}:{secrets.token_hex(8)}"
    data = {"endpoint": {"id": endpoint.id, "url": endpoint.url}}
    body = payload(WEBHOOK_TEST, key, data, utcnow()).encode()
    async with httpx.AsyncClient(timeout=settings.webhook_timeout) as client:
        started = time.monotonic()
        reply = await client.post(
            endpoint.url, content=body, headers=_headers(endpoint.secret, WEBHOOK_TEST, key, body)
        )
    return reply.status_code, int((time.monotonic() - started) * 1000)


def _headers(secret: str, event_type: str, key: str, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Trackrelay-Event": event_type,
        "Idempotency-Key": key,
        SIGNATURE_HEADER: sign(secret, body),
    }


# --- the worker ---


@dataclass(frozen=True)
class Claim:
    """A row this worker holds until ``locked_until``."""

    id: int
    channel: str
    target: str
    event_type: str
    idempotency_key: str
    payload: str
    attempts: int
    created_at: datetime
    url: str | None
    secret: str | None


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reply_code: int | None
    latency_ms: int
    error: str = ""
    permanent: bool = False
    retry_after: float | None = None  # seconds the endpoint asked us to wait
    gone: bool = False  # 410: pause the endpoint, keep the row


class OutboxWorker:
    """Delivers due outbox rows until stopped; start it in a lifespan.

    ``lease`` is how long a claim lasts before another worker may take the
    row; it must exceed the delivery timeout (default: timeout + 60 s).
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        batch_size: int = 20,
        lease: float | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.batch_size = batch_size
        self.lease = lease if lease is not None else settings.webhook_timeout + 60.0
        self._client = client
        self._own_client = client is None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.webhook_timeout, follow_redirects=False
            )
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="outbox-worker")

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming; let deliveries in flight finish (up to ``grace`` s)."""
        self._stop.set()
        if self._task is not None and not self._task.done():
            wait = self.settings.webhook_timeout + 5.0 if grace is None else grace
            try:
                await asyncio.wait_for(asyncio.shield(self._task), wait)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._task = None
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = await self.run_once()
            except Exception:
                log.exception("outbox worker: a round failed; retrying")
                done = 0
            if not done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.webhook_poll_interval)

    async def run_once(self) -> int:
        """Claim due rows and deliver them concurrently; return how many."""
        claims = await asyncio.to_thread(claim_due, self.engine, self.batch_size, self.lease)
        if claims:
            await asyncio.gather(*(self._deliver(claim) for claim in claims))
        return len(claims)

    async def _deliver(self, claim: Claim) -> None:
        started = utcnow()
        outcome = await self._attempt(claim)
        await asyncio.to_thread(record_outcome, self.engine, self.settings, claim, started, outcome)

    async def _attempt(self, claim: Claim) -> Outcome:
        clock = time.monotonic()
        try:
            if claim.channel == "email":
                code = await mailnotify.send(
                    self.settings, claim.target, claim.event_type, claim.payload
                )
                return Outcome(True, code, _ms(clock))
            return await self._post(claim, clock)
        except (PermanentError, mailnotify.NotConfigured) as exc:
            return Outcome(False, None, _ms(clock), str(exc), permanent=True)
        except mailnotify.MailRefused as exc:
            return Outcome(False, exc.code, _ms(clock), str(exc), permanent=exc.code >= 500)
        except (httpx.HTTPError, OSError, mailnotify.MailError) as exc:
            return Outcome(False, None, _ms(clock), f"{type(exc).__name__}: {exc}"[:500])

    async def _post(self, claim: Claim, clock: float) -> Outcome:
        if claim.url is None or claim.secret is None:
            raise PermanentError("the endpoint was removed")
        assert self._client is not None, "start() the worker first"
        body = claim.payload.encode()
        reply = await self._client.post(
            claim.url,
            content=body,
            headers=_headers(claim.secret, claim.event_type, claim.idempotency_key, body),
        )
        code = reply.status_code
        ok = 200 <= code < 300
        error = "" if ok else f"HTTP {code}: {reply.text[:200]}"
        wait = retry_after(reply.headers.get("retry-after")) if code in (429, 503) else None
        return Outcome(ok, code, _ms(clock), error, retry_after=wait, gone=code == 410)


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP date is always GMT; without a zone it is not one
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _ms(clock: float) -> int:
    return int((time.monotonic() - clock) * 1000)


def claim_due(engine: Engine, limit: int, lease: float) -> list[Claim]:
    """Take up to ``limit`` due rows (pending and due, or with an expired lease)."""
    now = utcnow()
    active = select(col(WebhookEndpoint.id)).where(col(WebhookEndpoint.active).is_(True))
    due = and_(
        or_(
            and_(col(OutboxItem.status) == "pending", col(OutboxItem.next_attempt_at) <= now),
            and_(col(OutboxItem.status) == "delivering", col(OutboxItem.locked_until) <= now),
        ),
        # a paused endpoint keeps its queue until it is resumed
        or_(col(OutboxItem.endpoint_id).is_(None), col(OutboxItem.endpoint_id).in_(active)),
    )
    # One statement, so the claim is atomic on SQLite as well; PostgreSQL
    # skips rows another worker is claiming at the same moment.
    due_ids = (
        select(col(OutboxItem.id))
        .where(due)
        .order_by(col(OutboxItem.next_attempt_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    with session_scope(engine) as session:
        conn = session.connection()
        got = list(
            conn.execute(
                update(OutboxItem)
                .where(col(OutboxItem.id).in_(due_ids))
                .values(
                    status="delivering",
                    locked_until=now + timedelta(seconds=lease),
                    attempts=col(OutboxItem.attempts) + 1,
                )
                .returning(col(OutboxItem.id))
            ).scalars()
        )
        if not got:
            return []
        rows = conn.execute(
            select(
                col(OutboxItem.id),
                col(OutboxItem.channel),
                col(OutboxItem.target),
                col(OutboxItem.event_type),
                col(OutboxItem.idempotency_key),
                col(OutboxItem.payload),
                col(OutboxItem.attempts),
                col(OutboxItem.created_at),
                col(WebhookEndpoint.url),
                col(WebhookEndpoint.secret),
            )
            .outerjoin(WebhookEndpoint, col(WebhookEndpoint.id) == col(OutboxItem.endpoint_id))
            .where(col(OutboxItem.id).in_(got))
            .order_by(col(OutboxItem.id))
        ).all()
    return [Claim(**row._mapping) for row in rows]


def retry_delay(settings: Settings, attempts: int) -> float:
    """Exponential backoff with jitter: base * 2**(n-1), capped, times 0.5-1.0."""
    delay = min(
        settings.webhook_retry_max_interval, settings.webhook_retry_base * 2 ** (attempts - 1)
    )
    return delay * random.uniform(0.5, 1.0)


def record_outcome(
    engine: Engine, settings: Settings, claim: Claim, started: datetime, outcome: Outcome
) -> None:
    """Log the attempt and move the row on, unless another worker took it over."""
    now = utcnow()
    values: dict[str, Any] = {"locked_until": None, "last_error": outcome.error}
    paused = False
    if outcome.ok:
        values.update(status="delivered", delivered_at=now)
    elif outcome.gone and claim.channel == "webhook" and claim.url is not None:
        # The row waits with the paused endpoint; resuming sends it at once.
        values.update(status="pending", next_attempt_at=now)
        paused = True
    else:
        delay = retry_delay(settings, claim.attempts)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        next_at = now + timedelta(seconds=delay)
        deadline = claim.created_at + timedelta(seconds=settings.webhook_retry_period)
        if outcome.permanent or next_at > deadline:
            values.update(status="failed")
        else:
            values.update(status="pending", next_attempt_at=next_at)
    with session_scope(engine) as session:
        conn = session.connection()
        conn.execute(
            insert(DeliveryAttempt).values(
                outbox_id=claim.id,
                attempt=claim.attempts,
                started_at=started,
                status="ok" if outcome.ok else "error",
                reply_code=outcome.reply_code,
                latency_ms=outcome.latency_ms,
                error=outcome.error,
            )
        )
        moved = conn.execute(
            update(OutboxItem)
            .where(
                col(OutboxItem.id) == claim.id,
                col(OutboxItem.status) == "delivering",
                col(OutboxItem.attempts) == claim.attempts,
            )
            .values(**values)
        ).rowcount
        if paused:
            conn.execute(
                update(WebhookEndpoint)
                .where(col(WebhookEndpoint.id) == int(claim.target))
                .values(active=False)
            )
    level = logging.INFO if outcome.ok else logging.WARNING
    log.log(
        level,
        "%s %s to %s attempt %d: %s%s",
        claim.channel,
        claim.idempotency_key,
        claim.url or claim.target,
        claim.attempts,
        values.get("status"),
        f" ({outcome.error})" if outcome.error else "",
    )
    if not moved:
        log.warning("outbox row %d was taken over by another worker (lease expired)", claim.id)
    if paused:
        log.warning(
            "webhook endpoint %s (%s) answered 410 Gone: paused, its queue waits; "
            "resume it in the dashboard or with `trackrelay webhook resume %s`",
            claim.target,
            claim.url,
            claim.target,
        )


def events_hook(
    settings: Settings, engine: Engine
) -> Callable[[list[dict[str, Any]]], Awaitable[None]]:
    """The receiver batch writer's ``on_written`` hook: queue notifications.

    It runs after the events committed, in its own transaction; a crash in
    between loses those notifications (never the events). Calling
    :func:`shared.outbox.enqueue_for_events` inside the writer's transaction
    instead closes that gap.
    """
    notify_email = bool(settings.notify_from)

    def work(events: list[dict[str, Any]]) -> None:
        with session_scope(engine) as session:
            enqueue_for_events(session, events, notify_email=notify_email)

    async def on_written(events: list[dict[str, Any]]) -> None:
        try:
            await asyncio.to_thread(work, events)
        except Exception:
            log.exception("could not queue notifications for %d events", len(events))

    return on_written


async def outbox_loop(settings: Settings, engine: Engine, stop_event: asyncio.Event) -> None:
    """Run a worker until ``stop_event`` is set (for a lifespan task)."""
    worker = OutboxWorker(settings, engine)
    await worker.start()
    try:
        await stop_event.wait()
    finally:
        await worker.stop()
