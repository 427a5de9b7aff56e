"""Recipients' choices through the real relay: in opt-in consent mode only
consenting recipients are tracked, and "stop tracking me" on the receiver's
public page stops the relay tracking that address.

A tracked message (tests/data/clients/message.eml, which asks with
``X-Track: open, click``) goes to consenting, non-consenting and opt-out
recipients in one transaction. The recording upstream must receive, for the
recipients who may not be tracked, the submitted bytes minus the X-Track line
and nothing else; for the others, tracked per-recipient copies.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from starlette.testclient import TestClient

from receiver.app import create_app
from shared import consent
from shared.config import Settings
from shared.models import Message, Recipient
from shared.tokens import Signer
from tests.support.injection_checks import check_relayed, without_header
from tests.support.relaykit import MESSAGE, client, relay_one, relay_settings, running_relay
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

PUBLIC_URL = "https://t.example.net"
ANA, BEN, CY = "ana@eu.example", "ben@eu.example", "cy@us.example"


@pytest.mark.parametrize(
    ("domain", "untracked"),
    [("*", [BEN, CY]), ("eu.example", [BEN])],
    ids=["global", "per-domain"],
)
def test_opt_in_tracks_only_consenting_recipients(
    domain: str,
    untracked: list[str],
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
) -> None:
    consent.set_mode(engine, "opt-in", domain)
    consent.add_consent(engine, ANA)
    settings = relay_settings(make_settings, upstream, public_url=PUBLIC_URL)
    data = MESSAGE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    relay_one(settings, engine, data, recipients=(ANA, BEN, CY))
    copies = {tuple(m.rcpt_tos): m.data for m in upstream.messages}
    tracked = [r for r in (ANA, BEN, CY) if r not in untracked]
    assert sorted(copies) == sorted([(r,) for r in tracked] + [tuple(untracked)])
    assert copies[tuple(untracked)] == without_header(data, "X-Track")
    signer = Signer(settings.signing_keys())
    positions = {ANA: 1, BEN: 2, CY: 3}
    for rcpt in tracked:
        relayed = check_relayed(data, copies[(rcpt,)], PUBLIC_URL, signer)
        assert relayed.recipients == {positions[rcpt]}
        assert relayed.report.pixels == 1
        assert relayed.clicks

    with Session(engine) as session:
        [message] = session.exec(select(Message)).all()
        rows = session.exec(select(Recipient).order_by(Recipient.position)).all()
    assert [(r.address, r.tracked) for r in rows] == [(r, r in tracked) for r in (ANA, BEN, CY)]
    decision = json.loads(message.decision)
    assert (decision["tracked"], decision["no_consent"]) == (True, untracked)


@pytest.mark.parametrize(
    ("stored", "mailed"),
    [("bücher.example", "xn--bcher-kva.example"), ("xn--bcher-kva.example", "bücher.example")],
    ids=["unicode-stored", "ascii-stored"],
)
def test_opt_in_for_an_idn_domain_holds_in_either_spelling(
    stored: str,
    mailed: str,
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
) -> None:
    """An opt-in and a consent recorded for ``bücher.example`` hold for mail to
    ``xn--bcher-kva.example``, and the other way round."""
    consent.set_mode(engine, "opt-in", stored)
    consent.add_consent(engine, f"Ana@{stored}")
    ana, ben = f"ana@{mailed}", f"ben@{mailed}"
    settings = relay_settings(make_settings, upstream, public_url=PUBLIC_URL)
    data = MESSAGE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    async def scenario() -> None:
        async with running_relay(settings, engine) as relay, client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain(USER, PASSWORD)
            options = [] if mailed.isascii() else ["SMTPUTF8"]
            await smtp.sendmail(USER, [ana, ben, CY], data, mail_options=options)

    asyncio.run(scenario())
    copies = {tuple(m.rcpt_tos): m.data for m in upstream.messages}
    assert sorted(copies) == sorted([(ana,), (ben,), (CY,)])  # CY: opt-out, tracked
    assert copies[(ben,)] == without_header(data, "X-Track")
    relayed = check_relayed(data, copies[(ana,)], PUBLIC_URL, Signer(settings.signing_keys()))
    assert relayed.recipients == {1}
    assert relayed.report.pixels == 1


def test_opt_in_without_any_consent_sends_the_message_untracked(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    consent.set_mode(engine, "opt-in")
    settings = relay_settings(make_settings, upstream, public_url=PUBLIC_URL)
    data = MESSAGE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    relay_one(settings, engine, data, recipients=(ANA, CY))
    [got] = upstream.messages
    assert (got.rcpt_tos, got.data) == ([ANA, CY], without_header(data, "X-Track"))
    with Session(engine) as session:
        [message] = session.exec(select(Message)).all()
    assert "no consent" in json.loads(message.decision)["why"]


def test_stop_tracking_me_on_the_public_page_reaches_the_relay(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    settings = relay_settings(make_settings, upstream, public_url=PUBLIC_URL)
    # the public URL is https: the CSRF cookie is Secure, so the browser speaks https
    with TestClient(create_app(settings, engine), base_url="https://testserver") as browser:
        page = browser.get("/").text
        confirm = browser.post(
            "/stop-tracking", data={"csrf": _hidden(page, "csrf"), "address": "Ben@EU.example"}
        ).text
        done = browser.post(
            "/stop-tracking/confirm",
            data={"csrf": _hidden(confirm, "csrf"), "confirm": _hidden(confirm, "confirm")},
        )
        assert done.status_code == 200
    data = MESSAGE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    relay_one(settings, engine, data, recipients=(ANA, BEN))
    copies = {tuple(m.rcpt_tos): m.data for m in upstream.messages}
    assert copies[(BEN,)] == without_header(data, "X-Track")
    relayed = check_relayed(data, copies[(ANA,)], PUBLIC_URL, Signer(settings.signing_keys()))
    assert relayed.recipients == {1}


def _hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name}"
    return match[1]
