"""Webhook signatures: what the receiving side checks, and the request headers.

``X-Trackrelay-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>"
with the endpoint's secret>``. The time is signed with the body so a captured
delivery cannot be replayed after ``TOLERANCE`` seconds; several ``v1=`` values
may be sent (a receiving side accepts any), which leaves room to rotate a
secret. :func:`verify_signature` is what a receiving side runs (the README
shows the same with the stdlib alone, and a test executes that snippet).
Both the queued deliveries (shared/outbox_worker.py) and the operator's test
ping (shared/webhooks.py ``send_test``) send :func:`headers`.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Trackrelay-Signature"
USER_AGENT = "trackrelay-webhooks/1"
TOLERANCE = 300  # seconds: a signature older than this is a replay


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for ``body`` at ``timestamp`` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, t, body)}"


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
    expected = _mac(secret, t, body)
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def headers(secret: str, event_type: str, key: str, body: bytes) -> dict[str, str]:
    """The request headers of one delivery of ``body``, signed now."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Trackrelay-Event": event_type,
        "Idempotency-Key": key,
        SIGNATURE_HEADER: sign(secret, body),
    }
