"""The messages list's answers: the reply icon, the bounced and complaint badges, the
Replied / Not replied / Bounced / follow-up filters and the CSV columns (the rest of
the list: test_routes.py)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from starlette.testclient import TestClient

from tests.support.dashboardkit import (
    M_CORP,
    M_OPENED,
    M_UNTRACKED,
    M_XSS,
    D,
    add_answers,
    auto_reply_only,
    login,
)
from tests.support.seedrows import add_message, event, write_events


def _row(html: str, message_id: int) -> str:
    row = html[html.index(f'data-message-id="{message_id}"') :]
    return row[: row.index("</tr>")]


def _ids(client: TestClient, **params: str) -> set[int]:
    html = client.get(f"{D}/messages", params=params).text
    return {int(m) for m in _found(html)}


def _found(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('data-message-id="')[1:]]


def test_the_list_shows_a_reply_a_bounce_and_a_complaint(
    client: TestClient, engine: Engine
) -> None:
    add_answers(engine)
    auto_reply_only(engine, M_CORP, "<corp@corp.example>", "erin@partner.example")
    login(client, "ada")
    html = client.get(f"{D}/messages").text
    answered = _row(html, M_OPENED)
    assert "hit-reply is-hit" in answered
    assert 'aria-label="Replied"' in answered
    assert "First <time datetime=" in answered[answered.index("hit-reply") :]
    assert 'data-badge="bounced"' in answered
    assert "Bounced · hard" in answered
    assert 'title="1 of 2 recipients bounced (hard)"' in answered
    assert 'data-badge="complaint"' in answered
    # An out-of-office is no reply: the arrow stays grey and says why.
    ooo = _row(html, M_CORP)
    assert "hit-reply is-none" in ooo
    assert "Automatic reply only (1 recipient), not counted as a reply" in ooo
    quiet = _row(html, M_XSS)
    assert "hit-reply is-none" in quiet
    assert "No reply yet" in quiet
    assert 'data-badge="bounced"' not in quiet


def test_replied_not_replied_bounced_and_follow_up_filters(
    client: TestClient, engine: Engine
) -> None:
    add_answers(engine)
    auto_reply_only(engine, M_CORP, "<corp@corp.example>", "erin@partner.example")
    old = add_message(
        engine, sender="sam@example.com", created_at=datetime.now(UTC) - timedelta(days=10)
    )
    write_events(engine, [event(old, "open")])
    login(client, "ada")
    assert _ids(client, state="replied") == {M_OPENED}
    assert _ids(client, state="not_replied") == {M_XSS, M_CORP, M_UNTRACKED, old.id}
    assert _ids(client, state="bounced") == {M_OPENED}
    # Opened, no reply, sent more than N days ago (default 3): the follow-up list.
    page = client.get(f"{D}/messages", params={"state": "follow_up"}).text
    assert {int(m) for m in _found(page)} == {old.id}
    assert 'name="days" min="1" max="90" value="3"' in page
    assert _ids(client, state="follow_up", days="30") == set()
    assert _ids(client, state="follow_up", days="1") == {old.id}
    bad = client.get(f"{D}/messages", params={"state": "follow_up", "days": "365"})
    assert bad.status_code == 200
    assert "Days “365” is not a whole number from 1 to 90; showing 3." in bad.text
    # The pager and the exports keep the days.
    assert "days=1" in client.get(f"{D}/messages", params={"state": "follow_up", "days": "1"}).text


def test_the_csv_exports_carry_replies_bounces_and_the_bounce_report(
    client: TestClient, engine: Engine
) -> None:
    add_answers(engine)
    login(client, "ada")
    text = client.get(f"{D}/messages.csv", params={"state": "bounced"}).text
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["message_id"] == str(M_OPENED)
    assert (row["replied"], row["auto_replied"], row["bounced"]) == ("1", "1", "1")
    assert (row["bounce_type"], row["complained"]) == ("hard", "1")
    assert row["first_reply"]
    events = list(csv.DictReader(io.StringIO(client.get(f"{D}/events.csv").text)))
    [bounce] = [e for e in events if e["kind"] == "bounce"]
    assert (bounce["bounce_type"], bounce["status"]) == ("hard", "5.1.1")
    assert bounce["diagnostic"] == "Sorry, no mailbox here by that name."
    assert bounce["recipient"] == "carol@client.example"
    assert {e["kind"] for e in events} >= {"reply", "auto_reply", "complaint", "open"}
