"""The messages list's filters, read from and written back to the query string.

One object carries them so the list, its pager, its CSV export and the events
export all apply exactly the same selection: :meth:`Filters.selection`, what
the read model (receiver/readmodel/) understands, the same as the API's query
parameters become. Bad values are dropped with a note for the person rather
than answered with an error page; only text no search can mean (a NUL, other
control characters) is a :class:`BadInput`, which the page wrapper answers 400.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from receiver.readmodel import Selection, day_end, day_start

TRACKING = {"": "Any tracking", "on": "Tracking enabled", "off": "Not tracked"}
STATES = {
    "": "Any",
    "opened": "Opened",
    "not_opened": "Not opened",
    "clicked": "Clicked",
    "replied": "Replied",
    "not_replied": "Not replied",
    "bounced": "Bounced",
    "follow_up": "Follow up",
}
MAX_QUERY = 200
FOLLOW_UP_DAYS = 3  # "opened but not replied after N days": N unless the form says
MAX_FOLLOW_UP_DAYS = 90


def _days(raw: str, notes: list[str]) -> int:
    """The follow-up list's N, 1 to 90; anything else is the default, with a note."""
    if not raw.strip():
        return FOLLOW_UP_DAYS
    try:
        days = int(raw)
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_FOLLOW_UP_DAYS:
        notes.append(
            f"Days “{raw.strip()}” is not a whole number from 1 to {MAX_FOLLOW_UP_DAYS};"
            f" showing {FOLLOW_UP_DAYS}."
        )
        return FOLLOW_UP_DAYS
    return days


class BadInput(ValueError):
    """A query parameter no page can take; receiver/dashboard/web.py ``page`` answers 400."""


def text(params: QueryParams, name: str, limit: int) -> str:
    """A text filter, trimmed and cut to ``limit``; control characters are a BadInput."""
    value = params.get(name, "")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadInput(f"The {name} filter cannot contain control characters.")
    return value.strip()[:limit]


@dataclass(frozen=True)
class Filters:
    tracking: str = ""
    state: str = ""
    sender: str = ""
    date_from: date | None = None
    date_to: date | None = None
    q: str = ""
    days: int = FOLLOW_UP_DAYS  # of the follow-up list (state "follow_up")
    cursor: str = ""  # where the page starts (receiver/readmodel/paging.py); "" the newest

    @classmethod
    def parse(cls, params: QueryParams) -> tuple[Filters, list[str]]:
        notes: list[str] = []
        tracking = params.get("tracking", "")
        state = params.get("state", "")
        dates: dict[str, date | None] = {}
        for name, label in (("from", "From"), ("to", "To")):
            raw = params.get(name, "").strip()
            dates[name] = None
            if raw:
                try:
                    dates[name] = date.fromisoformat(raw)
                except ValueError:
                    notes.append(f"{label} date “{raw}” is not a date like 2025-03-31; ignored.")
        if dates["from"] and dates["to"] and dates["from"] > dates["to"]:
            notes.append("The From date is after the To date; nothing can match.")
        return (
            cls(
                tracking=tracking if tracking in TRACKING else "",
                state=state if state in STATES else "",
                sender=text(params, "sender", 320),
                date_from=dates["from"],
                date_to=dates["to"],
                q=text(params, "q", MAX_QUERY),
                days=_days(params.get("days", ""), notes)
                if state == "follow_up"
                else FOLLOW_UP_DAYS,
                cursor=text(params, "cursor", 200),
            ),
            notes,
        )

    def replace(self, **changes: Any) -> Filters:
        return dataclasses.replace(self, **changes)

    def params(self, **changes: Any) -> dict[str, str]:
        """Non-empty filters as query parameters (the first page has no cursor)."""
        f = self.replace(**changes)
        values = {
            "tracking": f.tracking,
            "state": f.state,
            "sender": f.sender,
            "from": f.date_from.isoformat() if f.date_from else "",
            "to": f.date_to.isoformat() if f.date_to else "",
            "q": f.q,
            "days": str(f.days) if f.state == "follow_up" else "",
            "cursor": f.cursor,
        }
        return {k: v for k, v in values.items() if v}

    def query(self, **changes: Any) -> str:
        encoded = urlencode(self.params(**changes))
        return f"?{encoded}" if encoded else ""

    def selection(self) -> Selection:
        """What the read model selects for these filters (``cursor`` is paging, not here)."""
        return Selection(
            tracked={"on": True, "off": False}.get(self.tracking),
            opened={"opened": True, "not_opened": False}.get(self.state),
            clicked=True if self.state == "clicked" else None,
            replied={"replied": True, "not_replied": False}.get(self.state),
            bounced=True if self.state == "bounced" else None,
            follow_up_days=self.days if self.state == "follow_up" else None,
            sender=self.sender,
            since=day_start(self.date_from) if self.date_from else None,
            until=day_end(self.date_to) if self.date_to else None,
            text=self.q,
        )

    @property
    def active(self) -> bool:
        return bool(self.params(cursor=""))
