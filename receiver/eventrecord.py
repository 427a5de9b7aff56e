"""One hit as data: what a request hands over, its unique key, its journal record.

Shared by the three places a hit passes through: the request (receiver/tracking.py
calls :func:`new_event`; a tuple, because building it costs a tenth of a dict),
the receiver's queue (receiver/events.py numbers each batch with
:data:`event_keys`) and the writer process (receiver/eventstore.py gives each
event its key with :func:`keyed`, and journals it as :func:`to_record`).

Every event's key is fixed before its first write attempt, so a batch written
twice is absorbed by the unique constraint (receiver/events.py says when that
happens).
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import secrets
import time
from typing import Any

MAX_USER_AGENT = 1024
#: The receiver's journal files: ``events-<pid>-<n>-<random>.jsonl`` (shared/journal.py).
JOURNAL_PREFIX = "events"

#: What a request hands to the writer: (occurred_at, kind, message_id,
#: recipient_position, link_position, ip, user_agent, method, purpose,
#: dashboard_user). A tuple: building it costs a tenth of a dict.
RawEvent = tuple[float, str, int, int, int, str, str, str, str, bool]
#: A stored event as a dictionary of the events table's columns (those that may notify).
Row = dict[str, Any]
#: A raw event with its unique ``event_key`` in front: what is written, journaled, replayed.
KeyedEvent = tuple[str, float, str, int, int, int, str, str, str, str, bool]
#: The journal's field names for a KeyedEvent, in its order (the journal holds JSON objects).
RECORD_FIELDS = (
    "event_key",
    "occurred_at",
    "kind",
    "message_id",
    "recipient_position",
    "link_position",
    "ip",
    "user_agent",
    "method",
    "purpose",
    "dashboard_user",
)


def new_event(
    kind: str,
    message_id: int,
    recipient: int,
    link: int,
    ip: str,
    user_agent: str,
    method: str,
    purpose: str = "",
    dashboard_user: bool = False,
) -> RawEvent:
    """A raw event as the request saw it; the writer keys and classifies it."""
    return (
        time.time(),
        kind,
        message_id,
        recipient,
        link,
        ip,
        user_agent[:MAX_USER_AGENT],
        method,
        purpose,
        dashboard_user,
    )


def keyed(prefix: str, first: int, events: list[RawEvent]) -> list[KeyedEvent]:
    """``events`` with their keys: ``prefix`` + the 16 hex digits of first, first+1, ..."""
    template = prefix + "%016x"  # %-formatting: a third cheaper than an f-string
    numbered = zip(events, itertools.count(first), strict=False)
    return [(template % n,) + event for event, n in numbered]  # noqa: RUF005 - faster than *


class _EventKeys:
    """Unique event keys without a syscall per hit.

    ``os.urandom`` costs ~100 us on some VMs — more than the rest of a pixel
    request. A key is a random 64-bit per-process prefix and a counter: unique
    within a process, and across processes and restarts with overwhelming odds.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a worker never reuses a prefix

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = 0

    def reserve(self, count: int) -> tuple[str, int]:
        """Numbers for ``count`` events: (prefix, first); key ``i`` is prefix + %016x of first+i."""
        first, self._next = self._next, self._next + count
        return self._prefix, first

    def assign(self, events: list[RawEvent]) -> list[KeyedEvent]:
        prefix, first = self.reserve(len(events))
        return keyed(prefix, first, events)


#: This process's key numbers (a new prefix after a fork: each worker has its own).
event_keys = _EventKeys()


def to_record(event: KeyedEvent) -> dict[str, Any]:
    """A keyed event as the journal stores it (a JSON object, as always)."""
    return dict(zip(RECORD_FIELDS, event, strict=True))


def from_record(record: dict[str, Any]) -> KeyedEvent:
    """A journal record back as a keyed event; KeyError/TypeError/ValueError if malformed."""
    return (
        str(record["event_key"]),
        float(record["occurred_at"]),
        str(record["kind"]),
        int(record["message_id"]),
        int(record["recipient_position"]),
        int(record["link_position"]),
        str(record["ip"]),
        str(record["user_agent"]),
        str(record["method"]),
        str(record.get("purpose", "")),
        bool(record.get("dashboard_user")),
    )


@functools.lru_cache(maxsize=65536)
def truncate_ip(ip: str, full: bool = False) -> str:
    """``203.0.113.0/24`` / ``2001:db8:1::/48`` by default; the address when ``full``."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if full:
        return str(address)
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
