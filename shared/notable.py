"""What is worth telling someone about: decided once per written batch.

Three consumers hear about hits: webhooks and the sender's notification mail
(shared/outbox.py) and the dashboards' live feed (receiver/live.py). They must
agree on what a "first open" is, so they do not each ask the database: the
receiver's writer process calls :func:`mark` (through
:func:`shared.outbox.enqueue_for_events`) in the transaction that inserts the
batch, and every row comes out with ``row["notable"]`` set to one of

* ``first_open``          the earliest human or proxy open of a recipient copy
* ``first_machine_open``  the earliest machine open of a recipient copy (Apple MPP...)
* ``click``               a click judged human, proxy or unknown (every one)
* ``reply``, ``auto_reply``, ``bounce``, ``complaint``  every answer written (the
                          intake writer, relay/answerstore.py, passes only the rows its
                          insert added, so a re-sent copy is never news twice)
* ``None``                nothing to announce (a later open, a scanner, the sender...)

The writer reports the marked rows to the receiver, which hands them to the
live feed: that one answer is all the feed reads.

"Earliest" is the smallest ``(occurred_at, event_key)`` among the stored opens
of that copy (``message_id``, ``recipient_position``) and verdict group, so
exactly one open is first however the hits were batched, replayed or split
between receiver processes. The batch's rows are already inserted when
:func:`mark` runs: it takes the batch's earliest open per copy and asks, in
ONE query for the whole batch, which of them have an earlier stored open
(a ``NOT EXISTS`` probe per candidate on ``ix_events_message_kind``). One
query per batch, not one per open: repeat opens of a popular message are the
common case and cost nothing here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table

from shared.isotime import parse
from shared.models import Event
from shared.verdicts import COUNTED, MACHINE_OPENS, NOTIFIED_CLICKS

FIRST_OPEN = "first_open"
FIRST_MACHINE_OPEN = "first_machine_open"
CLICK = "click"
#: Answer kinds (shared/answers.py): each one written is notable, as itself.
ANSWERS = ("reply", "auto_reply", "bounce", "complaint")

#: SQLite: candidates per query at most (6 variables each).
SQLITE_CANDIDATES_PER_QUERY = 500

Row = MutableMapping[str, Any]
EVENTS: Table = Event.__table__  # type: ignore[attr-defined]


def may_notify(kind: str, verdict: str) -> bool:
    """Whether an event of this kind and verdict can be notable at all.

    A cheap filter: the receiver's writer builds dictionaries only for these
    and :func:`mark` decides for each of them.
    """
    if kind == "open":
        return verdict in COUNTED or verdict in MACHINE_OPENS
    return kind == "click" and verdict in NOTIFIED_CLICKS


def mark(conn: Connection, rows: Iterable[Row]) -> list[Row]:
    """Set ``row["notable"]`` on every row (see the module docstring); return the notable.

    ``rows`` are events already inserted in ``conn``'s transaction, with
    ``kind``, ``verdict``, ``message_id``, ``recipient_position``,
    ``occurred_at`` (a datetime or an ISO string) and ``event_key``.
    """
    rows = list(rows)
    # copy and verdict group -> the batch's earliest open(s) there, and their time
    earliest: dict[tuple[int, int, bool], tuple[datetime, list[Row]]] = {}
    for row in rows:
        kind, verdict = row.get("kind"), row.get("verdict")
        row["notable"] = CLICK if kind == "click" and verdict in NOTIFIED_CLICKS else None
        if kind in ANSWERS:
            row["notable"] = kind
            continue
        if kind != "open" or not may_notify("open", str(verdict)):
            continue
        machine = verdict in MACHINE_OPENS
        copy = (int(row["message_id"]), int(row.get("recipient_position") or 0), machine)
        at, seen = when(row), earliest.get(copy)
        if seen is None or at < seen[0]:
            earliest[copy] = (at, [row])
        elif at == seen[0]:
            seen[1].append(row)  # the database breaks the tie by event key
    candidates = [row for _, tied in earliest.values() for row in tied]
    opened_before = _opened_before(conn, candidates)
    for index, row in enumerate(candidates):
        if index not in opened_before:
            machine = row.get("verdict") in MACHINE_OPENS
            row["notable"] = FIRST_MACHINE_OPEN if machine else FIRST_OPEN
    return sorted((row for row in rows if row["notable"]), key=when)


def when(row: Mapping[str, Any]) -> datetime:
    """A row's ``occurred_at`` as an aware UTC datetime."""
    value = row.get("occurred_at")
    if isinstance(value, str):
        value = parse(value)
    if not isinstance(value, datetime):
        raise ValueError(f"event {row.get('event_key')!r} has no time")
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


_MACHINE = ", ".join(f"'{v}'" for v in MACHINE_OPENS)
_OPENS = ", ".join(f"'{v}'" for v in COUNTED + MACHINE_OPENS)
# An earlier stored open of the candidate's copy, in its verdict group.
_EARLIER = (
    f"EXISTS (SELECT 1 FROM {EVENTS.name} e WHERE e.message_id = c.m AND e.kind = 'open' "  # noqa: S608 - constants
    f"AND e.recipient_position = c.p AND e.verdict IN ({_OPENS}) "
    f"AND (e.verdict IN ({_MACHINE})) = c.machine "
    "AND (e.occurred_at < c.t OR (e.occurred_at = c.t AND e.event_key < c.k)))"
)
_PG_SQL = (
    "SELECT c.n FROM unnest(%s::integer[], %s::bigint[], %s::integer[], %s::boolean[], "  # noqa: S608 - constants
    "%s::timestamptz[], %s::varchar[]) AS c(n, m, p, machine, t, k) WHERE " + _EARLIER
)


def _opened_before(conn: Connection, candidates: Sequence[Row]) -> set[int]:
    """Indexes of the ``candidates`` that have an earlier stored open (one query).

    Plain SQL, like the writer's inserts: PostgreSQL gets one fixed statement
    over column arrays (``unnest``), SQLite a ``VALUES`` list.
    """
    if not candidates:
        return set()
    dialect = conn.dialect
    machine = [row.get("verdict") in MACHINE_OPENS for row in candidates]
    columns: list[list[Any]] = [
        list(range(len(candidates))),
        [int(row["message_id"]) for row in candidates],
        [int(row.get("recipient_position") or 0) for row in candidates],
        machine,
        [when(row) for row in candidates],
        [str(row["event_key"]) for row in candidates],
    ]
    if dialect.name == "postgresql":
        return set(conn.exec_driver_sql(_PG_SQL, tuple(columns)).scalars())
    # SQLite stores DateTime as text: compare with the column's own format.
    to_db = EVENTS.c.occurred_at.type.dialect_impl(dialect).bind_processor(dialect)
    if to_db is not None:
        columns[4] = [to_db(t) for t in columns[4]]
    columns[3] = [int(m) for m in machine]
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    found: set[int] = set()
    rows = list(zip(*columns, strict=True))
    for start in range(0, len(rows), SQLITE_CANDIDATES_PER_QUERY):
        chunk = rows[start : start + SQLITE_CANDIDATES_PER_QUERY]
        values = ", ".join([f"({', '.join([marker] * len(columns))})"] * len(chunk))
        sql = f"WITH c(n, m, p, machine, t, k) AS (VALUES {values}) SELECT c.n FROM c WHERE "  # noqa: S608 - markers
        params = tuple(value for row in chunk for value in row)
        found.update(conn.exec_driver_sql(sql + _EARLIER, params).scalars())
    return found
