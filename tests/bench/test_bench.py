"""The benchmark suite still runs: its messages are what they claim, one short
throughput sample and the report work. No timing is asserted, ever."""

from __future__ import annotations

import binascii
import email
import email.policy
import tempfile
from pathlib import Path

import pytest

from bench import harness, messages, run
from bench.relay import _files
from relay.mime import open_body, scan, walk


def test_small_message_is_about_2kb_plain_text() -> None:
    data = messages.small(tracked=False)
    assert 1500 <= len(data) <= 2600
    assert b"X-Track" not in data
    assert b"X-Track: opens, clicks" in messages.small(tracked=True)
    assert all(line.endswith(b"\r") for line in data.split(b"\n")[:-1])


def test_newsletter_is_50kb_quoted_printable_html_with_30_links() -> None:
    data = messages.newsletter(tracked=True)
    assert 45_000 <= len(data) <= 55_000
    [html] = [p for p in walk(scan(data)) if p.content_type == "text/html"]
    assert html.cte == "quoted-printable"
    assert max(map(len, data[html.body_start : html.body_end].split(b"\r\n"))) <= 76
    text = open_body(data, html).text
    assert text.count('<a href="https://news.example.com/story/') == 30
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"


def test_attachment_message_is_35mb_on_the_wire() -> None:
    data = messages.with_attachment(tracked=True)
    assert 34e6 < len(data) < 37e6
    body = data.partition(b"application/octet-stream")[2].split(b"\r\n\r\n", 1)[1]
    assert len(binascii.a2b_base64(body.split(b"\r\n--", 1)[0])) == 25 * 1024 * 1024


def test_markdown_report_names_every_item() -> None:
    results = {
        "machine": {
            "date": "d",
            "cpu": "c",
            "cores": 2,
            "kernel": "k",
            "python": "3.11",
            "commit": "abc",
            "loadavg_before": (1.0, 1.0, 1.0),
            "loadavg_after": (1.0, 1.0, 1.0),
        },
        "command": "python -m bench.run",
        "quick": True,
        "repeat": 1,
        "items": {},
        "skipped": {"receiver": "missing wrk"},
    }
    text = run.render(results)
    assert "commit abc" in text
    assert "- receiver: skipped (missing wrk)" in text


@pytest.mark.skipif(
    not (Path(harness.SMTP_SINK).exists() and Path(harness.SMTP_SOURCE).exists()),
    reason="postfix's smtp-sink/smtp-source are not installed (apt-get install postfix)",
)
def test_one_short_throughput_sample_against_smtp_sink() -> None:
    with tempfile.TemporaryDirectory() as tmp, harness.smtp_sink() as sink:
        path = _files(Path(tmp))["2KB"]
        elapsed = harness.smtp_source(sink.port, path, sessions=2, messages=20)
        assert elapsed > 0
        assert sink.cpu_seconds() >= 0
        assert sink.peak_rss() > 0


@pytest.mark.skipif(
    not Path(harness.SMTP_SINK).exists() or not Path(harness.SMTP_SOURCE).exists(),
    reason="postfix's smtp-sink/smtp-source are not installed (apt-get install postfix)",
)
def test_trackrelay_relays_a_tracked_sample_through_the_harness() -> None:
    with tempfile.TemporaryDirectory() as tmp, harness.smtp_sink() as sink:
        path = _files(Path(tmp))["50KB tracked"]
        with harness.trackrelay(sink.port) as relay:
            elapsed = harness.smtp_source(relay.port, path, sessions=1, messages=3)
            assert elapsed > 0
            assert relay.cpu_seconds() > 0
