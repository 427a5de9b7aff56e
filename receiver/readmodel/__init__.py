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

Modules: ``scope`` (the WHERE clauses), ``paging`` (keyset cursors on
created_at and id, capped counts), ``messages`` (lists with hit counts, the
streamed CSV rows, senders), ``detail`` (one message's story and the facts of
its tracking decision), ``events`` (the feed after a cursor), ``activity``
(per sender and day figures for the overview, from the rollup).
Everything is synchronous SQLAlchemy taking an Engine: callers run it with
``asyncio.to_thread``. This is the place to make reads fast (keyset paging,
capped counts, indexes, streamed exports): callers only see rows and pages.
"""

from __future__ import annotations

from receiver.readmodel.activity import DayFigures, daily
from receiver.readmodel.detail import (
    DecisionFacts,
    Detail,
    LinkView,
    Outcome,
    RecipientView,
    TimelineEntry,
    decision_facts,
    message_detail,
)
from receiver.readmodel.events import EventRow, events_after, export_events
from receiver.readmodel.messages import (
    Answers,
    Hits,
    MessageRow,
    Page,
    export_messages,
    messages_page,
    senders,
)
from receiver.readmodel.paging import COUNT_CAP, BadCursor, Cursor
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
    "COUNT_CAP",
    "Answers",
    "BadCursor",
    "Cursor",
    "DayFigures",
    "DecisionFacts",
    "Detail",
    "EventRow",
    "Hits",
    "LinkView",
    "MessageRow",
    "Outcome",
    "Page",
    "RecipientView",
    "Selection",
    "TimelineEntry",
    "aware",
    "daily",
    "day_end",
    "day_start",
    "decision_facts",
    "events_after",
    "export_events",
    "export_messages",
    "message_detail",
    "messages_page",
    "selected",
    "senders",
    "visible",
]
