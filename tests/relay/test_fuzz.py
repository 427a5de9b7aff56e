"""Malformed mail: the MIME scanner and the HTML splicer under mutation.

Real messages (tests/data/corpus and ../shared/corpus) are mutated the ways
broken clients and attackers break mail — byte flips, truncations, deleted
boundaries, huge header lines — and run through the tracker's real entry
point (``Tracker.prepare``, tracking on for everyone). Each example must end
within a bound of seconds (``signal.alarm``: a hang fails the test instead of
hanging the suite), never raise, and either inject (changing only what
injection may change) or fall back to the original bytes (minus the trigger
header).
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.prepared import Submission
from relay.track import Tracker
from shared import db
from shared.config import Settings
from shared.policies import set_policy
from tests.support.paths import CORPUS

LOCAL = Path(__file__).parents[1] / "data" / "corpus" / "eml"
BOUND = 5  # seconds per example: far above the normal milliseconds, far below a hang
SEEDS = sorted(LOCAL.glob("*.eml")) + (
    sorted((CORPUS / "eml").rglob("*.eml"))[::8] if (CORPUS / "eml").is_dir() else []
)
TRIGGER = b"X-Track: all\r\n"


class Hang(Exception):
    pass


@contextmanager
def time_bound(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    var = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{var / 'fuzz.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    set_policy(engine, "*", mode="always", allow_text_links=True, per_recipient=True)
    yield Tracker(Settings(var_dir=var, secret_key="fuzz-key-0123456789abcdef"), engine)
    engine.dispose()


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0 and data:  # byte flips
        raw = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if kind == 1:  # truncation
        return data[: rng.randrange(len(data) + 1)]
    if kind == 2:  # delete one boundary line (or every one)
        lines = data.split(b"\n")
        marks = [i for i, line in enumerate(lines) if line.startswith(b"--")]
        if marks:
            doomed = set(marks) if rng.random() < 0.3 else {rng.choice(marks)}
            return b"\n".join(line for i, line in enumerate(lines) if i not in doomed)
        return data
    if kind == 3:  # a huge header line
        return b"X-Huge: " + b"a" * rng.choice([998, 5000, 200_000]) + b"\r\n" + data
    if kind == 4:  # a huge folded header (many continuation lines)
        return b"Subject: x\r\n" + b" y\r\n" * rng.choice([1000, 50_000]) + data
    # spliced garbage: the middle of one part inside another
    cut = rng.randrange(len(data) + 1)
    return data[:cut] + data[rng.randrange(len(data) + 1) :]


def prepare(tracker: Tracker, data: bytes) -> tuple[bytes, bool]:
    """(data of the copy for the first recipient, whether injection failed)."""
    sub = Submission(11, "ann@example.com", ["bob@example.org", "cy@example.org"], data, "", "")
    failures = tracker.metrics.failures
    with time_bound(BOUND):
        prepared = asyncio.run(tracker.prepare(sub))
    assert sum(len(c.recipients) for c in prepared.copies) == 2  # nobody lost
    return prepared.copies[0].data, tracker.metrics.failures > failures


def check_outcome(original: bytes, out: bytes, failed: bool) -> None:
    body = TRIGGER + original
    if failed:  # fail open: the original, only the trigger header line gone
        assert out in (original, body)
        return
    # Injected or left untracked: the trigger field is gone either way (with
    # its continuation lines, which may be all there was).
    assert not out.startswith(TRIGGER)


@pytest.mark.parametrize("seed_index", range(min(len(SEEDS), 40)))
def test_corpus_mutations(tracker: Tracker, seed_index: int) -> None:
    path = SEEDS[seed_index]
    rng = random.Random(seed_index)
    original = path.read_bytes()
    for _ in range(6):
        mutated = mutate(original, rng)
        out, failed = prepare(tracker, TRIGGER + mutated)
        check_outcome(mutated, out, failed)


_pieces = st.sampled_from(
    [
        b"Content-Type: multipart/alternative; boundary=b\r\n",
        b"Content-Type: text/html; charset=utf-8\r\n",
        b"Content-Type: text/html; charset=bogus-charset\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"\r\n",
        b"--b\r\n",
        b"--b--\r\n",
        b'<a href="https://example.com/x">x</a>',
        b"<html><body>",
        b"</body></html>",
        b"=\r\n",
        b"=3D",
        b"PGEgaHJlZj0iaHR0cHM6Ly9leGFtcGxlLmNvbS8iPng8L2E+\r\n",
        b"\xff\xfe",
        b"\n",
        b"\r",
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_pieces, st.binary(max_size=12)), max_size=40).map(b"".join))
def test_generated_messages(tracker: Tracker, data: bytes) -> None:
    out, failed = prepare(tracker, TRIGGER + data)
    check_outcome(data, out, failed)
