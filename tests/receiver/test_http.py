"""The receiver over real HTTP (uvicorn, ephemeral port); redirects checked against Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.redirect import browser_url
from receiver.sessions import SELF_COOKIE
from shared.config import Settings
from shared.tokens import Signer
from shared.users import add_user
from tests.support.dashboardkit import csrf_from
from tests.support.receiverkit import (
    ServerThread,
    count_events,
    event_rows,
    start_receiver,
    wait_for,
)

CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
#: Links as written in messages (after HTML5 attribute decoding by the injector).
LINKS = [
    "https://straße.de/x",
    "https://bücher.example/ä?q=ü",
    "https://shop.example/?a=1&region=eu&copy=2&reg=3",
    "https://Example.COM:443/a b/../c/./d?x=1 'q'#frag ment",
    "http://example.com:8080/p{}^`|\\q?a=\"<>'^`{}|#x",
    "https://user:pä ss@example.com/",
    "https://EXAMPLE.com./%7Efoo/%2e%2E/bar",
    "https://x.example/path?q=%zz&x=%41",
    "https://ΕΛΛΑΣ.example/Ω",
    "https://faß.de/",
    "https://xn--bcher-kva.example/",
    " https://example.com/\tline\nbreak ",
    "https://例え.テスト/パス?キー=値",
    "HTTPS://example.com",
    "https://192.168.0.1:443/",
    "https://[2001:DB8::1]:8443/x",
]


@pytest.fixture
def server(make_settings: Callable[..., Settings], engine: Engine) -> Iterator[ServerThread]:
    settings = make_settings(event_flush_interval=0.02)
    with ServerThread(create_app(settings, engine)) as running:
        running.signer = Signer(settings.signing_keys())  # type: ignore[attr-defined]
        yield running


@pytest.fixture(scope="module")
def chromium_links(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return chromium_hrefs(LINKS, tmp_path_factory.mktemp("chromium"))


def chromium_hrefs(urls: list[str], tmp_path: Path) -> list[str]:
    """``new URL(u).href`` for each URL, computed by headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    page = tmp_path / "urls.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><pre id=o></pre><script>"
        f"const urls = {json.dumps(urls)};"
        "document.getElementById('o').textContent = urls.map(u => {"
        "  const h = new URL(u).href;"
        "  return Array.from(new TextEncoder().encode(h))"
        "    .map(b => b.toString(16).padStart(2, '0')).join('');"
        "}).join(' ');</script>",
        encoding="utf-8",
    )
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    hexes = out.split('<pre id="o">', 1)[1].split("</pre>", 1)[0].split()
    return [bytes.fromhex(h).decode("utf-8") for h in hexes]


def test_redirects_go_exactly_where_chromium_would(
    server: ServerThread, chromium_links: list[str]
) -> None:
    expected = chromium_links
    signer: Signer = server.signer  # type: ignore[attr-defined]
    with httpx.Client(base_url=server.url) as client:
        for position, (link, href) in enumerate(zip(LINKS, expected, strict=True), 1):
            response = client.get(f"/c/{signer.click_token(7, 1, position, link)}")
            assert response.status_code == 302, link
            assert response.headers["location"] == href, link
            assert browser_url(href) == href  # stable: following it again changes nothing


def test_idna_is_uts46_not_the_stdlib_codec() -> None:
    assert "straße.de".encode("idna") == b"strasse.de"  # the trap
    assert browser_url("https://straße.de/x") == "https://xn--strae-oqa.de/x"
    assert browser_url("https://bücher.example/ä?q=ü") == (
        "https://xn--bcher-kva.example/%C3%A4?q=%C3%BC"
    )
    assert browser_url("https://shop.example/?a=1&region=eu") == (
        "https://shop.example/?a=1&region=eu"
    )


def test_a_browser_following_the_redirect_lands_there(server: ServerThread, engine: Engine) -> None:
    """A real client follows the 302 to a second local server and arrives with the query intact."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def echo(request: Request) -> PlainTextResponse:
        raw = request.scope["raw_path"] + b"?" + request.scope["query_string"]
        return PlainTextResponse(raw.decode("ascii"))

    target = Starlette(routes=[Route("/{path:path}", echo)])
    signer: Signer = server.signer  # type: ignore[attr-defined]
    with ServerThread(target) as landing:
        link = f"{landing.url}/ä/x?region=eu&copy=1&q=ü"
        with httpx.Client(follow_redirects=True, headers={"user-agent": CHROME}) as client:
            response = client.get(f"{server.url}/c/{signer.click_token(9, 2, 3, link)}")
    assert response.status_code == 200
    assert response.text == "/%C3%A4/x?region=eu&copy=1&q=%C3%BC"
    assert [r.status_code for r in response.history] == [302]
    wait_for(lambda: count_events(engine) == 1)
    [row] = event_rows(engine)
    assert (row["kind"], row["message_id"], row["recipient_position"], row["link_position"]) == (
        "click",
        9,
        2,
        3,
    )
    assert row["ip"] == "127.0.0.0/24"
    assert row["user_agent"] == CHROME


def test_pixels_over_http(server: ServerThread, engine: Engine) -> None:
    signer: Signer = server.signer  # type: ignore[attr-defined]
    with httpx.Client(base_url=server.url) as client:
        for recipient in range(1, 21):
            response = client.get(f"/o/{signer.open_token(11, recipient)}.gif")
            assert response.status_code == 200
            assert len(response.content) == 43
        assert client.get("/o/nonsense.gif").status_code == 200
        assert client.get("/c/nonsense").status_code == 404
    wait_for(lambda: count_events(engine) == 20)
    rows = event_rows(engine)
    assert sorted(r["recipient_position"] for r in rows) == list(range(1, 21))
    assert {r["verdict"] for r in rows} == {"scanner"}  # httpx's user agent is a tool


def test_several_workers_share_the_port_and_record_every_hit(
    make_settings: Callable[..., Settings], database_url: str, engine: Engine, tmp_path: Path
) -> None:
    settings = make_settings(database_url=database_url)
    env = {
        "TRACKRELAY_VAR_DIR": str(tmp_path / "var"),
        "TRACKRELAY_DATABASE_URL": database_url,
        "TRACKRELAY_SECRET_KEY": settings.secret_key.get_secret_value(),
        "TRACKRELAY_HTTP_PORT": "0",
        "TRACKRELAY_RECEIVER_WORKERS": "2",
    }
    proc, url = start_receiver(env, tmp_path / "receiver.log")
    signer = Signer(settings.signing_keys())
    try:
        # The socket is bound before the workers start: the first request queues
        # until a worker has imported the app, which on a loaded machine takes more
        # than httpx's default 5 s.
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=30).status_code == 200)
        with httpx.Client(base_url=url) as client:
            for i in range(100):
                assert client.get(f"/o/{signer.open_token(21, i)}").status_code == 200
        wait_for(lambda: count_events(engine) == 100)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert len({r["event_key"] for r in event_rows(engine)}) == 100


def test_dashboard_pages_carry_the_security_headers(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url) as client:
        for path in ("/dashboard/login", "/dashboard/static/dashboard.js"):
            headers = client.get(path).headers
            csp = headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "style-src 'self'" in csp
            assert "unsafe-inline" not in csp
            assert "frame-ancestors 'none'" in csp
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["x-content-type-options"] == "nosniff"


def test_no_template_has_inline_script_or_style() -> None:
    """What the dashboard's CSP would block: script without src, on*= handlers, style=."""
    templates = Path(__file__).resolve().parents[2] / "receiver" / "templates" / "dashboard"
    for template in templates.rglob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(
            r"\son(?:click|change|submit|load|error|input|focus|blur|key\w*|mouse\w*)\s*=", text
        ), template.name
        assert not re.search(r"\sstyle\s*=", text), template.name
        assert "<style" not in text, template.name


def test_metrics_are_local_or_with_the_token(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    """Over real HTTP from loopback: allowed. From elsewhere: the token, or the setting."""
    with (
        ServerThread(create_app(make_settings(), engine)) as running,
        httpx.Client(base_url=running.url) as client,
    ):
        assert client.get("/metrics").status_code == 200
    remote = ("198.51.100.9", 40000)
    closed = create_app(make_settings(metrics_token="s3cret-token"), engine)
    with TestClient(closed, client=remote) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 403
        assert "TRACKRELAY_METRICS_TOKEN" in refused.text
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
        good = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert good.status_code == 200
    with TestClient(create_app(make_settings(metrics_public=True), engine), client=remote) as c:
        assert c.get("/metrics").status_code == 200


def test_a_signed_in_dashboard_user_s_own_hits_are_self(
    server: ServerThread, engine: Engine
) -> None:
    """Sign-in sets a signed cookie for /o and /c only (receiver/sessions.py SelfMark)."""
    signer: Signer = server.signer  # type: ignore[attr-defined]
    add_user(engine, "ada", "a long enough password", "admin")
    browser = {"User-Agent": CHROME}
    with (
        httpx.Client(base_url=server.url, headers=browser) as own,
        httpx.Client(base_url=server.url, headers=browser) as stranger,
    ):
        form = csrf_from(own.get("/dashboard/login").text)
        signed_in = own.post(
            "/dashboard/login",
            data={"username": "ada", "password": "a long enough password", "csrf_token": form},
        )
        assert signed_in.status_code == 303
        marks = [c for c in own.cookies.jar if c.name == SELF_COOKIE]
        assert sorted(c.path for c in marks) == ["/c", "/o"]
        assert own.get(f"/o/{signer.open_token(31, 1)}").status_code == 200
        click = signer.click_token(31, 1, 1, "https://example.com/")
        assert own.get(f"/c/{click}").status_code == 302
        assert stranger.get(f"/o/{signer.open_token(31, 2)}").status_code == 200
        forged = {"Cookie": f"{SELF_COOKIE}=1.AAAAAA.forged"}
        assert stranger.get(f"/o/{signer.open_token(31, 3)}", headers=forged).status_code == 200
        form = csrf_from(own.get("/dashboard/messages").text)
        assert own.post("/dashboard/logout", data={"csrf_token": form}).status_code == 303
        assert not [c for c in own.cookies.jar if c.name == SELF_COOKIE]
    wait_for(lambda: count_events(engine) == 4)
    verdicts = {(r["kind"], r["recipient_position"]): r["verdict"] for r in event_rows(engine)}
    assert verdicts == {
        ("open", 1): "self",
        ("click", 1): "self",
        ("open", 2): "human",
        ("open", 3): "human",
    }
