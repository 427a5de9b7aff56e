"""Relay benchmarks: throughput, added latency, CPU, peak memory, event-loop stall.

Baselines measured in the same run: smtp-source -> smtp-sink directly, a bare
aiosmtpd forwarding proxy, and a naive email-package + selectolax tracking
proxy (bench/baselines.py). Results are medians of ``--repeat`` runs with
min-max, and ratios against the direct sink.

    python -m bench.relay [throughput|latency|memory|all] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import aiosmtplib

from bench import messages
from bench.harness import Server, Stat, baseline, percentile, smtp_sink, smtp_source, trackrelay

Factory = Callable[[int], AbstractContextManager[Server]]

TARGETS: dict[str, Factory] = {
    "bare aiosmtpd proxy": lambda up: baseline("bare", up),
    "naive tracking proxy": lambda up: baseline("naive", up),
    "trackrelay": lambda up: trackrelay(up),
}


def _targets_for(message: str) -> list[str]:
    """Untracked mail against the bare proxy, tracked mail against the naive tracker."""
    if "tracked" in message:
        return ["naive tracking proxy", "trackrelay"]
    return ["bare aiosmtpd proxy", "trackrelay"]


def _files(tmp: Path) -> dict[str, Path]:
    made = {
        "2KB": messages.small(tracked=False),
        "2KB tracked": messages.small(tracked=True),
        "50KB": messages.newsletter(tracked=False),
        "50KB tracked": messages.newsletter(tracked=True),
    }
    paths = {}
    for name, data in made.items():
        path = tmp / (name.replace(" ", "_") + ".eml")
        # smtp-source sends the file line by line and adds CRLF itself.
        path.write_bytes(data.replace(b"\r\n", b"\n"))
        paths[name] = path
    return paths


def throughput(repeat: int, quick: bool) -> list[dict[str, Any]]:
    """Messages/s at 1, 10 and 50 sessions for each target and message."""
    rows: list[dict[str, Any]] = []
    count = {"2KB": 400 if quick else 2000, "50KB": 200 if quick else 1000}
    with tempfile.TemporaryDirectory() as tmp, smtp_sink() as sink:
        files = _files(Path(tmp))
        for sessions in (1, 10, 50):
            for name, path in files.items():
                n = count[name.split()[0]]
                direct = Stat.of(
                    [n / smtp_source(sink.port, path, sessions, n) for _ in range(repeat)]
                )
                rows.append(_row("direct smtp-sink", name, sessions, direct, direct, None))
                for target in _targets_for(name):
                    with TARGETS[target](sink.port) as server:
                        cpu0 = server.cpu_seconds()
                        rates = [
                            n / smtp_source(server.port, path, sessions, n) for _ in range(repeat)
                        ]
                        cpu = (server.cpu_seconds() - cpu0) / (n * repeat)
                    rows.append(_row(target, name, sessions, Stat.of(rates), direct, cpu))
    return rows


def _row(
    target: str, message: str, sessions: int, rate: Stat, direct: Stat, cpu: float | None
) -> dict[str, Any]:
    return {
        "item": "throughput",
        "target": target,
        "message": message,
        "sessions": sessions,
        "msgs_per_s": rate.median,
        "min": rate.low,
        "max": rate.high,
        "ratio_vs_direct": rate.median / direct.median,
        "cpu_ms_per_msg": None if cpu is None else cpu * 1000,
    }


async def _send_timed(port: int, data: bytes, n: int) -> list[float]:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False)
    await client.connect()
    times = []
    try:
        for _ in range(n):
            start = time.perf_counter()
            await client.sendmail("ann@example.com", ["bob@example.net"], data)
            times.append(time.perf_counter() - start)
    finally:
        await client.quit()
    return times


def latency(repeat: int, quick: bool) -> list[dict[str, Any]]:
    """Added latency p50/p99 of one client, tracked 50 KB, over direct delivery."""
    n = 100 if quick else 300
    data = messages.newsletter(tracked=True)
    rows = []
    with smtp_sink() as sink:
        direct = asyncio.run(_send_timed(sink.port, data, n))
        for target, factory in TARGETS.items():
            with factory(sink.port) as server:
                times = asyncio.run(_send_timed(server.port, data, n))
            rows.append(
                {
                    "item": "latency",
                    "target": target,
                    "message": "50KB tracked",
                    "direct_p50_ms": statistics.median(direct) * 1000,
                    "p50_ms": statistics.median(times) * 1000,
                    "p99_ms": percentile(times, 99) * 1000,
                    "added_p50_ms": (statistics.median(times) - statistics.median(direct)) * 1000,
                    "added_p99_ms": (percentile(times, 99) - percentile(direct, 99)) * 1000,
                }
            )
    return rows


async def _stall_probe(port: int, stop: asyncio.Event) -> list[float]:
    """NOOP round trips on an idle session: the loop's responsiveness."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False)
    await client.connect()
    rtts = []
    try:
        while not stop.is_set():
            start = time.perf_counter()
            await client.noop()
            rtts.append(time.perf_counter() - start)
            await asyncio.sleep(0.005)
    finally:
        await client.quit()
    return rtts


async def _big_with_small(port: int, big: bytes, small: bytes) -> tuple[float, list[float]]:
    stop = asyncio.Event()
    probe = asyncio.create_task(_stall_probe(port, stop))
    start = time.perf_counter()
    smalls = asyncio.create_task(_send_timed(port, small, 50))
    await _send_timed(port, big, 1)
    elapsed = time.perf_counter() - start
    await smalls
    stop.set()
    return elapsed, await probe


def memory(repeat: int, quick: bool) -> list[dict[str, Any]]:
    """Peak RSS relaying a 25 MiB attachment (~35 MB on the wire), and the longest stall."""
    big = messages.with_attachment(tracked=True)
    small = messages.small(tracked=True)
    rows = []
    with smtp_sink() as sink:
        for target, factory in TARGETS.items():
            with factory(sink.port) as server:
                idle = server.peak_rss()
                elapsed, rtts = asyncio.run(_big_with_small(server.port, big, small))
                peak = server.peak_rss()
            rows.append(
                {
                    "item": "memory",
                    "target": target,
                    "wire_bytes": len(big),
                    "idle_rss_mb": idle / 2**20,
                    "peak_rss_mb": peak / 2**20,
                    "peak_over_wire": peak / len(big),
                    "growth_over_wire": (peak - idle) / len(big),
                    "big_message_s": elapsed,
                    "longest_stall_ms": max(rtts) * 1000 if rtts else None,
                    "median_noop_ms": statistics.median(rtts) * 1000 if rtts else None,
                }
            )
    return rows


ITEMS = {"throughput": throughput, "latency": latency, "memory": memory}


def run(items: list[str], repeat: int, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for item in items:
        rows += ITEMS[item](repeat, quick)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("item", nargs="?", default="all", choices=[*ITEMS, "all"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer messages per run")
    args = parser.parse_args()
    items = list(ITEMS) if args.item == "all" else [args.item]
    print(json.dumps(run(items, args.repeat, args.quick), indent=2))


if __name__ == "__main__":
    main()
