"""Times as trackrelay stores them and as ISO 8601 text: read and written once, here.

Every time trackrelay stores is UTC, but SQLite (and the models' plain
``timestamp`` columns on PostgreSQL) hand datetimes back naive, and journals,
IPC and JSON carry them as text. So a naive datetime is read as UTC, never as
the machine's local time (:func:`aware`), and text is ISO 8601 as Python
writes it, ``Z`` accepted for ``+00:00`` (:func:`parse`; Python 3.11's
``fromisoformat`` reads both).

Written out, a time is RFC 3339 in UTC (:func:`iso`): ``…Z`` in the JSON API
and webhook payloads, ``…+00:00`` in the dashboard's CSV exports and
``<time datetime>`` attributes, which have always been spelled so
(``zulu=False``; the exports keep their shape).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: datetime | None) -> datetime | None:
    """``value`` with its zone; a naive datetime is UTC (what was stored)."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse(value: str) -> datetime:
    """ISO 8601 text as an aware datetime (no zone: UTC); ValueError if it is not one."""
    return aware(datetime.fromisoformat(value))


def moment(value: datetime | str | None, *, strict: bool = True) -> datetime:
    """A time given as a datetime, as ISO text or not at all (None: now), made aware.

    ``strict=False`` is for what only reports a time (a live note): text that
    does not read, or a value of another type, is now instead of an error.
    """
    if isinstance(value, datetime):
        return aware(value)
    if value is None:
        return datetime.now(UTC)
    try:
        if not isinstance(value, str):
            raise TypeError(f"not a datetime: {value!r}")
        return parse(value)
    except (TypeError, ValueError):
        if strict:
            raise
        return datetime.now(UTC)


@overload
def iso(value: datetime | str, *, zulu: bool = True) -> str: ...
@overload
def iso(value: None, *, zulu: bool = True) -> None: ...
def iso(value: datetime | str | None, *, zulu: bool = True) -> str | None:
    """``2026-12-03T09:24:20Z`` (``zulu=False``: ``…+00:00``); text is taken as written."""
    if value is None or isinstance(value, str):
        return value
    text = aware(value).astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z") if zulu else text
