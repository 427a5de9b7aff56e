"""The tracking decision panel's words, for every record the relay can write.

Each record is made the way the relay makes it: the real Tracker runs the
pipeline (relay/pipeline.py, relay/policy.py) on a message with a policy
snapshot, relay/record.py turns it and the upstream's replies into the rows
it stores, and the read model reads those rows (decision_facts). So a reason
the relay rewords fails here, not on a sales person's screen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.dashboard.decision import panel, sentences, technical
from receiver.readmodel import DecisionFacts, decision_facts
from relay.prepared import Prepared, Submission
from relay.record import Delivery, RecordStore, to_record
from relay.track import Tracker
from shared.config import Settings
from shared.models import Message, Policy, Recipient
from shared.policies import Snapshot, snapshot_of
from shared.smtpclient import Reply
from tests.support.dashboardkit import D, login, seed

BASE = "https://t.example.net"
OK = Reply(250, "2.0.0 Ok: queued as 4XyZ")
UNKNOWN_USER = Reply(550, "5.1.1 <carol@example.net>: mailbox unavailable")
HEAD = (
    b"From: Ann <ann@example.com>\r\nTo: bob@example.org, carol@example.net\r\n"
    b"Subject: hello\r\nMessage-ID: <m1@example.com>\r\n"
)
HTML_BODY = (
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
    b'<html><body><a href="https://example.com/a">a</a></body></html>\r\n'
)
TWO = ["bob@example.org", "carol@example.net"]
INTERNAL = ("Policy:", "Mode:", "mode ", "policy default", "{", "[", "Sent by", "True", "False")


def html(trigger: bytes = b"X-Track: opens, clicks\r\n", body: bytes = HTML_BODY) -> bytes:
    return HEAD + trigger + body


def alternative(trigger: bytes = b"X-Track: all\r\n") -> bytes:
    return (
        HEAD + trigger + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSee https://example.com/t\r\n--b\r\n"
        b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
        b'<p><a href="https://example.com/h">h</a></p>\r\n--b--\r\n'
    )


class Broken(Tracker):
    def prepare_sync(self, sub: Submission, snapshot: Snapshot | None) -> Prepared:
        raise RuntimeError("rewriting bug")


@pytest.fixture
def relay(make_settings: Callable[..., Settings]) -> Callable[..., DecisionFacts]:
    settings = make_settings(public_url=BASE)

    def relayed(
        data: bytes,
        recipients: list[str] = TWO,
        *,
        policies: Iterable[Policy] = (),
        suppressed: Iterable[str] = (),
        consent_modes: Mapping[str, str] | None = None,
        store: bool = True,
        replies: Mapping[str, Reply] | None = None,
        broken: bool = False,
        listener: str = "",
        commands: tuple[str, ...] = (),
    ) -> DecisionFacts:
        sub = Submission(
            42, "ann@example.com", recipients, data, "ann", "192.0.2.1", listener, commands
        )
        if broken:
            prepared = asyncio.run(Broken(settings, None).prepare(sub))  # type: ignore[arg-type]
        else:
            snapshot = snapshot_of(policies, suppressed, consent_modes) if store else None
            prepared = Tracker(settings, None).prepare_sync(sub, snapshot)  # type: ignore[arg-type]
        answers = {r: (replies or {}).get(r, OK) for r in recipients}
        record = to_record(prepared, Delivery(answers, [], next(iter(answers.values()))))
        return facts_of(record)

    return relayed


def facts_of(record: dict[str, Any]) -> DecisionFacts:
    """What the read model makes of the rows relay/record.py stores."""
    message = Message.model_validate(record["message"])
    return decision_facts(message, [Recipient.model_validate(r) for r in record["recipients"]])


def said(facts: DecisionFacts) -> list[str]:
    out = sentences(facts)
    for sentence in out:
        assert not any(word in sentence for word in INTERNAL), sentence
    return out


# --- tracked ---------------------------------------------------------------------


def test_asked_for_by_the_header(relay: Callable[..., DecisionFacts]) -> None:
    assert said(relay(html())) == [
        "Opens and clicks tracked because the message asked for it (X-Track).",
        "One copy per recipient: 2 copies.",
        "1 link tracked, pixel added in the HTML part.",
        "Delivered: 2 of 2 accepted by the server.",
    ]


def test_asked_for_by_a_bcc_command(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(html(b""), commands=("track@trackrelay.invalid",))
    assert said(facts)[0] == (
        "Opens and clicks tracked because the message asked for it (Bcc track@trackrelay.invalid)."
    )


@pytest.mark.parametrize(
    ("listener", "first"),
    [
        ("gateway", "Came in through the gateway, from the organisation's mail server."),
        ("plain", "Came in on the plain port, from a trusted network."),
        ("submission", "Opens and clicks tracked because the message asked for it (X-Track)."),
    ],
)
def test_the_listener_is_said_where_it_is_not_a_submission(
    relay: Callable[..., DecisionFacts], listener: str, first: str
) -> None:
    assert said(relay(html(), listener=listener))[0] == first


def test_an_esp_header(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(html(b"X-PM-TrackOpens: true\r\n"))
    assert said(facts)[:3] == [
        "Opens tracked (not clicks) because the message asked for it (X-PM-TrackOpens).",
        "One copy per recipient: 2 copies.",
        "Pixel added in the HTML part.",
    ]


def test_the_sender_policy_tracks_everything(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(html(b""), policies=[Policy(pattern="@example.com", mode="always")])
    assert said(facts)[0] == (
        "Opens and clicks tracked because the policy for @example.com tracks every message."
    )


def test_a_ceiling_of_the_policy(relay: Callable[..., DecisionFacts]) -> None:
    policy = Policy(pattern="*", mode="always", allow_clicks=False)
    assert said(relay(html(b""), policies=[policy]))[:2] == [
        "Opens tracked (not clicks) because the policy for all senders tracks every message.",
        "The policy for all senders does not allow click tracking.",
    ]


def test_text_links_not_allowed(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(alternative(b"X-Track: all\r\nX-PM-TrackLinks: HtmlAndText\r\n"))
    assert said(facts)[:4] == [
        "Opens and clicks tracked because the message asked for it (X-Track, X-PM-TrackLinks).",
        "The default policy does not allow tracking links in the plain-text part.",
        "One copy per recipient: 2 copies.",
        "1 link tracked, pixel added in the HTML part.",
    ]


def test_links_in_both_parts(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(alternative(), policies=[Policy(pattern="*", allow_text_links=True)])
    assert said(facts)[2] == (
        "2 links tracked (1 in the plain-text part, 1 in the HTML part), "
        "pixel added in the HTML part."
    )


def test_suppressed_and_unconsented_recipients(relay: Callable[..., DecisionFacts]) -> None:
    three = [*TWO, "dan@eu.example"]
    facts = relay(
        html(), three, suppressed=["carol@example.net"], consent_modes={"eu.example": "opt-in"}
    )
    assert said(facts) == [
        "Opens and clicks tracked because the message asked for it (X-Track).",
        "carol@example.net is on the suppression list and got the message untracked.",
        "dan@eu.example has not consented to tracking (consent is required for their address) "
        "and got the message untracked.",
        "One copy per recipient: 1 copy.",
        "1 link tracked, pixel added in the HTML part.",
        "Delivered: 3 of 3 accepted by the server.",
    ]


def test_one_shared_copy_and_a_bcc_copy(relay: Callable[..., DecisionFacts]) -> None:
    policy = Policy(pattern="*", per_recipient=False)
    facts = relay(html(), [*TWO, "dave@example.com"], policies=[policy])
    assert said(facts)[1] == (
        "One copy for everyone, so opens and clicks count for the whole message; "
        "and 1 own copy for Bcc recipients: 2 copies."
    )


def test_too_many_recipients_for_a_copy_each(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(html(), policies=[Policy(pattern="*", recipient_cap=1)])
    assert said(facts)[1] == (
        "One copy for everyone, so opens and clicks count for the whole message "
        "(more than 1 recipient: too many for one copy each): 1 copy."
    )


def test_links_never_tracked(relay: Callable[..., DecisionFacts]) -> None:
    body = HTML_BODY.replace(
        b"</body>",
        b'<a href="https://example.com/unsubscribe?u=1">stop</a>'
        b'<a href="mailto:ann@example.com">mail</a><a href="tel:+441234">call</a></body>',
    )
    assert said(relay(html(body=body)))[2:4] == [
        "1 link tracked, pixel added in the HTML part.",
        "3 links left as written, as always for these: 1 unsubscribe, password or signed link, "
        "1 email address link, 1 phone number link.",
    ]


def test_links_the_relay_could_not_read_with_certainty(
    relay: Callable[..., DecisionFacts],
) -> None:
    # relay/html.py's splicer and the HTML parser disagree (tests/relay/test_html.py)
    body = HTML_BODY.split(b"<html>")[0] + (
        b'<p><a href="https://a.example/ok">ok</a><template><a href="https://a.example/t">'
        b"t</a></template></p></body>\r\n"
    )
    assert said(relay(html(body=body)))[:4] == [
        "Opens tracked (not clicks) because the message asked for it (X-Track).",
        "One copy per recipient: 2 copies.",
        "Pixel added in the HTML part.",
        "The links of the HTML part were left as written: its HTML could not be read with "
        "certainty, and a wrong link would be worse than an untracked one.",
    ]


# --- not tracked -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "policies", "first"),
    [
        (
            b"",
            [],
            "Not tracked: the message did not ask for it, and the default policy tracks only "
            "messages that do.",
        ),
        (
            b"X-Track: all\r\n",
            [Policy(pattern="ann@example.com", mode="never")],
            "Not tracked: the policy for ann@example.com never tracks.",
        ),
        (b"X-Track: none\r\n", [], "Not tracked: the message asked not to be (X-Track)."),
        (
            b"X-Track: maybe\r\n",
            [],
            "Not tracked: the message's X-Track header says “maybe”, which the relay does not "
            "understand.",
        ),
        (
            b"X-Mailgun-Track: yes\r\n",
            [Policy(pattern="*", allow_opens=False, allow_clicks=False)],
            "Not tracked: the message asked for it (X-Mailgun-Track), but the policy does not "
            "allow it.",
        ),
    ],
)
def test_why_not(
    relay: Callable[..., DecisionFacts], trigger: bytes, policies: list[Policy], first: str
) -> None:
    out = said(relay(html(trigger), policies=policies))
    assert out[0] == first
    assert out[-1] == "Delivered: 2 of 2 accepted by the server."
    assert not any("cop" in s for s in out)  # an untracked message is one copy: not news


def test_every_recipient_left_out(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(html(), suppressed=TWO)
    assert said(facts)[0] == "Not tracked: every recipient is on the suppression list."
    facts = relay(html(), suppressed=["bob@example.org"], consent_modes={"*": "opt-in"})
    assert said(facts)[0] == (
        "Not tracked: no recipient may be tracked (on the suppression list, "
        "or no consent where consent is required)."
    )


def test_dkim(relay: Callable[..., DecisionFacts]) -> None:
    covers = b"DKIM-Signature: v=1; d=example.com;\r\n\th=From:To:X-Track; bh=x; b=y\r\n"
    assert said(relay(covers + html()))[0] == (
        "Not tracked, and sent exactly as written: its DKIM signature covers the tracking "
        "header (X-Track), so removing it would break the signature."
    )
    signed = b"DKIM-Signature: v=1; d=example.com; h=From:To; bh=x; b=y\r\n"
    assert said(relay(signed + html()))[0] == (
        "Not tracked: the message is DKIM-signed, and changing its body would break the "
        "signature. Only the tracking header was removed."
    )


def test_no_policy_store_and_fail_open(relay: Callable[..., DecisionFacts]) -> None:
    assert said(relay(html(), store=False))[0] == (
        "Not tracked: the tracking rules could not be read from the database when it was sent."
    )
    assert said(relay(html(), broken=True))[0] == (
        "Not tracked: adding tracking failed, so the message went out as written "
        "(only the tracking header removed)."
    )


def test_no_html_part(relay: Callable[..., DecisionFacts]) -> None:
    text = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nHello.\r\n"
    assert said(relay(html(b"X-Track: opens\r\n", body=text)))[:2] == [
        "Not tracked: there was nothing in the message that could be tracked.",
        "The message has no HTML part to carry the open pixel.",
    ]
    assert said(relay(html(body=text)))[1:3] == [
        "The message has no HTML part to carry the open pixel.",
        "The message has no links to track.",
    ]


def test_a_signed_part_is_left_alone(relay: Callable[..., DecisionFacts]) -> None:
    body = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/signed; boundary="s"; '
        b'protocol="application/pkcs7-signature"\r\n\r\n--s\r\n' + HTML_BODY.split(b"\r\n", 1)[1]
    ) + b"--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--s--\r\n"
    assert said(relay(html(body=body)))[:3] == [
        "Not tracked: there was nothing in the message that could be tracked.",
        "The HTML part was left as written: it is digitally signed.",
        "Delivered: 2 of 2 accepted by the server.",
    ]


# --- delivery --------------------------------------------------------------------


def test_delivery_per_copy(relay: Callable[..., DecisionFacts]) -> None:
    facts = relay(html(), replies={"carol@example.net": UNKNOWN_USER})
    assert said(facts)[-1] == "Partly delivered: 1 of 2 accepted by the server, 1 refused."
    assert [(o.address, o.accepted, o.reply) for o in panel(facts).outcomes] == [
        ("bob@example.org", True, "250 2.0.0 Ok: queued as 4XyZ"),
        ("carol@example.net", False, "550 5.1.1 <carol@example.net>: mailbox unavailable"),
    ]
    refused = {r: UNKNOWN_USER for r in TWO}
    assert said(relay(html(), replies=refused))[-1] == "Not delivered: the server refused all 2."
    one = relay(html(), ["bob@example.org"], replies={"bob@example.org": UNKNOWN_USER})
    assert said(one)[-1] == "Not delivered: the server refused it."


def test_many_recipients_list_the_first_outcomes(relay: Callable[..., DecisionFacts]) -> None:
    many = [f"r{i}@example.org" for i in range(25)]
    facts = relay(html(b"X-Track: all\r\n"), many, policies=[Policy(pattern="*", recipient_cap=50)])
    shown = panel(facts)
    assert len(shown.outcomes) == 20
    assert shown.more == "And 5 more recipients: see the recipients list."
    assert "One copy per recipient: 25 copies." in shown.sentences


# --- the technical record ----------------------------------------------------------


def test_the_technical_record_has_every_field_and_parts_as_a_table(
    relay: Callable[..., DecisionFacts],
) -> None:
    record = technical(relay(html()))
    fields = dict(record.fields)
    assert fields["policy"] == "default"
    assert fields["mode"] == "header"
    assert fields["reasons"] == "header X-Track: opens, clicks"
    assert fields["auth_user"] == "ann"
    assert fields["message_id_header"] == "<m1@example.com>"
    assert fields["upstream_reply"] == "250 2.0.0 Ok: queued as 4XyZ"
    assert (fields["tracked"], fields["copies"], fields["suppressed"]) == ("true", "2", "—")
    [parts] = record.tables
    assert (parts.title, parts.columns) == (
        "parts_modified",
        ["part", "type", "encoding", "charset", "links", "pixel"],
    )
    assert parts.rows == [["1", "text/html", "7bit", "ascii", "1", "true"]]


def test_a_record_the_relay_did_not_write() -> None:
    """An old row (no decision), or text that is not JSON: said from the row, kept raw."""
    old = Message(id=1, track_opens=True, track_clicks=True, per_recipient=True)
    assert sentences(decision_facts(old, [])) == ["Opens and clicks tracked."]
    odd = Message(id=2, decision="tracked, probably", parts_modified="{")
    facts = decision_facts(odd, [])
    assert sentences(facts) == ["Not tracked."]
    assert ("decision", "tracked, probably") in technical(facts).fields
    assert technical(facts).tables == []


# --- the page ----------------------------------------------------------------------


def test_the_page_says_it_in_sentences(
    relay: Callable[..., DecisionFacts], engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    """A record stored by the relay's own writer, read back through the page."""
    settings = make_settings(public_url=BASE)
    sub = Submission(42, "ann@example.com", TWO, html(), "ann", "192.0.2.1")
    prepared = Tracker(settings, None).prepare_sync(sub, snapshot_of([]))  # type: ignore[arg-type]
    answers = {"bob@example.org": OK, "carol@example.net": UNKNOWN_USER}
    RecordStore(engine).write([to_record(prepared, Delivery(answers, [], OK))], replay=False)
    seed(engine)
    with TestClient(create_app(settings, engine)) as client:
        login(client, "ada")
        page = client.get(f"{D}/messages/42").text
    panel_html = page[page.index("Tracking decision") :]
    shown, _, hidden = panel_html.partition("<summary>Technical record</summary>")
    for sentence in (
        "Opens and clicks tracked because the message asked for it (X-Track).",
        "One copy per recipient: 2 copies.",
        "1 link tracked, pixel added in the HTML part.",
        "Partly delivered: 1 of 2 accepted by the server, 1 refused.",
        "250 2.0.0 Ok: queued as 4XyZ",
        "550 5.1.1 &lt;carol@example.net&gt;: mailbox unavailable",
    ):
        assert shown.count(sentence) == 1, sentence
    for word in ("Policy", "Mode", "default", "Sent by", '"part"', "{", "Message-ID"):
        assert word not in shown, word
    assert "<details" in shown
    assert "<td>text/html</td>" in hidden
    assert "<dt>policy</dt><dd>default</dd>" in hidden
    assert '"part"' not in hidden  # parts as a table, not JSON
