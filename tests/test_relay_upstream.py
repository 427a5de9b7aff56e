"""relay/upstream.py's DATA encoding: the very bytes aiosmtplib would have sent."""

from __future__ import annotations

import itertools

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.headers import Segment
from relay.upstream import data_chunks

PIECES = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"..", b"\r\r\n", b"\n."]


def aiosmtplib_wire(content: bytes) -> bytes:
    """What ``aiosmtplib.SMTP.data`` writes after the 354 (protocol.py)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


def segments(content: bytes, cuts: list[int]) -> list[Segment]:
    """``content`` cut at ``cuts``, as views and bytes (as the tracker hands it over)."""
    view = memoryview(content)
    bounds = [0, *sorted(c % (len(content) + 1) for c in cuts), len(content)]
    out: list[Segment] = []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        out.append(view[start:end] if i % 2 else bytes(view[start:end]))
    return out


@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.lists(st.integers(0, 200), max_size=6),
    st.integers(1, 9),
)
def test_data_chunks_are_aiosmtplibs_bytes(parts: list[bytes], cuts: list[int], size: int) -> None:
    content = b"".join(parts)
    assert b"".join(data_chunks(segments(content, cuts), size)) == aiosmtplib_wire(content)


def test_a_clean_message_is_sent_in_chunks_without_a_copy_of_the_whole() -> None:
    content = b"Subject: x\r\n\r\n" + b".dot line\r\n" * 1000
    chunks = list(data_chunks([memoryview(content)], size=4096))
    assert len(chunks) == len(content) // 4096 + 1
    assert max(map(len, chunks)) <= 4096 * 2  # a block and its stuffing dots
    assert b"".join(chunks) == aiosmtplib_wire(content)


def test_small_segments_go_out_as_one_chunk() -> None:
    """Headers, a rewritten part and the rest of a small message: one write."""
    content = b"Subject: x\r\n\r\n<p>hi</p>\r\n.\r\n"
    chunks = list(data_chunks(segments(content, [5, 12, 20])))
    assert chunks == [aiosmtplib_wire(content)]
