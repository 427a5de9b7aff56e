"""DATA reading speed: trackrelay's chunked reader vs stock aiosmtpd, 50 KB messages.

Both servers run on loopback (plain SMTP, no TLS, no upstream: handle_DATA
answers 250 at once) so the figure is the cost of reading DATA. One client
connection sends N messages with a raw pipelined-free SMTP dialogue.

    .venv/bin/python -m bench.data_reader [messages]
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.smtp import RelaySMTP

LINE = b"0123456789" * 7 + b"abcdef\r\n"
MESSAGE = b"Subject: bench\r\n\r\n" + LINE * (50 * 1024 // len(LINE))


class Sink:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content == MESSAGE
        return "250 OK"


async def measure(factory: Any, count: int) -> float:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def command(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        return reply

    await reader.readline()
    await command(b"EHLO bench")
    started = time.perf_counter()
    for _ in range(count):
        await command(b"MAIL FROM:<a@example.com>")
        await command(b"RCPT TO:<b@example.net>")
        await command(b"DATA")
        assert (await command(MESSAGE + b".")).startswith(b"250")
    elapsed = time.perf_counter() - started
    await command(b"QUIT")
    writer.close()
    server.close()
    return count / elapsed


async def compare(count: int) -> dict[str, Any]:
    """msg/s of the stock reader (mail.log at WARNING and at DEBUG) and trackrelay's."""
    log = logging.getLogger("mail.log")
    level = log.level
    loop = asyncio.get_running_loop()
    common = {"hostname": "bench", "data_size_limit": 10 * 2**20, "loop": loop}
    try:
        log.setLevel(logging.WARNING)
        stock = await measure(lambda: SMTP(Sink(), **common), count)
        ours = await measure(lambda: RelaySMTP(Sink(), listener="bench", **common), count)
        log.setLevel(logging.DEBUG)
        debug = await measure(lambda: SMTP(Sink(), **common), max(1, count // 4))
    finally:
        log.setLevel(level)
    return {
        "item": "data_reader",
        "message_bytes": len(MESSAGE),
        "messages": count,
        "stock_msgs_per_s": stock,
        "stock_debug_log_msgs_per_s": debug,
        "trackrelay_msgs_per_s": ours,
        "ratio": ours / stock,
    }


async def main(count: int) -> None:
    row = await compare(count)
    mb = len(MESSAGE) / 2**20
    stock, ours = row["stock_msgs_per_s"], row["trackrelay_msgs_per_s"]
    print(f"{len(MESSAGE)} byte message, {count} messages over one connection")
    print(f"stock aiosmtpd : {stock:8.1f} msg/s  {stock * mb:7.1f} MB/s")
    print(f"trackrelay     : {ours:8.1f} msg/s  {ours * mb:7.1f} MB/s  ({ours / stock:.1f}x)")
    print(f"stock aiosmtpd with mail.log at DEBUG: {row['stock_debug_log_msgs_per_s']:8.1f} msg/s")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
