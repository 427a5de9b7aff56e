"""The receiver's counters, rendered as Prometheus text for ``GET /metrics``.

Hand-written rather than a client library: a few counters, two gauges
computed at scrape time and one histogram are all we need, and the hot path
(a pixel hit) must stay a dict increment. Each receiver process (worker)
keeps its own figures; scrape every worker, or run one per replica.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

#: Upper bounds (seconds) of the batch write latency histogram.
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (kind, valid|invalid)
        self.recorded: Counter[tuple[str, str]] = Counter()  # (kind, verdict) in the database
        self.journaled = 0
        self.replayed = 0
        self.duplicates = 0
        self.dropped = 0
        self.rejected = 0
        self.write_errors = 0
        self._buckets = [0] * (len(WRITE_BUCKETS) + 1)
        self._write_sum = 0.0
        self._write_count = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def hit(self, kind: str, valid: bool) -> None:
        self.requests[kind, "valid" if valid else "invalid"] += 1

    def observe_write(self, seconds: float) -> None:
        self._buckets[bisect.bisect_left(WRITE_BUCKETS, seconds)] += 1
        self._write_sum += seconds
        self._write_count += 1

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A value read at scrape time (queue depth, journal size)."""
        self.gauges[name] = (help, read)

    def counter(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere, read at scrape time (the relay's, under ``serve``)."""
        self.counters[name] = (help, read)

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")

        family("trackrelay_hits_total", "counter", "pixel and click requests, by token validity")
        for (kind, valid), n in sorted(self.requests.items()):
            out.append(f'trackrelay_hits_total{{kind="{kind}",token="{valid}"}} {n}')
        family("trackrelay_events_recorded_total", "counter", "events written, by kind and verdict")
        for (kind, verdict), n in sorted(self.recorded.items()):
            out.append(f'trackrelay_events_recorded_total{{kind="{kind}",verdict="{verdict}"}} {n}')
        for name, help, value in (
            ("journaled", "events spilled to the journal while the database was down", 0),
            ("replayed", "journaled events written to the database on replay", 0),
            ("duplicates", "replayed events already in the database (skipped)", 0),
            ("dropped", "events lost: queue full or journal unwritable", 0),
            (
                "rejected",
                "events the database refused as invalid (journal/rejected-events.jsonl)",
                0,
            ),
            ("write_errors", "failed batch writes (database unavailable)", 0),
        ):
            metric = f"trackrelay_events_{name}_total"
            family(metric, "counter", help)
            out.append(f"{metric} {getattr(self, name) + value}")
        family("trackrelay_event_write_seconds", "histogram", "batch write latency")
        cumulative = 0
        for bound, n in zip((*WRITE_BUCKETS, float("inf")), self._buckets, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'trackrelay_event_write_seconds_bucket{{le="{le}"}} {cumulative}')
        out.append(f"trackrelay_event_write_seconds_sum {self._write_sum:.6f}")
        out.append(f"trackrelay_event_write_seconds_count {self._write_count}")
        for name, (help, read) in sorted(self.counters.items()):
            family(name, "counter", help)
            out.append(f"{name} {read():g}")
        for name, (help, read) in sorted(self.gauges.items()):
            family(name, "gauge", help)
            out.append(f"{name} {read():g}")
        return "\n".join(out) + "\n"
