"""Golden whole messages: tests/data/golden/NAME.eml in, NAME.out.eml expected.

Each input carries its own trigger header; the tracker runs with the default
policy (track when asked), a fixed key, message id and receiver URL, so the
output is deterministic. To accept a deliberate change, run with
``UPDATE_GOLDEN=1`` and review the diff of the .out.eml files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relay.prepared import Submission
from relay.track import Tracker
from shared.config import Settings
from shared.policies import snapshot_of
from shared.tokens import Signer
from tests.support.injection_checks import check, without_added_id

GOLDEN = Path(__file__).parents[1] / "data" / "golden"
INPUTS = sorted(p for p in GOLDEN.glob("*.eml") if not p.name.endswith(".out.eml"))
BASE = "https://t.example.net"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    settings = Settings(
        var_dir=tmp_path_factory.mktemp("var"), secret_key="golden-key", public_url=BASE
    )
    return Tracker(settings, None)  # type: ignore[arg-type]


def run(tracker: Tracker, data: bytes) -> tuple[bytes, dict[str, object]]:
    sub = Submission(0x1234_5678_9ABC, "ann@example.com", ["bob@example.org"], data, "ann", "")
    prepared = tracker.prepare_sync(sub, snapshot_of([]))
    assert len(prepared.copies) == 1
    return prepared.copies[0].data, json.loads(prepared.message.decision)


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_golden(path: Path, tracker: Tracker) -> None:
    data = path.read_bytes()
    out, _ = run(tracker, data)
    expected = path.with_suffix(".out.eml")
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_bytes(out)
    assert out == expected.read_bytes()


def _without_trigger(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(
        line
        for line in lines
        if not line.lower().startswith((b"x-track:", b"x-mailgun-track", b"x-pm-track"))
    )


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_golden_invariants(path: Path, tracker: Tracker) -> None:
    data = path.read_bytes()
    out, _ = run(tracker, data)
    if path.stem == "dkim-covers-trigger":
        assert without_added_id(data, out) == data
        return
    original = _without_trigger(data)
    if path.stem == "signed":
        assert without_added_id(original, out) == original
        return
    signer = Signer([b"golden-key"])
    check(original, out, BASE, "t.example.net", signer, links_agreed=True)


def test_snail_quoted_printable(tracker: Tracker) -> None:
    """s-nail's QP output splits URLs over soft breaks and writes = as =3D."""
    data = (GOLDEN / "snail-qp.eml").read_bytes()
    for variant in (data, data.replace(b"\n", b"\r\n")):
        out, decision = run(tracker, variant)
        assert decision["links_tracked"] == 5
        assert decision["pixel"] is True
        assert all(len(line) <= 76 for line in out.replace(b"\r\n", b"\n").split(b"\n")[9:])
        signer = Signer([b"golden-key"])
        report = check(_without_trigger(variant), out, BASE, "t.example.net", signer)
        assert report.clicks == 5
        urls = [signer.verify_click(t).url for t in _tokens(out)]
        assert urls[0] == (
            "https://news.example.com/story/1?utm_source=newsletter&utm_medium=email&region=eu&id=1"
        )


def _tokens(data: bytes) -> list[str]:
    import binascii
    import re

    body = binascii.a2b_qp(data.split(b"\n\n", 1)[-1].split(b"\r\n\r\n", 1)[-1]).decode()
    return re.findall(re.escape(BASE) + r"/c/([A-Za-z0-9_-]+)", body)
