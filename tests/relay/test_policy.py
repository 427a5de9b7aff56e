"""Trigger headers and the precedence of header, policy and ceilings."""

from __future__ import annotations

import pytest

from relay.headers import top_fields
from relay.policy import Request, command_of, decide, parse_triggers, with_commands
from shared.models import Policy


def request(*headers: str, own: str = "X-Track") -> Request:
    data = "".join(f"{h}\r\n" for h in headers).encode() + b"\r\nbody"
    return parse_triggers(top_fields(data)[0], own)


def asked(r: Request) -> tuple[bool | None, bool | None, bool | None]:
    return r.opens, r.html_links, r.text_links


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("X-Track: opens", (True, False, False)),
        ("X-Track: open", (True, False, False)),
        ("X-Track: Clicks", (False, True, None)),
        ("x-track:  OPENS , click ", (True, True, None)),
        ("X-Track: all", (True, True, None)),
        ("X-Track: on", (True, True, None)),
        ("X-Track: yes", (True, True, None)),
        ("X-Track: none", (False, False, False)),
        ("X-Track: off", (False, False, False)),
        ("X-Track: No", (False, False, False)),
        ("X-Mailgun-Track: yes", (True, True, None)),
        ("X-Mailgun-Track: no", (False, False, False)),
        ("X-Mailgun-Track-Opens: yes", (True, None, None)),
        ("X-Mailgun-Track-Clicks: htmlonly", (None, True, False)),
        ("X-Mailgun-Track-Clicks: no", (None, False, False)),
        ("X-PM-TrackOpens: true", (True, None, None)),
        ("X-PM-TrackOpens: false", (False, None, None)),
        ("X-PM-TrackLinks: None", (None, False, False)),
        ("X-PM-TrackLinks: HtmlAndText", (None, True, True)),
        ("X-PM-TrackLinks: HtmlOnly", (None, True, False)),
        ("X-PM-TrackLinks: TextOnly", (None, False, True)),
    ],
)
def test_header_values(header: str, expected: tuple[bool | None, ...]) -> None:
    r = request(header)
    assert not r.invalid
    assert asked(r) == expected


@pytest.mark.parametrize(
    "header",
    ["X-Track: maybe", "X-Track:", "X-Track: none, opens", "X-PM-TrackOpens: sometimes"],
)
def test_unknown_values_are_invalid(header: str) -> None:
    assert "is not understood" in request(header).invalid


@pytest.mark.parametrize(
    "header",
    [
        "X-Track: opens,\r\n\tclicks",
        "X-Track: opens,\r\n clicks",
        "X-Track:\topens\t,\tclicks",
        "X-Track: opens\r\n\t\t, click",
    ],
)
def test_folded_with_tabs_or_spaces(header: str) -> None:
    """RFC 5322 2.2.3: unfolding removes the CRLF and keeps the WSP, tab or space."""
    r = request(header)
    assert not r.invalid
    assert asked(r) == (True, True, None)


def test_dialect_headers_folded_with_a_tab() -> None:
    assert asked(request("X-PM-TrackLinks:\r\n\tHtmlOnly")) == (None, True, False)


def test_configured_header_name() -> None:
    assert asked(request("X-Spy: opens", own="X-Spy")) == (True, False, False)
    assert asked(request("X-Track: opens", own="X-Spy")) == (None, None, None)


def test_off_wins_when_headers_disagree() -> None:
    r = request("X-Track: all", "X-PM-TrackOpens: false")
    assert asked(r) == (False, True, None)


def policy(**values: object) -> Policy:
    return Policy(pattern="*", **values)


def test_precedence() -> None:
    # header mode: header switches on; nothing asked -> off
    d = decide(request("X-Track: all"), policy())
    assert (d.opens, d.html_links, d.text_links) == (True, True, False)
    assert not decide(request(), policy()).anything
    # never beats the header
    assert not decide(request("X-Track: all"), policy(mode="never")).anything
    # always: on without a header, header may switch off
    d = decide(request(), policy(mode="always", allow_text_links=True))
    assert (d.opens, d.html_links, d.text_links) == (True, True, True)
    d = decide(request("X-Track: opens"), policy(mode="always"))
    assert (d.opens, d.clicks) == (True, False)
    # ceilings beat the header, with a reason
    d = decide(request("X-Track: all"), policy(allow_opens=False))
    assert (d.opens, d.html_links) == (False, True)
    assert "policy *: opens not allowed" in d.reasons
    # text links need the policy's permission
    d = decide(request("X-PM-TrackLinks: HtmlAndText"), policy())
    assert (d.html_links, d.text_links) == (True, False)
    d = decide(request("X-PM-TrackLinks: TextOnly"), policy(allow_text_links=True))
    assert (d.html_links, d.text_links) == (False, True)
    # invalid header -> untracked even in always mode
    d = decide(request("X-Track: perhaps"), policy(mode="always"))
    assert not d.anything
    assert d.reasons[0].startswith("untracked: X-Track")


# --- Bcc commands ---

DOMAIN = "trackrelay.invalid"


def test_command_of_knows_only_the_command_domain() -> None:
    assert command_of("Track@TrackRelay.Invalid", DOMAIN) == "track"
    assert command_of("track@trackrelay.invalid.", DOMAIN) == "track"
    assert command_of("whatever@trackrelay.invalid", DOMAIN) == "whatever"  # the caller refuses
    assert command_of("track@example.com", DOMAIN) is None
    assert command_of("no-domain", DOMAIN) is None


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["track@t"], (True, True, None)),
        (["opens@t"], (True, False, False)),
        (["clicks@t"], (False, True, None)),
        (["opens@t", "clicks@t"], (True, True, None)),
        (["notrack@t"], (False, False, False)),
    ],
)
def test_bcc_commands_ask_like_the_tracking_header(
    commands: list[str], expected: tuple[bool | None, ...]
) -> None:
    r = with_commands(Request(), commands)
    assert asked(r) == expected
    assert r.commands == tuple(commands)


def test_contradicting_commands_leave_the_message_untracked() -> None:
    r = with_commands(Request(), ["track@t", "notrack@t"])
    assert r.invalid == "Bcc commands track@t, notrack@t contradict each other"
    decision = decide(r, Policy(pattern="*", mode="always"))
    assert not decision.anything


def test_a_command_and_a_header_combine_off_wins_and_the_reasons_name_both() -> None:
    r = with_commands(request("X-Track: opens"), ["track@trackrelay.invalid"])
    assert asked(r) == (True, False, False)
    decision = decide(r, Policy(pattern="*", mode="header"))
    assert decision.opens
    assert not decision.clicks
    assert decision.reasons == ("header X-Track: opens", "Bcc command track@trackrelay.invalid")


def test_ceilings_win_over_a_command() -> None:
    r = with_commands(Request(), ["track@t"])
    decision = decide(r, Policy(pattern="*", mode="header", allow_clicks=False))
    assert decision.opens
    assert not decision.clicks
    assert "policy *: clicks not allowed" in decision.reasons
    assert not decide(r, Policy(pattern="*", mode="never")).anything
