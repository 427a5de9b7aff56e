"""The Mailbox page: connect through the in-suite OAuth server's consent page, on
SQLite and PostgreSQL.

The browser's part is played with real HTTP: the dashboard's redirect is
followed to the test server's consent page (tests/support/oauth_server.py),
its form posted, and the server's redirect brought back to the receiver's
callback, as a browser would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.dashboard import mailbox as mailbox_page
from shared import mailbox
from shared.config import Settings
from shared.mailbox import MailboxBroken
from shared.models import MailboxConnection, OutboxItem
from tests.support.dashboardkit import D, csrf_from, login, seed
from tests.support.oauth_server import OAuthServer, provider_settings
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

PUBLIC = "https://t.example.test"
CALLBACK = f"{PUBLIC}/dashboard/mailbox/callback"
SAM = "sam@example.com"


def _settings(
    make_settings: Callable[..., Settings], server: OAuthServer, **values: Any
) -> Settings:
    oauth = {
        **provider_settings(server),
        "microsoft": {"client_id": "ms-app", "tenant": "contoso.example"},
        "google": {"client_id": "g-app", "client_secret": "g-secret"},
    }
    return make_settings(oauth=oauth, public_url=PUBLIC, **values)


@pytest.fixture
def app_client(
    engine: Engine, make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> Iterator[TestClient]:
    seed(engine)
    with TestClient(create_app(_settings(make_settings, oauth_server), engine)) as client:
        yield client


def start(client: TestClient, address: str = SAM, provider: str = "test") -> httpx.Response:
    """Press Connect: the POST that sends the browser to the provider."""
    token = csrf_from(client.get(f"{D}/mailbox").text)
    return client.post(
        f"{D}/mailbox",
        data={"csrf_token": token, "address": address, "provider": provider},
        follow_redirects=False,
    )


def consent(location: str, server: OAuthServer, decision: str = "allow") -> str:
    """The person at the provider's consent page: Allow (or Deny); where it sends them."""
    page = httpx.get(location)
    assert page.status_code == 200
    assert "Allow access to your mailbox?" in page.text
    form = {**dict(parse_qsl(urlsplit(location).query)), "decision": decision, "username": SAM}
    answer = httpx.post(f"{server.url}/authorize", data=form, follow_redirects=False)
    assert answer.status_code == 302
    back = answer.headers["location"]
    assert back.startswith(CALLBACK + "?")
    return back


def land(client: TestClient, back: str) -> str:
    """The provider's redirect arrives at the receiver; the page it leads to."""
    parts = urlsplit(back)
    answer = client.get(f"{parts.path}?{parts.query}", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{D}/mailbox"
    page = client.get(f"{D}/mailbox")
    assert page.status_code == 200
    return page.text


def connect(client: TestClient, server: OAuthServer) -> str:
    started = start(client)
    assert started.status_code == 303, started.text
    return land(client, consent(started.headers["location"], server))


def rows(engine: Engine) -> list[MailboxConnection]:
    with Session(engine) as session:
        return list(session.exec(select(MailboxConnection)).all())


def sam_connected(client: TestClient, engine: Engine, server: OAuthServer) -> MailboxConnection:
    """Sam signed in and connected to provider test: the one connection there is."""
    login(client, "sam")
    connect(client, server)
    [row] = rows(engine)
    return row


def test_the_page_offers_each_configured_provider(
    app_client: TestClient, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    page = app_client.get(f"{D}/mailbox")
    assert page.status_code == 200
    buttons = ("Connect Microsoft 365", "Connect Google", "Connect test")
    positions = [page.text.index(b) for b in buttons]
    assert positions == sorted(positions)
    assert f'href="{D}/mailbox" aria-current="page">Mailbox<' in page.text
    assert "No mailbox connected" in page.text
    assert CALLBACK in page.text  # what the operator registers, said on the page
    # Connect's redirect goes to the providers: the page's CSP lets the form go there
    csp = page.headers["content-security-policy"]
    [form_action] = [d.split()[1:] for d in csp.split("; ") if d.startswith("form-action ")]
    assert sorted(form_action) == sorted(
        [
            "'self'",
            "https://accounts.google.com",
            "https://login.microsoftonline.com",
            oauth_server.url,
        ]
    )
    # and on other pages the nav links it
    assert f'href="{D}/mailbox">Mailbox<' in app_client.get(f"{D}/messages").text


def test_connect_is_the_code_flow_with_pkce_and_lands_ok(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    started = start(app_client)
    assert started.status_code == 303
    query = dict(parse_qsl(urlsplit(started.headers["location"]).query))
    assert started.headers["location"].startswith(f"{oauth_server.url}/authorize?")
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43
    assert query["redirect_uri"] == CALLBACK
    assert query["state"]
    page = land(app_client, consent(started.headers["location"], oauth_server))
    assert f"Connected {SAM} to test" in page
    assert 'data-state="ok"' in page
    assert oauth_server.token_requests == ["authorization_code"]
    [row] = rows(engine)
    assert (row.address, row.provider, row.state, row.sent) == (SAM, "test", "ok", "clean")
    assert row.last_refresh_at is not None
    # the grant works: the relay's token is the one the server issued, live
    route = mailbox.route(engine, app_client.app.state.settings, "sam", SAM)  # type: ignore[attr-defined]
    assert route is not None
    access = mailbox.access_token(engine, app_client.app.state.settings, route.id)  # type: ignore[attr-defined]
    assert oauth_server.is_live(access.token)


def test_the_presets_send_the_person_to_microsoft_and_google(app_client: TestClient) -> None:
    login(app_client, "sam")
    microsoft = start(app_client, provider="microsoft").headers["location"]
    assert microsoft.startswith(
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/authorize?"
    )
    assert "code_challenge_method=S256" in microsoft
    google = start(app_client, provider="google").headers["location"]
    assert google.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    assert "access_type=offline" in google


def test_declined_consent_is_said_on_the_page(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    back = consent(start(app_client).headers["location"], oauth_server, decision="deny")
    page = land(app_client, back)
    assert "Not connected: access was declined at test." in page
    assert rows(engine) == []


def test_a_foreign_state_is_refused_and_the_state_is_single_use(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    back = consent(start(app_client).headers["location"], oauth_server)
    query = dict(parse_qsl(urlsplit(back).query))
    forged = f"{CALLBACK}?code={query['code']}&state=not-the-one"
    assert "does not belong to the sign-in started here" in land(app_client, forged)
    # the sign-in under way was used up by that attempt: the real answer is refused too
    assert "did not start on this page" in land(app_client, back)
    assert rows(engine) == []
    assert oauth_server.token_requests == []  # no code was ever traded


def test_a_callback_without_a_sign_in_under_way(app_client: TestClient) -> None:
    login(app_client, "sam")
    assert "did not start on this page" in land(app_client, f"{CALLBACK}?code=x&state=y")


def test_a_stale_sign_in_is_refused(
    app_client: TestClient,
    engine: Engine,
    oauth_server: OAuthServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    login(app_client, "sam")
    monkeypatch.setattr(mailbox_page, "PENDING_TTL", -1.0)
    back = consent(start(app_client).headers["location"], oauth_server)
    assert "took too long" in land(app_client, back)
    assert rows(engine) == []


def test_a_token_error_is_said_on_the_page(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    back = consent(start(app_client).headers["location"], oauth_server)
    state = dict(parse_qsl(urlsplit(back).query))["state"]
    page = land(app_client, f"{CALLBACK}?code=not-a-code&state={state}")
    assert "Not connected: test refused (invalid_grant: unknown, used or expired code)." in page
    assert rows(engine) == []


def test_a_provider_gone_quiet_is_said_on_the_page(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    back = consent(start(app_client).headers["location"], oauth_server)
    oauth_server.stop()  # the token endpoint no longer answers
    page = land(app_client, back)
    assert "test could not be reached to finish the sign-in. Try again." in page
    assert rows(engine) == []


def test_only_an_address_the_person_sends_as(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    refused = start(app_client, address="boss@example.com")
    assert refused.status_code == 400
    assert "may not send as boss@example.com" in refused.text
    assert start(app_client, provider="nope").status_code == 400
    app_client.post(f"{D}/logout", data={"csrf_token": csrf_from(refused.text)})
    login(app_client, "dom")  # sends as @corp.example: types the address
    started = start(app_client, address="Dom@Corp.Example")
    assert started.status_code == 303
    land(app_client, consent(started.headers["location"], oauth_server))
    assert [r.address for r in rows(engine)] == ["dom@corp.example"]


def test_every_post_needs_the_csrf_token(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    for path, data in (
        (f"{D}/mailbox", {"address": SAM, "provider": "test"}),
        (f"{D}/mailbox/{row.id}/disconnect", {}),
        (f"{D}/mailbox/{row.id}/sent", {"sent": "leave"}),
        (f"{D}/mailbox/password", {"address": SAM, "provider": "google", "password": "x"}),
    ):
        assert app_client.post(path, data=data, follow_redirects=False).status_code == 403
    assert [(r.state, r.sent) for r in rows(engine)] == [("ok", "clean")]


def test_disconnect_revokes_at_the_provider(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    settings = app_client.app.state.settings  # type: ignore[attr-defined]
    token = mailbox.access_token(engine, settings, row.id or 0).token
    page = app_client.get(f"{D}/mailbox")
    answer = app_client.post(
        f"{D}/mailbox/{row.id}/disconnect",
        data={"csrf_token": csrf_from(page.text)},
        follow_redirects=True,
    )
    assert f"{SAM}: revoked at the provider and forgotten." in answer.text
    assert rows(engine) == []
    assert not oauth_server.is_live(token)


def test_a_connection_is_its_owners_and_the_admins(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    app_client.cookies.clear()
    login(app_client, "dom")
    page = app_client.get(f"{D}/mailbox")
    assert SAM not in page.text
    token = csrf_from(page.text)
    for path in (f"{D}/mailbox/{row.id}/disconnect", f"{D}/mailbox/{row.id}/sent"):
        assert app_client.post(path, data={"csrf_token": token, "sent": "leave"}).status_code == 404
    app_client.cookies.clear()
    login(app_client, "ada")
    page = app_client.get(f"{D}/mailbox")
    assert "Everyone&#39;s connections" in page.text or "Everyone's connections" in page.text
    assert f'data-connection="{SAM}"' in page.text
    answer = app_client.post(
        f"{D}/mailbox/{row.id}/disconnect", data={"csrf_token": csrf_from(page.text)}
    )
    assert "revoked at the provider and forgotten" in answer.text
    assert rows(engine) == []


def test_the_sent_folder_mode(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    token = csrf_from(app_client.get(f"{D}/mailbox").text)
    answer = app_client.post(
        f"{D}/mailbox/{row.id}/sent", data={"csrf_token": token, "sent": "leave"}
    )
    assert "the Sent folder is left as the provider fills it" in answer.text
    assert 'value="leave" selected' in answer.text
    answer = app_client.post(f"{D}/mailbox/{row.id}/sent", data={"csrf_token": token, "sent": "x"})
    assert "Choose clean or leave for the Sent folder." in answer.text
    assert [r.sent for r in rows(engine)] == ["leave"]


def test_a_broken_connection_is_a_banner_on_every_page(
    engine: Engine, make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    seed(engine)
    settings = _settings(make_settings, oauth_server, notify_from="relay@example.com")
    with TestClient(create_app(settings, engine)) as client:
        login(client, "sam")
        connect(client, oauth_server)
        assert "stopped working" not in client.get(f"{D}/messages").text
        [row] = rows(engine)
        # the person revokes the app at the provider; the relay's next refresh finds out
        oauth_server.revoke_user(SAM)
        mailbox.token_refused(engine, row.id or 0)
        with pytest.raises(MailboxBroken):
            mailbox.access_token(engine, settings, row.id or 0)
        for path in ("/messages", "/overview", "/mailbox"):
            text = client.get(f"{D}{path}").text
            assert (
                f"Your mailbox connection for {SAM} stopped working: reconnect it on the "
                f'<a href="{D}/mailbox">Mailbox page</a>.'
            ) in text
        page = client.get(f"{D}/mailbox").text
        assert 'data-state="broken"' in page
        assert "invalid_grant" in page
        client.cookies.clear()
        login(client, "dom")
        assert "stopped working" not in client.get(f"{D}/messages").text
    # the notification mail to the address, queued once with the break
    with Session(engine) as session:
        mails = session.exec(select(OutboxItem).where(OutboxItem.channel == "email")).all()
    assert [(m.target, m.event_type) for m in mails] == [(SAM, "mailbox.disconnected")]


def test_reconnecting_mends_a_broken_connection(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    mailbox.mark_broken(engine, row.id or 0, "the provider no longer accepts the grant")
    assert "stopped working" in app_client.get(f"{D}/mailbox").text
    page = connect(app_client, oauth_server)
    assert "stopped working" not in page
    assert [(r.id, r.state) for r in rows(engine)] == [(row.id, "ok")]


def test_without_providers_the_page_says_what_to_configure(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    seed(engine)
    with TestClient(create_app(make_settings(), engine)) as client:
        login(client, "sam")
        page = client.get(f"{D}/mailbox")
        assert "No providers configured" in page.text
        assert 'name="provider"' not in page.text
        refused = client.post(
            f"{D}/mailbox",
            data={"csrf_token": csrf_from(page.text), "address": SAM, "provider": "test"},
        )
        assert refused.status_code == 400
        assert "That provider is not configured here." in refused.text


# --- Connect with an app password: the recording upstream (USER/PASSWORD) as provider fast ---


@pytest.fixture
def password_client(
    engine: Engine, make_settings: Callable[..., Settings], upstream: RecordingUpstream
) -> Iterator[TestClient]:
    seed(engine)
    oauth = {
        "microsoft": {"client_id": "ms-app"},  # no app passwords (basic auth is ending)
        "google": {"client_id": "g-app"},  # app passwords, and OAuth
        "fast": {"app_passwords": True, "smtp": upstream.url},  # app passwords only
    }
    settings = make_settings(oauth=oauth, public_url=PUBLIC, upstream_verify_tls=False)
    with TestClient(create_app(settings, engine)) as client:
        yield client


def connect_password(client: TestClient, **fields: str) -> httpx.Response:
    token = csrf_from(client.get(f"{D}/mailbox").text)
    data = {"csrf_token": token, "address": SAM, "provider": "fast", "login": USER, **fields}
    return client.post(f"{D}/mailbox/password", data=data, follow_redirects=False)


def test_the_app_password_form_offers_the_providers_that_take_them(
    password_client: TestClient,
) -> None:
    login(password_client, "sam")
    page = password_client.get(f"{D}/mailbox")
    assert page.status_code == 200
    form = page.text[page.text.index('data-form="app-password"') :]
    form = form[: form.index("</form>")]
    assert f'action="{D}/mailbox/password"' in page.text
    assert '<option value="google"' in form
    assert '<option value="fast"' in form
    assert '<option value="microsoft"' not in form
    assert 'name="csrf_token"' in form
    assert 'type="password"' in form
    # fast has no OAuth sign-in: no Connect button, nothing to send the browser to
    assert "Connect fast" not in page.text
    assert "Connect Google" in page.text
    csp = page.headers["content-security-policy"]
    [form_action] = [d.split()[1:] for d in csp.split("; ") if d.startswith("form-action ")]
    assert sorted(form_action) == sorted(
        ["'self'", "https://accounts.google.com", "https://login.microsoftonline.com"]
    )


def test_connect_with_an_app_password(
    password_client: TestClient, engine: Engine, upstream: RecordingUpstream
) -> None:
    login(password_client, "sam")
    answer = connect_password(password_client, password=PASSWORD)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"{D}/mailbox"
    page = password_client.get(f"{D}/mailbox").text
    assert f"Connected {SAM} to fast with an app password" in page
    assert 'data-state="ok"' in page
    assert PASSWORD not in page
    assert upstream.auth_attempts == [("PLAIN", USER)]  # the one trial login
    [row] = rows(engine)
    assert (row.address, row.provider, row.method, row.login) == (SAM, "fast", "password", USER)
    assert PASSWORD not in row.grant


def test_a_refused_app_password_is_said_in_the_form_and_never_echoed(
    password_client: TestClient, engine: Engine, upstream: RecordingUpstream
) -> None:
    login(password_client, "sam")
    answer = connect_password(password_client, password="my-wrong-app-pass")
    assert answer.status_code == 400
    assert "my-wrong-app-pass" not in answer.text
    assert '<input name="password" type="password" value="" ' in answer.text
    assert f"refused the app password for {USER}" in answer.text
    assert 'id="password-error"' in answer.text
    assert f'value="{USER}"' in answer.text  # the rest is kept for the next try
    assert rows(engine) == []


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"password": ""}, "password", "Paste the app password"),
        ({"provider": "microsoft"}, "provider", "takes no app passwords here"),
        ({"address": "boss@example.com"}, "address", "may not send as boss@example.com"),
        ({"login": "two words"}, "login", "The login is one word"),
    ],
)
def test_the_app_password_form_names_what_is_wrong(
    password_client: TestClient,
    engine: Engine,
    upstream: RecordingUpstream,
    fields: dict[str, str],
    field: str,
    message: str,
) -> None:
    login(password_client, "sam")
    answer = connect_password(password_client, **{"password": PASSWORD, **fields})
    assert answer.status_code == 400
    assert f'id="{field}-error"' in answer.text
    assert message in answer.text
    assert PASSWORD not in answer.text
    assert upstream.auth_attempts == []  # nothing was tried at the provider
    assert rows(engine) == []


def test_an_app_password_connection_is_listed_and_disconnected(
    password_client: TestClient, engine: Engine
) -> None:
    login(password_client, "sam")
    assert connect_password(password_client, password=PASSWORD).status_code == 303
    page = password_client.get(f"{D}/mailbox")
    [row] = rows(engine)
    assert "app password" in page.text
    answer = password_client.post(
        f"{D}/mailbox/{row.id}/disconnect",
        data={"csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert "an app password: forgotten" in password_client.get(f"{D}/mailbox").text
    assert rows(engine) == []


# --- where connections are used; what went wrong; disconnecting when the provider is away ---


def test_outside_local_mode_the_page_says_connections_are_unused(
    app_client: TestClient, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")  # the app's settings: the default passthrough mode
    page = connect(app_client, oauth_server)
    assert "data-unused" in page
    assert (
        "Mailbox connections are used only in local auth mode (TRACKRELAY_AUTH_MODE=local); "
        "this relay runs in passthrough mode, so no mail goes out through them."
    ) in page
    assert f"Connected {SAM} to test. Note: Mailbox connections are used only" in page
    assert "its mail now goes out through that mailbox" not in page


def test_in_local_mode_the_page_says_mail_goes_through_the_mailbox(
    engine: Engine, make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    seed(engine)
    settings = _settings(
        make_settings,
        oauth_server,
        auth_mode="local",
        upstream="smtp://127.0.0.1:9",
        upstream_user="relay",
    )
    with TestClient(create_app(settings, engine)) as client:
        login(client, "sam")
        page = connect(client, oauth_server)
    assert f"Connected {SAM} to test: its mail now goes out through that mailbox." in page
    assert "data-unused" not in page


def test_the_last_error_is_shown_with_when(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    assert "data-last-error" not in app_client.get(f"{D}/mailbox").text
    mailbox.note_error(engine, row.id or 0, "the provider is away\n(503)")
    page = app_client.get(f"{D}/mailbox").text
    shown = page[page.index("data-last-error") :]
    shown = shown[: shown.index("</small>")]
    assert "<time datetime=" in shown
    assert shown.endswith(": the provider is away (503)")
    app_client.cookies.clear()
    login(app_client, "ada")  # and in everyone's connections
    assert app_client.get(f"{D}/mailbox").text.count("data-last-error") == 1


def test_a_provider_away_at_disconnect_offers_to_forget_without_revoking(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    assert "Forget without revoking" not in app_client.get(f"{D}/mailbox").text
    oauth_server.revoke_down = True
    token = csrf_from(app_client.get(f"{D}/mailbox").text)
    answer = app_client.post(f"{D}/mailbox/{row.id}/disconnect", data={"csrf_token": token})
    assert "the provider did not revoke the grant (" in answer.text
    assert "kept, try again (or forget it without revoking)." in answer.text
    assert "Forget without revoking" in answer.text
    assert 'name="force" value="1"' in answer.text
    assert len(rows(engine)) == 1
    answer = app_client.post(
        f"{D}/mailbox/{row.id}/disconnect", data={"csrf_token": token, "force": "1"}
    )
    assert "forgotten without revoking (remove the app&#39;s access in the account)." in answer.text
    assert rows(engine) == []
    assert "Forget without revoking" not in app_client.get(f"{D}/mailbox").text


def test_reconnecting_keeps_the_sent_folder_mode(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    row = sam_connected(app_client, engine, oauth_server)
    mailbox.set_sent(engine, row.id or 0, "leave")
    connect(app_client, oauth_server)
    assert [(r.id, r.sent) for r in rows(engine)] == [(row.id, "leave")]


def test_an_odd_token_answer_or_no_refresh_token_is_said_never_a_500(
    app_client: TestClient, engine: Engine, oauth_server: OAuthServer
) -> None:
    login(app_client, "sam")
    oauth_server.token_answer = {"token_type": "Bearer"}  # 200 without access_token
    back = consent(start(app_client).headers["location"], oauth_server)
    assert "test could not be reached to finish the sign-in. Try again." in land(app_client, back)
    oauth_server.token_answer = None
    oauth_server.issue_refresh = False  # not asked for offline access
    page = land(app_client, consent(start(app_client).headers["location"], oauth_server))
    assert "Not connected: test gave no refresh token" in page
    assert "[oauth.test] scopes" in page
    assert rows(engine) == []
