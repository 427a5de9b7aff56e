"""The consent and erasure pages (receiver/dashboard/privacy.py)."""

from __future__ import annotations

from sqlalchemy import Engine, func
from sqlmodel import col, select
from starlette.testclient import TestClient

from shared import consent, policies
from shared.db import session_scope
from shared.models import Event, Recipient
from tests.support.dashboardkit import M_OPENED, D, login, token

POSTS = [
    "/privacy/mode",
    "/privacy/mode/clear",
    "/privacy/consents",
    "/privacy/consents/remove",
    "/privacy/erase",
]


def test_senders_get_403(client: TestClient, engine: Engine) -> None:
    consent.add_consent(engine, "ana@eu.example")
    login(client, "sam")
    for path in ("/privacy", "/privacy/erase"):
        assert client.get(D + path).status_code == 403, path
    t = token(client)
    data = {"csrf_token": t, "mode": "opt-in", "domain": "eu.example"}
    data |= {"address": "bob@client.example", "confirm": "yes"}
    for path in POSTS:
        assert client.post(D + path, data=data).status_code == 403, path
    assert f"{D}/privacy" not in client.get(f"{D}/messages").text
    assert consent.list_modes(engine) == {"*": "opt-out"}
    assert [c.address for c in consent.list_consents(engine)] == ["ana@eu.example"]
    assert _recipients(engine, "bob@client.example") == 1


def test_posts_without_csrf_change_nothing(client: TestClient, engine: Engine) -> None:
    consent.add_consent(engine, "ana@eu.example")
    consent.set_mode(engine, "opt-in", "eu.example")
    login(client, "ada")
    data = {"mode": "opt-in", "domain": "eu.example", "address": "ana@eu.example"}
    data |= {"confirm": "yes"}
    for path in POSTS:
        for extra in ({}, {"csrf_token": "forged"}):
            response = client.post(D + path, data=data | extra)
            assert response.status_code == 403, path
    assert consent.list_modes(engine) == {"*": "opt-out", "eu.example": "opt-in"}
    assert [c.address for c in consent.list_consents(engine)] == ["ana@eu.example"]


def test_consent_modes(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    page = client.get(f"{D}/privacy")
    assert page.status_code == 200
    assert "No consents recorded" in page.text
    t = token(client, f"{D}/privacy")
    done = client.post(f"{D}/privacy/mode", data={"csrf_token": t, "mode": "opt-in"})
    assert "Consent mode for every recipient domain without its own: opt-in." in done.text
    bad = client.post(f"{D}/privacy/mode", data={"csrf_token": t, "mode": "maybe"})
    assert bad.status_code == 400
    assert "Mode must be one of opt-out, opt-in" in bad.text
    bad = client.post(
        f"{D}/privacy/mode", data={"csrf_token": t, "mode": "opt-out", "domain": "not a domain"}
    )
    assert bad.status_code == 400
    assert "is not a domain" in bad.text
    assert 'value="not a domain"' in bad.text  # what was typed stays
    ok = client.post(
        f"{D}/privacy/mode", data={"csrf_token": t, "mode": "opt-out", "domain": "@US.example"}
    )
    assert "Consent mode for us.example: opt-out." in ok.text
    assert consent.list_modes(engine) == {"*": "opt-in", "us.example": "opt-out"}
    cleared = client.post(f"{D}/privacy/mode/clear", data={"csrf_token": t, "domain": "us.example"})
    assert "us.example follows the global mode again." in cleared.text
    assert consent.list_modes(engine) == {"*": "opt-in"}


def test_consents_add_list_search_remove(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    t = token(client, f"{D}/privacy")
    url = f"{D}/privacy/consents"
    bad = client.post(url, data={"csrf_token": t, "address": "@eu.example"})
    assert bad.status_code == 400
    assert "Consent is recorded per address" in bad.text
    bad = client.post(url, data={"csrf_token": t, "address": "nobody"})
    assert bad.status_code == 400
    assert "is not an email address" in bad.text
    ok = client.post(url, data={"csrf_token": t, "address": "Ana@EU.example"})
    assert "Consent of ana@eu.example recorded." in ok.text
    again = client.post(url, data={"csrf_token": t, "address": "ana@eu.example"})
    assert again.status_code == 400
    assert "already recorded" in again.text
    markup = client.post(url, data={"csrf_token": t, "address": "<b>@eu.example"})
    assert markup.status_code == 400
    assert "&lt;b&gt;@eu.example" in markup.text
    assert "<b>@eu.example" not in markup.text
    client.post(url, data={"csrf_token": t, "address": "a&b@eu.example"})  # & is allowed
    html = client.get(f"{D}/privacy").text
    assert "ana@eu.example" in html
    assert "a&amp;b@eu.example" in html
    assert "Dashboard" in html
    assert "a&b@eu.example" not in html
    found = client.get(f"{D}/privacy", params={"q": "ANA"}).text
    assert "ana@eu.example" in found
    assert "a&amp;b@eu.example" not in found
    assert (
        "No consent recorded for an address containing"
        in client.get(f"{D}/privacy", params={"q": "zzz"}).text
    )
    gone = client.post(f"{url}/remove", data={"csrf_token": t, "address": "ana@eu.example"})
    assert "Consent of ana@eu.example withdrawn." in gone.text
    twice = client.post(f"{url}/remove", data={"csrf_token": t, "address": "ana@eu.example"})
    assert "No consent was recorded for ana@eu.example." in twice.text
    assert [c.address for c in consent.list_consents(engine)] == ["a&b@eu.example"]


def _recipients(engine: Engine, address: str) -> int:
    with session_scope(engine) as s:
        query = select(func.count()).select_from(Recipient).where(Recipient.address == address)
        return int(s.exec(query).one())


def test_erase_asks_first_then_reports(client: TestClient, engine: Engine) -> None:
    policies.add_suppression(engine, "bob@client.example")
    login(client, "ada")
    t = token(client, f"{D}/privacy/erase")
    url = f"{D}/privacy/erase"
    bad = client.post(url, data={"csrf_token": t, "address": "@client.example"})
    assert bad.status_code == 400
    assert "not a whole domain" in bad.text
    bad = client.post(url, data={"csrf_token": t, "address": "bob"})
    assert bad.status_code == 400
    assert "is not an email address" in bad.text

    ask = client.post(url, data={"csrf_token": t, "address": " Bob@Client.example "})
    assert ask.status_code == 200
    assert "Erase everything about bob@client.example?" in ask.text
    assert "It cannot be undone." in ask.text
    assert 'name="confirm" value="yes"' in ask.text
    assert _recipients(engine, "bob@client.example") == 1  # nothing removed yet

    done = client.post(
        url, data={"csrf_token": t, "address": "bob@client.example", "confirm": "yes"}
    )
    assert done.status_code == 200
    assert "Erased bob@client.example" in done.text
    assert "<span>events</span><strong>4</strong>" in done.text  # o1, o2, c1, c2 of seed()
    assert "<span>recipients</span><strong>1</strong>" in done.text
    assert "kept (it is what keeps this address untracked" in done.text
    assert "--forget-suppression" not in done.text
    assert _recipients(engine, "bob@client.example") == 0
    with session_scope(engine) as s:
        left = s.exec(
            select(func.count())
            .select_from(Event)
            .where(col(Event.message_id) == M_OPENED, col(Event.recipient_position) == 1)
        ).one()
    assert left == 0
    assert [s.address for s in policies.list_suppressions(engine)] == ["bob@client.example"]

    forget = client.post(
        url,
        data={
            "csrf_token": t, "address": "bob@client.example", "confirm": "yes", "forget": "on",
        },
    )  # fmt: skip
    assert "<span>suppressions</span><strong>1</strong>" in forget.text
    assert policies.list_suppressions(engine) == []
