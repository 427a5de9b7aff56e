"""The messages list, one message's story, the CSV exports and the live stream.

These pages only present: what they show comes from the read model
(receiver/readmodel/), the same answers the JSON API gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
from collections.abc import AsyncIterator, Generator, Iterable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from receiver import readmodel
from receiver.dashboard import decision
from receiver.dashboard.devices import device_family
from receiver.dashboard.filters import STATES, TRACKING, Filters
from receiver.dashboard.web import engine_of, not_found, page, render
from receiver.live import LiveFeed
from shared.identity import Viewer
from shared.isotime import iso

PER_PAGE = 50
KEEPALIVE = 15.0


@page()
async def messages_list(request: Request, viewer: Viewer) -> Response:
    filters, notes = Filters.parse(request.query_params)
    cursor = None
    if filters.cursor:
        try:
            cursor = readmodel.Cursor.decode(filters.cursor)
        except readmodel.BadCursor:
            notes.append("That page link is not one this dashboard made; showing the newest.")
    engine = engine_of(request)
    found = await asyncio.to_thread(
        readmodel.messages_page, engine, viewer, filters.selection(), PER_PAGE, cursor
    )
    senders = await asyncio.to_thread(readmodel.senders, engine, viewer)
    return render(
        request,
        "dashboard/messages.html",
        {
            "rows": found.rows,
            "total": found.total,
            "found": found,
            "filters": filters,
            "notes": notes,
            "senders": senders,
            "tracking_choices": TRACKING,
            "state_choices": STATES,
            "nav": "messages",
        },
    )


@page()
async def message_detail(request: Request, viewer: Viewer) -> Response:
    message_id = int(request.path_params["message_id"])
    before = None
    notes = []
    if raw := request.query_params.get("before", ""):
        try:
            before = readmodel.Cursor.decode(raw)
        except readmodel.BadCursor:
            notes.append("That link is not one this dashboard made; showing the latest events.")
    detail = await asyncio.to_thread(
        readmodel.message_detail, engine_of(request), viewer, message_id, before
    )
    if detail is None:
        return not_found(request)
    context = {
        "d": detail,
        "panel": decision.panel(detail.decision),
        "notes": notes,
        "device": device_family,
        "nav": "messages",
    }
    return render(request, "dashboard/message.html", context)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: A formula start after a separator: a spreadsheet in a locale that splits on
#: ";" (or one told to split on ",", tab) would make a cell of what follows.
_FORMULA_AFTER_SEPARATOR = re.compile(r"[;,\t|]\s*[=+\-@]")
#: Either, in one search.
_FORMULA = re.compile(
    "^[" + re.escape("".join(_FORMULA_START)) + "]|" + _FORMULA_AFTER_SEPARATOR.pattern
)


def _cell(value: object) -> str:
    """A CSV cell that a spreadsheet will not run as a formula, in any locale.

    Every cell is also quoted (``csv.QUOTE_ALL`` in :func:`_csv_lines`), so a
    reader splitting on ";" keeps ``a;=1+1`` one cell; the leading ``'`` makes
    it text where it would otherwise start a formula.
    """
    if value is None:
        return ""
    if type(value) is int:  # counts and ids: nothing to check (a third of the cells)
        return str(value)
    text = str(value)
    return "'" + text if _FORMULA.search(text) else text


def _csv_lines(header: list[str], rows: Iterable[Sequence[object]]) -> Generator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
        if buffer.tell() > 32_768:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


async def _in_thread(lines: Generator[str]) -> AsyncIterator[str]:
    """Drive a blocking generator (database reads) without blocking the loop."""
    done = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, lines, done)
            if chunk is done:
                return
            yield str(chunk)
    finally:  # a client gone mid-way: close the query (its connection) now
        with contextlib.suppress(ValueError):  # unless a read is still running
            lines.close()


def _csv_response(lines: Generator[str], name: str) -> Response:
    return StreamingResponse(
        _in_thread(lines),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )


@page()
async def messages_csv(request: Request, viewer: Viewer) -> Response:
    filters, _ = Filters.parse(request.query_params)
    rows = readmodel.export_messages(engine_of(request), viewer, filters.selection())
    return _csv_response(
        _csv_lines(list(readmodel.messages.EXPORT_COLUMNS), map(_message_cells, rows)),
        "messages.csv",
    )


def _message_cells(row: tuple[Any, ...]) -> list[object]:
    mid, sent, sender, subject, recipients, opens, clicks, *hits, status = row[:15]
    o_count, o_first, o_last, c_count, c_first, c_last, machine = hits
    replies, first_reply, auto, bounces, bounce_type, complaints = row[15:]
    return [
        str(mid), iso(sent, zulu=False), sender, subject, recipients,
        "yes" if opens else "no", "yes" if clicks else "no",
        o_count, iso(o_first, zulu=False), iso(o_last, zulu=False),
        c_count, iso(c_first, zulu=False), iso(c_last, zulu=False), machine, status,
        replies, iso(first_reply, zulu=False), auto, bounces, bounce_type, complaints,
    ]  # fmt: skip


@page()
async def events_csv(request: Request, viewer: Viewer) -> Response:
    filters, _ = Filters.parse(request.query_params)
    rows = (
        [str(r[0]), r[1], r[2], r[3], iso(r[4], zulu=False), *r[5:]]
        for r in readmodel.export_events(engine_of(request), viewer, filters.selection())
    )
    return _csv_response(_csv_lines(list(readmodel.events.EXPORT_COLUMNS), rows), "events.csv")


@page()
async def live(request: Request, viewer: Viewer) -> Response:
    """Server-sent events: first opens and clicks on mail this viewer may see."""
    feed: LiveFeed = request.app.state.live_feed
    sub = feed.subscribe(None if viewer.is_admin else list(viewer.addresses))

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 3000\n: connected\n\n"
            while True:
                note = await sub.next(KEEPALIVE)
                if note is None:
                    return
                if note is True:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: hit\ndata: {json.dumps(note)}\n\n"
        finally:
            feed.unsubscribe(sub)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
