"""How fast the CSV exports stream, and whether memory stays flat (no test: figures).

Seeds a fresh PostgreSQL database (``generate_series``, a few seconds) with
``--messages`` messages (3 recipients each, a tenth from one heavy sender) and
``--events`` events, then drains readmodel's ``export_messages`` and
``export_events`` as an admin and as the heavy sender, printing rows/s and the
process's peak RSS before and after::

    .venv/bin/python -m bench.export_rate --url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

The database it creates (``trackrelay_export_rate``) is dropped at the end.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from receiver import readmodel
from shared import db
from shared.identity import Viewer

NAME = "trackrelay_export_rate"
SEED = [
    """INSERT INTO messages (id, created_at, sender, sender_key, from_header, subject,
       message_id_header, auth_user, client_ip, size_in, size_out, track_opens, track_clicks,
       per_recipient, decision, parts_modified, status, upstream_reply, opens, machine_opens,
       self_opens, clicks, machine_clicks, self_clicks, replies, auto_replies, bounces,
       complaints)
     SELECT g, timestamp '2026-01-01' + g * interval '30 seconds',
       CASE WHEN g % 10 = 0 THEN 'heavy@big.example' ELSE 's' || (g % 300) || '@x.example' END,
       CASE WHEN g % 10 = 0 THEN 'heavy@big.example' ELSE 's' || (g % 300) || '@x.example' END,
       '', 'Subject number ' || g, '', '', '', 0, 0, true, true, true, '', '', 'sent', '',
       g % 3, 0, 0, g % 2, 0, 0, 0, 0, 0, 0
     FROM generate_series(1, :messages) g""",
    """INSERT INTO recipients (message_id, position, address, tracked, status, reply_code,
       reply_text, opens, machine_opens, self_opens, clicks, machine_clicks, self_clicks,
       bounce_type)
     SELECT m, p, 'r' || m || '-' || p || '@client.example', true, 'accepted', 250, '',
       0, 0, 0, 0, 0, 0, ''
     FROM generate_series(1, :messages) m, generate_series(1, 3) p""",
    """INSERT INTO events (event_key, message_id, recipient_position, link_position, kind,
       occurred_at, ip, user_agent, method, verdict, reasons, bounce_type, status_code,
       diagnostic)
     SELECT 'k' || g, 1 + (g::bigint * 7919) % :messages, 1 + g % 3, 0, 'open',
       timestamp '2026-01-02' + g * interval '1 second', '198.51.100.0',
       'Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0', 'GET', 'human', 'ua:browser', '', '', ''
     FROM generate_series(1, :events) g""",
]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drain(rows: Iterator[tuple[Any, ...]]) -> tuple[int, float]:
    start = time.perf_counter()
    count = sum(1 for _ in rows)
    return count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a PostgreSQL URL to create the database")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=600_000)
    args = parser.parse_args(argv)
    admin_engine = db.make_engine(args.url, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{NAME}"'))
    url = make_url(args.url).set(database=NAME).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        engine = db.make_engine(url)
        with engine.begin() as conn:
            for sql in SEED:
                conn.execute(text(sql), {"messages": args.messages, "events": args.events})
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
        everyone = readmodel.Selection()
        admin = Viewer(1, "root", "admin", ())
        heavy = Viewer(2, "heavy", "sender", ("heavy@big.example",))
        print(f"peak RSS before: {peak_mb():.0f} MB")
        for label, viewer in (("admin", admin), ("sender", heavy)):
            for kind, export in (
                ("messages", readmodel.export_messages),
                ("events", readmodel.export_events),
            ):
                count, seconds = drain(export(engine, viewer, everyone))
                print(
                    f"{kind:8} {label:6} {count:8} rows {seconds:6.1f} s "
                    f"{count / seconds:8.0f} rows/s  peak RSS {peak_mb():.0f} MB"
                )
        engine.dispose()
    finally:
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)'))
        admin_engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
