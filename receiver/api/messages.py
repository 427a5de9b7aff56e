"""Messages and events as JSON: the read model's answers in the API's shapes.

Nothing here queries the database: the read model (receiver/readmodel/) does,
with the same scope, filters and counting rule as the dashboard. This module
turns query parameters into a :class:`~receiver.readmodel.Selection` and rows
into the JSON that receiver/openapi.py documents. Message ids are 63-bit and
are strings in JSON, which JavaScript could not hold as numbers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from receiver import readmodel
from receiver.api.endpoint import (
    ApiError,
    bool_param,
    endpoint,
    engine_of,
    id_param,
    int_param,
    iso,
    text_param,
    time_param,
)
from shared.identity import Viewer
from shared.models import Event, Message

MAX_LIMIT = 200
MAX_FOLLOW_UP = 90  # days, as the dashboard's follow-up list


@endpoint()
async def list_messages(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Messages, newest first, filtered like the dashboard."""
    selection = readmodel.Selection(
        tracked=bool_param(request, "tracked"),
        opened=bool_param(request, "opened"),
        clicked=bool_param(request, "clicked"),
        sender=text_param(request, "sender"),
        since=time_param(request, "since"),
        until=time_param(request, "until", end_of_day=True),
        text=text_param(request, "q"),
        replied=bool_param(request, "replied"),
        bounced=bool_param(request, "bounced"),
        follow_up_days=int_param(request, "follow_up_days", 0, 1, MAX_FOLLOW_UP) or None,
    )
    limit = int_param(request, "limit", 50, 1, MAX_LIMIT)
    offset = int_param(request, "offset", 0, 0, 10**9)  # deprecated: use cursor
    cursor = _cursor(request, "cursor")
    if cursor is not None and offset:
        raise ApiError(400, "send cursor or offset, not both")
    page = await asyncio.to_thread(
        readmodel.messages_page, engine_of(request), viewer, selection, limit, cursor, offset
    )
    return {
        "messages": [
            {**_message(row.message), **_hits(row), "recipients": row.recipients}
            for row in page.rows
        ],
        "total": page.total,
        "total_capped": page.capped,
        "limit": limit,
        "offset": offset,
        "next_cursor": page.older,
    }


def _cursor(request: Request, name: str = "cursor") -> readmodel.Cursor | None:
    raw = request.query_params.get(name, "")
    if not raw:
        return None
    try:
        return readmodel.Cursor.decode(raw)
    except readmodel.BadCursor:
        raise ApiError(400, f"{name} must be a cursor this API returned") from None


@endpoint()
async def get_message(request: Request, viewer: Viewer) -> dict[str, Any]:
    """One message with its recipients, links and a page of its events, latest first."""
    message_id = id_param(request, "message_id", "message")
    before = _cursor(request, "events_before")
    d = await asyncio.to_thread(
        readmodel.message_detail, engine_of(request), viewer, message_id, before
    )
    if d is None:
        raise ApiError(404, f"no message {message_id}")
    return {
        **_message(d.row.message),
        **_hits(d.row),
        "recipients": [
            {
                "position": r.position,
                "address": r.address,
                "tracked": r.tracked,
                "status": r.status,
                "reply_code": r.reply_code,
                "reply_text": r.reply_text,
                "first_opened_at": iso(r.opens.first),
                "clicks": r.clicks.count,
                **_answers(r.timeline),
            }
            for r in d.recipients
        ],
        "links": [
            {"position": link.position, "url": link.url, "clicks": link.clicks} for link in d.links
        ],
        "events": [_event(e) for e in d.events],
        "event_count": d.event_count,
        "events_next": d.older,
    }


@endpoint()
async def list_events(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Events with an id above ``after``, oldest first: poll with ``next_after``."""
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 100, 1, 1000)
    rows = await asyncio.to_thread(readmodel.events_after, engine_of(request), viewer, after, limit)
    events = [_event(row.event) for row in rows]
    return {"events": events, "next_after": events[-1]["id"] if events else after}


def _message(m: Message) -> dict[str, Any]:
    return {
        "id": str(m.id),
        "created_at": iso(m.created_at),
        "sender": m.sender,
        "from": m.from_header,
        "subject": m.subject,
        "message_id_header": m.message_id_header,
        "status": m.status,
        "track_opens": m.track_opens,
        "track_clicks": m.track_clicks,
        "per_recipient": m.per_recipient,
        "listener": m.listener,
    }


def _hits(row: readmodel.MessageRow) -> dict[str, Any]:
    return {
        "opens": row.opens.count,
        "clicks": row.clicks.count,
        "first_opened_at": iso(row.opens.first),
        "first_clicked_at": iso(row.clicks.first),
        "replies": row.answers.replies,
        "first_replied_at": iso(row.answers.first_reply),
        "auto_replies": row.answers.auto_replies,
        "bounces": row.answers.bounces,
        "bounce_type": row.answers.bounce_type,
        "complaints": row.answers.complaints,
    }


#: An answer kind -> the recipient's field with the time of the first one.
ANSWERED_AT = {
    "reply": "replied_at",
    "auto_reply": "auto_replied_at",
    "bounce": "bounced_at",
    "complaint": "complained_at",
}


def _answers(timeline: list[readmodel.TimelineEntry]) -> dict[str, Any]:
    """When the recipient first replied, auto-replied, bounced, complained (oldest
    first on the timeline); a hard bounce wins over a soft one."""
    out: dict[str, Any] = dict.fromkeys(ANSWERED_AT.values())
    out["bounce_type"] = ""
    for entry in timeline:
        e = entry.event
        field = ANSWERED_AT.get(e.kind)
        if field is not None and out[field] is None:
            out[field] = iso(e.occurred_at)
        if e.kind == "bounce" and out["bounce_type"] != "hard":
            out["bounce_type"] = e.bounce_type
    return out


def _event(e: Event) -> dict[str, Any]:
    if e.kind == "bounce":
        return {
            **_event_fields(e),
            "bounce_type": e.bounce_type,
            "status": e.status_code,
            "diagnostic": e.diagnostic,
        }
    return _event_fields(e)


def _event_fields(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "message_id": str(e.message_id),
        "kind": e.kind,
        "recipient_position": e.recipient_position,
        "link_position": e.link_position,
        "occurred_at": iso(e.occurred_at),
        "verdict": e.verdict,
        "reasons": [r for r in e.reasons.split(",") if r],
        "ip": e.ip,
        "user_agent": e.user_agent,
    }
