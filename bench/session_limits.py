"""Cost of one admit + release of a session: the in-process counter vs SharedCounts.

``SessionLimits`` counts in a dict in one process (``TRACKRELAY_RELAY_WORKERS=1``)
or, with several workers, in the :class:`relay.limits.SharedCounts` the parent
made before the fork (lockf + a shared mapping). Each round admits a session
from one of 200 client addresses (IPv4 and IPv6 /64s, as ``client_key`` sees
them) and releases it; the median of ``--repeat`` runs of ``--rounds`` rounds,
as microseconds per admit + release, and the ratio shared / in-process. With
``--contend``, the other workers admit and release the same way at the same
time, in processes of their own (the lock then contends across processes).

    .venv/bin/python -m bench.session_limits [--rounds N] [--repeat R] [--workers W] [--contend]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import statistics
import sys
import time

from relay.limits import SessionLimits, SharedCounts

ADDRESSES = [f"192.0.2.{i}" for i in range(100)] + [f"2001:db8:{i:x}::1" for i in range(100)]


def microseconds_per_round(limits: SessionLimits, rounds: int) -> float:
    """Microseconds per admit + release, held sessions spread over the table."""
    held = [ADDRESSES[i % len(ADDRESSES)] for i in range(50)]  # sessions already open
    for ip in held:
        limits.admit(ip, "smtp")
    started = time.perf_counter()
    for i in range(rounds):
        ip = ADDRESSES[i % len(ADDRESSES)]
        if limits.admit(ip, "smtp") is None:
            limits.release(ip)
    elapsed = time.perf_counter() - started
    for ip in held:
        limits.release(ip)
    return elapsed / rounds * 1e6


def _contender(counts: SharedCounts, number: int, stop: multiprocessing.synchronize.Event) -> None:
    limits = SessionLimits(10_000, 1_000, shared=counts.of_worker(number))
    while not stop.is_set():
        microseconds_per_round(limits, 2_000)


def measure(rounds: int, repeat: int, workers: int, contend: bool) -> dict[str, float]:
    local = SessionLimits(10_000, 1_000)
    counts = SharedCounts(10_000, workers)
    stop = multiprocessing.get_context("fork").Event()
    others = []
    if contend:
        for number in range(1, workers):
            process = multiprocessing.get_context("fork").Process(
                target=_contender, args=(counts, number, stop)
            )
            process.start()
            others.append(process)
    shared = SessionLimits(10_000, 1_000, shared=counts.of_worker(0))
    try:
        in_process, across = [], []
        for _ in range(repeat):  # interleaved, so load changes hit both alike
            in_process.append(microseconds_per_round(local, rounds))
            across.append(microseconds_per_round(shared, rounds))
    finally:
        stop.set()
        for process in others:
            process.join()
    a, b = statistics.median(in_process), statistics.median(across)
    return {"in_process_us": a, "shared_us": b, "ratio": b / a}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--contend", action="store_true")
    args = parser.parse_args(argv)
    got = measure(args.rounds, args.repeat, args.workers, args.contend)
    contended = f", {args.workers - 1} other workers contending" if args.contend else ""
    print(
        f"admit + release, {args.workers} worker columns{contended}: "
        f"in-process {got['in_process_us']:.2f} us, shared {got['shared_us']:.2f} us, "
        f"ratio {got['ratio']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
