"""State columns follow events: the one owner of what ``recipients``, ``messages``,
``daily_stats`` and ``senders`` say about the events behind them.

Readers (receiver/readmodel/) filter and draw from these columns, never from
the events table, so a page costs the same after a year of mail as after a
day. The writers keep them in the transaction that writes what they count:

* :func:`apply` — the batch of events just inserted (receiver/eventrows.py
  for opens and clicks, the intake writer for answers); only rows the insert
  actually added may be passed (``insert_ignoring`` drops repeats), so a hit
  is counted once however often its batch is replayed.
* :func:`recorded` — the relay's record (relay/record.py) of new messages:
  ``sent`` and tracking go into the day's rollup and the sender's row; a
  message recorded after its first hits (its record was journaled, or they
  were written while it committed) has its state counted from those events
  first.
* :func:`recount` — erasure and the purge of old hits (shared/privacy.py):
  what remains of some messages' events, counted again.
* :func:`removing` — the purge of old messages: their senders' rows lose them,
  in the batch that deletes them.
* :func:`rebuild` — everything from the events, set-based: one aggregate per
  table (``trackrelay db rebuild-state``, optionally in committed slices of
  messages; migration 0004's backfill; the benchmark's seeder).

What the columns mean (shared/verdicts.py says which verdicts count):

* ``opens``/``clicks`` count COUNTED hits, ``machine_*`` AUTOMATED ones,
  ``self_*`` the sender's own; ``first_*``/``last_*`` are times of COUNTED hits.
* an answer (``reply``, ``auto_reply``, ``bounce``, ``complaint``) sets the
  recipient's ``*_at`` to its first time; a message counts the recipients who
  answered so, a message-level answer (position 0) counting as one when no
  recipient has. A hard bounce wins over a soft one in ``bounce_type``.
* ``daily_stats`` is per sender and UTC day of the MESSAGE: ``opened``/
  ``clicked`` count messages tracked for opens/clicks with a counted hit,
  ``replied``/``bounced`` messages with an answer, ``human_opens`` and
  ``machine_opens`` hits, ``opens_<verdict>`` opens by verdict.

Concurrency: :func:`apply` adds to counters in SQL (``opens = opens + v.opens``)
and learns from what the update returns whether a message's first counted
open or click came now (the new count equals what it added), so two writers
never count one first open twice; a batch with answers locks its messages
first (``FOR UPDATE``, in id order) and counts their answers again from their
answer events, as :func:`rebuild` does.
Rollup rows are upserted in key order (shared/db.py ``upsert_adding_sql``).
Should two writers still deadlock on PostgreSQL, one batch fails and the
spool journals and replays it (shared/spool.py). A hit written while its
message's record is being committed (neither transaction sees the other's
row) is counted by the record's transaction: :func:`recorded` says how.

Cost: one update per batch for recipients and one for messages (SQL text
built once per size; PostgreSQL: ``unnest`` of column arrays, SQLite:
multi-row VALUES, as receiver/eventrows.py measured), so it grows with the
messages a batch touches, not with its hits. Measured on 2 busy cores (load
7), 500 hits spread over 440 messages: 55 ms of a 130 ms SQLite batch,
120 ms of a 300 ms PostgreSQL one; hits on fewer messages cost less.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.sql.elements import TextClause

from shared.db import upsert_adding_sql
from shared.models import Event
from shared.verdicts import AUTOMATED, COUNTED, SELF, VERDICTS

log = logging.getLogger(__name__)

OPEN, CLICK = "open", "click"
#: An answer kind -> (recipient column, message counter, daily counter or "").
ANSWERS = {
    "reply": ("replied_at", "replies", "replied"),
    "auto_reply": ("auto_replied_at", "auto_replies", ""),
    "bounce": ("bounced_at", "bounces", "bounced"),
    "complaint": ("complained_at", "complaints", ""),
}
#: Hit counters of recipients and messages, in this order.
COUNTERS = ("opens", "machine_opens", "self_opens", "clicks", "machine_clicks", "self_clicks")
#: Times of counted hits: first/last open, first/last click.
TIMES = ("first_open_at", "last_open_at", "first_click_at", "last_click_at")
#: The rollup's figures of a day (what the overview draws: readmodel/activity.py) ...
FIGURES = (
    "sent",
    "track_opens",
    "opened",
    "track_clicks",
    "clicked",
    "human_opens",
    "machine_opens",
    "replied",
    "bounced",
)
#: ... and all its counters: those and the opens by verdict.
DAILY = (*FIGURES, *(f"opens_{verdict}" for verdict in VERDICTS))
#: SQLite: rows per statement at most (17 columns: far below 32766 variables).
SQLITE_ROWS = 256

#: (message_id, recipient_position, kind, verdict, occurred_at, bounce_type) of one
#: event; ``occurred_at`` an aware datetime or the database's own form of one.
Facts = tuple[int, int, str, str, Any, str]


def _slot(kind: str, verdict: str) -> int | None:
    """The index in COUNTERS a hit adds to, None for none (unknown, answers)."""
    base = {OPEN: 0, CLICK: 3}.get(kind)
    if base is None:
        return None
    if verdict in COUNTED:
        return base
    if verdict in AUTOMATED:
        return base + 1
    return base + 2 if verdict == SELF else None


#: (kind, verdict) -> slot, worked out once.
_SLOTS = {(k, v): _slot(k, v) for k in (OPEN, CLICK) for v in VERDICTS}


def _earlier(a: Any, b: Any) -> Any:
    return b if a is None or (b is not None and b < a) else a


class _Tally:
    """What one batch adds to one recipient or one message.

    ``figures`` is COUNTERS then TIMES; the rest is made only when needed
    (a plain class with slots: the writer builds one per message per batch).
    """

    __slots__ = ("answers", "bounce_type", "figures", "opens")

    def __init__(self) -> None:
        self.figures: list[Any] = [0, 0, 0, 0, 0, 0, None, None, None, None]
        self.answers: dict[str, Any] | None = None  # kind -> first time
        self.bounce_type = ""
        self.opens: dict[str, int] | None = None  # by verdict (messages only)

    def hit(self, slot: int | None, at: Any) -> None:
        if slot is None:
            return
        f = self.figures
        f[slot] += 1
        if slot == 0 or slot == 3:  # counted: first and last
            t = 6 if slot == 0 else 8
            if f[t] is None or at < f[t]:
                f[t] = at
            if f[t + 1] is None or at > f[t + 1]:
                f[t + 1] = at

    def opened(self, verdict: str) -> None:
        if self.opens is None:
            self.opens = {}
        self.opens[verdict] = self.opens.get(verdict, 0) + 1

    def answer(self, kind: str, at: Any, bounce_type: str) -> None:
        if self.answers is None:
            self.answers = {}
        self.answers[kind] = _earlier(self.answers.get(kind), at)
        if kind == "bounce" and bounce_type:  # 'hard' < 'soft': a hard bounce wins
            self.bounce_type = min(filter(None, (self.bounce_type, bounce_type)))


class _Dialect:
    """What differs between SQLite and PostgreSQL in these statements."""

    def __init__(self, conn: Connection) -> None:
        self.name = conn.dialect.name
        if self.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database: {self.name}")
        self.postgres = self.name == "postgresql"
        self.marker = "%s" if self.postgres else "?"
        occurred = Event.__table__.c.occurred_at.type  # type: ignore[attr-defined]
        self._bind = occurred.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        self.sql: dict[tuple[str, int], str] = {}  # statements built once

    @classmethod
    def of(cls, conn: Connection) -> _Dialect:
        found = _DIALECTS.get(conn.dialect.name)
        if found is None:
            found = _DIALECTS[conn.dialect.name] = cls(conn)
        return found

    def day(self, column: str) -> str:
        """The UTC date of a timestamp column, as the rollup's ``day``."""
        if self.postgres:
            return f"CAST(({column} AT TIME ZONE 'UTC') AS date)"
        return f"date({column})"

    def time(self, value: Any) -> Any:
        """A time as the database compares it (SQLite: its stored text)."""
        if isinstance(value, datetime) and not self.postgres and self._bind is not None:
            return self._bind(value)
        return value

    def day_value(self, value: Any) -> Any:
        return date.fromisoformat(value) if isinstance(value, str) else value

    def for_update(self) -> str:
        return " FOR UPDATE" if self.postgres else ""

    def source(self, columns: Sequence[str], types: Sequence[str], rows: int) -> str:
        """``WITH v(columns) AS (...)`` of ``rows`` rows of driver parameters."""
        if self.postgres:
            arrays = ", ".join(f"%s::{t}[]" for t in types)
            return f"WITH v({', '.join(columns)}) AS (SELECT * FROM unnest({arrays}))"
        row = f"({', '.join([self.marker] * len(columns))})"
        return f"WITH v({', '.join(columns)}) AS (VALUES {', '.join([row] * rows)})"

    def params(
        self, rows: list[tuple[Any, ...]], arrays: bool = True
    ) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(row count, parameters) per statement: PostgreSQL one of column arrays
        (``arrays``), else multi-row VALUES of power-of-two sizes (a few cached
        statements, as receiver/eventrows.py measured)."""
        if not rows:
            return
        if self.postgres and arrays:
            yield 0, tuple(list(column) for column in zip(*rows, strict=True))
            return
        start = 0
        while start < len(rows):
            size = min(SQLITE_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
            yield size, tuple(itertools.chain.from_iterable(rows[start : start + size]))
            start += size

    def in_list(self, column: str, count: int) -> str:
        if self.postgres:
            return f"{column} = ANY(%s)"
        return f"{column} IN ({', '.join([self.marker] * count)})"

    def in_params(self, ids: list[Any]) -> tuple[Any, ...]:
        return (ids,) if self.postgres else tuple(ids)


_DIALECTS: dict[str, _Dialect] = {}


def _chunks(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- apply: a batch of new events ---

_RECIPIENT_V = ("mid", "pos", *COUNTERS, *TIMES, *(c for c, _, _ in ANSWERS.values()), "btype")
_MESSAGE_V = ("mid", *COUNTERS, *TIMES)


def _types(columns: Sequence[str]) -> list[str]:
    def one(c: str) -> str:
        if c == "mid":
            return "bigint"
        if c == "btype":
            return "varchar"
        if c.endswith("_at") or c == "first_reply":
            return "timestamptz"
        return "integer"

    return [one(c) for c in columns]


def _first(column: str, value: str) -> str:
    return f"CASE WHEN {column} IS NULL OR {value} < {column} THEN {value} ELSE {column} END"


def _last(column: str, value: str) -> str:
    return f"CASE WHEN {column} IS NULL OR {value} > {column} THEN {value} ELSE {column} END"


def _hit_sets(table: str) -> list[str]:
    sets = [f"{c} = {table}.{c} + v.{c}" for c in COUNTERS]
    for i, c in enumerate(TIMES):
        pick = _first if i % 2 == 0 else _last
        sets.append(f"{c} = {pick(f'{table}.{c}', f'v.{c}')}")
    return sets


def _recipient_update(d: _Dialect, rows: int) -> str:
    sets = _hit_sets("recipients")
    sets += [f"{c} = {_first(f'recipients.{c}', f'v.{c}')}" for c, _, _ in ANSWERS.values()]
    sets.append(
        "bounce_type = CASE WHEN v.btype <> '' AND (recipients.bounce_type = ''"
        " OR v.btype < recipients.bounce_type) THEN v.btype ELSE recipients.bounce_type END"
    )
    return (
        f"{d.source(_RECIPIENT_V, _types(_RECIPIENT_V), rows)} UPDATE recipients"
        f" SET {', '.join(sets)} FROM v"
        " WHERE recipients.message_id = v.mid AND recipients.position = v.pos"
    )


def _message_update(d: _Dialect, rows: int) -> str:
    """Add to the messages and return what the rollup needs: their sender, day,
    tracking and the new open and click counters (the old are new minus added)."""
    sets = _hit_sets("messages")
    return (
        f"{d.source(_MESSAGE_V, _types(_MESSAGE_V), rows)} UPDATE messages"
        f" SET {', '.join(sets)} FROM v WHERE messages.id = v.mid"
        f" RETURNING messages.id, messages.sender_key, {d.day('messages.created_at')},"
        " messages.track_opens, messages.track_clicks, messages.opens, messages.clicks"
    )


_ANSWER_COUNTERS = tuple(counter for _, counter, _ in ANSWERS.values())


def _old_answer_counts(conn: Connection, d: _Dialect, ids: list[int]) -> dict[int, list[int]]:
    """Answer counters (``_ANSWER_COUNTERS`` order) of messages about to get answers,
    locked in id order so two writers never count one first answer twice."""
    found: dict[int, list[int]] = {}
    for chunk in _chunks(ids):
        sql = (
            f"SELECT id, {', '.join(_ANSWER_COUNTERS)} FROM messages"
            f" WHERE {d.in_list('id', len(chunk))} ORDER BY id{d.for_update()}"
        )
        for row in conn.exec_driver_sql(sql, d.in_params(chunk)):
            found[int(row[0])] = [int(n) for n in row[1:]]
    return found


def _recount_answers(conn: Connection, d: _Dialect, ids: list[int]) -> dict[int, list[int]]:
    """Answer counters of messages that got answers, counted again from their answer
    events (``ix_events_message_kind``) as :func:`rebuild` counts them; returns them."""
    kinds = ", ".join(f"'{kind}'" for kind in ANSWERS)
    columns = (*_ANSWER_COUNTERS, "first_reply_at")
    found: dict[int, list[int]] = {}
    for chunk in _chunks(ids):
        sql = (
            f"UPDATE messages SET {', '.join(f'{c} = a.{c}' for c in columns)}"
            f" FROM (SELECT message_id, {', '.join(_answer_aggregates())} FROM events"
            f" WHERE {d.in_list('message_id', len(chunk))} AND kind IN ({kinds})"
            " GROUP BY message_id) AS a WHERE messages.id = a.message_id"
            f" RETURNING messages.id, {', '.join(f'messages.{c}' for c in _ANSWER_COUNTERS)}"
        )
        for row in conn.exec_driver_sql(sql, d.in_params(chunk)):
            found[int(row[0])] = [int(n) for n in row[1:]]
    return found


def _tally(
    d: _Dialect, events: Iterable[Facts]
) -> tuple[dict[int, _Tally], dict[tuple[int, int], _Tally]]:
    messages: dict[int, _Tally] = {}
    recipients: dict[tuple[int, int], _Tally] = {}
    convert = d.time if not d.postgres else None
    slots = _SLOTS
    for message_id, position, kind, verdict, at, bounce_type in events:
        if convert is not None:
            at = convert(at)
        message = messages.get(message_id)
        if message is None:
            message = messages[message_id] = _Tally()
        recipient = None
        if position > 0:
            recipient = recipients.get((message_id, position))
            if recipient is None:
                recipient = recipients[message_id, position] = _Tally()
        if kind in ANSWERS:
            _answer(message, recipient, kind, at, bounce_type)
            continue
        slot = slots.get((kind, verdict))
        message.hit(slot, at)
        if recipient is not None:
            recipient.hit(slot, at)
        if kind == OPEN:
            message.opened(verdict)
    return messages, recipients


def _answer(message: _Tally, recipient: _Tally | None, kind: str, at: Any, bounce: str) -> None:
    message.answer(kind, at, bounce)
    if recipient is not None:
        recipient.answer(kind, at, bounce)


_NOTHING: dict[str, Any] = {}


_DAILY_INDEX = {name: i for i, name in enumerate(DAILY)}
_ANSWER_DAILY = tuple(
    (i, _DAILY_INDEX[daily]) for i, (_, _, daily) in enumerate(ANSWERS.values()) if daily
)


def _daily(
    d: _Dialect,
    changed: Iterable[Any],
    messages: dict[int, _Tally],
    answers: tuple[dict[int, list[int]], dict[int, list[int]]],
) -> list[tuple[Any, ...]]:
    """Rollup rows to add, in key order (so concurrent writers lock them in one order).

    ``changed``: the rows the message update returned; ``answers``: the answer
    counters of the messages that got answers, before and after.
    """
    rows: dict[tuple[str, str], tuple[Any, list[int]]] = {}
    at = _DAILY_INDEX
    before, after = answers
    for message_id, sender_key, day, track_opens, track_clicks, opens, clicks in changed:
        tally = messages[message_id]
        f = tally.figures
        key = (sender_key, str(day))
        entry = rows.get(key)
        if entry is None:
            entry = rows[key] = (d.day_value(day), [0] * len(DAILY))
        add = entry[1]
        add[at["opened"]] += bool(track_opens and f[0] and opens == f[0])
        add[at["clicked"]] += bool(track_clicks and f[3] and clicks == f[3])
        add[at["human_opens"]] += f[0]
        add[at["machine_opens"]] += f[1]
        if message_id in after:
            was, now = before[message_id], after[message_id]
            for i, daily in _ANSWER_DAILY:
                add[daily] += was[i] == 0 and now[i] > 0
        for verdict, n in (tally.opens or _NOTHING).items():
            add[at[f"opens_{verdict}"]] += n
    return [(key[0], day, *add) for key, (day, add) in sorted(rows.items()) if any(add)]


def _statement(d: _Dialect, name: str, rows: int, build: Callable[[_Dialect, int], str]) -> str:
    sql = d.sql.get((name, rows))
    if sql is None:
        sql = d.sql[name, rows] = build(d, rows)
    return sql


def apply(conn: Connection, events: Iterable[Facts]) -> None:
    """Add the events just inserted to their recipients, messages and daily rollups.

    In the caller's transaction; a few statements per batch whatever its size
    (one update each for recipients and messages, one upsert for the rollup;
    a batch with answers also locks its messages and counts their answers
    again). Events of a message not recorded yet change nothing
    (:func:`recorded` counts them when its record comes).
    """
    d = _Dialect.of(conn)
    messages, recipients = _tally(d, events)
    if not messages:
        return
    _stripes(conn, messages, exclusive=False)  # after a record committing, before one to come
    answered = sorted(m for m, t in messages.items() if t.answers)
    before = _old_answer_counts(conn, d, answered) if answered else {}
    recipient_rows = [
        (m, p, *t.figures, *((t.answers or _NOTHING).get(k) for k in ANSWERS), t.bounce_type)
        for (m, p), t in sorted(recipients.items())
    ]
    for rows, params in d.params(recipient_rows):
        conn.exec_driver_sql(_statement(d, "recipients", rows, _recipient_update), params)
    message_rows = [
        (m, *t.figures) for m, t in sorted(messages.items()) if t.opens or any(t.figures)
    ]
    changed: list[Any] = []
    for rows, params in d.params(message_rows):
        sql = _statement(d, "messages", rows, _message_update)
        changed += conn.exec_driver_sql(sql, params).all()
    after = _recount_answers(conn, d, sorted(before)) if before else {}
    if after:  # messages with answers only: their rollup rows too
        have = {row[0] for row in changed}
        changed += _keys_of(conn, d, [m for m in after if m not in have])
    daily = _daily(d, changed, messages, (before, after))
    for rows, params in d.params(daily, arrays=False):
        conn.exec_driver_sql(_statement(d, "daily", rows, _daily_upsert), params)


def _keys_of(conn: Connection, d: _Dialect, ids: list[int]) -> list[Any]:
    """What the message update returns, for messages it did not touch."""
    found: list[Any] = []
    for chunk in _chunks(ids):
        sql = (
            f"SELECT id, sender_key, {d.day('created_at')}, track_opens, track_clicks,"
            f" opens, clicks FROM messages WHERE {d.in_list('id', len(chunk))}"
        )
        found += conn.exec_driver_sql(sql, d.in_params(chunk)).all()
    return found


def _daily_upsert(d: _Dialect, rows: int) -> str:
    row = f"({', '.join([d.marker] * (len(DAILY) + 2))})"
    return upsert_adding_sql(
        "daily_stats",
        ("sender_key", "day", *DAILY),
        f"VALUES {', '.join([row] * rows)}",
        ("sender_key", "day"),
        add=DAILY,
    )


# --- counting from the events: rebuild, recount, recorded ---


def _in(values: str, *verdicts: str) -> str:
    return f"{values} IN ({', '.join(repr(v) for v in verdicts)})"


def _hit_aggregates(e: str) -> list[str]:
    """Per group of events (``e``: their table's prefix): COUNTERS and TIMES, as in
    :class:`_Tally`. Over no event (a LEFT JOIN's NULLs) they give 0 and NULL."""
    out = []
    for kind in (OPEN, CLICK):
        noun = "opens" if kind == OPEN else "clicks"
        for verdicts, name in (
            (COUNTED, noun),
            (AUTOMATED, f"machine_{noun}"),
            ((SELF,), f"self_{noun}"),
        ):
            out.append(
                f"sum(CASE WHEN {e}kind = '{kind}' AND {_in(f'{e}verdict', *verdicts)}"
                f" THEN 1 ELSE 0 END) AS {name}"
            )
    for kind in (OPEN, CLICK):
        counted = _in(f"{e}verdict", *COUNTED)
        when = f"CASE WHEN {e}kind = '{kind}' AND {counted} THEN {e}occurred_at END"
        out += [f"min({when}) AS first_{kind}_at", f"max({when}) AS last_{kind}_at"]
    return out


def _recipient_aggregates(e: str) -> list[str]:
    out = _hit_aggregates(e)
    out += [
        f"min(CASE WHEN {e}kind = '{kind}' THEN {e}occurred_at END) AS {column}"
        for kind, (column, _, _) in ANSWERS.items()
    ]
    out.append(
        f"coalesce(min(CASE WHEN {e}kind = 'bounce' AND {e}bounce_type <> ''"
        f" THEN {e}bounce_type END), '') AS bounce_type"
    )
    return out


def _message_aggregates(e: str) -> list[str]:
    return [*_hit_aggregates(e), *_answer_aggregates(e)]


def _answer_aggregates(e: str = "") -> list[str]:
    """Per message: recipients who answered so (a message-level answer counting as one
    when no recipient has), and the first reply."""
    out = []
    for kind, (_, counter, _) in ANSWERS.items():
        named = (
            f"count(DISTINCT CASE WHEN {e}kind = '{kind}' AND {e}recipient_position > 0"
            f" THEN {e}recipient_position END)"
        )
        out.append(
            f"CASE WHEN {named} > 0 THEN {named}"
            f" ELSE max(CASE WHEN {e}kind = '{kind}' THEN 1 ELSE 0 END) END AS {counter}"
        )
    out.append(f"min(CASE WHEN {e}kind = 'reply' THEN {e}occurred_at END) AS first_reply_at")
    return out


_RECIPIENT_STATE = (*COUNTERS, *TIMES, *(c for c, _, _ in ANSWERS.values()), "bounce_type")
_MESSAGE_STATE = (*COUNTERS, *TIMES, *(m for _, m, _ in ANSWERS.values()), "first_reply_at")
#: The columns of ``messages`` kept here and by the record's writer, not in the record.
MESSAGE_KEPT = ("sender_key", *_MESSAGE_STATE)


@dataclass(frozen=True)
class _Scope:
    """Which messages a statement covers: ``{c}`` is the message id column."""

    where: str
    params: dict[str, Any]
    expanding: bool = False

    def of(self, column: str) -> str:
        return self.where.format(c=column)

    def statement(self, sql: str) -> TextClause:
        clause = text(sql)
        if self.expanding:
            clause = clause.bindparams(bindparam("ids", expanding=True))
        return clause


def _between(lo: int, hi: int) -> _Scope:
    return _Scope("{c} BETWEEN :lo AND :hi", {"lo": lo, "hi": hi})


def _ids(ids: Sequence[int]) -> _Scope:
    return _Scope("{c} IN :ids", {"ids": list(ids)}, expanding=True)


def _set_from(table: str, columns: Sequence[str], source: str, match: str) -> str:
    """``UPDATE table SET columns = a.columns FROM (source) AS a WHERE match``, leaving
    alone the rows that already say so (most rows, for a backfill: no write)."""
    sets = ", ".join(f"{c} = a.{c}" for c in columns)
    mine = ", ".join(f"{table}.{c}" for c in columns)
    theirs = ", ".join(f"a.{c}" for c in columns)
    return (
        f"UPDATE {table} SET {sets} FROM ({source}) AS a WHERE {match}"
        f" AND ({mine}) IS DISTINCT FROM ({theirs})"
    )


#: What a recipient's and a message's state columns say with no event behind them.
_RECIPIENT_EMPTY = {
    c: ("''" if c == "bounce_type" else "NULL" if c.endswith("_at") else "0")
    for c in _RECIPIENT_STATE
}
_MESSAGE_EMPTY = {c: ("NULL" if c.endswith("_at") else "0") for c in _MESSAGE_STATE}


def _clear_unhit(table: str, empty: dict[str, str], unhit: str, scope: str) -> str:
    """``UPDATE table`` to ``empty`` where no event is behind the row (``unhit``) and
    it says something else (after a purge or an erasure; a fresh backfill: none).

    ``unhit`` names the scope's events again: without it PostgreSQL hashed every
    event for an erasure's 500 messages (27 s of a 32 s erasure at 1M)."""
    sets = ", ".join(f"{c} = {v}" for c, v in empty.items())
    mine = ", ".join(empty)
    values = ", ".join(empty.values())
    return (
        f"UPDATE {table} SET {sets} WHERE {scope}"
        f" AND ({mine}) IS DISTINCT FROM ({values}) AND NOT EXISTS ({unhit})"
    )


def _count_state(conn: Connection, scope: _Scope) -> None:
    """Recipients' and messages' state of ``scope`` counted from their events.

    One aggregate over the events of ``scope`` per table (grouped by recipient,
    then by message), joined to the rows it counts, which are written only where
    they say something else; then the rows of ``scope`` with no event left are
    set to their empty state. The events are read once per table whatever the
    scope's size: the whole table for :func:`rebuild` (a sequential scan and one
    grouping, no probe per row), a slice or a list of ids through
    ``ix_events_message_kind``.
    """
    recipients = _set_from(
        "recipients",
        _RECIPIENT_STATE,
        "SELECT e.message_id AS mid, e.recipient_position AS pos,"
        f" {', '.join(_recipient_aggregates('e.'))} FROM events AS e"
        f" WHERE {scope.of('e.message_id')} GROUP BY e.message_id, e.recipient_position",
        "recipients.message_id = a.mid AND recipients.position = a.pos"
        f" AND {scope.of('recipients.message_id')}",
    )
    recipients_unhit = _clear_unhit(
        "recipients",
        _RECIPIENT_EMPTY,
        "SELECT 1 FROM events AS e WHERE e.message_id = recipients.message_id"
        f" AND e.recipient_position = recipients.position AND {scope.of('e.message_id')}",
        scope.of("recipients.message_id"),
    )
    messages = _set_from(
        "messages",
        _MESSAGE_STATE,
        f"SELECT e.message_id AS mid, {', '.join(_message_aggregates('e.'))}"
        f" FROM events AS e WHERE {scope.of('e.message_id')} GROUP BY e.message_id",
        f"messages.id = a.mid AND {scope.of('messages.id')}",
    )
    messages_unhit = _clear_unhit(
        "messages",
        _MESSAGE_EMPTY,
        "SELECT 1 FROM events AS e WHERE e.message_id = messages.id"
        f" AND {scope.of('e.message_id')}",
        scope.of("messages.id"),
    )
    for sql in (recipients, recipients_unhit, messages, messages_unhit):
        conn.execute(scope.statement(sql), scope.params)


def _add_daily(conn: Connection, scope: _Scope, with_events: bool = True) -> None:
    """Add the messages of ``scope`` (with their state) to the daily rollup."""
    d = _Dialect.of(conn)
    day = d.day("m.created_at")
    figures = [
        "count(*)",
        "sum(CASE WHEN m.track_opens THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.track_opens AND m.opens > 0 THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.track_clicks THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.track_clicks AND m.clicks > 0 THEN 1 ELSE 0 END)",
        "sum(m.opens)",
        "sum(m.machine_opens)",
        "sum(CASE WHEN m.replies > 0 THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.bounces > 0 THEN 1 ELSE 0 END)",
    ]
    join = ""
    if with_events:
        figures += [f"coalesce(sum(v.{v}), 0)" for v in VERDICTS]
        sums = ", ".join(
            f"sum(CASE WHEN verdict = '{v}' THEN 1 ELSE 0 END) AS {v}" for v in VERDICTS
        )
        join = (
            f" LEFT JOIN (SELECT message_id, {sums} FROM events"
            f" WHERE kind = 'open' AND {scope.of('message_id')} GROUP BY message_id) AS v"
            " ON v.message_id = m.id"
        )
    else:
        figures += ["0"] * len(VERDICTS)
    source = (  # in key order: concurrent writers lock the rollup's rows in one order
        f"SELECT m.sender_key, {day}, {', '.join(figures)} FROM messages AS m{join}"
        f" WHERE {scope.of('m.id')} GROUP BY m.sender_key, {day} ORDER BY 1, 2"
    )
    sql = upsert_adding_sql(
        "daily_stats", ("sender_key", "day", *DAILY), source, ("sender_key", "day"), add=DAILY
    )
    conn.execute(scope.statement(sql), scope.params)


def recount(conn: Connection, message_ids: Sequence[int]) -> None:
    """Count the state of these messages and their recipients again from their events.

    The daily rollup is left as it is (shared/privacy.py says why).
    """
    for chunk in _chunks(sorted(set(message_ids))):
        _count_state(conn, _ids(chunk))


#: PostgreSQL advisory locks that order a record and the hits of its messages:
#: (class, message id mod STRIPES), per transaction. Advisory, not a lock on
#: ``events``: VACUUM, ANALYZE and ``CREATE INDEX CONCURRENTLY`` on the table
#: never wait for them, nor they for those. Few, so a batch of 500 messages
#: holds at most 64 of the server's lock slots.
STATE_LOCK_CLASS = 0x7472  # "tr"
STRIPES = 64


def _stripes(conn: Connection, message_ids: Iterable[int], exclusive: bool) -> None:
    """Take these messages' stripes for this transaction, in ascending order (as
    every taker does, so two transactions never wait on each other in a circle);
    ``exclusive`` for a record, shared for a batch of hits. SQLite: nothing."""
    stripes = sorted({int(m) % STRIPES for m in message_ids})
    if not stripes or not _Dialect.of(conn).postgres:
        return
    take = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    conn.exec_driver_sql(  # unnest keeps the array's order
        f"SELECT count({take}({STATE_LOCK_CLASS}, s)::text) FROM unnest(%s::int[]) AS s",
        (stripes,),
    )


#: Of some messages, those with an event: one probe of ``ix_events_message_kind`` per
#: message (PostgreSQL: an index-only scan, LIMIT 1 each), nothing read when none has.
_EARLY = (
    "SELECT m.id FROM messages AS m WHERE {m} AND EXISTS"
    " (SELECT 1 FROM events AS e WHERE e.message_id = m.id)"
)


def recorded(conn: Connection, message_ids: Sequence[int]) -> None:
    """New messages were just inserted: add them to the rollups and the senders.

    A message whose hits came first has its state (and its day's figures)
    counted from those events: its record was journaled, or a hit was written
    while the record's transaction ran, whose :func:`apply` could not see the
    message. For the second, PostgreSQL takes its messages' stripes
    (:func:`_stripes`) exclusively first: the probe then waits for the hit
    batches of those messages in flight, and sees what they committed, while
    later ones wait for this commit, and their :func:`apply` sees the message.
    What it costs: a record waits for the hit batches in flight that share a
    stripe with it, and they for the records committing. SQLite needs
    nothing: its writers take turns.
    """
    _stripes(conn, message_ids, exclusive=True)
    for chunk in _chunks(sorted(set(message_ids))):
        scope = _ids(chunk)
        early = list(
            conn.execute(scope.statement(_EARLY.format(m=scope.of("m.id"))), scope.params).scalars()
        )
        if early:
            _count_state(conn, _ids(early))
        _add_daily(conn, scope, with_events=bool(early))
        sql = upsert_adding_sql(
            "senders",
            ("sender_key", "messages", "last_at"),
            "SELECT sender_key, count(*), max(created_at) FROM messages"
            f" WHERE {scope.of('id')} GROUP BY sender_key ORDER BY 1",
            ("sender_key",),
            add=("messages",),
            latest=("last_at",),
        )
        conn.execute(scope.statement(sql), scope.params)


def removing(conn: Connection, message_ids: Sequence[int]) -> None:
    """These messages are about to be deleted in this transaction (the retention
    purge, shared/privacy.py): their senders' rows count them no longer.

    The rows are locked in key order first (PostgreSQL), the order the record's
    upsert takes them in, so a purge batch and a record never deadlock on two
    senders. ``last_at`` stays: the purge takes the oldest mail first, and a
    sender whose mail is all gone keeps its row with 0 messages, as
    :func:`rebuild` leaves it. The daily rollup keeps its counts (they name no
    recipient). Erasure deletes no message and needs none of this.
    """
    d = _Dialect.of(conn)
    for chunk in _chunks(sorted(set(message_ids))):
        scope = _ids(chunk)
        gone = (
            "SELECT sender_key, count(*) AS n FROM messages"
            f" WHERE {scope.of('id')} GROUP BY sender_key"
        )
        if d.postgres:
            lock = (
                f"SELECT 1 FROM senders WHERE sender_key IN (SELECT sender_key FROM ({gone}) AS g)"
                " ORDER BY sender_key FOR UPDATE"
            )
            conn.execute(scope.statement(lock), scope.params)
        conn.execute(
            scope.statement(
                f"UPDATE senders SET messages = senders.messages - g.n FROM ({gone}) AS g"
                " WHERE senders.sender_key = g.sender_key"
            ),
            scope.params,
        )


#: (table, column, its key column, the table's id column for the slice)
_KEYS = (
    ("messages", "sender", "sender_key", "id"),
    ("recipients", "address", "address_key", "message_id"),
)


def _keys(conn: Connection, scope: _Scope) -> None:
    """``sender_key`` and ``address_key``: Python's ``lower()`` of what they key, where
    they say something else (rows written by hand; migration 0004 did the bulk)."""
    for table, column, key, id_column in _KEYS:
        rows = conn.execute(
            scope.statement(
                f"SELECT id, {column}, {key} FROM {table}"
                f" WHERE {scope.of(id_column)} AND {key} <> lower({column})"
            ),
            scope.params,
        ).all()
        for id_, value, stored in rows:
            if value.lower() != stored:
                conn.execute(
                    text(f"UPDATE {table} SET {key} = :key WHERE id = :id"),
                    {"key": value.lower(), "id": id_},
                )


def _slices(conn: Connection, size: int) -> Iterator[tuple[int, int]]:
    """(first, last) message id of each run of ``size`` messages, in id order."""
    after: int | None = None
    while True:
        where = "" if after is None else "WHERE id > :after "
        ids = list(
            conn.execute(
                text(f"SELECT id FROM messages {where}ORDER BY id LIMIT :n"),
                {"after": after, "n": size},
            ).scalars()
        )
        if not ids:
            return
        yield ids[0], ids[-1]
        after = ids[-1]


def _clear_days(conn: Connection) -> None:
    """Clear the rollup from the oldest stored message's day on."""
    day = _Dialect.of(conn).day("min(created_at)")
    conn.execute(text(f"DELETE FROM daily_stats WHERE day >= (SELECT {day} FROM messages)"))


def _count_senders(conn: Connection) -> None:
    sql = upsert_adding_sql(
        "senders",
        ("sender_key", "messages", "last_at"),
        "SELECT sender_key, count(*), max(created_at) FROM messages WHERE true GROUP BY sender_key",
        ("sender_key",),
        assign=("messages", "last_at"),
    )
    conn.execute(text(sql))
    # A sender whose mail is all purged keeps its row (the menu), with no message.
    conn.execute(
        text(
            "UPDATE senders SET messages = 0 WHERE messages <> 0 AND NOT EXISTS"
            " (SELECT 1 FROM messages WHERE messages.sender_key = senders.sender_key)"
        )
    )


_EVERYTHING = _Scope("1 = 1", {})


def rebuild_connection(
    conn: Connection, size: int | None = None, commit: Callable[[], None] | None = None
) -> int:
    """:func:`rebuild` on one connection (``commit`` after each step, if given).

    Days older than the oldest message stored keep their rollup (purged mail's
    counts, shared/privacy.py); a sender whose mail is all purged keeps its row,
    with 0 messages.
    Returns the number of slices (1 for the whole tables at once).
    """

    def step() -> None:
        if commit is not None:
            commit()

    if size is None:  # set-based: each table in one statement, the rollup in one step
        _keys(conn, _EVERYTHING)
        _count_state(conn, _EVERYTHING)
        step()
        _clear_days(conn)  # the rollup cleared and refilled in one transaction
        _add_daily(conn, _EVERYTHING)
        _count_senders(conn)
        step()
        return 1
    _clear_days(conn)
    step()
    slices = list(_slices(conn, size))
    for lo, hi in slices:
        scope = _between(lo, hi)
        _keys(conn, scope)
        _count_state(conn, scope)
        _add_daily(conn, scope)
        step()
    _count_senders(conn)
    step()
    return len(slices)


def rebuild(engine: Engine, size: int | None = None) -> int:
    """Count every state column and rollup again from the events; returns the number
    of committed slices.

    Meant for a quiet moment (after a restore, a bug fixed, the migration).
    By default each table is counted in one statement over all its events (one
    aggregate, one join: 1M messages and 9.7M events in minutes, where slices
    of 5,000 messages took 21 minutes, BENCHMARKS.md "Scale"), the state in one
    transaction and the rollup cleared and refilled in a second, so the
    overview never reads low. That first transaction holds the row locks of
    every message and recipient it changes until it commits: a writer's batch
    waits for it (or, on a PostgreSQL deadlock, fails and is replayed by the
    spool). ``size`` counts ``size`` messages per committed transaction
    instead (``trackrelay db rebuild-state --slice``), for a database that
    is being written to: each lock is held one slice long, the rollup reads low
    until the last slice commits, and a hit written to a slice while it is
    counted may be missing from it or counted twice until the next rebuild.
    """
    with engine.connect() as conn:
        slices = rebuild_connection(conn, size, commit=conn.commit)
    if size is None:
        log.info("state rebuilt from every event at once")
    else:
        log.info("state rebuilt in %d slice(s) of %d messages", slices, size)
    return slices
