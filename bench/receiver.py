"""Pixel throughput: the receiver with durable event recording vs a bare GIF endpoint.

    python -m bench.receiver [--workers N] [--duration S] [--rounds R] [--database-url URL]

Starts two servers with the same uvicorn setup (httptools, uvloop, same worker
count): ``trackrelay receiver`` and a bare Starlette app answering the same
43-byte GIF at the same path. Alternates wrk runs (64 connections) between
them, reports hits/s and p99 per run and the medians, then checks that every
hit the receiver answered is a row in the database.

Target: receiver >= 0.9x the bare endpoint's hits/s, receiver p99 < 10 ms.
wrk is closed-loop: at saturation, latency ~ connections / throughput, so the
p99 figure mostly measures how fast the server drains 64 queued connections.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from shared import db
from shared.tokens import Signer

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-0123456789abcdef0123456789"


def start(
    cmd: list[str], env: dict[str, str], log: Path, pattern: str
) -> tuple[subprocess.Popen[bytes], str]:
    out = open(log, "wb")  # noqa: SIM115 - the child writes it while it runs
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            time.sleep(1.0)  # let every worker finish its startup
            return proc, match[1]
        if proc.poll() is not None:
            raise SystemExit(f"{cmd} exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{cmd} did not start:\n{log.read_text()}")


def wrk(url: str, duration: float, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    total = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "requests": total,
        "p50_ms": p50,
        "p99_ms": p99,
        "non_2xx": int(errors[1]) if errors else 0,
        "socket_errors": socket_errors[1] if socket_errors else "",  # type: ignore[dict-item]
    }


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def metric(url: str, line_start: str) -> int:
    with urllib.request.urlopen(url + "/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_start):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    summary = measure(
        args.workers, args.duration, args.rounds, args.connections, args.database_url, echo=True
    )
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"receiver-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"results: {out}")
    return 0 if summary["all_hits_stored"] else 1


def measure(  # noqa: C901 - one benchmark run, set-up to tear-down
    workers: int = 1,
    duration: int = 10,
    rounds: int = 3,
    connections: int = 64,
    database_url: str = "",
    *,
    echo: bool = False,
) -> dict[str, Any]:
    """Run the comparison; the summary says whether every answered hit was stored."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    def say(line: str) -> None:
        if echo:
            print(line, flush=True)

    work = Path(tempfile.mkdtemp(prefix="trackrelay-bench-"))
    database_url = database_url or f"sqlite:///{work / 'bench.db'}"
    db.upgrade(database_url)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        before = conn.execute(text("SELECT count(*) FROM events")).scalar_one()

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
    env |= {
        "TRACKRELAY_VAR_DIR": str(work / "var"),
        "TRACKRELAY_DATABASE_URL": database_url,
        "TRACKRELAY_SECRET_KEY": SECRET,
        "TRACKRELAY_HTTP_PORT": "0",
        "TRACKRELAY_RECEIVER_WORKERS": str(workers),
        "TRACKRELAY_LOG_LEVEL": "WARNING",
    }
    receiver, receiver_url = start(
        [sys.executable, "-m", "trackrelay", "receiver"],
        env,
        work / "receiver.log",
        r"http://(127\.0\.0\.1:\d+)/",
    )
    bare, bare_url = start(
        [sys.executable, "-m", "bench.bare", "--workers", str(workers)],
        env,
        work / "bare.log",
        r"bare endpoint on http://(127\.0\.0\.1:\d+)/",
    )
    path = f"/o/{Signer([SECRET.encode()]).open_token(4242, 1)}.gif"
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "receiver": []}
    receiver_total = 0  # responses wrk completed from the receiver, warm-up included
    served = 0
    try:
        for name, base in (("bare", bare_url), ("receiver", receiver_url)):
            warm = wrk(f"http://{base}{path}", 2, connections)
            receiver_total += int(warm["requests"]) if name == "receiver" else 0
        for round_ in range(rounds):
            for name, base in (("bare", bare_url), ("receiver", receiver_url)):
                result = wrk(f"http://{base}{path}", duration, connections)
                runs[name].append(result)
                receiver_total += int(result["requests"]) if name == "receiver" else 0
                say(
                    f"round {round_ + 1} {name:9s} {result['rps']:9.0f} hits/s  "
                    f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
                )
        if workers == 1:  # one process: its counter is every hit it answered
            served = metric(f"http://{receiver_url}", VALID_HITS)
    finally:
        for proc in (receiver, bare):
            proc.send_signal(signal.SIGTERM)  # the receiver flushes its queue on the way out
        for proc in (receiver, bare):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    with engine.begin() as conn:
        stored = conn.execute(text("SELECT count(*) FROM events")).scalar_one() - before
        distinct = conn.execute(text("SELECT count(DISTINCT event_key) FROM events")).scalar_one()
        distinct -= before
    engine.dispose()
    shutil.rmtree(work, ignore_errors=True)

    bare_rps = statistics.median(r["rps"] for r in runs["bare"])
    recv_rps = statistics.median(r["rps"] for r in runs["receiver"])
    # wrk does not count the requests in flight when a run stops (at most one per
    # connection and run); the server answered, and so recorded, those too.
    in_flight = connections * (rounds + 1)
    ok = distinct == stored and receiver_total <= stored <= receiver_total + in_flight
    if workers == 1:
        ok = ok and stored == served
    summary: dict[str, Any] = {
        "workers": workers,
        "connections": connections,
        "duration_s": duration,
        "rounds": rounds,
        "database": database_url.split("@")[-1],
        "bare_median_rps": bare_rps,
        "bare_min_rps": min(r["rps"] for r in runs["bare"]),
        "bare_max_rps": max(r["rps"] for r in runs["bare"]),
        "receiver_median_rps": recv_rps,
        "receiver_min_rps": min(r["rps"] for r in runs["receiver"]),
        "receiver_max_rps": max(r["rps"] for r in runs["receiver"]),
        "ratio": recv_rps / bare_rps,
        "ratios_per_round": [
            r["rps"] / b["rps"] for r, b in zip(runs["receiver"], runs["bare"], strict=True)
        ],
        "bare_median_p50_ms": statistics.median(r["p50_ms"] for r in runs["bare"]),
        "receiver_median_p50_ms": statistics.median(r["p50_ms"] for r in runs["receiver"]),
        "bare_median_p99_ms": statistics.median(r["p99_ms"] for r in runs["bare"]),
        "receiver_median_p99_ms": statistics.median(r["p99_ms"] for r in runs["receiver"]),
        "receiver_responses_completed_by_wrk": receiver_total,
        "receiver_valid_hits_served": served or None,
        "events_in_database": stored,
        "distinct_event_keys": distinct,
        "all_hits_stored": ok,
        "runs": runs,
    }
    say(
        f"\nmedian: bare {bare_rps:.0f} hits/s, receiver {recv_rps:.0f} hits/s "
        f"-> {summary['ratio']:.3f}x; p99 bare {summary['bare_median_p99_ms']:.2f} ms, "
        f"receiver {summary['receiver_median_p99_ms']:.2f} ms"
    )
    say(
        f"receiver responses completed by wrk: {receiver_total}; answered by the server: "
        f"{served or 'n/a (several workers)'}; events in the database: {stored} "
        f"(distinct keys {distinct})"
    )
    say(
        "every answered hit is in the database"
        if ok
        else "MISMATCH: answered hits and stored events differ"
    )
    return summary


VALID_HITS = 'trackrelay_hits_total{kind="open",token="valid"}'


if __name__ == "__main__":
    sys.exit(main())
