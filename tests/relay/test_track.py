"""Tracker.prepare: copies per recipient, Bcc, suppression, DKIM, fail-open."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from relay.prepared import MessageRecord, Prepared, Submission
from relay.track import Tracker
from shared.config import Settings
from shared.eventstate import MESSAGE_KEPT
from shared.models import Message
from shared.policies import add_suppression, set_policy, snapshot_of
from shared.tokens import Signer
from tests.support.tracing import peak_allocated

BASE = "https://t.example.net"
NOON = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)
HTML = (
    b"From: Ann <ann@example.com>\r\nTo: Bob <bob@example.org>, carol@example.net\r\n"
    b"Subject: hello\r\nMessage-ID: <m1@example.com>\r\n{trigger}"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
    b'<html><body><a href="https://example.com/a">a</a></body></html>\r\n'
)


def message(trigger: bytes = b"X-Track: all\r\n") -> bytes:
    return HTML.replace(b"{trigger}", trigger)


@pytest.fixture
def tracker(make_settings: Callable[..., Settings], engine: Engine) -> Tracker:
    return Tracker(make_settings(public_url=BASE), engine)


def prepare(tracker: Tracker, data: bytes, recipients: list[str], sender: str = "ann@example.com"):
    sub = Submission(42, sender, recipients, data, "ann", "192.0.2.1")
    return asyncio.run(tracker.prepare(sub))


def tokens(prepared: Prepared, signer: Signer) -> list[tuple[list[str], int, int]]:
    """(recipients, open-token recipient, click-token recipient) per copy."""
    import re

    out = []
    for copy in prepared.copies:
        body = copy.data.decode()
        opens = re.findall(re.escape(BASE) + r"/o/([\w-]+)\.gif", body)
        clicks = re.findall(re.escape(BASE) + r"/c/([\w-]+)", body)
        out.append(
            (
                copy.recipients,
                signer.verify_open(opens[0]).recipient if opens else -1,
                signer.verify_click(clicks[0]).recipient if clicks else -1,
            )
        )
    return out


def signer_of(tracker: Tracker) -> Signer:
    return tracker._setup.signer


def test_per_recipient_copies_and_bcc(tracker: Tracker) -> None:
    rcpts = ["bob@example.org", "carol@example.net", "dave@example.com"]
    prepared = prepare(tracker, message(), rcpts)
    assert tokens(prepared, signer_of(tracker)) == [
        (["bob@example.org"], 1, 1),
        (["carol@example.net"], 2, 2),
        (["dave@example.com"], 3, 3),
    ]
    row = prepared.message
    assert (row.id, row.sender, row.subject, row.from_header) == (
        42,
        "ann@example.com",
        "hello",
        "Ann <ann@example.com>",
    )
    assert row.track_opens
    assert row.track_clicks
    assert row.per_recipient
    assert row.message_id_header == "<m1@example.com>"
    assert row.size_in == len(message())
    assert row.size_out > row.size_in
    assert [(link.position, link.url) for link in prepared.links] == [(1, "https://example.com/a")]
    assert prepared.tracked_recipients == set(rcpts)
    for copy in prepared.copies:
        assert b"X-Track" not in copy.data


def test_shared_copy_when_per_recipient_is_off_bcc_still_alone(
    tracker: Tracker, engine: Engine
) -> None:
    set_policy(engine, "@example.com", per_recipient=False)
    rcpts = ["bob@example.org", "dave@example.com", "carol@example.net"]
    prepared = prepare(tracker, message(), rcpts)
    assert tokens(prepared, signer_of(tracker)) == [
        (["bob@example.org", "carol@example.net"], 0, 0),
        (["dave@example.com"], 2, 2),
    ]
    assert not prepared.message.per_recipient


def test_recipient_cap(tracker: Tracker, engine: Engine) -> None:
    set_policy(engine, "ann@example.com", recipient_cap=1)
    prepared = prepare(tracker, message(), ["bob@example.org", "carol@example.net"])
    assert tokens(prepared, signer_of(tracker)) == [
        (["bob@example.org", "carol@example.net"], 0, 0)
    ]


def test_suppressed_recipients_get_an_untracked_copy(tracker: Tracker, engine: Engine) -> None:
    add_suppression(engine, "Carol@Example.net")
    set_policy(engine, "*", per_recipient=False)
    prepared = prepare(tracker, message(), ["bob@example.org", "carol@example.net"])
    assert tokens(prepared, signer_of(tracker)) == [
        (["bob@example.org"], 0, 0),
        (["carol@example.net"], -1, -1),
    ]
    untracked = prepared.copies[1].data
    assert untracked == message().replace(b"X-Track: all\r\n", b"")
    assert prepared.tracked_recipients == {"bob@example.org"}
    assert json.loads(prepared.message.decision)["suppressed"] == ["carol@example.net"]


def test_all_suppressed_means_untracked(tracker: Tracker, engine: Engine) -> None:
    add_suppression(engine, "bob@example.org")
    prepared = prepare(tracker, message(), ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [message(b"")]
    assert not prepared.message.track_opens
    assert prepared.links == []


def test_headers_removed_even_when_not_tracked(tracker: Tracker, engine: Engine) -> None:
    set_policy(engine, "*", mode="never")
    triggers = b"X-Track: all\r\nX-Mailgun-Track: yes\r\nX-PM-TrackOpens: true\r\n"
    prepared = prepare(tracker, message(triggers), ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [message(b"")]
    decision = json.loads(prepared.message.decision)
    assert decision["tracked"] is False
    assert "policy *: mode never" in decision["reasons"]


def test_no_header_no_tracking_in_header_mode(tracker: Tracker) -> None:
    prepared = prepare(tracker, message(b""), ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [message(b"")]


def test_always_policy_tracks_without_header(tracker: Tracker, engine: Engine) -> None:
    set_policy(engine, "@example.com", mode="always", allow_clicks=False)
    prepared = prepare(tracker, message(b""), ["bob@example.org"])
    assert prepared.message.track_opens
    assert not prepared.message.track_clicks
    assert tokens(prepared, signer_of(tracker)) == [(["bob@example.org"], 1, -1)]


def test_unknown_header_value_untracked_with_reason(tracker: Tracker) -> None:
    prepared = prepare(tracker, message(b"X-Track: maybe\r\n"), ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [message(b"")]
    reasons = json.loads(prepared.message.decision)["reasons"]
    assert reasons == ["untracked: X-Track: 'maybe' is not understood"]


def test_dkim_covering_the_trigger_leaves_the_message_untouched(tracker: Tracker) -> None:
    dkim = b"DKIM-Signature: v=1; d=example.com;\r\n\th=From:To:X-Track; bh=x; b=y\r\n"
    data = dkim + message()
    prepared = prepare(tracker, data, ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [data]


def test_dkim_not_covering_the_trigger_removes_it_but_keeps_the_body(tracker: Tracker) -> None:
    dkim = b"DKIM-Signature: v=1; d=example.com; h=From:To; bh=x; b=y\r\n"
    prepared = prepare(tracker, dkim + message(), ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [dkim + message(b"")]


def test_null_sender_uses_the_from_header_for_policy(tracker: Tracker, engine: Engine) -> None:
    set_policy(engine, "ann@example.com", mode="never")
    prepared = prepare(tracker, message(), ["bob@example.org"], sender="<>")
    assert not prepared.message.track_opens
    assert prepared.message.sender == ""


class Broken(Tracker):
    def prepare_sync(self, sub: Submission, snapshot: object) -> Prepared:
        raise RuntimeError("rewriting bug")


def test_fail_open(make_settings: Callable[..., Settings], engine: Engine) -> None:
    tracker = Broken(make_settings(public_url=BASE), engine)
    before = tracker.metrics.failures
    prepared = prepare(
        tracker, message(b"X-Track: all\r\nX-PM-TrackLinks: HtmlOnly\r\n"), ["b@x.org"]
    )
    assert [c.data for c in prepared.copies] == [message(b"")]
    assert [c.recipients for c in prepared.copies] == [["b@x.org"]]
    assert tracker.metrics.failures == before + 1
    assert prepared.message.id == 42
    assert prepared.links == []


def test_database_down_at_start_means_untracked(
    make_settings: Callable[..., Settings], tmp_path
) -> None:
    from shared.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path}/missing/../nowhere.db")  # no tables
    tracker = Tracker(make_settings(public_url=BASE), engine)
    prepared = prepare(tracker, message(), ["bob@example.org"])
    assert [c.data for c in prepared.copies] == [message(b"")]
    assert "policy store unavailable" in prepared.message.decision
    engine.dispose()


@pytest.mark.parametrize("trigger", [b"X-Track: all\r\n", b"X-Track: off\r\n"])
def test_a_large_attachment_is_never_copied(
    make_settings: Callable[..., Settings], trigger: bytes
) -> None:
    """Tracked or not, a copy is views of the received bytes plus the few new
    ones (the rewritten HTML part): preparing a message with a 20 MB attachment
    allocates a small fraction of it, where deleting the trigger line and
    splicing the HTML part once made two full copies."""
    data = (
        b"From: ann@example.com\r\nTo: bob@example.org\r\nSubject: big\r\n"
        + trigger
        + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
        b'<p><a href="https://example.com/a">a</a></p>\r\n--b\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + (b"QUJD" * 19 + b"\r\n") * 270_000
        + b"--b--\r\n"
    )
    tracker = Tracker(make_settings(public_url=BASE), None)  # type: ignore[arg-type]
    small = Submission(42, "ann@example.com", ["bob@example.org"], message(), "ann", "")
    tracker.prepare_sync(small, snapshot_of([]))  # caches and compiled patterns are warm
    sub = Submission(42, "ann@example.com", ["bob@example.org"], data, "ann", "")
    with peak_allocated() as peak:
        prepared = tracker.prepare_sync(sub, snapshot_of([]))
    assert peak[0] < len(data) / 10  # ~1.3 MB: selectolax's parser of the HTML part
    [copy] = prepared.copies
    new = [s for s in copy.segments if not (isinstance(s, memoryview) and s.obj is data)]
    assert sum(map(len, new)) < 1000
    assert copy.size == len(copy.data) == prepared.message.size_out
    assert b"X-Track" not in copy.data
    assert prepared.message.track_opens == (trigger == b"X-Track: all\r\n")


def test_the_record_is_the_json_the_message_model_wrote(tracker: Tracker) -> None:
    """MessageRecord is plain data, but its JSON (journal lines, rows) is what
    ``Message.model_dump(mode="json")`` gave: same keys in order, defaults, values."""

    def items(values: dict[str, object]) -> list[tuple[str, object]]:
        return list(values.items())

    kept = set(MESSAGE_KEPT)  # the writers' columns (shared/eventstate.py), not the record's
    fields = [name for name in Message.model_fields if name not in kept]
    assert [f.name for f in dataclasses.fields(MessageRecord)] == fields
    for moment in (NOON, NOON.replace(microsecond=120000), datetime.now(UTC)):
        expected = Message(id=7, created_at=moment).model_dump(mode="json", exclude=kept)
        assert items(MessageRecord(id=7, created_at=moment).as_json()) == items(expected)
    record = prepare(tracker, message(), ["bob@example.org", "carol@example.net"]).message
    expected = Message(**dataclasses.asdict(record)).model_dump(mode="json", exclude=kept)
    assert items(record.as_json()) == items(expected)


NO_ID = (
    b"From: Ann <ann@Example.COM>\r\nTo: bob@example.org\r\nSubject: no id\r\n{trigger}"
    b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    b'<html><body><a href="https://example.com/a">a</a></body></html>\r\n'
)


@pytest.mark.parametrize("trigger", [b"X-Track: all\r\n", b""])
def test_a_message_without_message_id_gets_one_in_every_copy_and_the_record(
    tracker: Tracker, trigger: bytes
) -> None:
    """RFC 6409 section 8.3: the relay, as a submission server, adds the Message-ID
    replies and bounces will name; tracked or not, per-recipient copies too."""
    data = NO_ID.replace(b"{trigger}", trigger)
    prepared = prepare(tracker, data, ["bob@example.org", "carol@example.net"])
    added = f"<trackrelay.{42:016x}@example.com>"
    assert prepared.message.message_id_header == added
    for copy in prepared.copies:
        assert copy.data.startswith(f"Message-ID: {added}\r\nFrom: Ann".encode())
    assert prepared.message.size_out == max(c.size for c in prepared.copies)
    assert len(prepared.copies) == (2 if trigger else 1)


def test_an_lf_message_gets_an_lf_line_and_a_domainless_sender_the_relay_host(
    make_settings: Callable[..., Settings],
) -> None:
    tracker = Tracker(make_settings(public_url=BASE, hostname="relay.example.net"), None)  # type: ignore[arg-type]
    sub = Submission(7, "", ["bob@example.org"], b"Subject: x\n\nbody\n", "", "")
    prepared = tracker.prepare_sync(sub, snapshot_of([]))
    assert prepared.copies[0].data == (
        b"Message-ID: <trackrelay.0000000000000007@relay.example.net>\nSubject: x\n\nbody\n"
    )


def test_a_message_with_a_message_id_keeps_it_untouched(tracker: Tracker) -> None:
    prepared = prepare(tracker, message(b""), ["bob@example.org"])
    assert prepared.copies[0].data == message(b"")
    assert prepared.message.message_id_header == "<m1@example.com>"


def test_no_message_id_is_added_where_a_dkim_signature_covers_one(tracker: Tracker) -> None:
    data = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1;\r\n"
        b" h=from:to:subject:message-id; bh=x; b=y\r\n" + NO_ID.replace(b"{trigger}", b"")
    )
    prepared = prepare(tracker, data, ["bob@example.org"])
    assert prepared.copies[0].data == data
    assert prepared.message.message_id_header == ""


def test_an_absurd_message_id_is_recorded_cut_to_the_indexable_size(tracker: Tracker) -> None:
    long_id = "<" + "x" * 3000 + "@example.com>"
    data = message(b"").replace(b"<m1@example.com>", long_id.encode())
    prepared = prepare(tracker, data, ["bob@example.org"])
    recorded = prepared.message.message_id_header
    assert len(recorded.encode()) <= 900
    assert long_id.startswith(recorded)
