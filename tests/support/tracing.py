"""Memory a piece of code allocates at its peak, from tracemalloc: exact and
repeatable (unlike RSS), so a test can say "never holds the message twice"."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def peak_allocated() -> Iterator[list[int]]:
    """``with peak_allocated() as peak:`` -> ``peak[0]``: the most bytes the block
    held at once beyond what was allocated when it began."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    peak = [0]
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
