"""MIME offsets, eligibility, and re-encoding in the part's own encoding."""

from __future__ import annotations

import binascii

import pytest

from relay import mime

NESTED = (
    b"Content-Type: multipart/mixed; boundary=outer\r\n\r\npreamble\r\n"
    b'--outer\r\nContent-Type: multipart/alternative; boundary="outer-inner"\r\n\r\n'
    b"--outer-inner\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
    b"--outer-inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n"
    b"--outer-inner--\r\n"
    b"--outer\r\nContent-Type: multipart/signed; boundary=s\r\n\r\n--s\r\n"
    b"Content-Type: text/html\r\n\r\n<p>signed</p>\r\n--s--\r\n"
    b"--outer\r\nContent-Type: text/html\r\nContent-Disposition: attachment\r\n\r\n<p>att</p>\r\n"
    b"--outer--\r\nepilogue\r\n"
)


def test_offsets_and_eligibility() -> None:
    root = mime.scan(NESTED)
    parts = {p.path: p for p in mime.walk(root)}
    body = {path: NESTED[p.body_start : p.body_end] for path, p in parts.items()}
    assert body["1.1.1"] == b"plain"
    assert parts["1.1.1"].kind == "text"
    assert body["1.1.2"] == b"<p>html</p>"
    assert parts["1.1.2"].kind == "html"
    assert parts["1.1.2"].charset == "utf-8"
    assert parts["1.2.1"].frozen == "signed"
    assert parts["1.2.1"].kind == ""
    assert parts["1.3"].attachment
    assert parts["1.3"].kind == ""


def test_lf_only_and_missing_close_delimiter() -> None:
    data = b"Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/html\n\nx\n"
    leaf = mime.scan(data).children[0]
    assert data[leaf.body_start : leaf.body_end] == b"x\n"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (b"Content-Type: text/html; charset=x-unknown\r\n", "unknown charset"),
        (b"Content-Type: text/html; charset=utf-16\r\n", "stateful"),
        (b"Content-Type: text/html; charset=iso-2022-jp\r\n", "stateful"),
        (
            b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: x-uue\r\n",
            "x-uue",
        ),
        (
            b"Content-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 8bit\r\n",
            "valid",
        ),
    ],
)
def test_bodies_left_alone(headers: bytes, why: str) -> None:
    data = headers + b"\r\n<p>caf\xc3\xa9</p>\r\n"
    with pytest.raises(mime.BodyError, match=why):
        mime.open_body(data, mime.scan(data))


def _edit(data: bytes, old: bytes, new: bytes) -> mime.NewBody:
    part = mime.scan(data)
    body = mime.open_body(data, part)
    start = body.decoded.index(old)
    return mime.encode(body, [(start, start + len(old), new)])


def test_qp_only_the_edited_logical_line_changes() -> None:
    lines = [b"line %d with caf=C3=A9 and a=3Db" % i for i in range(5)]
    lines[2] = b'<a href=3D"https://exa=\r\nmple.com/x?a=3D1">x</a>'
    data = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
    data += b"\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    new = _edit(data, b"https://example.com/x?a=1", b"https://t.example.net/c/" + b"T" * 100)
    out = new.raw.split(b"\r\n")
    assert out[:2] == lines[:2]
    assert out[-3:] == [*lines[3:], b""]
    assert all(len(line) <= 76 for line in out)
    assert binascii.a2b_qp(new.raw).count(b"T" * 100) == 1
    assert new.cte_line is None


def test_base64_keeps_line_length_and_ending() -> None:
    html = b"<p><a href='https://example.com/'>x</a></p>" * 10
    encoded = binascii.b2a_base64(html, newline=False)
    body = b"\n".join(encoded[i : i + 64] for i in range(0, len(encoded), 64)) + b"\n"
    data = b"Content-Type: text/html\nContent-Transfer-Encoding: base64\n\n" + body
    new = _edit(data, b"https://example.com/", b"https://t.example.net/c/abc")
    lines = new.raw.split(b"\n")
    assert {len(line) for line in lines[:-2]} == {64}
    assert lines[-1] == b""
    assert b"https://t.example.net/c/abc" in binascii.a2b_base64(new.raw)


def test_7bit_line_over_998_moves_to_quoted_printable() -> None:
    data = b"Content-Type: text/html\r\n\r\n<a href='https://example.com/'>x</a>\r\n"
    new = _edit(data, b"https://example.com/", b"https://t.example.net/c/" + b"x" * 990)
    assert new.cte_line == b"Content-Transfer-Encoding: quoted-printable\r\n"
    assert binascii.a2b_qp(new.raw).startswith(b"<a href='https://t.example.net/c/xxx")
    small = _edit(data, b"https://example.com/", b"https://t.example.net/c/x")
    assert small.cte_line is None
    assert small.raw.startswith(b"<a href='https://t.example.net/c/x'")


def test_multibyte_offsets() -> None:
    data = b"Content-Type: text/html; charset=utf-8\r\n\r\n\xc3\xa9\xe2\x82\xac<a href='u'>\r\n"
    part = mime.scan(data)
    body = mime.open_body(data, part)
    start = body.text.index("u'")
    edits = mime.byte_edits(body, [(start, start + 1, "https://t/c/1")])
    assert edits == [(14, 15, b"https://t/c/1")]


def test_qp_empty_body_takes_the_pixel() -> None:
    data = b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    body = mime.open_body(data, mime.scan(data))
    new = mime.encode(body, [(0, 0, b'<img src="https://t.example.net/o/x.gif">')])
    assert binascii.a2b_qp(new.raw) == b'<img src="https://t.example.net/o/x.gif">'
