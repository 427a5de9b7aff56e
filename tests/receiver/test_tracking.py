"""/o and /c in detail (Starlette TestClient), and what they record (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, insert
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from receiver.app import create_app
from receiver.sessions import SelfMark
from receiver.tracking import PIXEL, TrackingApp
from shared.config import Settings
from shared.models import Message
from shared.tokens import Signer
from tests.support.receiverkit import count_events, event_rows, wait_for

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
MESSAGE_ID = 4_611_686_018_427_387_911


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(event_flush_interval=0.02, metrics_token=METRICS_TOKEN)


METRICS_TOKEN = "metrics-token-for-tests"


@pytest.fixture
def signer(settings: Settings) -> Signer:
    return Signer(settings.signing_keys())


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine), client=("198.51.100.77", 50000)) as c:
        yield c


def test_pixel_is_always_the_same_gif(client: TestClient, signer: Signer) -> None:
    valid = signer.open_token(MESSAGE_ID, 2)
    for path in [f"/o/{valid}", f"/o/{valid}.gif", f"/o/{valid}/p.png", "/o/garbage", "/o/x.gif"]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.content == PIXEL
        assert len(PIXEL) == 43
        assert response.headers["content-type"] == "image/gif"
        assert response.headers["cache-control"] == "no-store, private"
        assert "set-cookie" not in response.headers
    assert PIXEL.startswith(b"GIF89a")


def test_pixel_records_one_open_per_valid_hit(
    client: TestClient, signer: Signer, engine: Engine
) -> None:
    client.get(f"/o/{signer.open_token(MESSAGE_ID, 2)}.gif", headers={"user-agent": CHROME})
    client.get("/o/forged.gif")
    client.get(f"/o/{signer.click_token(MESSAGE_ID, 2, 1, 'https://example.com/')}")
    wait_for(lambda: count_events(engine) == 1)
    [row] = event_rows(engine)
    assert row["kind"] == "open"
    assert row["message_id"] == MESSAGE_ID
    assert row["recipient_position"] == 2
    assert row["link_position"] == 0
    assert row["ip"] == "198.51.100.0/24"  # truncated by default
    assert row["user_agent"] == CHROME
    assert row["method"] == "GET"
    assert row["verdict"] == "human"
    assert row["reasons"] == "browser or mail client"
    assert len(row["event_key"]) == 32


def test_click_redirects_302_to_the_signed_url(
    client: TestClient, signer: Signer, engine: Engine
) -> None:
    url = "https://shop.example/basket?item=3&region=eu&copy=1"
    response = client.get(f"/c/{signer.click_token(MESSAGE_ID, 1, 4, url)}", follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == url
    assert response.headers["cache-control"] == "no-store"
    wait_for(lambda: count_events(engine) == 1)
    [row] = event_rows(engine)
    assert (row["kind"], row["recipient_position"], row["link_position"]) == ("click", 1, 4)


def _flip(token: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_bad_click_tokens_get_a_404_page_never_a_redirect(
    client: TestClient, signer: Signer, settings: Settings, engine: Engine
) -> None:
    good = signer.click_token(MESSAGE_ID, 1, 1, "https://example.com/a")
    other_key = Signer([b"another deployment's key"]).click_token(
        MESSAGE_ID, 1, 1, "https://example.com/a"
    )
    bad = {
        "forged url byte": _flip(good, 20),
        "forged mac": _flip(good, -1),
        "truncated": good[:-6],
        "open token as click": signer.open_token(MESSAGE_ID, 1),
        "unknown key": other_key,
        "garbage": "not-a-token",
        "empty-ish": "x",
    }
    for what, token in bad.items():
        for method in ("GET", "HEAD"):
            response = client.request(method, f"/c/{token}", follow_redirects=False)
            assert response.status_code == 404, what
            assert "location" not in response.headers, what
            if method == "GET":
                assert "This link is not valid" in response.text
                assert response.headers["content-type"].startswith("text/html")
    assert count_events(engine) == 0


@pytest.mark.parametrize(
    "url", ["javascript:alert(1)", "data:text/html,hi", "ftp://example.com/", "//example.com/x"]
)
def test_only_http_and_https_targets(client: TestClient, signer: Signer, url: str) -> None:
    response = client.get(f"/c/{signer.click_token(MESSAGE_ID, 0, 1, url)}", follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers


def test_head_answers_but_is_flagged(client: TestClient, signer: Signer, engine: Engine) -> None:
    head = client.head(f"/o/{signer.open_token(MESSAGE_ID, 0)}", headers={"user-agent": CHROME})
    assert head.status_code == 200
    assert head.headers["content-length"] == "43"
    click = client.head(
        f"/c/{signer.click_token(MESSAGE_ID, 0, 1, 'https://example.com/')}",
        headers={"user-agent": CHROME},
        follow_redirects=False,
    )
    assert click.status_code == 302
    assert click.headers["location"] == "https://example.com/"
    wait_for(lambda: count_events(engine) == 2)
    assert {(r["method"], r["verdict"]) for r in event_rows(engine)} == {("HEAD", "scanner")}


def test_full_ip_only_when_configured(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    settings = make_settings(store_full_ip=True, event_flush_interval=0.02)
    signer = Signer(settings.signing_keys())
    app = create_app(settings, engine)
    with TestClient(app, client=("2001:db8:4:5::9", 1)) as client:
        client.get(f"/o/{signer.open_token(MESSAGE_ID, 0)}")
    with TestClient(create_app(make_settings(), engine), client=("2001:db8:4:5::9", 1)) as client:
        client.get(f"/o/{signer.open_token(MESSAGE_ID, 0)}")
    assert sorted(r["ip"] for r in event_rows(engine)) == ["2001:db8:4:5::9", "2001:db8:4::/48"]


def _add_message(engine: Engine, client_ip: str, age: timedelta) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(Message.__table__),  # type: ignore[attr-defined]
            {
                "id": MESSAGE_ID,
                "created_at": datetime.now(UTC) - age,
                "sender": "alice@example.org",
                "client_ip": client_ip,
            },
        )


def test_the_sender_ip_is_self(client: TestClient, signer: Signer, engine: Engine) -> None:
    _add_message(engine, "198.51.100.77", timedelta(hours=1))
    client.get(f"/o/{signer.open_token(MESSAGE_ID, 1)}", headers={"user-agent": CHROME})
    wait_for(lambda: count_events(engine) == 1)
    [row] = event_rows(engine)
    assert row["verdict"] == "self"
    assert row["reasons"].startswith("the IP that submitted the message")


def test_a_click_seconds_after_sending_is_a_scanner(
    client: TestClient, signer: Signer, engine: Engine
) -> None:
    _add_message(engine, "192.0.2.1", timedelta(seconds=1))
    token = signer.click_token(MESSAGE_ID, 1, 1, "https://example.com/")
    client.get(f"/c/{token}", headers={"user-agent": CHROME}, follow_redirects=False)
    wait_for(lambda: count_events(engine) == 1)
    [row] = event_rows(engine)
    assert row["verdict"] == "scanner"
    assert "clicked seconds after sending" in row["reasons"]


def test_a_dashboard_user_s_mark_makes_the_hit_self(
    settings: Settings, signer: Signer, engine: Engine
) -> None:
    """The mark sign-in sets (receiver/sessions.py SelfMark); tests/receiver/test_http.py
    signs in over HTTP. An expired or foreign mark is not the user's."""
    mark = SelfMark(settings.secret_key.get_secret_value())
    other = SelfMark("another deployment's secret")
    app = create_app(settings, engine)
    with TestClient(app) as client:
        for recipient, value in ((1, mark), (2, other)):
            cookie = value.cookies(https=False)[0].split(";")[0]
            headers = {"user-agent": CHROME, "cookie": f"a=b; {cookie}; c=d"}
            client.get(f"/o/{signer.open_token(MESSAGE_ID, recipient)}", headers=headers)
        wait_for(lambda: count_events(engine) == 2)
    verdicts = [row["verdict"] for row in event_rows(engine)]
    assert sorted(verdicts) == ["human", "self"]
    assert mark.carried(mark.cookies(https=True)[1].split(";")[0].encode())


def test_on_written_listeners_get_the_committed_rows(
    settings: Settings, signer: Signer, engine: Engine
) -> None:
    seen: list[dict[str, object]] = []

    async def listener(rows: list[dict[str, object]]) -> None:
        seen.extend(rows)

    app = create_app(settings, engine)
    app.state.on_written(listener)
    with TestClient(app) as client:
        client.get(f"/o/{signer.open_token(MESSAGE_ID, 3)}", headers={"user-agent": CHROME})
        wait_for(lambda: seen)
    [row] = seen
    assert row["message_id"] == MESSAGE_ID
    assert row["recipient_position"] == 3
    assert row["verdict"] == "human"
    assert len(str(row["event_key"])) == 32


def test_healthz_and_metrics(client: TestClient, signer: Signer, engine: Engine) -> None:
    client.get(f"/o/{signer.open_token(MESSAGE_ID, 0)}", headers={"user-agent": "curl/8.5.0"})
    client.get("/o/bad")
    wait_for(lambda: count_events(engine) == 1)
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "database": "ok",
        "event_writer": "ok",
        "queue_depth": 0,
        "journal_files": 0,
        "journal_bytes": 0,
    }
    assert client.get("/metrics").status_code == 403  # not loopback, no token
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert 'trackrelay_hits_total{kind="open",token="valid"} 1' in text
    assert 'trackrelay_hits_total{kind="open",token="invalid"} 1' in text
    assert 'trackrelay_events_recorded_total{kind="open",verdict="scanner"} 1' in text
    assert "trackrelay_event_queue_depth 0" in text
    assert "trackrelay_journal_bytes 0" in text
    assert 'trackrelay_event_write_seconds_bucket{le="+Inf"} 1' in text
    assert "trackrelay_events_dropped_total 0" in text


class _ThroughStarlette:
    """The same app, but every request through Starlette's middleware and router."""

    def __init__(self, app: TrackingApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Starlette.__call__(self.app, scope, receive, send)


def test_the_fast_path_answers_as_the_routes_do(
    settings: Settings, signer: Signer, engine: Engine
) -> None:
    app = create_app(settings, engine)
    assert isinstance(app, TrackingApp)
    open_token = signer.open_token(MESSAGE_ID, 2)
    click_token = signer.click_token(MESSAGE_ID, 2, 1, "https://example.com/a?b=1&c=2")
    requests = [
        (method, path)
        for method in ("GET", "HEAD", "POST", "OPTIONS")
        for path in (
            f"/o/{open_token}",
            f"/o/{open_token}.gif",
            "/o/",
            "/o",
            "/o/bad/x.png",
            f"/c/{click_token}",
            f"/c/{click_token}/",
            "/c/forged",
            "/c/",
            "/oo/x",
        )
    ]
    answers = []
    with TestClient(app) as fast:
        slow = TestClient(_ThroughStarlette(app))
        for method, path in requests:
            pair = []
            for client in (fast, slow):
                response = client.request(method, path, follow_redirects=False)
                headers = sorted((k, v) for k, v in response.headers.items() if k != "date")
                pair.append((response.status_code, headers, response.content))
            assert pair[0] == pair[1], (method, path)
            answers.append(pair[0][0])
        wait_for(lambda: count_events(engine) == 16)  # 2 of each valid token x GET/HEAD x 2 apps
    assert sorted(set(answers)) == [200, 302, 307, 404, 405]  # 307: "/o" -> "/o/"
