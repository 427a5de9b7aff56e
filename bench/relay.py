"""Relay benchmarks: throughput, added latency, CPU, peak memory, event-loop stall, scale-out.

Baselines measured in the same run: smtp-source -> smtp-sink directly, a bare
aiosmtpd forwarding proxy, and a naive email-package + selectolax tracking
proxy (bench/baselines.py). Every server is started once per item and the
targets take turns in each repeat (direct, baseline, trackrelay, direct, ...),
so slow drifts of a shared machine hit them alike. Results are medians of
``--repeat`` runs with min-max, and ratios against the direct sink.

    python -m bench.relay [throughput|latency|memory|scaleout|all] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
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
MESSAGES = ("2KB", "2KB tracked", "50KB", "50KB tracked")


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


def _counts(quick: bool) -> dict[str, int]:
    return {"2KB": 150, "50KB": 80} if quick else {"2KB": 800, "50KB": 400}


@contextmanager
def _servers(factories: dict[str, Factory], upstream: int) -> Iterator[dict[str, Server]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(make(upstream)) for name, make in factories.items()}


def _rate(server: Server, path: Path, sessions: int, n: int) -> tuple[float, float]:
    """(messages/s, CPU seconds the server spent)."""
    cpu0 = server.cpu_seconds()
    elapsed = smtp_source(server.port, path, sessions, n)
    return n / elapsed, server.cpu_seconds() - cpu0


def throughput(repeat: int, quick: bool) -> list[dict[str, Any]]:
    """Messages/s at 1, 10 and 50 sessions (10 with --quick) for each target and message."""
    rows: list[dict[str, Any]] = []
    count = _counts(quick)
    levels = (10,) if quick else (1, 10, 50)
    with (
        tempfile.TemporaryDirectory() as tmp,
        smtp_sink() as sink,
        _servers(TARGETS, sink.port) as servers,
    ):
        files = _files(Path(tmp))
        for sessions in levels:
            for name in MESSAGES:
                n = count[name.split()[0]]
                path = files[name]
                rates: dict[str, list[float]] = {"direct smtp-sink": []}
                cpu: dict[str, float] = {}
                for target in _targets_for(name):
                    smtp_source(servers[target].port, path, sessions, min(n, 50))  # warm up
                    rates[target] = []
                    cpu[target] = 0.0
                for _ in range(repeat):
                    rates["direct smtp-sink"].append(n / smtp_source(sink.port, path, sessions, n))
                    for target in _targets_for(name):
                        rate, seconds = _rate(servers[target], path, sessions, n)
                        rates[target].append(rate)
                        cpu[target] += seconds
                direct = Stat.of(rates["direct smtp-sink"])
                for target, values in rates.items():
                    spent = cpu.get(target)
                    per_msg = None if spent is None else spent / (n * repeat)
                    rows.append(_row(target, name, sessions, Stat.of(values), direct, per_msg))
    return rows


def scaleout(repeat: int, quick: bool) -> list[dict[str, Any]]:
    """trackrelay as one process and as two worker processes sharing the port."""
    rows: list[dict[str, Any]] = []
    count = _counts(quick)
    factories: dict[str, Factory] = {
        "trackrelay 1 process": lambda up: trackrelay(up),
        "trackrelay 2 processes": lambda up: trackrelay(up, workers=2),
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        smtp_sink() as sink,
        _servers(factories, sink.port) as servers,
    ):
        files = _files(Path(tmp))
        for sessions in (10,) if quick else (10, 50):
            for name in ("2KB", "50KB tracked"):
                n = count[name.split()[0]]
                rates: dict[str, list[float]] = {"direct smtp-sink": []}
                cpu: dict[str, float] = dict.fromkeys(factories, 0.0)
                for target in factories:
                    smtp_source(servers[target].port, files[name], sessions, min(n, 50))
                    rates[target] = []
                for _ in range(repeat):
                    rates["direct smtp-sink"].append(
                        n / smtp_source(sink.port, files[name], sessions, n)
                    )
                    for target in factories:
                        rate, seconds = _rate(servers[target], files[name], sessions, n)
                        rates[target].append(rate)
                        cpu[target] += seconds
                direct = Stat.of(rates["direct smtp-sink"])
                for target, values in rates.items():
                    per_msg = cpu[target] / (n * repeat) if target in cpu else None
                    row = _row(target, name, sessions, Stat.of(values), direct, per_msg)
                    rows.append({**row, "item": "scaleout"})
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
    """Added latency p50/p99 of one client, tracked 50 KB, over direct delivery.

    The targets take turns in slices of 20 messages, so every target sees the
    same machine load; the direct figure is measured in the same slices.
    """
    n = 60 if quick else 300
    data = messages.newsletter(tracked=True)
    order = ["direct", *TARGETS]
    times: dict[str, list[float]] = {name: [] for name in order}
    with smtp_sink() as sink, _servers(TARGETS, sink.port) as servers:
        ports = {"direct": sink.port, **{name: s.port for name, s in servers.items()}}
        for name in order:
            asyncio.run(_send_timed(ports[name], data, 5))  # warm up
        for _ in range(n // 20):
            for name in order:
                times[name] += asyncio.run(_send_timed(ports[name], data, 20))
    direct = times["direct"]
    rows = []
    for target in TARGETS:
        mine = times[target]
        rows.append(
            {
                "item": "latency",
                "target": target,
                "message": "50KB tracked",
                "samples": len(mine),
                "direct_p50_ms": statistics.median(direct) * 1000,
                "direct_p99_ms": percentile(direct, 99) * 1000,
                "p50_ms": statistics.median(mine) * 1000,
                "p99_ms": percentile(mine, 99) * 1000,
                "added_p50_ms": (statistics.median(mine) - statistics.median(direct)) * 1000,
                "added_p99_ms": (percentile(mine, 99) - percentile(direct, 99)) * 1000,
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


def _probe_process(port: int, stop: Any, results: Any) -> None:
    """The stall probe in a process of its own (the target of a forked child)."""

    async def main() -> list[float]:
        done = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.01)
            done.set()

        watcher = asyncio.create_task(watch())
        rtts = await _stall_probe(port, done)
        await watcher
        return rtts

    results.put(asyncio.run(main()))


@contextmanager
def _stall_probe_running(port: int) -> Iterator[list[float]]:
    """NOOP round trips measured by another process while the block runs.

    Not on the sending client's event loop: aiosmtplib spends ~1 s of CPU
    normalising and dot-stuffing a 35 MB message, and a NOOP waiting on that
    loop would count the client's own stall as the server's.
    """
    context = multiprocessing.get_context("fork")
    stop, results = context.Event(), context.Queue()
    child = context.Process(target=_probe_process, args=(port, stop, results), daemon=True)
    child.start()
    rtts: list[float] = []
    try:
        time.sleep(0.4)  # the probe's session is open and idle
        yield rtts
    finally:
        stop.set()
        rtts.extend(results.get(timeout=60))
        child.join(10)


async def _big_with_small(port: int, big: bytes, small: bytes) -> float:
    start = time.perf_counter()
    smalls = asyncio.create_task(_send_timed(port, small, 50))
    await _send_timed(port, big, 1)
    elapsed = time.perf_counter() - start
    await smalls
    return elapsed


def memory(repeat: int, quick: bool) -> list[dict[str, Any]]:
    """Peak RSS relaying a 25 MiB attachment (~35 MB on the wire), and the longest stall."""
    big = messages.with_attachment(tracked=True)
    small = messages.small(tracked=True)
    rows = []
    with smtp_sink() as sink:
        for target, factory in TARGETS.items():
            with factory(sink.port) as server:
                asyncio.run(_send_timed(server.port, small, 5))  # imports and pools warm
                idle = server.peak_rss()
                with _stall_probe_running(server.port) as rtts:
                    elapsed = asyncio.run(_big_with_small(server.port, big, small))
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
                    "noop_samples": len(rtts),
                }
            )
    return rows


ITEMS = {"throughput": throughput, "latency": latency, "memory": memory, "scaleout": scaleout}


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
