"""relay/upstream.py's DATA encoding: the very bytes aiosmtplib would have sent."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.upstream import data_chunks

PIECES = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"..", b"\r\r\n", b"\n."]


def aiosmtplib_wire(content: bytes) -> bytes:
    """What ``aiosmtplib.SMTP.data`` writes after the 354 (protocol.py)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(1, 9))
def test_data_chunks_are_aiosmtplibs_bytes(parts: list[bytes], size: int) -> None:
    content = b"".join(parts)
    assert b"".join(data_chunks(content, size)) == aiosmtplib_wire(content)


def test_a_clean_message_is_sent_in_chunks_without_a_copy_of_the_whole() -> None:
    content = b"Subject: x\r\n\r\n" + b".dot line\r\n" * 1000
    chunks = list(data_chunks(content, size=4096))
    assert len(chunks) == len(content) // 4096 + 2
    assert b"".join(chunks) == aiosmtplib_wire(content)
