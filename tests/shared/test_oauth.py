"""shared/oauth.py, the OAuth client, against the in-suite authorization server."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from shared import mailbox, oauth
from shared.config import Settings
from shared.oauth import OAuthRefused, ProviderUnavailable
from tests.support.oauth_server import PUBLIC_CLIENT, OAuthServer, provider_settings

REDIRECT = "https://relay.example/mailbox/callback"


def provider_of(
    make_settings: Callable[..., Settings], server: OAuthServer, **extra: str
) -> oauth.OAuthProvider:
    tables = provider_settings(server)
    tables["test"].update(extra)
    return mailbox.provider(make_settings(oauth=tables), "test")


def consent(server: OAuthServer, url: str, decision: str = "allow") -> dict[str, str]:
    """The person on the consent page: Allow (or Deny); the redirect's query."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    page = httpx2.get(url)
    assert page.status_code == 200, page.text
    form = {**query, "username": "ann@example.com", "decision": decision}
    back = httpx2.post(f"{server.url}/authorize", data=form)
    location = back.headers["location"]
    assert location.startswith(REDIRECT)
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@pytest.mark.parametrize("client", ["confidential", "public"])
def test_authorization_code_with_pkce(
    make_settings: Callable[..., Settings], oauth_server: OAuthServer, client: str
) -> None:
    extra = {"client_id": PUBLIC_CLIENT, "client_secret": ""} if client == "public" else {}
    provider = provider_of(make_settings, oauth_server, **extra)
    request = oauth.authorization_request(provider, REDIRECT)
    query = parse_qs(urlsplit(request.url).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["state"] == [request.state]
    assert request.verifier not in request.url
    callback = consent(oauth_server, request.url)
    token = oauth.exchange_code(provider, request, callback)
    assert oauth_server.is_live(token.access_token)
    assert token.refresh_token
    with pytest.raises(OAuthRefused) as used:  # a code is good once
        oauth.exchange_code(provider, request, callback)
    assert used.value.error == "invalid_grant"


def test_a_foreign_state_or_a_refusal_is_refused(
    make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    provider = provider_of(make_settings, oauth_server)
    request = oauth.authorization_request(provider, REDIRECT)
    other = oauth.authorization_request(provider, REDIRECT)
    callback = consent(oauth_server, request.url)
    with pytest.raises(OAuthRefused, match="invalid_state"):
        oauth.exchange_code(provider, other, callback)
    declined = consent(oauth_server, request.url, "deny")
    with pytest.raises(OAuthRefused) as refused:
        oauth.exchange_code(provider, request, declined)
    assert refused.value.error == "access_denied"
    assert oauth_server.token_requests == []  # neither reached the token endpoint


def test_a_device_code_declined_and_a_provider_away(
    make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    provider = provider_of(make_settings, oauth_server)
    device = oauth.start_device(provider)
    oauth_server.deny(device.user_code)
    with pytest.raises(OAuthRefused) as declined:
        oauth.poll_device(provider, device, sleep=lambda _: None)
    assert declined.value.error == "access_denied"
    gone = provider_of(make_settings, oauth_server, issuer="http://127.0.0.1:9")
    with pytest.raises(ProviderUnavailable, match="OpenID discovery"):
        oauth.refresh(gone, "rt-x", timeout=2)


def test_google_asks_for_offline_access(make_settings: Callable[..., Settings]) -> None:
    google = mailbox.provider(make_settings(oauth={"google": {"client_id": "g"}}), "google")
    request = oauth.authorization_request(google, REDIRECT)
    query = parse_qs(urlsplit(request.url).query)
    assert request.url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    assert query["access_type"] == ["offline"]
    assert query["scope"] == ["https://mail.google.com/"]


def test_a_failed_discovery_is_not_asked_again_at_once(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = OAuthServer(discovery_down=True).start()
    try:
        provider = provider_of(make_settings, server)
        for _ in range(2):  # a page naming the provider twice waits for one failure
            with pytest.raises(ProviderUnavailable, match="OpenID discovery"):
                oauth.endpoints(provider, timeout=5)
        assert server.discoveries == 1
        monkeypatch.setattr(oauth, "DISCOVERY_RETRY", 0.0)
        server.discovery_down = False
        assert oauth.endpoints(provider)["token_endpoint"] == f"{server.url}/token"
        assert server.discoveries == 2
    finally:
        server.stop()


def test_an_answer_authlib_trips_over_is_provider_unavailable_in_one_line(
    make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    provider = provider_of(make_settings, oauth_server)
    with pytest.raises(ProviderUnavailable) as empty:  # Authlib: AttributeError on ""
        oauth.refresh(provider, "")
    assert str(empty.value).startswith("[oauth.test]: unexpected answer (AttributeError: ")
    oauth_server.token_answer = {"token_type": "Bearer"}  # 200, no access_token
    device = oauth.start_device(provider)
    oauth_server.approve(device.user_code, "ann@example.com")
    with pytest.raises(ProviderUnavailable, match=r"^\[oauth.test\]: the token answer has no"):
        oauth.poll_device(provider, device, sleep=lambda _: None)
    oauth_server.token_answer = {"access_token": "at-x", "expires_in": "soon"}
    with pytest.raises(ProviderUnavailable, match=r"^\[oauth.test\]: .*'soon'$"):
        oauth.refresh(provider, "rt-x")


def test_revoke_tells_revoked_from_already_invalid_from_refused(
    make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    provider = provider_of(make_settings, oauth_server)
    assert oauth.revoke(provider, "rt-unknown") == "revoked"  # RFC 7009 2.2: 200 for unknown
    oauth_server.revoke_like_google = True
    assert oauth.revoke(provider, "rt-unknown") == "invalid"  # Google: 400 invalid_token
    oauth_server.clients["trackrelay-test"] = "another"
    with pytest.raises(OAuthRefused) as refused:
        oauth.revoke(provider, "rt-unknown")
    assert refused.value.error == "invalid_client"
    oauth_server.revoke_down = True
    with pytest.raises(ProviderUnavailable, match="503"):
        oauth.revoke(provider, "rt-unknown")
