"""The naive relays a user might write, to measure trackrelay against.

``bare``: an aiosmtpd server forwarding each message with aiosmtplib, a new
upstream connection per message, no tracking.
``naive``: the same, but parsing with the ``email`` package, rewriting every
HTML part with selectolax (hrefs + a pixel) and re-serialising the message.

Run one: ``python -m bench.baselines bare|naive LISTEN_PORT UPSTREAM_PORT``.
"""

from __future__ import annotations

import asyncio
import email.policy
import sys
from email import message_from_bytes
from email.message import EmailMessage
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from selectolax.lexbor import LexborHTMLParser as HTMLParser

PIXEL = '<img src="https://t.example/o/x.gif" width="1" height="1" alt="">'


class BareProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    def transform(self, data: bytes) -> bytes:
        return data

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None
        assert envelope.mail_from is not None
        data = self.transform(envelope.original_content)
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        try:
            await aiosmtplib.send(
                data,
                sender=sender,
                recipients=envelope.rcpt_tos,
                hostname="127.0.0.1",
                port=self.upstream_port,
                start_tls=False,
                use_tls=False,
            )
        except aiosmtplib.SMTPException as exc:
            return f"451 4.4.1 {exc}"
        return "250 OK"


class NaiveTrackingProxy(BareProxy):
    def transform(self, data: bytes) -> bytes:
        message = message_from_bytes(data, policy=email.policy.SMTP)
        assert isinstance(message, EmailMessage)
        for part in message.walk():
            if part.get_content_type() == "text/html" and not part.is_attachment():
                html = part.get_content()
                tree = HTMLParser(html)
                for i, node in enumerate(tree.css("a[href]")):
                    node.attrs["href"] = f"https://t.example/c/{i}"
                body = tree.body
                if body is not None:
                    body.insert_child(HTMLParser(PIXEL).css_first("img"))  # type: ignore[arg-type]
                part.set_content(tree.html or "", subtype="html")
        return message.as_bytes()


async def main(kind: str, port: int, upstream_port: int) -> None:
    handler: Any = (NaiveTrackingProxy if kind == "naive" else BareProxy)(upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=None), "127.0.0.1", port
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
