"""The SMTP protocol layer (relay/smtp.py, relay/datareader.py): DATA reader,
limits, idle timeout."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.datareader import DataTooBig, DataTooLong, read_data
from tests.support.tracing import peak_allocated


def stuff(body: bytes) -> bytes:
    """What a client sends for ``body`` (CRLF lines): dot-stuffed, terminated."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


async def read(wire: bytes, chunk: int = 7, size_limit: int | None = None) -> tuple[bytes, bytes]:
    reader = asyncio.StreamReader(limit=1001)
    for start in range(0, len(wire), chunk):
        reader.feed_data(wire[start : start + chunk])
    reader.feed_eof()
    body = await read_data(reader, size_limit=size_limit)
    return body, await reader.read()


def run_read(wire: bytes, **options: object) -> tuple[bytes, bytes]:
    return asyncio.run(read(wire, **options))  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 100000])
def test_unstuffs_and_stops_at_the_terminator_whatever_the_chunks(chunk: int) -> None:
    body = b"Subject: x\r\n\r\n.leading dot\r\n..two\r\nend.\r\n"
    assert run_read(stuff(body) + b"QUIT\r\n", chunk=chunk) == (body, b"QUIT\r\n")


def test_empty_message_and_a_message_of_one_empty_line() -> None:
    assert run_read(b".\r\nNOOP\r\n") == (b"", b"NOOP\r\n")
    assert run_read(b"\r\n.\r\n") == (b"\r\n", b"")


@pytest.mark.parametrize(
    "smuggled",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"],
)
def test_only_crlf_dot_crlf_ends_data(smuggled: bytes) -> None:
    """SMTP smuggling: a bare LF/CR variant of the terminator is content."""
    body = b"Subject: a\r\n\r\nhi" + smuggled + b"MAIL FROM:<evil@example.com>\r\nDATA\r\nevil\r\n"
    assert run_read(stuff(body)) == (body, b"")


def test_line_of_1000_octets_is_refused_after_draining() -> None:
    wire = b"a" * 998 + b"\r\n" + b"b" * 1000 + b"\r\nmore\r\n.\r\nQUIT\r\n"

    async def go() -> bytes:
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(wire)
        with pytest.raises(DataTooLong):
            await read_data(reader, size_limit=None)
        return await reader.read(100)

    assert asyncio.run(go()) == b"QUIT\r\n"
    # 998 octets plus a transparency dot is still a legal line
    assert run_read(b".." + b"a" * 997 + b"\r\n.\r\n")[0] == b"." + b"a" * 997 + b"\r\n"


@pytest.mark.parametrize("chunk", [1, 999, 1000, 1001])
def test_long_lines_across_chunk_boundaries(chunk: int) -> None:
    body = (b"x" * 998 + b"\r\n") * 4
    assert run_read(stuff(body), chunk=chunk)[0] == body


def test_size_limit_answers_at_once_and_drains() -> None:
    sent: list[int] = []

    async def go() -> bytes:
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data((b"y" * 78 + b"\r\n") * 1000 + b".\r\nRSET\r\n")

        async def too_big() -> None:
            sent.append(1)

        with pytest.raises(DataTooBig):
            await read_data(reader, size_limit=10_000, on_too_big=too_big)
        return await reader.read(100)

    assert asyncio.run(go()) == b"RSET\r\n"
    assert sent == [1]


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r\n", b"\n")), max_size=12),
    chunk=st.integers(min_value=1, max_value=300),
)
def test_any_body_round_trips(lines: list[bytes], chunk: int) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    assert run_read(stuff(body), chunk=chunk) == (body, b"")


@given(
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b".."]), max_size=40),
    st.lists(st.integers(0, 60), max_size=8),
)
def test_unstuffing_chunk_by_chunk_equals_one_replace(parts: list[bytes], cuts: list[int]) -> None:
    from relay.datareader import _Unstuffer

    data = b"\r\n" + b"".join(parts)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    unstuff = _Unstuffer()
    out = b"".join(unstuff.feed(data[a:b]) for a, b in itertools.pairwise(bounds))
    assert out == data.replace(b"\r\n.", b"\r\n")


def test_a_large_message_is_held_once_while_it_arrives() -> None:
    """The body grows in one buffer that is handed over without a copy: never
    twice in memory, as a list of chunks joined at the end was."""
    body = b"Subject: big\r\n\r\n" + b".line of the body\r\nanother line\r\n" * 600_000
    wire = stuff(body)

    async def go() -> tuple[bytes, int]:
        reader = asyncio.StreamReader(limit=1001)

        async def feed() -> None:
            for start in range(0, len(wire), 1 << 18):
                reader.feed_data(wire[start : start + (1 << 18)])
                while len(reader._buffer) > 2 * 1001:  # type: ignore[attr-defined]
                    await asyncio.sleep(0)  # the transport pauses reading

        feeder = asyncio.create_task(feed())
        with peak_allocated() as peak:
            got = await read_data(reader, size_limit=None)
        await feeder
        return got, peak[0]

    got, peak = asyncio.run(go())
    assert got == body
    assert peak < 1.3 * len(body)  # the body, its growth room, one chunk in flight
