"""A year of mail (issue 13): the dashboard, the API, the exports, purge and erase
timed over HTTP against the real receiver on a seeded database.

    python -m bench.scale --messages 100000 \\
        --database postgresql+psycopg://postgres@127.0.0.1:5432/scale_bench_100k
    python -m bench.scale --messages 100000 1000000 --database postgresql+psycopg://...
    python -m bench.scale --sqlite --messages 20000
    python -m bench.scale --render              # rewrite scale.md from scale.json

For each size: create the database (PostgreSQL: ``--database`` names one that
is created and dropped; ``--sqlite``: a file in a temporary directory), run the
project's migrations, seed it (bench/scaleseed.py, which counts the derived
state with its owner, ``shared.eventstate``'s whole-table rebuild), start
``trackrelay receiver`` on it, log in through the login form as the admin and
as the sender who owns 2 % of the mail, make an API token for each, then time
every page and call (median of ``--repeat`` after one warm-up), stream both
CSV exports (rows/s, receiver RSS before, peak, after), and run retention
purge and erasure (shared/privacy.py) while a probe sends pixel hits and keeps
the slowest. Results accumulate in ``bench/results/scale.json`` (one entry per
database and size); ``scale.md`` is the table with every size measured, the
growth ratio from the smallest to the largest, and issue 13's targets marked
met / not met at the largest size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from bench import scaleseed
from bench.harness import ROOT, Server
from bench.receiver import SECRET, start
from shared import db, privacy
from shared.apitokens import create_token
from shared.models import Message
from shared.tokens import Signer

RESULTS = ROOT / "bench" / "results"
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/trackrelay_scale_bench"
D, API = "/dashboard", "/api/v1"
PAGE_MS, GROWTH, CSV_ROWS_S, FLAT_MB = 200.0, 2.0, 20_000, 64
PURGE_IDLE_MS, ERASE_S, PROBE_MS = 100.0, 5.0, 1000.0


# --- the database -------------------------------------------------------------


@contextlib.contextmanager
def database(url: str) -> Iterator[str]:
    """A new, empty database at ``url`` (PostgreSQL), dropped afterwards;
    ``sqlite`` for a file in a temporary directory."""
    if url == "sqlite":
        work = Path(tempfile.mkdtemp(prefix="trackrelay-scale-"))
        try:
            yield f"sqlite:///{work / 'scale.db'}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    parsed = make_url(url)
    name = parsed.database
    if not name or not re.fullmatch(r"[a-z0-9_]+", name):
        raise SystemExit(f"--database: name a database of [a-z0-9_] to create, not {name!r}")
    admin = db.make_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    _drop(admin, name)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield parsed.render_as_string(hide_password=False)
    finally:
        _drop(admin, name)
        admin.dispose()


def _drop(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


def prepare(url: str, messages: int, heaviest: int) -> tuple[Engine, scaleseed.Seeded]:
    """Migrate and seed (the derived state included)."""
    db.upgrade(url)
    engine = db.make_engine(url)
    return engine, scaleseed.seed(engine, messages, heaviest)


# --- the receiver and its clients -----------------------------------------------


@contextlib.contextmanager
def receiver(url: str) -> Iterator[tuple[Server, str]]:
    work = Path(tempfile.mkdtemp(prefix="trackrelay-scale-recv-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
    env |= {
        "TRACKRELAY_VAR_DIR": str(work / "var"),
        "TRACKRELAY_DATABASE_URL": url,
        "TRACKRELAY_SECRET_KEY": SECRET,
        "TRACKRELAY_HTTP_PORT": "0",
        "TRACKRELAY_RECEIVER_WORKERS": "1",
        "TRACKRELAY_LOG_LEVEL": "WARNING",
        "TRACKRELAY_RETENTION_DAYS": "0",  # the benchmark purges, not the hourly loop
    }
    proc, address = start(
        [sys.executable, "-m", "trackrelay", "receiver"],
        env,
        work / "receiver.log",
        r"http://(127\.0\.0\.1:\d+)/",
    )
    try:
        yield Server(int(address.rsplit(":", 1)[1]), proc), f"http://{address}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def dashboard_client(base: str, username: str) -> httpx.Client:
    """A client signed in through the real login form."""
    client = httpx.Client(base_url=base, timeout=600)
    page = client.get(f"{D}/login")
    match = CSRF.search(page.text)
    if match is None:
        raise RuntimeError(f"no CSRF field on the login page ({page.status_code})")
    data = {"username": username, "password": scaleseed.PASSWORD, "csrf_token": match[1]}
    response = client.post(f"{D}/login", data=data, follow_redirects=False)
    if response.status_code != 303:
        raise RuntimeError(f"login as {username} failed: {response.status_code}")
    return client


def api_client(base: str, engine: Engine, username: str) -> httpx.Client:
    token, _ = create_token(engine, username, "scale bench")
    return httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Bearer {token}"})


# --- timing -----------------------------------------------------------------------


def timed(client: httpx.Client, path: str, repeat: int) -> dict[str, Any]:
    """Median of ``repeat`` GETs after one warm-up; every status seen; bytes of the last."""
    statuses: set[int] = set()
    times: list[float] = []
    size = 0
    for attempt in range(repeat + 1):
        began = time.perf_counter()
        response = client.get(path)
        elapsed = (time.perf_counter() - began) * 1000
        statuses.add(response.status_code)
        size = len(response.content)
        if attempt:
            times.append(elapsed)
    return {
        "path": path,
        "ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "statuses": sorted(statuses),
        "bytes": size,
    }


_PAGE_OF = re.compile(r"Page\s+\d+\s+of\s+([\d,]+)")
PER_PAGE = 50


def deep_pages(client: httpx.Client, engine: Engine, sender: str, page: int) -> tuple[str, str]:
    """Paths of list page ``page`` and of the last page, in the pager's own terms.

    A numbered pager ("Page 1 of N", ``?page=N``): those numbers. A keyset
    pager (``?cursor=``, receiver/readmodel/paging.py): the cursor its "Older"
    link would carry after ``page - 1`` clicks, i.e. the last row of the page
    before, found here in the database (following the link 49 times would
    time 49 pages, not one), and likewise for the last page.
    """
    html = client.get(f"{D}/messages").text
    if 'class="pager"' not in html:  # one page holds it all
        return f"{D}/messages", f"{D}/messages"
    found = _PAGE_OF.search(html)
    if found is not None and "page=" in html:
        last = int(found[1].replace(",", ""))
        return f"{D}/messages?page={min(page, last)}", f"{D}/messages?page={last}"
    if "cursor=" not in html:
        raise RuntimeError("the messages pager has neither page numbers nor cursors")
    table = Message.__table__  # type: ignore[attr-defined]
    visible = select(func.count()).select_from(table)
    if sender:
        visible = visible.where(table.c.sender == sender)
    with engine.connect() as conn:
        total = int(conn.execute(visible).scalar_one())
    last = max(1, -(-total // PER_PAGE))
    return _cursor_page(engine, sender, min(page, last)), _cursor_page(engine, sender, last)


def _cursor_page(engine: Engine, sender: str, page: int) -> str:
    if page == 1:
        return f"{D}/messages"
    from receiver.readmodel.paging import Cursor  # type: ignore[import-not-found]

    table = Message.__table__  # type: ignore[attr-defined]
    query = select(table.c.created_at, table.c.id)
    if sender:
        query = query.where(table.c.sender == sender)
    query = query.order_by(table.c.created_at.desc(), table.c.id.desc())
    with engine.connect() as conn:
        created, row_id = conn.execute(query.offset((page - 1) * PER_PAGE - 1).limit(1)).one()
    cursor = Cursor(created, int(row_id), True).encode()
    return f"{D}/messages?{httpx.QueryParams(cursor=cursor)}"


def dashboard_calls(seeded: scaleseed.Seeded, admin: bool) -> list[tuple[str, str]]:
    q = httpx.QueryParams
    calls = [
        ("filter Opened", f"{D}/messages?{q(state='opened')}"),
        ("filter Not opened", f"{D}/messages?{q(state='not_opened')}"),
        ("filter Clicked", f"{D}/messages?{q(state='clicked')}"),
        ("search subject", f"{D}/messages?{q(q='Invoice')}"),
        ("search recipient", f"{D}/messages?{q(q=seeded.heaviest_recipient)}"),
        ("overview by day", f"{D}/overview?period=day"),
        ("overview by week", f"{D}/overview?period=week"),
    ]
    if admin:
        calls.append(("heaviest message page", f"{D}/messages/{seeded.heaviest_id}"))
    return calls


def api_calls(seeded: scaleseed.Seeded, admin: bool) -> list[tuple[str, str]]:
    middle = seeded.counts["events"] // 2
    calls = [
        ("API messages?opened=true", f"{API}/messages?opened=true"),
        ("API events (first 100)", f"{API}/events?limit=100"),
        # ids are 1..N in a seeded database: a cursor half way through everyone's events
        ("API events (100 after the middle)", f"{API}/events?limit=100&after={middle}"),
    ]
    if admin:
        calls.append(("heaviest message API", f"{API}/messages/{seeded.heaviest_id}"))
    return calls


def pages(
    base: str,
    engine: Engine,
    seeded: scaleseed.Seeded,
    username: str,
    options: Options,
) -> dict[str, dict[str, Any]]:
    """Every page and call of ``username`` (those ``options.calls`` name, if any)."""
    admin = username == scaleseed.ADMIN
    out: dict[str, dict[str, Any]] = {}
    with (
        closing(dashboard_client(base, username)) as web,
        closing(api_client(base, engine, username)) as api,
    ):
        deep, last = deep_pages(web, engine, scaleseed.ADDRESSES[username], 50)
        calls = [
            (web, "messages page 1", f"{D}/messages"),
            (web, "messages page 50", deep),
            (web, "messages last page", last),
            *((web, label, path) for label, path in dashboard_calls(seeded, admin)),
            *((api, label, path) for label, path in api_calls(seeded, admin)),
        ]
        for client, label, path in calls:
            if options.calls and not any(c in label for c in options.calls):
                continue
            out[label] = timed(client, path, options.repeat)
            if options.echo:
                r = out[label]
                print(
                    f"   {username:4s} {label:26s} {r['ms']:9.1f} ms  {r['statuses']}", flush=True
                )
    return out


def csv_export(
    base: str, server: Server, username: str, path: str, budget: float
) -> dict[str, Any]:
    """Stream a CSV export: rows/s and the receiver's RSS before, at its peak, after."""
    before = server.rss()
    peak, rows, status = before, -1, 0  # the header line is no row
    stopped = False
    with closing(dashboard_client(base, username)) as web:
        began = last_sample = time.perf_counter()  # after the login
        with web.stream("GET", path) as response:
            status = response.status_code
            for chunk in response.iter_bytes():
                rows += chunk.count(b"\n")
                now = time.perf_counter()
                if now - last_sample > 0.25:
                    peak, last_sample = max(peak, server.rss()), now
                if now - began > budget:
                    stopped = True
                    break
            elapsed = time.perf_counter() - began
    time.sleep(0.5)
    after = server.rss()
    return {
        "path": path,
        "status": status,
        "rows": max(rows, 0),
        "seconds": elapsed,
        "rows_per_s": max(rows, 0) / elapsed,
        "stopped_after_budget": stopped,
        "rss_before_mb": before / 2**20,
        "rss_peak_mb": max(peak, after) / 2**20,
        "rss_after_mb": after / 2**20,
    }


# --- purge and erase under a probe ---------------------------------------------------


class Probe:
    """Pixel hits in a loop on its own connection; the slowest one is kept."""

    def __init__(self, base: str, message_id: int) -> None:
        token = Signer([SECRET.encode()]).open_token(message_id, 1)
        self.path = f"/o/{token}.gif"
        self.client = httpx.Client(base_url=base, timeout=60)
        self.slowest_ms = 0.0
        self.hits = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                ok = self.client.get(self.path).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.slowest_ms = max(self.slowest_ms, (time.perf_counter() - began) * 1000)
            self.hits += 1
            self.failures += not ok
            self._stop.wait(0.02)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        self.client.close()

    def result(self) -> dict[str, Any]:
        return {
            "probe_hits": self.hits,
            "probe_failures": self.failures,
            "probe_slowest_ms": self.slowest_ms,
        }


def retention(engine: Engine, base: str, seeded: scaleseed.Seeded, repeat: int) -> dict[str, Any]:
    """The hourly purge with nothing due (median), then the oldest 10 % purged,
    then the heaviest recipient erased, each under the probe."""
    with engine.connect() as conn:
        created = Message.__table__.c.created_at  # type: ignore[attr-defined]
        oldest = conn.execute(select(func.min(created))).scalar_one()
    idle: list[float] = []
    for _ in range(repeat + 1):
        began = time.perf_counter()
        nothing = privacy.purge(engine, scaleseed.SPAN_DAYS + 2)
        idle.append((time.perf_counter() - began) * 1000)
    out: dict[str, Any] = {
        "purge_idle_ms": statistics.median(idle[1:]),
        "purge_idle_counts": nothing,
    }
    cutoff = oldest + timedelta(days=scaleseed.SPAN_DAYS / 10)
    with Probe(base, seeded.heaviest_id) as probe:
        began = time.perf_counter()
        out["purge_counts"] = privacy.purge(engine, 1, now=cutoff + timedelta(days=1))
        out["purge_s"] = time.perf_counter() - began
    out["purge_probe"] = probe.result()
    with Probe(base, seeded.heaviest_id) as probe:
        began = time.perf_counter()
        erased = privacy.erase(engine, seeded.heaviest_recipient)
        out["erase_s"] = time.perf_counter() - began
    out["erase_counts"] = erased.counts
    out["erase_probe"] = probe.result()
    return out


# --- one size, several sizes ----------------------------------------------------------


@dataclass
class Options:
    database: str  # a PostgreSQL URL or "sqlite"
    repeat: int = 5
    heaviest: int = 11_000
    csv_budget: float = 300.0
    echo: bool = True
    only: tuple[str, ...] = ()  # of PARTS; none: all of them
    calls: tuple[str, ...] = ()  # pages and calls whose label contains one of these; none: all

    def runs(self, part: str) -> bool:
        return not self.only or part in self.only


#: What one size measures: each viewer's pages and calls, the CSV exports, purge and erase.
VIEWERS = {"admin": scaleseed.ADMIN, "sender": scaleseed.SENDER, "sparse": scaleseed.SPARSE}
PARTS = (*VIEWERS, "csv", "retention")


def measure(messages: int, options: Options) -> dict[str, Any]:
    """Everything for one size; the database is gone afterwards."""
    say = print if options.echo else (lambda *a, **k: None)
    with database(options.database) as url:
        say(f"== {messages} messages on {make_url(url).get_backend_name()}: seeding", flush=True)
        engine, seeded = prepare(url, messages, options.heaviest)
        rebuild_s = seeded.state_seconds
        say(f"   seeded in {seeded.seconds:.0f} s ({seeded.counts}), state {rebuild_s:.0f} s")
        result: dict[str, Any] = {
            "backend": engine.dialect.name,
            "messages": messages,
            "seed_s": seeded.seconds - rebuild_s,
            "state_rebuild_s": rebuild_s,
            "counts": seeded.counts,
            "heaviest_events": options.heaviest,
            "repeat": options.repeat,
            "heaviest_recipient": seeded.heaviest_recipient,
        }
        try:
            with receiver(url) as (server, base):
                for viewer, user in VIEWERS.items():
                    if options.runs(viewer):
                        result[viewer] = pages(base, engine, seeded, user, options)
                if options.runs("csv"):
                    result["csv"] = {
                        f"{who} {kind}": csv_export(
                            base, server, user, f"{D}/{kind}.csv", options.csv_budget
                        )
                        for who, user in VIEWERS.items()
                        for kind in ("messages", "events")
                    }
                    say(f"   csv: {_csv_line(result['csv'])}", flush=True)
                if options.runs("retention"):
                    result["retention"] = retention(engine, base, seeded, options.repeat)
                    say(f"   retention: {_retention_line(result['retention'])}", flush=True)
        finally:
            engine.dispose()
    return result


def _csv_line(csv: dict[str, Any]) -> str:
    return "; ".join(f"{k} {v['rows_per_s']:.0f} rows/s" for k, v in csv.items())


def _retention_line(r: dict[str, Any]) -> str:
    return (
        f"idle purge {r['purge_idle_ms']:.1f} ms, 10 % purge {r['purge_s']:.1f} s, "
        f"erase {r['erase_s']:.1f} s, slowest hit "
        f"{max(r['purge_probe']['probe_slowest_ms'], r['erase_probe']['probe_slowest_ms']):.0f} ms"
    )


def store(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Add one size's result to the file: what it measured replaces what an older run
    of the same size said (a run of some parts, ``--only``, keeps the others)."""
    stored: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    key = f"{result['backend']} {result['messages']}"
    runs = stored.setdefault("runs", {})
    runs[key] = {**runs.get(key, {}), **result, "machine": _machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2, default=str))
    return stored


def _machine() -> dict[str, Any]:
    from bench.run import machine

    return machine()


# --- the table --------------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _growth(small: float | None, large: float | None) -> float | None:
    return None if not small or large is None else large / small


def render(stored: dict[str, Any]) -> str:
    """The Markdown tables: every backend, every size, growth and targets."""
    out = ["# Scale (issue 13)", ""]
    runs = stored.get("runs", {})
    for backend in sorted({r["backend"] for r in runs.values()}):
        sizes = sorted(
            (r for r in runs.values() if r["backend"] == backend), key=lambda r: r["messages"]
        )
        out += _render_backend(backend, sizes)
    return "\n".join(out) + "\n"


def _render_backend(backend: str, sizes: list[dict[str, Any]]) -> list[str]:
    m = sizes[-1]["machine"]
    head = [f"{r['messages']:,}" for r in sizes]
    out = [
        f"## {backend}",
        "",
        f"{m['date']}, commit {m['commit']}; {m['cpu']}, {m['cores']} cores. Seeding: "
        + ", ".join(
            f"{r['messages']:,} in {r['seed_s']:.0f} s (+{r['state_rebuild_s']:.0f} s "
            f"state; {r['counts']['events']:,} events)"
            for r in sizes
        )
        + f". Medians of {sizes[-1].get('repeat', 5)} after a warm-up; targets judged at the "
        "largest size.",
        "",
        "| viewer | page / call | " + " | ".join(head) + " | growth | < 200 ms | growth < 2x |",
        "|---|---|" + "---|" * (len(sizes) + 3),
    ]
    for viewer in VIEWERS:
        for label in sizes[-1].get(viewer, {}):
            values = [r.get(viewer, {}).get(label, {}) for r in sizes]
            ms = [v.get("ms") for v in values]
            bad = any(s != [200] for v in values for s in [v.get("statuses", [200])])
            growth = _growth(ms[0], ms[-1]) if len(sizes) > 1 else None
            out.append(
                f"| {viewer} | {label}{' (non-200!)' if bad else ''} | "
                + " | ".join(_fmt_ms(v) for v in ms)
                + f" | {'-' if growth is None else f'{growth:.1f}x'} | "
                f"{_met(ms[-1] is not None and ms[-1] < PAGE_MS)} | "
                f"{'-' if growth is None else _met(growth < GROWTH)} |"
            )
    out += ["", *_render_exports(sizes), "", *_render_retention(sizes), ""]
    return out


def _render_exports(sizes: list[dict[str, Any]]) -> list[str]:
    out = [
        "| export | size | rows | rows/s | RSS before / peak / after MB | > 20,000 rows/s, flat |",
        "|---|---|---|---|---|---|",
    ]
    for r in sizes:
        for label, c in r.get("csv", {}).items():
            flat = c["rss_peak_mb"] - c["rss_before_mb"] < FLAT_MB
            ok = c["rows_per_s"] > CSV_ROWS_S and flat and not c["stopped_after_budget"]
            stopped = f" (stopped after {c['seconds']:.0f} s)" if c["stopped_after_budget"] else ""
            out.append(
                f"| {label} | {r['messages']:,} | {c['rows']:,}{stopped} | "
                f"{c['rows_per_s']:,.0f} | "
                f"{c['rss_before_mb']:.0f} / {c['rss_peak_mb']:.0f} / {c['rss_after_mb']:.0f} | "
                f"{_met(ok)} |"
            )
    return out


def _render_retention(sizes: list[dict[str, Any]]) -> list[str]:
    out = [
        "| size | purge, nothing due (< 100 ms) | purge oldest 10 % | erase heaviest recipient "
        "(< 5 s) | slowest hit during them (< 1 s) |",
        "|---|---|---|---|---|",
    ]
    for r in sizes:
        t = r.get("retention")
        if not t:
            continue
        idle = t["purge_idle_ms"]
        slowest = max(t["purge_probe"]["probe_slowest_ms"], t["erase_probe"]["probe_slowest_ms"])
        purged = t["purge_counts"]
        out.append(
            f"| {r['messages']:,} | {idle:.1f} ms {_met(idle < PURGE_IDLE_MS)} | "
            f"{t['purge_s']:.1f} s ({purged.get('messages', 0):,} messages, "
            f"{purged.get('events', 0):,} events) | "
            f"{t['erase_s']:.1f} s ({t['erase_counts'].get('recipients', 0):,} rows) "
            f"{_met(t['erase_s'] < ERASE_S)} | {slowest:.0f} ms {_met(slowest < PROBE_MS)} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, nargs="+", default=[100_000])
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--database", default="", help="a PostgreSQL URL naming a database to create"
    )
    where.add_argument("--sqlite", action="store_true", help="SQLite in a temporary directory")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--heaviest", type=int, default=11_000, help="events of the heaviest message"
    )
    parser.add_argument("--csv-budget", type=float, default=300.0, help="seconds per CSV at most")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=[], help="measure only these parts"
    )
    parser.add_argument(
        "--calls", nargs="+", default=[], help="only the pages and calls whose label has one"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only rewrite scale.md")
    args = parser.parse_args(argv)
    path = args.output / "scale.json"
    if args.render:
        return _write_md(json.loads(path.read_text()), args.output)
    if not args.sqlite and not args.database:
        parser.error("give --database postgresql+psycopg://... or --sqlite")
    options = Options(
        "sqlite" if args.sqlite else args.database,
        args.repeat,
        args.heaviest,
        args.csv_budget,
        only=tuple(args.only),
        calls=tuple(args.calls),
    )
    for n in args.messages:
        started = time.monotonic()
        stored = store(measure(n, options), path)
        print(f"== {n} messages done in {time.monotonic() - started:.0f} s", flush=True)
        _write_md(stored, args.output)
    return 0


def _write_md(stored: dict[str, Any], output: Path) -> int:
    markdown = render(stored)
    (output / "scale.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
