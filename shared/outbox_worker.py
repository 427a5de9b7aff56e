"""Deliver the outbox: signed webhooks and the sender's notification mail.

Rows are written by shared/outbox.py in the same transaction as what they
announce. :class:`OutboxWorker` (one per receiver process, started in
receiver/app.py's lifespan) claims due rows, delivers them, and records every
attempt in the delivery log. Guarantees:

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

Webhook requests are signed by shared/webhook_signature.py; mail goes through
shared/mailnotify.py. The endpoints themselves and the delivery log that
operators read are shared/webhooks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, and_, insert, or_, select, update
from sqlmodel import col

from shared import mailnotify, safehttp
from shared.config import Settings
from shared.db import session_scope
from shared.models import DeliveryAttempt, OutboxItem, WebhookEndpoint, utcnow
from shared.webhook_signature import headers

log = logging.getLogger(__name__)


class PermanentError(Exception):
    """A delivery that retrying cannot fix (marks the row failed at once)."""


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
            self._client = safehttp.client(self.settings)
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
            headers=headers(claim.secret, claim.event_type, claim.idempotency_key, body),
        )
        code = reply.status_code
        ok = 200 <= code < 300
        error = "" if ok else f"HTTP {code}: {safehttp.excerpt(reply.text)}"
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
    delay: float = min(
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
