"""Deterministic benchmark messages: 2 KB text, ~50 KB newsletter, 35 MB attachment.

Built with plain byte templates (not the ``email`` package) so the bytes are
exactly what a mail client would send: CRLF, quoted-printable HTML with soft
line breaks, base64 attachment wrapped at 76 columns.
"""

from __future__ import annotations

import base64
import quopri
import random

CRLF = b"\r\n"


def _headers(subject: str, tracked: bool, extra: list[str]) -> list[str]:
    lines = [
        "From: Ann Example <ann@example.com>",
        "To: Bob Example <bob@example.net>",
        f"Subject: {subject}",
        "Date: Fri, 27 Nov 2026 10:00:00 +0000",
        f"Message-ID: <{subject.replace(' ', '.')}@example.com>",
        "MIME-Version: 1.0",
    ]
    if tracked:
        lines.append("X-Track: opens, clicks")
    return lines + extra


def _join(lines: list[str], body: bytes) -> bytes:
    return CRLF.join(line.encode() for line in lines) + CRLF + CRLF + body


def small(tracked: bool = False) -> bytes:
    """A ~2 KB text message with two links."""
    rng = random.Random(2)
    words = [
        rng.choice(["meeting", "report", "numbers", "agenda", "notes", "plan"]) for _ in range(300)
    ]
    text = " ".join(words)
    paragraphs = [text[i : i + 72] for i in range(0, len(text), 72)]
    body = (
        "\r\n".join(paragraphs)
        + "\r\n\r\nhttps://example.com/agenda\r\nhttps://example.com/notes\r\n"
    )
    return _join(
        _headers("weekly notes", tracked, ["Content-Type: text/plain; charset=utf-8"]),
        body.encode(),
    )


def newsletter(tracked: bool = False, links: int = 30) -> bytes:
    """A ~50 KB multipart/alternative newsletter, HTML quoted-printable, ~30 links."""
    rng = random.Random(5)
    blocks = []
    for i in range(links):
        para = " ".join(
            rng.choice(
                [
                    "Our",
                    "new",
                    "release",
                    "brings",
                    "faster",
                    "sync",
                    "and",
                    "a",
                    "cleaner",
                    "inbox",
                ]
            )
            for _ in range(215)
        )
        story = (
            '<tr><td style="padding:16px 24px;font-family:Helvetica,Arial,sans-serif;'
            'font-size:15px;line-height:22px;color:#333333;">'
            '<h2 style="margin:0 0 8px 0;font-size:19px;">Story {n}</h2>'
            '<p style="margin:0 0 12px 0;">{para}</p>'
            '<a href="https://news.example.com/story/{n}?utm_source=newsletter&amp;'
            'utm_medium=email&amp;utm_campaign=nov&amp;region=eu" style="color:#1a73e8;">'
            "Read more</a></td></tr>"
        )
        blocks.append(story.format(n=i + 1, para=para))
    html = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml"><head><meta http-equiv="Content-Type" '
        'content="text/html; charset=UTF-8"/><title>November news</title></head>\n'
        '<body style="margin:0;padding:0;background:#f4f4f4;"><table width="100%" cellpadding="0" '
        'cellspacing="0" border="0" style="max-width:600px;margin:0 auto;background:#ffffff;">\n'
        + "\n".join(blocks)
        + '\n<tr><td style="padding:24px;font-size:12px;color:#888;">You get this because you '
        'subscribed. <a href="https://news.example.com/unsubscribe?u=1">Unsubscribe</a></td></tr>'
        "</table></body></html>\n"
    )
    qp = quopri.encodestring(html.replace("\n", "\r\n").encode("utf-8")).replace(b"\n", b"\r\n")
    qp = qp.replace(b"\r\r\n", b"\r\n")
    text = b"November news. Read it in a browser: https://news.example.com/nov\r\n"
    boundary = "----=_Part_4711_bench"
    body = CRLF.join(
        [
            f"--{boundary}".encode(),
            b"Content-Type: text/plain; charset=UTF-8",
            b"Content-Transfer-Encoding: 7bit",
            b"",
            text,
            f"--{boundary}".encode(),
            b"Content-Type: text/html; charset=UTF-8",
            b"Content-Transfer-Encoding: quoted-printable",
            b"",
            qp,
            f"--{boundary}--".encode(),
            b"",
        ]
    )
    return _join(
        _headers(
            "November news",
            tracked,
            [f'Content-Type: multipart/alternative; boundary="{boundary}"'],
        ),
        body,
    )


def with_attachment(tracked: bool = False, size: int = 25 * 1024 * 1024) -> bytes:
    """A short HTML message with a ``size``-byte binary attachment (base64, ~1.37x)."""
    rng = random.Random(7)
    blob = rng.randbytes(size)
    encoded = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    boundary = "----=_Part_big_bench"
    html = b'<html><body><p>See the attached file. <a href="https://example.com/x">x</a></p></body></html>'
    body = CRLF.join(
        [
            f"--{boundary}".encode(),
            b"Content-Type: text/html; charset=UTF-8",
            b"Content-Transfer-Encoding: 7bit",
            b"",
            html,
            f"--{boundary}".encode(),
            b"Content-Type: application/octet-stream; name=data.bin",
            b"Content-Disposition: attachment; filename=data.bin",
            b"Content-Transfer-Encoding: base64",
            b"",
            encoded,
            f"--{boundary}--".encode(),
            b"",
        ]
    )
    return _join(
        _headers("big file", tracked, [f'Content-Type: multipart/mixed; boundary="{boundary}"']),
        body,
    )
