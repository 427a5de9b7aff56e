"""Injection over real messages and real templates: nothing but hrefs and the pixel.

Runs over ../shared/corpus (261 real .eml files from MIME libraries' test
suites, and HTML email templates wrapped in messages) when it is present, and
always over the permissive subset copied to tests/data/corpus (see ATTRIBUTION
there). The invariants are in tests/support/injection_checks.py.
"""

from __future__ import annotations

import binascii
import json
from pathlib import Path

import pytest

from relay import mime
from relay.headers import top_fields
from relay.prepared import Submission
from relay.track import Tracker
from shared.config import Settings
from shared.models import Policy
from shared.policies import snapshot_of
from shared.tokens import Signer
from tests.support.injection_checks import check, without_added_id
from tests.support.paths import CORPUS

LOCAL = Path(__file__).parents[1] / "data" / "corpus"
BASE = "https://t.example.net"
HOST = "t.example.net"
FROZEN_TOP = ("multipart/signed", "multipart/encrypted", "application/pkcs7-mime")


def _files(kind: str) -> list[Path]:
    local = sorted((LOCAL / kind).glob("*"))
    shared = sorted((CORPUS / kind).rglob("*.*")) if (CORPUS / kind).is_dir() else []
    return local + [p for p in shared if p.suffix in (".eml", ".html")]


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tracker, Signer]:
    var = tmp_path_factory.mktemp("var")
    settings = Settings(var_dir=var, secret_key="corpus-key-0123456789", public_url=BASE)
    return Tracker(settings, None), Signer(settings.signing_keys())  # type: ignore[arg-type]


SNAPSHOT = snapshot_of(
    [Policy(pattern="*", mode="always", allow_text_links=True, per_recipient=False)]
)


def _run(tracker: Tracker, data: bytes) -> tuple[bytes, dict[str, object]]:
    sub = Submission(7, "ann@example.com", ["bob@example.org"], b"X-Track: all\r\n" + data, "", "")
    prepared = tracker.prepare_sync(sub, SNAPSHOT)
    assert len(prepared.copies) == 1
    return prepared.copies[0].data, json.loads(prepared.message.decision)


def test_corpus_is_there() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"{CORPUS} is absent: only the local subset in {LOCAL} runs")
    assert len(list((CORPUS / "eml").rglob("*.eml"))) >= 261


@pytest.mark.parametrize("path", _files("eml"), ids=_id)
def test_eml(path: Path, tracker: tuple[Tracker, Signer]) -> None:
    the_tracker, signer = tracker
    data = path.read_bytes()
    out, decision = _run(the_tracker, data)
    fields, _ = top_fields(data)
    if mime.scan(data).content_type in FROZEN_TOP or any(
        f.name == "dkim-signature" for f in fields
    ):
        assert without_added_id(data, out) == data, "a signed or encrypted message was modified"
        return
    check(
        data,
        out,
        BASE,
        HOST,
        signer,
        text_links=True,
        links_agreed="links_left_alone" not in decision,
    )


def wrap(html: bytes, encoding: str) -> bytes:
    """A template as the HTML part of a message, in one of three encodings."""
    html = html.replace(b'href="#"', b'href="https://example.com/button"').replace(b"\r\n", b"\n")
    if encoding == "quoted-printable":
        body = binascii.b2a_qp(html.replace(b"\n", b"\r\n"), istext=True)
    elif encoding == "base64":
        encoded = binascii.b2a_base64(html, newline=False)
        body = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"
    else:
        body = html.replace(b"\n", b"\r\n")
    return (
        b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: template\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + body
    )


ENCODINGS = ("quoted-printable", "base64", "8bit")


@pytest.mark.parametrize("path", _files("html"), ids=_id)
def test_template(path: Path, tracker: tuple[Tracker, Signer]) -> None:
    the_tracker, signer = tracker
    encoding = ENCODINGS[sum(path.name.encode()) % len(ENCODINGS)]
    data = wrap(path.read_bytes(), encoding)
    out, decision = _run(the_tracker, data)
    assert "links_left_alone" not in decision, decision
    report = check(data, out, BASE, HOST, signer)
    assert report.pixels == 1
    assert out != data


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_template_every_encoding(encoding: str, tracker: tuple[Tracker, Signer]) -> None:
    the_tracker, signer = tracker
    data = wrap((LOCAL / "html" / "cerberus-hybrid.html").read_bytes(), encoding)
    out, _ = _run(the_tracker, data)
    report = check(data, out, BASE, HOST, signer)
    assert report.pixels == 1
    assert report.clicks >= 3
