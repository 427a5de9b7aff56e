"""The JSON API: tokens and scopes, filters, cursors, admin resources, OpenAPI."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import jsonschema
import pytest
import uvicorn
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.routing import Route

from receiver import api
from receiver.openapi import document
from shared import apitokens
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Message
from shared.users import add_user
from tests.support.seedrows import T0, add_message, event, write_events


@pytest.fixture
def client(engine: Engine) -> Iterator[httpx.Client]:
    """The API mounted as receiver/app.py will, served by uvicorn on 127.0.0.1:0."""
    app = Starlette(routes=[api.mount])
    app.state.engine = engine
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        yield client
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def tokens(engine: Engine) -> dict[str, str]:
    add_user(engine, "root", "password123", "admin")
    add_user(engine, "alice", "password123", "sender", ["alice@example.com"])
    add_user(engine, "team", "password123", "sender", ["@team.example"])
    return {
        name: apitokens.create_token(engine, name, f"{name} script")[0]
        for name in ("root", "alice", "team")
    }


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def validate(body: Any, schema: str) -> None:
    doc = document()
    root = {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]}
    jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(body)


def test_tokens_are_required_hashed_and_revocable(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    reply = client.get("/api/v1/messages")
    assert reply.status_code == 401
    assert "error" in reply.json()
    assert reply.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/v1/messages", headers=auth("trk_forged")).status_code == 401
    assert client.get("/api/v1/messages", headers=auth(tokens["root"])).status_code == 200
    listed = {name: row for row, name in apitokens.list_tokens(engine)}
    assert tokens["root"] not in repr(listed)  # only the hash and a prefix are kept
    assert listed["root"].prefix == tokens["root"][:12]
    assert listed["root"].last_used_at is not None
    caller = apitokens.authenticate_token(engine, tokens["alice"])
    assert isinstance(caller, Viewer)  # the dashboard's identity: one scope for both
    assert (caller.username, caller.addresses, caller.is_admin) == (
        "alice",
        ("alice@example.com",),
        False,
    )
    apitokens.revoke_token(engine, listed["root"].prefix)
    reply = client.get("/api/v1/messages", headers=auth(tokens["root"]))
    assert reply.status_code == 401
    assert reply.json() == {"error": "unknown or revoked API token"}


def test_senders_see_only_their_own_mail(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    mine = add_message(engine, sender="alice@example.com")
    team = add_message(engine, sender="bob@team.example")
    other = add_message(engine, sender="mallory@elsewhere.example")
    write_events(engine, [event(mine), event(team), event(other)])

    def ids(token: str) -> set[str]:
        reply = client.get("/api/v1/messages", headers=auth(token))
        assert reply.status_code == 200
        validate(reply.json(), "MessageList")
        return {m["id"] for m in reply.json()["messages"]}

    assert ids(tokens["root"]) == {str(mine.id), str(team.id), str(other.id)}
    assert ids(tokens["alice"]) == {str(mine.id)}
    assert ids(tokens["team"]) == {str(team.id)}
    assert (
        client.get(f"/api/v1/messages/{other.id}", headers=auth(tokens["alice"])).status_code == 404
    )
    events = client.get("/api/v1/events", headers=auth(tokens["alice"])).json()["events"]
    assert {e["message_id"] for e in events} == {str(mine.id)}
    for path in ("/api/v1/policies", "/api/v1/suppressions", "/api/v1/consents"):
        reply = client.get(path, headers=auth(tokens["alice"]))
        assert reply.status_code == 403
        assert reply.json() == {"error": "this needs an admin token"}


def test_message_filters_and_paging(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    opened = add_message(engine, subject="Invoice 42", created_at=T0)
    clicked = add_message(engine, subject="Report", created_at=T0 + timedelta(days=1))
    quiet = add_message(
        engine, subject="Hello", recipients=("zed@zoo.test",), created_at=T0 + timedelta(days=2)
    )
    untracked = add_message(
        engine, subject="Plain", tracked=False, created_at=T0 + timedelta(days=3)
    )
    write_events(
        engine,
        [
            event(opened),
            event(clicked, kind="click", link=1),
            event(quiet, verdict="machine"),  # a machine open is not an open
        ],
    )

    def ids(**params: str) -> list[str]:
        reply = client.get("/api/v1/messages", params=params, headers=auth(tokens["root"]))
        assert reply.status_code == 200, reply.text
        return [m["id"] for m in reply.json()["messages"]]

    assert ids() == [str(m.id) for m in (untracked, quiet, clicked, opened)]
    assert ids(tracked="false") == [str(untracked.id)]
    assert ids(opened="true") == [str(opened.id)]
    assert ids(clicked="true") == [str(clicked.id)]
    assert set(ids(opened="false", tracked="true")) == {str(clicked.id), str(quiet.id)}
    assert ids(q="invoice") == [str(opened.id)]
    assert ids(q="ZOO.test") == [str(quiet.id)]
    assert ids(since="2026-03-02", until="2026-03-03") == [str(quiet.id), str(clicked.id)]
    assert ids(sender="nobody@example.com") == []
    page = client.get("/api/v1/messages?limit=2&offset=1", headers=auth(tokens["root"])).json()
    assert page["total"] == 4
    assert [m["id"] for m in page["messages"]] == [
        str(quiet.id),
        str(clicked.id),
    ]
    bad = client.get("/api/v1/messages?opened=maybe", headers=auth(tokens["root"]))
    assert bad.status_code == 400
    assert "opened" in bad.json()["error"]
    bad = client.get("/api/v1/messages?since=yesterday", headers=auth(tokens["root"]))
    assert bad.status_code == 400
    assert client.get("/api/v1/messages?limit=0", headers=auth(tokens["root"])).status_code == 400


def test_not_opened_means_tracked_for_opens_and_no_counted_open(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    """As on the dashboard: mail not tracked for opens is not "not opened" (nor
    mail not tracked for clicks "not clicked")."""
    quiet = add_message(engine, subject="Quiet")
    machine_only = add_message(engine, subject="Machine only")
    opened = add_message(engine, subject="Opened")
    untracked = add_message(engine, subject="Untracked", tracked=False)
    clicks_only = add_message(engine, subject="Clicks only")
    with session_scope(engine) as session:
        row = session.get(Message, clicks_only.id)
        assert row is not None
        row.track_opens = False
    write_events(engine, [event(machine_only, verdict="machine"), event(opened)])

    def ids(**params: str) -> set[str]:
        reply = client.get("/api/v1/messages", params=params, headers=auth(tokens["root"]))
        assert reply.status_code == 200, reply.text
        return {m["id"] for m in reply.json()["messages"]}

    assert ids(opened="false") == {str(quiet.id), str(machine_only.id)}
    assert ids(opened="false", tracked="true") == {str(quiet.id), str(machine_only.id)}
    not_clicked = {str(m.id) for m in (quiet, machine_only, opened, clicks_only)}
    assert ids(clicked="false") == not_clicked
    assert str(untracked.id) not in ids(opened="false") | ids(clicked="false")


def test_search_matches_like_wildcards_literally(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    percent = add_message(engine, subject="50% off")
    add_message(engine, subject="500 off")
    underscore = add_message(engine, subject="Plan a_b")
    add_message(engine, subject="Plan a1b")
    in_address = add_message(engine, subject="x", recipients=("first_last@client.test",))
    add_message(engine, subject="y", recipients=("firstxlast@client.test",))

    def ids(q: str) -> set[str]:
        reply = client.get("/api/v1/messages", params={"q": q}, headers=auth(tokens["root"]))
        assert reply.status_code == 200, reply.text
        return {m["id"] for m in reply.json()["messages"]}

    assert ids("50%") == {str(percent.id)}
    assert ids("A_B") == {str(underscore.id)}
    assert ids("first_last") == {str(in_address.id)}
    assert ids("%") == {str(percent.id)}
    assert ids("\\") == set()


def test_one_message_and_the_event_cursor(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    message = add_message(engine)
    write_events(
        engine,
        [
            event(message, recipient=2),
            event(message, kind="click", recipient=2, link=1),
            event(message, kind="click", verdict="scanner", link=1),
        ],
    )
    reply = client.get(f"/api/v1/messages/{message.id}", headers=auth(tokens["root"]))
    assert reply.status_code == 200
    detail = reply.json()
    validate(detail, "MessageDetail")
    assert detail["listener"] == "submission"
    assert [r["address"] for r in detail["recipients"]] == ["bob@client.test", "carol@other.test"]
    assert detail["recipients"][1]["first_opened_at"] is not None
    assert detail["recipients"][0]["first_opened_at"] is None
    assert detail["links"] == [{"position": 1, "url": "https://example.com/report", "clicks": 1}]
    assert (detail["opens"], detail["clicks"]) == (1, 1)  # the scanner's click does not count
    assert len(detail["events"]) == 3
    assert client.get("/api/v1/messages/12345", headers=auth(tokens["root"])).status_code == 404

    first = client.get("/api/v1/events?limit=2", headers=auth(tokens["root"])).json()
    validate(first, "EventList")
    assert len(first["events"]) == 2
    rest = client.get(
        f"/api/v1/events?after={first['next_after']}", headers=auth(tokens["root"])
    ).json()
    assert [e["kind"] for e in rest["events"]] == ["click"]
    assert rest["events"][0]["verdict"] == "scanner"
    done = client.get(f"/api/v1/events?after={rest['next_after']}", headers=auth(tokens["root"]))
    assert done.json() == {"events": [], "next_after": rest["next_after"]}


def test_admin_manages_policies_suppression_and_consent(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    h = auth(tokens["root"])
    reply = client.put(
        "/api/v1/policies",
        json={"pattern": "@Example.com", "mode": "always", "notify": True},
        headers=h,
    )
    assert reply.status_code == 200, reply.text
    validate(reply.json(), "Policy")
    assert reply.json()["pattern"] == "@example.com"
    assert reply.json()["notify"]
    again = client.put(
        "/api/v1/policies", json={"pattern": "@example.com", "mode": "never"}, headers=h
    )
    assert again.json()["id"] == reply.json()["id"]
    assert again.json()["mode"] == "never"
    listed = client.get("/api/v1/policies", headers=h).json()
    validate(listed, "PolicyList")
    assert [p["mode"] for p in listed["policies"]] == ["never"]
    assert (
        client.put(
            "/api/v1/policies", json={"pattern": "*", "mode": "sometimes"}, headers=h
        ).status_code
        == 400
    )
    assert (
        client.put(
            "/api/v1/policies", json={"pattern": "*", "colour": "red"}, headers=h
        ).status_code
        == 400
    )
    assert client.put("/api/v1/policies", content=b"[1]", headers=h).status_code == 400
    assert client.delete(f"/api/v1/policies/{reply.json()['id']}", headers=h).status_code == 204
    assert client.delete(f"/api/v1/policies/{reply.json()['id']}", headers=h).status_code == 404

    added = client.post("/api/v1/suppressions", json={"address": "Bob@Client.test"}, headers=h)
    assert added.status_code == 201
    validate(added.json(), "Suppression")
    validate(client.get("/api/v1/suppressions", headers=h).json(), "SuppressionList")
    assert (
        client.post("/api/v1/suppressions", json={"address": "@x.test"}, headers=h).status_code
        == 400
    )
    assert client.delete("/api/v1/suppressions/bob@client.test", headers=h).status_code == 204
    assert client.delete("/api/v1/suppressions/bob@client.test", headers=h).status_code == 404

    added = client.post(
        "/api/v1/consents", json={"address": "ana@eu.example", "source": "form"}, headers=h
    )
    assert added.status_code == 201
    validate(added.json(), "Consent")
    mode = client.put(
        "/api/v1/consent-modes", json={"domain": "eu.example", "mode": "opt-in"}, headers=h
    )
    assert mode.json() == {"domain": "eu.example", "mode": "opt-in"}
    assert client.put("/api/v1/consent-modes", json={"mode": "maybe"}, headers=h).status_code == 400
    listed = client.get("/api/v1/consents", headers=h).json()
    validate(listed, "ConsentList")
    assert {"domain": "eu.example", "mode": "opt-in"} in listed["modes"]
    assert client.delete("/api/v1/consents/ana@eu.example", headers=h).status_code == 204
    assert client.delete("/api/v1/consents/ana@eu.example", headers=h).status_code == 404


def test_unknown_paths_and_methods_answer_json(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    reply = client.get("/api/v1/nothing", headers=auth(tokens["root"]))
    assert reply.status_code == 404
    assert reply.json() == {"error": "no such API path"}
    reply = client.post("/api/v1/messages", headers=auth(tokens["root"]))
    assert reply.status_code == 405
    assert reply.json() == {"error": "method not allowed"}


def _documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item}


def _routed_operations() -> set[tuple[str, str]]:
    found = set()
    for route in api.routes:
        assert isinstance(route, Route)
        path = route.path.replace(":int", "")
        found |= {(path, m) for m in route.methods or () if m != "HEAD"}
    return found


def test_openapi_document_matches_the_routes(client: httpx.Client) -> None:
    reply = client.get("/api/v1/openapi.json")
    assert reply.status_code == 200
    doc = reply.json()
    assert doc["openapi"].startswith("3.1")
    assert _documented_operations(doc) == _routed_operations()
    jsonschema.Draft202012Validator.check_schema({"components": doc["components"]})
    for item in doc["paths"].values():
        for operation in item.values():
            for response in operation["responses"].values():
                for media in response.get("content", {}).values():
                    ref = media["schema"]["$ref"].rsplit("/", 1)[1]
                    assert ref in doc["components"]["schemas"]


def test_errors_validate_against_the_error_schema(client: httpx.Client) -> None:
    validate(client.get("/api/v1/events").json(), "Error")


@pytest.mark.parametrize(
    ("path", "status", "said"),
    [
        ("/api/v1/messages/9223372036854775808", 404, "no message 9223372036854775808"),
        ("/api/v1/messages/99999999999999999999999", 404, "no message"),
        ("/api/v1/messages?q=%00", 400, "q must not contain control characters"),
        ("/api/v1/messages?sender=%00", 400, "sender must not contain control characters"),
        ("/api/v1/messages?q=a%0Db", 400, "q must not contain control characters"),
    ],
)
def test_bad_input_is_a_4xx_with_a_plain_message(
    client: httpx.Client, tokens: dict[str, str], path: str, status: int, said: str
) -> None:
    """Each was a 500 with a traceback (bigint out of range; NUL in a PostgreSQL query)."""
    reply = client.get(path, headers=auth(tokens["root"]))
    assert reply.status_code == status
    assert said in reply.json()["error"]


def test_a_policy_id_out_of_range_is_a_404(client: httpx.Client, tokens: dict[str, str]) -> None:
    reply = client.delete("/api/v1/policies/2147483648", headers=auth(tokens["root"]))
    assert reply.status_code == 404
    assert reply.json() == {"error": "no policy 2147483648"}


def test_answers_in_the_events_feed_and_per_recipient(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    """Replies, auto-replies, bounces and complaints as the intake writer stores them."""
    from relay.answerstore import AnswerStore, item
    from shared.answers import Finding

    message = add_message(engine)
    ids = (message.message_id_header,)
    bounce = Finding("bounce", "dsn-failed-permanent", ids, "carol@other.test", "hard", "5.1.1",
                     "550 5.1.1 no such user")  # fmt: skip
    AnswerStore(engine).write(
        [
            item("c1", T0, [Finding("reply", "in-reply-to", ids, "bob@client.test")]),
            item("c2", T0, [bounce]),
            item("c3", T0, [Finding("auto_reply", "out-of-office-subject", ids, "x@y.test")]),
        ],
        replay=False,
    )
    feed = client.get("/api/v1/events", headers=auth(tokens["root"])).json()
    validate(feed, "EventList")
    assert [(e["kind"], e["recipient_position"]) for e in feed["events"]] == [
        ("reply", 1),
        ("bounce", 2),
        ("auto_reply", 0),  # from someone else: no recipient, no address
    ]
    bounced = feed["events"][1]
    assert (bounced["bounce_type"], bounced["status"]) == ("hard", "5.1.1")
    assert bounced["diagnostic"] == "550 5.1.1 no such user"
    assert "bounce_type" not in feed["events"][0]
    detail = client.get(f"/api/v1/messages/{message.id}", headers=auth(tokens["root"])).json()
    validate(detail, "MessageDetail")
    bob, carol = detail["recipients"]
    assert bob["replied_at"] is not None
    assert bob["bounced_at"] is None
    assert (carol["bounced_at"] is not None, carol["bounce_type"]) == (True, "hard")
    assert carol["replied_at"] is None
    assert (detail["opens"], detail["clicks"]) == (0, 0)  # an answer is no open or click


def test_replied_bounced_and_follow_up_filter_the_messages(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    """The dashboard's Replied, Not replied, Bounced and follow-up filters, as parameters."""
    from relay.answerstore import AnswerStore, item
    from shared.answers import Finding

    replied = add_message(engine, subject="replied", created_at=T0)
    auto = add_message(engine, subject="out of office", created_at=T0)
    bounced = add_message(engine, subject="bounced", created_at=T0)
    write_events(engine, [event(auto), event(replied)])  # T0 is long ago: past any N days
    AnswerStore(engine).write(
        [
            item("r", T0, [Finding("reply", "in-reply-to", (replied.message_id_header,),
                                   "bob@client.test")]),
            item("o", T0, [Finding("auto_reply", "x-autoreply", (auto.message_id_header,),
                                   "bob@client.test")]),
            item("b", T0, [Finding("bounce", "dsn-failed-transient", (bounced.message_id_header,),
                                   "carol@other.test", "soft", "4.2.2", "mailbox full")]),
        ],
        replay=False,
    )  # fmt: skip

    def ids(**params: str) -> set[str]:
        reply = client.get("/api/v1/messages", params=params, headers=auth(tokens["root"]))
        assert reply.status_code == 200, reply.text
        validate(reply.json(), "MessageList")
        return {m["id"] for m in reply.json()["messages"]}

    assert ids(replied="true") == {str(replied.id)}
    assert ids(replied="false") == {str(auto.id), str(bounced.id)}  # an auto-reply is no reply
    assert ids(bounced="true") == {str(bounced.id)}
    assert ids(bounced="false") == {str(replied.id), str(auto.id)}
    assert ids(follow_up_days="3") == {str(auto.id)}  # opened, no reply, over 3 days old
    body = client.get("/api/v1/messages?bounced=true", headers=auth(tokens["root"])).json()
    [message] = body["messages"]
    assert (message["bounces"], message["bounce_type"], message["replies"]) == (1, "soft", 0)
    [answered] = client.get("/api/v1/messages?replied=true", headers=auth(tokens["root"])).json()[
        "messages"
    ]
    assert answered["replies"] == 1
    assert answered["first_replied_at"] is not None
    for path, said in (
        ("replied=maybe", "replied must be true or false"),
        ("bounced=2", "bounced must be true or false"),
        ("follow_up_days=0", "follow_up_days must be between 1 and 90"),
        ("follow_up_days=91", "follow_up_days must be between 1 and 90"),
        ("follow_up_days=soon", "follow_up_days must be an integer"),
    ):
        reply = client.get(f"/api/v1/messages?{path}", headers=auth(tokens["root"]))
        assert reply.status_code == 400, path
        assert reply.json() == {"error": said}


def test_messages_page_by_cursor_and_a_message_pages_its_events(
    client: httpx.Client, engine: Engine, tokens: dict[str, str]
) -> None:
    sent = [
        add_message(engine, subject=f"n{i}", created_at=T0 + timedelta(minutes=i)) for i in range(5)
    ]
    write_events(
        engine, [event(sent[0], at=T0 + timedelta(hours=1, seconds=s)) for s in range(130)]
    )
    seen: list[str] = []
    params = {"limit": "2"}
    while True:
        body = client.get("/api/v1/messages", params=params, headers=auth(tokens["root"])).json()
        validate(body, "MessageList")
        seen += [m["id"] for m in body["messages"]]
        if body["next_cursor"] is None:
            break
        params = {"limit": "2", "cursor": body["next_cursor"]}
    assert seen == [str(m.id) for m in reversed(sent)]
    assert body["total"] == 5
    assert body["total_capped"] is False
    both = client.get(
        "/api/v1/messages",
        params={"cursor": body["next_cursor"] or "o:x", "offset": "1"},
        headers=auth(tokens["root"]),
    )
    assert both.status_code == 400
    url = f"/api/v1/messages/{sent[0].id}"
    first = client.get(url, headers=auth(tokens["root"])).json()
    validate(first, "MessageDetail")
    assert (len(first["events"]), first["event_count"]) == (100, 130)
    assert first["recipients"][0]["first_opened_at"] is not None
    rest = client.get(
        url, params={"events_before": first["events_next"]}, headers=auth(tokens["root"])
    ).json()
    assert len(rest["events"]) == 30
    assert rest["events_next"] is None
    assert not {e["id"] for e in rest["events"]} & {e["id"] for e in first["events"]}
    bad = client.get(url, params={"events_before": "nonsense"}, headers=auth(tokens["root"]))
    assert bad.status_code == 400
    assert "events_before" in bad.json()["error"]
