"""Every dashboard form page keeps one contract (receiver/dashboard/web.py form_page).

A GET shows the form; a POST that does not pass comes back as the same page,
status 400, with the message by its field and what was typed; one that passes
moves on (303 with a flash, or the page showing what was made); without the
session's CSRF token even a valid form is refused (403) and changes nothing.
The pages' own tests (test_dashboard.py, _integrations, _privacy) go deeper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from shared import apitokens, consent, policies, webhooks
from shared.users import list_users
from tests.support.dashboardkit import D, login, token


@dataclass(frozen=True)
class Case:
    path: str
    bad: dict[str, str]
    says: str  # in the 400 page
    typed: str  # what was typed, shown again
    good: dict[str, str]
    then: str  # a 303's Location, or a text of the 200 page
    count: Callable[[Engine], int]  # what a valid form adds to
    gets: bool = True  # a page of its own (the consent forms live on /privacy)


def _users(engine: Engine) -> int:
    return len(list_users(engine))


CASES = {
    "policy new": Case(
        "/policies/new",
        {"pattern": "not an address", "mode": "always", "recipient_cap": "5"},
        "is not an email address (ann@example.com)",
        'value="not an address"',
        {"pattern": "@new.example", "mode": "always", "recipient_cap": "5"},
        f"{D}/policies",
        lambda e: len(policies.list_policies(e)),
    ),
    "policy edit": Case(
        "/policies/1",
        {"pattern": "*", "mode": "always", "recipient_cap": "0"},
        "from 1 to 1000",
        'value="0"',
        {"pattern": "*", "mode": "never", "recipient_cap": "5"},
        f"{D}/policies",
        lambda e: sum(p.mode == "never" for p in policies.list_policies(e)),
    ),
    "suppression": Case(
        "/suppressions",
        {"address": "nope"},
        "is not an email address",
        'value="nope"',
        {"address": "zoe@example.com"},
        f"{D}/suppressions",
        lambda e: len(policies.list_suppressions(e)),
    ),
    "user new": Case(
        "/users/new",
        {"username": "tina", "role": "boss", "password": "long enough pw"},
        "Choose a role: administrator or sender.",
        'value="tina"',
        {"username": "tina", "role": "sender", "password": "long enough pw"},
        f"{D}/users",
        _users,
    ),
    "user edit": Case(
        "/users/2",
        {"role": "sender", "addresses": "not-an-address", "password": ""},
        "Not an address",
        "not-an-address",
        {"role": "admin", "addresses": "", "password": ""},
        f"{D}/users",
        lambda e: sum(u.role == "admin" for u, _ in list_users(e)) - 1,
    ),
    "webhook": Case(
        "/webhooks",
        {"url": "https://hooks.example/a"},
        "Choose at least one event type to send.",
        'value="https://hooks.example/a"',
        {"url": "https://hooks.example/a", "type:link.clicked": "on"},
        "Endpoint added",
        lambda e: len(webhooks.list_endpoints(e)),
    ),
    "api token": Case(
        "/tokens",
        {"name": "x" * 256, "username": "ada"},
        "Keep the name under 255 characters.",
        'value="' + "x" * 256 + '"',
        {"name": "CRM sync", "username": "sam"},
        "Token created",
        lambda e: len(apitokens.list_tokens(e)),
    ),
    "consent mode": Case(
        "/privacy/mode",
        {"mode": "opt-in", "domain": "not a domain"},
        "is not a domain",
        'value="not a domain"',
        {"mode": "opt-in", "domain": "de.example"},
        f"{D}/privacy",
        lambda e: len(consent.list_modes(e)) - 1,
        gets=False,
    ),
    "consent": Case(
        "/privacy/consents",
        {"address": "@de.example"},
        "Consent is recorded per address, not for a domain",
        'value="@de.example"',
        {"address": "ann@de.example"},
        f"{D}/privacy",
        lambda e: len(consent.list_consents(e)),
        gets=False,
    ),
    "erase": Case(
        "/privacy/erase",
        {"address": "@de.example"},
        "not a whole domain",
        'value="@de.example"',
        {"address": "ann@de.example", "confirm": "yes"},
        "Erased ann@de.example",
        lambda e: 0,  # erasing adds nothing: the page says what it removed
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_form_page(client: TestClient, engine: Engine, case: Case) -> None:
    policies.set_policy(engine, "*", mode="header")
    login(client, "ada")
    if case.gets:
        page = client.get(D + case.path)
        assert page.status_code == 200
        assert "has-error" not in page.text
    t = token(client)
    before = case.count(engine)

    refused = client.post(D + case.path, data=case.good, follow_redirects=False)
    assert refused.status_code == 403
    assert "This form has expired" in refused.text
    assert case.count(engine) == before

    bad = client.post(D + case.path, data={"csrf_token": t, **case.bad}, follow_redirects=False)
    assert bad.status_code == 400
    assert case.says in bad.text.replace("&#39;", "'")
    assert case.typed in bad.text
    assert case.count(engine) == before

    good = client.post(D + case.path, data={"csrf_token": t, **case.good}, follow_redirects=False)
    if case.then.startswith("/"):
        assert good.status_code == 303
        assert good.headers["location"] == case.then
    else:
        assert good.status_code == 200
        assert case.then in good.text
    assert case.count(engine) == before + (case.path != "/privacy/erase")
