"""The read model: what the dashboard and the JSON API read, written once.

Both present the same answers (HTML and CSV, or JSON); neither builds its own
queries. The rules every read follows live here and nowhere else:

- visibility: a :class:`shared.identity.Viewer` who is an admin sees every
  message; a sender only mail from their addresses (``scope.visible``);
- selection: tracking, opened / not opened, clicked / not clicked, sender,
  dates and a literal text search (``scope.Selection``, ``scope.selected``);
- counting: opens and clicks are the ``human`` and ``proxy`` ones; ``machine``
  and ``scanner`` opens are counted apart; ``self`` and ``unknown`` are only
  on the timeline (``scope.COUNTED``, ``scope.AUTOMATED``).

Modules: ``scope`` (the WHERE clauses), ``messages`` (lists with hit counts,
paging, senders), ``detail`` (one message's story), ``events`` (the feed after
a cursor), ``activity`` (per sender and day figures for the overview, from the rollup).
Everything is synchronous SQLAlchemy taking an Engine: callers run it with
``asyncio.to_thread``. This is the place to make reads fast (keyset paging,
indexes): callers only see rows and pages.
"""

from __future__ import annotations

from receiver.readmodel.activity import DayFigures, daily
from receiver.readmodel.detail import Detail, LinkView, RecipientView, TimelineEntry, message_detail
from receiver.readmodel.events import EventRow, all_events, events_after
from receiver.readmodel.messages import (
    Hits,
    MessageRow,
    Page,
    all_messages,
    messages_page,
    senders,
)
from receiver.readmodel.scope import (
    AUTOMATED,
    COUNTED,
    Selection,
    aware,
    day_end,
    day_start,
    selected,
    visible,
)

__all__ = [
    "AUTOMATED",
    "COUNTED",
    "DayFigures",
    "Detail",
    "EventRow",
    "Hits",
    "LinkView",
    "MessageRow",
    "Page",
    "RecipientView",
    "Selection",
    "TimelineEntry",
    "all_events",
    "all_messages",
    "aware",
    "daily",
    "day_end",
    "day_start",
    "events_after",
    "message_detail",
    "messages_page",
    "selected",
    "senders",
    "visible",
]
