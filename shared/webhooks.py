"""Webhook endpoints as operators manage them, and what was delivered to them.

The CLI (``trackrelay webhook ...``) and the dashboard's integrations pages
call these: register, list, pause/resume and remove endpoints, read the
delivery log, send a signed test ping at once. Queued deliveries are made by
shared/outbox_worker.py from the rows shared/outbox.py writes; signatures are
shared/webhook_signature.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import Engine, delete, func, select
from sqlmodel import col
from sqlmodel import select as model_select

from shared import safehttp
from shared.config import Settings
from shared.db import session_scope
from shared.errors import UserError
from shared.models import DeliveryAttempt, OutboxItem, WebhookEndpoint, utcnow
from shared.outbox import EVENT_TYPES, WEBHOOK_TEST, payload
from shared.webhook_signature import headers

log = logging.getLogger(__name__)


class WebhookError(UserError):
    """A webhook operation that cannot be done; the message is for people."""


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


def queue_by_endpoint(engine: Engine) -> dict[int | None, dict[str, int]]:
    """{endpoint id: {status: rows}} of the outbox (email rows under None)."""
    by_status = select(col(OutboxItem.endpoint_id), col(OutboxItem.status), func.count())
    queue: dict[int | None, dict[str, int]] = {}
    with session_scope(engine) as session:
        rows = session.connection().execute(
            by_status.group_by(col(OutboxItem.endpoint_id), col(OutboxItem.status))
        )
        for endpoint_id, status, n in rows:
            queue.setdefault(endpoint_id, {})[status] = n
    return queue


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
    async with safehttp.client(settings) as client:
        started = time.monotonic()
        reply = await client.post(
            endpoint.url, content=body, headers=headers(endpoint.secret, WEBHOOK_TEST, key, body)
        )
    return reply.status_code, int((time.monotonic() - started) * 1000)
