"""Run the benchmark suite; write bench/results/results.json and results.md.

    python -m bench.run                      # everything (~25 min on 2 cores)
    python -m bench.run --quick              # everything, smaller (~6 min)
    python -m bench.run inject latency       # some items only
    python -m bench.run --list

Items (each also runs alone, see bench/README.md): inject, data_reader,
throughput, latency, memory, scaleout, receiver, receiver2 (two workers).
Optional, only when named (never in --quick: it takes an hour): scale, issue
13's year of mail on PostgreSQL at 100k and 1M messages (bench/scale.py).
The machine, the load average before and after, the commit and the command
line are stored with the results, because on a shared machine the numbers
mean little without them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import data_reader, inject, relay
from bench.harness import ROOT, SMTP_SINK, SMTP_SOURCE

Rows = list[dict[str, Any]]


def _inject(repeat: int, quick: bool) -> Rows:
    return inject.measure(100 if quick else 500)


def _data_reader(repeat: int, quick: bool) -> Rows:
    return [asyncio.run(data_reader.compare(200 if quick else 1000))]


def _receiver(workers: int) -> Callable[[int, bool], Rows]:
    def run(repeat: int, quick: bool) -> Rows:
        from bench import receiver

        duration, rounds = (3, 2) if quick else (10, repeat)
        summary = receiver.measure(workers, duration, rounds)
        summary.pop("runs")
        return [{"item": "receiver", **summary}]

    return run


def _scale(repeat: int, quick: bool) -> Rows:
    from bench import scale

    url = os.environ.get("TRACKRELAY_BENCH_DATABASE_URL", scale.DEFAULT_DATABASE)
    options = scale.Options(url, repeat=max(repeat, 5))
    path = scale.RESULTS / "scale.json"
    for messages in (100_000, 1_000_000):
        scale.store(scale.measure(messages, options), path)
    (scale.RESULTS / "scale.md").write_text(scale.render(json.loads(path.read_text())))
    return [{"item": "scale", "results": str(path), "markdown": str(scale.RESULTS / "scale.md")}]


ITEMS: dict[str, Callable[[int, bool], Rows]] = {
    "inject": _inject,
    "data_reader": _data_reader,
    "throughput": relay.throughput,
    "latency": relay.latency,
    "memory": relay.memory,
    "scaleout": relay.scaleout,
    "receiver": _receiver(1),
    "receiver2": _receiver(2),
    "scale": _scale,
}
OPTIONAL = {"scale"}  # long: run only when named
NEEDS = {
    "throughput": [SMTP_SINK, SMTP_SOURCE],
    "latency": [SMTP_SINK],
    "memory": [SMTP_SINK],
    "scaleout": [SMTP_SINK, SMTP_SOURCE],
    "receiver": ["wrk"],
    "receiver2": ["wrk"],
}


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "loadavg_before": os.getloadavg(),
    }


def missing_tools(item: str) -> list[str]:
    return [tool for tool in NEEDS.get(item, []) if shutil.which(tool) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("items", nargs="*", metavar="ITEM", help="default: all")
    parser.add_argument("--quick", action="store_true", help="fewer messages, shorter runs")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per figure (median); 3, or 1 with --quick"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--list", action="store_true", help="list the items and exit")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite results.md from a results.json"
    )
    args = parser.parse_args(argv)
    if args.list:
        print(
            "\n".join(
                f"{item} (optional: only when named)" if item in OPTIONAL else item
                for item in ITEMS
            )
        )
        return 0
    if args.render:
        markdown = render(json.loads(args.render.read_text()))
        (args.render.parent / "results.md").write_text(markdown)
        print(markdown)
        return 0
    unknown = [item for item in args.items if item not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {unknown}; choose from {list(ITEMS)}")
    if args.quick and OPTIONAL & set(args.items):
        parser.error(f"{sorted(OPTIONAL & set(args.items))} cannot run with --quick")
    items = args.items or [item for item in ITEMS if item not in OPTIONAL]
    repeat = args.repeat or (1 if args.quick else 3)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "repeat": repeat,
        "items": {},
        "skipped": {},
    }
    markdown = ""
    for item in items:
        absent = missing_tools(item)
        if absent:
            results["skipped"][item] = f"missing {', '.join(absent)}"
            print(f"== {item}: skipped (missing {', '.join(absent)})", flush=True)
            continue
        print(f"== {item}", flush=True)
        started = time.monotonic()
        try:
            results["items"][item] = ITEMS[item](repeat, args.quick)
        except Exception as exc:  # one broken item must not lose the others' figures
            results["skipped"][item] = f"failed: {type(exc).__name__}: {exc}"[:300]
            print(f"   FAILED: {exc}", flush=True)
        else:
            print(f"   done in {time.monotonic() - started:.0f} s", flush=True)
        markdown = write(results, args.output)  # after every item: a crash keeps the rest
    print(markdown)
    return 1 if any(v.startswith("failed") for v in results["skipped"].values()) else 0


def write(results: dict[str, Any], output: Path) -> str:
    results["machine"]["loadavg_after"] = os.getloadavg()
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=str))
    markdown = render(results)
    (output / "results.md").write_text(markdown)
    return markdown


# --- the markdown table -------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# trackrelay benchmark results",
        "",
        f"{m['date']}, commit {m['commit']}; {m['cpu']}, {m['cores']} cores, "
        f"Linux {m['kernel']}, Python {m['python']}; load average before "
        f"{_f(m['loadavg_before'][0], 2)}, after {_f(m['loadavg_after'][0], 2)}.",
        f"Command: `{results['command']}` (repeat {results['repeat']}"
        f"{', quick' if results['quick'] else ''}). Medians, (min-max) where repeated.",
        "",
    ]
    items = results["items"]
    if "inject" in items:
        out += ["## Injection alone (ms per message, median; min in brackets)", ""]
        out += _table(
            ["message", "KB", "links", "cold", "warm", "plan", "render", "email+selectolax"],
            [
                [
                    r["message"],
                    _f(r["kb"]),
                    str(r["links"]),
                    f"{_f(r['injection_cold_ms'], 3)} ({_f(r['injection_cold_min_ms'], 3)})",
                    f"{_f(r['injection_warm_ms'], 3)} ({_f(r['injection_warm_min_ms'], 3)})",
                    f"{_f(r['plan_ms'], 3)} ({_f(r['plan_min_ms'], 3)})",
                    f"{_f(r['render_ms'], 3)} ({_f(r['render_min_ms'], 3)})",
                    f"{_f(r['email_selectolax_ms'], 3)} ({_f(r['email_selectolax_min_ms'], 3)})",
                ]
                for r in items["inject"]
            ],
        )
    if "data_reader" in items:
        r = items["data_reader"][0]
        out += ["## DATA reader (50 KB messages, one connection, no upstream)", ""]
        out += _table(
            ["stock aiosmtpd", "stock, mail.log DEBUG", "trackrelay", "ratio"],
            [
                [
                    _f(r["stock_msgs_per_s"]),
                    _f(r["stock_debug_log_msgs_per_s"]),
                    _f(r["trackrelay_msgs_per_s"]),
                    _f(r["ratio"], 2) + "x",
                ]
            ],
        )
    for item, title in (
        ("throughput", "Relay throughput (messages/s)"),
        ("scaleout", "Scale-out: trackrelay as 1 and 2 processes on one port"),
    ):
        if item in items:
            out += [f"## {title}", ""]
            out += _table(
                ["sessions", "message", "target", "msg/s (min-max)", "x direct", "CPU ms/msg"],
                [
                    [
                        str(r["sessions"]),
                        r["message"],
                        r["target"],
                        f"{_f(r['msgs_per_s'])} ({_f(r['min'])}-{_f(r['max'])})",
                        _f(r["ratio_vs_direct"], 3),
                        _f(r["cpu_ms_per_msg"], 2),
                    ]
                    for r in items[item]
                ],
            )
    if "latency" in items:
        out += ["## Added latency, one client, tracked 50 KB (ms)", ""]
        out += _table(
            ["target", "p50", "p99", "direct p50", "added p50", "added p99"],
            [
                [
                    r["target"],
                    _f(r["p50_ms"], 2),
                    _f(r["p99_ms"], 2),
                    _f(r["direct_p50_ms"], 2),
                    _f(r["added_p50_ms"], 2),
                    _f(r["added_p99_ms"], 2),
                ]
                for r in items["latency"]
            ],
        )
    if "memory" in items:
        out += ["## Memory and event-loop stall, 25 MiB attachment + small mail", ""]
        out += _table(
            [
                "target",
                "wire MB",
                "idle RSS MB",
                "peak RSS MB",
                "peak/wire",
                "(peak-idle)/wire",
                "longest stall ms",
                "big msg s",
            ],
            [
                [
                    r["target"],
                    _f(r["wire_bytes"] / 2**20),
                    _f(r["idle_rss_mb"]),
                    _f(r["peak_rss_mb"]),
                    _f(r["peak_over_wire"], 2),
                    _f(r["growth_over_wire"], 2),
                    _f(r["longest_stall_ms"]),
                    _f(r["big_message_s"], 2),
                ]
                for r in items["memory"]
            ],
        )
    receivers = [*items.get("receiver", []), *items.get("receiver2", [])]
    if receivers:
        out += ["## Receiver pixel hits/s, wrk 64 connections", ""]
        out += _table(
            [
                "workers",
                "bare Starlette",
                "receiver",
                "ratio",
                "p99 bare",
                "p99 receiver",
                "stored",
            ],
            [
                [
                    str(r["workers"]),
                    f"{_f(r['bare_median_rps'], 0)} ({_f(r['bare_min_rps'], 0)}-"
                    f"{_f(r['bare_max_rps'], 0)})",
                    f"{_f(r['receiver_median_rps'], 0)} ({_f(r['receiver_min_rps'], 0)}-"
                    f"{_f(r['receiver_max_rps'], 0)})",
                    _f(r["ratio"], 3),
                    _f(r["bare_median_p99_ms"], 2),
                    _f(r["receiver_median_p99_ms"], 2),
                    "all" if r["all_hits_stored"] else "MISMATCH",
                ]
                for r in receivers
            ],
        )
    if "scale" in items:
        out += [f"## Scale (issue 13): see {items['scale'][0]['markdown']}", ""]
    for item, why in results["skipped"].items():
        out.append(f"- {item}: skipped ({why})")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
