"""Seed a database with a year of mail (issue 13's distribution), in SQL.

Everything is INSERT ... SELECT over a generated series (``generate_series`` on
PostgreSQL, a recursive CTE on SQLite) through one temporary plan table, so a
million messages take minutes, not hours. The schema is the project's own:
:func:`shared.db.upgrade` runs the Alembic migrations first.

The distribution (``n`` messages):

- timestamps spread evenly over the 365 days before now;
- ``SENDERS`` senders: every 50th message is the heavy sender's
  (:data:`HEAVY_SENDER`, exactly 2 %), every 5,000th (from the 25th) the
  sparse sender's (:data:`SPARSE_SENDER`, 0.02 %: whose own events are few
  among everyone's); the others are Zipf-like (``power(u, 2)``: a few heavy
  ones, a long tail);
- 95 % tracked (opens and clicks, per recipient); 1-5 recipients (3 on
  average), drawn Zipf-like from ``n / 2`` addresses, so a few recipients get
  much mail; 2 % of recipients refused (550, the reply quoting the address);
- 1-16 links per tracked message (8 on average over all messages), URLs
  Zipf-like (``power(u, 3)`` over 5,000 products);
- events: 60 % of tracked messages have some, exponential with 17 on average
  (10 per message overall), about 30 % clicks; verdicts human 60 %, proxy 15 %,
  machine 15 %, scanner 5 %, unknown 5 %; each within days of its message;
- one heaviest message (the heavy sender's, mid-year) with ``heaviest`` events;
- subjects: about 1.1 % "Invoice ..." (5 % of the heavy sender's), the rest
  "Newsletter ...": what the search measurements look for;
- users: ``ada`` (admin), ``sam`` (sender, :data:`HEAVY_SENDER`) and ``sol``
  (sender, :data:`SPARSE_SENDER`).

Every row respects the schema: unique event keys, (message, position) unique
for recipients and links, every event's message, recipient position and link
position exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, inspect, text

from shared import eventstate
from shared.db import session_scope
from shared.models import User, UserAddress
from shared.passwords import hash_password

HEAVY_SENDER = "news@bigshop.example"
SPARSE_SENDER = "quiet@tinyshop.example"
SENDERS = 300
ADMIN, SENDER, SPARSE = "ada", "sam", "sol"
#: Each user and the address they send from ("" for the admin).
ADDRESSES = {ADMIN: "", SENDER: HEAVY_SENDER, SPARSE: SPARSE_SENDER}
PASSWORD = "scale bench password"
SPAN_DAYS = 365
MAX_EVENTS = 400  # one message's events in the ordinary distribution (the heaviest aside)
BASE_ID = 2**62  # message ids: 63-bit, as the relay's; bijective in the sequence number

# Verdicts by a draw in 0..19: 12 human, 3 proxy, 3 machine, 1 scanner, 1 unknown.
_VERDICT = (
    "CASE WHEN {v} < 12 THEN 'human' WHEN {v} < 15 THEN 'proxy' "
    "WHEN {v} < 18 THEN 'machine' WHEN {v} < 19 THEN 'scanner' ELSE 'unknown' END"
)
_AGENT = (
    "CASE WHEN {v} < 12 THEN 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_4) AppleWebKit/605.1.15' "
    "WHEN {v} < 15 THEN 'Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
    "(via ggpht.com GoogleImageProxy)' "
    "WHEN {v} < 18 THEN 'Mozilla/5.0' WHEN {v} < 19 THEN 'curl/8.5.0' ELSE '' END"
)


@dataclass(frozen=True)
class Seeded:
    """What was seeded, for the measurements."""

    messages: int
    heaviest_id: int
    heaviest_recipient: str
    seconds: float  # everything, the state included
    counts: dict[str, int]
    state_seconds: float = 0.0  # of which eventstate.rebuild


@dataclass(frozen=True)
class _Dialect:
    rand: str  # uniform in [0, 1)
    series: str  # rows (i) for i in 1..{n}, as a FROM item
    numbers: str  # rows (j) for j in 1..{n}, as a FROM item joined to m
    join_numbers: str  # the condition joining numbers to the plan row
    # A CTE whose random() columns are drawn once per row: SQLite would
    # flatten a plain subquery and draw again at every use; PostgreSQL never
    # pulls up a subquery with volatile columns, so it need not materialise.
    materialized: str
    least: str  # the smaller of two values

    def ts(self, epoch: str) -> str:
        raise NotImplementedError


class _Postgres(_Dialect):
    def ts(self, epoch: str) -> str:
        return f"to_timestamp({epoch})"


class _SQLite(_Dialect):
    def ts(self, epoch: str) -> str:
        # SQLAlchemy's SQLite DateTime text: 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)
        return f"(datetime({epoch}, 'unixepoch') || '.000000')"


POSTGRES = _Postgres(
    rand="random()",
    series="generate_series(CAST(1 AS BIGINT), {n}) AS s(i)",
    numbers="generate_series(1, m.ne) AS s(j)",
    join_numbers="TRUE",
    materialized="",
    least="LEAST",
)
SQLITE = _SQLite(
    rand="(abs(random()) / 9223372036854775808.0)",
    series="(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) "
    "SELECT i FROM s) AS s",
    numbers="bench_numbers AS s",
    join_numbers="s.j <= m.ne",
    materialized="MATERIALIZED",
    least="min",
)


def dialect_of(engine: Engine) -> _Dialect:
    return POSTGRES if engine.dialect.name == "postgresql" else SQLITE


def seed(engine: Engine, n: int, heaviest: int = 11_000, now: datetime | None = None) -> Seeded:
    """Fill the (migrated, empty) database at ``engine`` with ``n`` messages."""
    started = time.monotonic()
    d = dialect_of(engine)
    end = int((now or datetime.now(UTC)).timestamp())
    start = end - SPAN_DAYS * 86400
    heavy_i = max(50, (n // 2) // 50 * 50)  # a multiple of 50: the heavy sender's
    _users(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            conn.execute(text("SELECT setseed(0.13)"))
        dropped = _drop_indexes(conn)
        _plan(conn, d, n, start, end, heavy_i, heaviest)
        keys = _key_columns(conn)
        _messages(conn, d, "sender_key" in keys)
        _recipients(conn, d, n, "address_key" in keys)
        _links(conn, d)
        _events(conn, d, end, heaviest)
        conn.execute(
            text(
                "UPDATE messages SET status = 'partial' WHERE id IN "
                "(SELECT message_id FROM recipients WHERE status = 'refused')"
            )
        )
        heaviest_id = int(
            conn.execute(text(f"SELECT id FROM bench_m WHERE i = {heavy_i}")).one()[0]
        )
        state_seconds = _count_state(conn)
        for statement in dropped:
            conn.execute(text(statement))
        conn.execute(text("DROP TABLE bench_m"))
        if engine.dialect.name == "sqlite":
            conn.execute(text("DROP TABLE bench_numbers"))
    _analyze(engine)
    with engine.connect() as conn:
        counts = {
            table: int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("messages", "recipients", "links", "events")
        }
        recipient = conn.execute(
            text(
                "SELECT address FROM recipients GROUP BY address "
                "ORDER BY count(*) DESC, address LIMIT 1"
            )
        ).scalar_one()
    seconds = time.monotonic() - started
    return Seeded(n, heaviest_id, str(recipient), seconds, counts, state_seconds)


def _users(engine: Engine) -> None:
    password = hash_password(PASSWORD)
    with session_scope(engine) as s:
        s.add(User(username=ADMIN, password_hash=password, role="admin"))
        for name in (SENDER, SPARSE):
            sender = User(username=name, password_hash=password, role="sender")
            s.add(sender)
            s.flush()
            assert sender.id is not None
            s.add(UserAddress(user_id=sender.id, address=ADDRESSES[name]))


def _count_state(conn: Connection) -> float:
    """Migration 0004's state columns and rollups, counted from the seeded events by
    their owner (``shared.eventstate``'s whole-table rebuild) while the plain
    indexes are still dropped: each changed row then costs no index entries
    (half the time at 100k). Statistics first, for the planner; seconds taken."""
    started = time.monotonic()
    conn.execute(text("ANALYZE"))
    eventstate.rebuild_connection(conn)
    return time.monotonic() - started


def _drop_indexes(conn: Connection) -> list[str]:
    """PostgreSQL: drop the plain indexes of the four big tables (not those of
    constraints) for the load; return the statements that make them again."""
    if conn.dialect.name != "postgresql":
        return []
    rows = conn.execute(
        text(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            "WHERE i.schemaname = current_schema() "
            "AND i.tablename IN ('messages', 'recipients', 'links', 'events') "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
        )
    ).all()
    for name, _ in rows:
        conn.execute(text(f'DROP INDEX "{name}"'))
    return [definition for _, definition in rows]


def _plan(
    conn: Connection, d: _Dialect, n: int, start: int, end: int, heavy_i: int, heaviest: int
) -> None:
    """One row per message: its id, time, sender number, and how many
    recipients, links and events it gets."""
    r = d.rand
    span = end - start
    ne = (
        f"CASE WHEN i = {heavy_i} THEN {heaviest} WHEN i % 20 = 7 OR u >= 0.6 THEN 0 "
        f"WHEN e > {MAX_EVENTS} THEN {MAX_EVENTS} ELSE e END"
    )
    conn.execute(
        text(
            f"CREATE TEMPORARY TABLE bench_m AS WITH base AS {d.materialized} "
            f"(SELECT i, {r} AS u, CAST(floor(-ln(1 - {r}) * 16.5) AS INTEGER) + 1 AS e "
            f"FROM {d.series.format(n=n)}) SELECT i, "
            f"{BASE_ID} + ((i * 2654435761) % 2147483647) * 2097152 + i AS id, "
            f"{start} + (i * {span}) / {n} - 1 AS t, "
            "CASE WHEN i % 50 = 0 THEN 0 WHEN i % 5000 = 25 THEN -1 "
            f"ELSE 1 + CAST(floor(power({r}, 2) * {SENDERS - 1}) AS INTEGER) END AS sender_no, "
            "i % 20 <> 7 AS tracked, "
            f"1 + CAST(floor({r} * 5) AS INTEGER) AS nr, "
            f"CASE WHEN i % 20 = 7 THEN 0 ELSE 1 + CAST(floor({r} * 16) AS INTEGER) END AS nl, "
            f"{ne} AS ne FROM base"
        )
    )
    if conn.dialect.name == "sqlite":
        most = max(heaviest, MAX_EVENTS)
        conn.execute(text("CREATE TEMPORARY TABLE bench_numbers (j INTEGER PRIMARY KEY)"))
        conn.execute(
            text("INSERT INTO bench_numbers (j) SELECT i FROM " + SQLITE.series.format(n=most))
        )


def _key_columns(conn: Connection) -> set[str]:
    """The lower-cased key columns the schema has (migration 0004 and later):
    filled here, as the relay fills them (every seeded address is lower-case)."""
    found = set()
    for table, column in (("messages", "sender_key"), ("recipients", "address_key")):
        if column in {c["name"] for c in inspect(conn).get_columns(table)}:
            found.add(column)
    return found


def _messages(conn: Connection, d: _Dialect, sender_key: bool) -> None:
    sender = (
        f"CASE WHEN sender_no = 0 THEN '{HEAVY_SENDER}' "
        f"WHEN sender_no = -1 THEN '{SPARSE_SENDER}' "
        "ELSE 'sender' || sender_no || '@company' || (sender_no % 60) || '.example' END"
    )
    subject = (
        "CASE WHEN i % 100 = 37 OR i % 1000 = 100 THEN 'Invoice ' || i || ' for your order' "
        "ELSE 'Newsletter ' || (i % 997) || ': offers and news of the week' END"
    )
    tracked = "CASE WHEN tracked THEN TRUE ELSE FALSE END"
    conn.execute(
        text(
            "INSERT INTO messages (id, created_at, sender, from_header, subject, "
            "message_id_header, auth_user, client_ip, size_in, size_out, track_opens, "
            "track_clicks, per_recipient, decision, parts_modified, status, upstream_reply"
            f"{', sender_key' if sender_key else ''}) "
            f"SELECT id, {d.ts('t')}, s, 'Shop news <' || s || '>', {subject}, "
            "'<' || i || '.scale@mail.bigshop.example>', '', '192.0.2.10', 48000, 49000, "
            f"{tracked}, {tracked}, {tracked}, '', "
            "CASE WHEN tracked THEN 'text/html' ELSE '' END, 'sent', '250 2.0.0 Ok: queued'"
            f"{', s' if sender_key else ''} FROM (SELECT m.*, {sender} AS s FROM bench_m m) AS x"
        )
    )


def _recipients(conn: Connection, d: _Dialect, n: int, address_key: bool) -> None:
    numbers = d.numbers.replace("m.ne", "m.nr")
    join = d.join_numbers.replace("m.ne", "m.nr")
    pool = n // 2 + 100
    address = "'r' || k || '@client' || (k % 97) || '.example'"
    conn.execute(
        text(
            "INSERT INTO recipients (message_id, position, address, tracked, status, "
            f"reply_code, reply_text{', address_key' if address_key else ''}) "
            f"WITH y AS {d.materialized} (SELECT m.id, s.j, m.tracked, {d.rand} AS u, "
            f"CAST(floor(power({d.rand}, 2) * {pool}) AS INTEGER) AS k "
            f"FROM bench_m m CROSS JOIN {numbers} WHERE {join}) "
            "SELECT id, j, a, tracked, CASE WHEN refused THEN 'refused' ELSE 'accepted' END, "
            "CASE WHEN refused THEN 550 ELSE 250 END, "
            "CASE WHEN refused THEN '5.1.1 <' || a || '>: mailbox unavailable' ELSE 'OK' END"
            f"{', a' if address_key else ''} "
            f"FROM (SELECT id, j, tracked, {address} AS a, u < 0.02 AS refused FROM y) AS x"
        )
    )


def _links(conn: Connection, d: _Dialect) -> None:
    numbers = d.numbers.replace("m.ne", "m.nl")
    join = d.join_numbers.replace("m.ne", "m.nl")
    conn.execute(
        text(
            "INSERT INTO links (message_id, position, url) "
            "SELECT m.id, s.j, 'https://shop' || (s.j % 20) || '.bigshop.example/p/' "
            f"|| CAST(floor(power({d.rand}, 3) * 5000) AS INTEGER) || '?utm_source=news' "
            f"FROM bench_m m CROSS JOIN {numbers} WHERE m.nl > 0 AND {join}"
        )
    )


def _events(conn: Connection, d: _Dialect, end: int, heaviest: int) -> None:
    v = "CAST(floor(w * 20) AS INTEGER)"
    click = "(nl > 0 AND u < 0.3)"
    # within days of the message (exponential, 1.5 days on average), never in
    # the future; the heaviest message's hits spread over the weeks after it
    mean = f"CASE WHEN ne >= {heaviest} THEN 1209600 ELSE 129600 END"
    when = f"{d.least}(t + CAST(floor(-ln(1 - z) * {mean}) AS INTEGER), {end})"
    conn.execute(
        text(
            "INSERT INTO events (event_key, message_id, recipient_position, link_position, "
            "kind, occurred_at, ip, user_agent, method, verdict, reasons) "
            f"WITH y AS {d.materialized} (SELECT m.i, m.id, m.t, m.nr, m.nl, m.ne, s.j, "
            f"{d.rand} AS u, {d.rand} AS w, {d.rand} AS z, {d.rand} AS p, {d.rand} AS q "
            f"FROM bench_m m CROSS JOIN {d.numbers} WHERE m.ne > 0 AND {d.join_numbers}) "
            "SELECT 'b' || i || '-' || j, id, 1 + CAST(floor(p * nr) AS INTEGER), "
            f"CASE WHEN {click} THEN 1 + CAST(floor(q * q * nl) AS INTEGER) ELSE 0 END, "
            f"CASE WHEN {click} THEN 'click' ELSE 'open' END, {d.ts(when)}, "
            f"'198.51.100.0', {_AGENT.format(v=v)}, 'GET', "
            f"CASE WHEN {click} THEN CASE WHEN {v} < 17 THEN 'human' ELSE 'scanner' END "
            f"ELSE {_VERDICT.format(v=v)} END, 'scale-bench' FROM y"
        )
    )


def _analyze(engine: Engine) -> None:
    """What autovacuum would have done on a database a year old: statistics and
    the visibility map (index-only scans)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
