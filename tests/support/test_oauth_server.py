"""The in-suite OAuth 2.0 authorization server does what the RFCs say (its own tests)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.oauth_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEVICE_GRANT,
    PUBLIC_CLIENT,
    OAuthServer,
)

AUTH = (CLIENT_ID, CLIENT_SECRET)
REDIRECT = "http://127.0.0.1:9/callback"


def token(server: OAuthServer, **form: str) -> httpx.Response:
    return httpx.post(f"{server.url}/token", data=form, auth=AUTH)


def device_tokens(server: OAuthServer, username: str = "ann@example.com") -> dict[str, str]:
    start = httpx.post(f"{server.url}/device", data={"scope": "mail"}, auth=AUTH).json()
    server.approve(start["user_code"], username)
    reply = token(server, grant_type=DEVICE_GRANT, device_code=start["device_code"])
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def test_discovery_names_every_endpoint(oauth_server: OAuthServer) -> None:
    doc = httpx.get(f"{oauth_server.url}/.well-known/openid-configuration").json()
    assert doc["issuer"] == oauth_server.url
    for name in ("authorization", "token", "device_authorization", "introspection", "revocation"):
        assert httpx.options(doc[f"{name}_endpoint"]).status_code in (200, 405)
    assert doc["code_challenge_methods_supported"] == ["S256"]


def test_authorization_code_with_pkce(oauth_server: OAuthServer) -> None:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = {
        "client_id": PUBLIC_CLIENT,
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "state": "st-1",
        "scope": "mail offline_access",
        "code_challenge": challenge.rstrip(b"=").decode(),
        "code_challenge_method": "S256",
    }
    page = httpx.get(f"{oauth_server.url}/authorize", params=query)
    assert page.status_code == 200
    assert "Allow" in page.text
    without_pkce = {k: v for k, v in query.items() if not k.startswith("code_challenge")}
    refused = httpx.get(f"{oauth_server.url}/authorize", params=without_pkce)
    assert "error=invalid_request" in refused.headers["location"]
    form = {**query, "username": "ann@example.com", "decision": "allow"}
    back = httpx.post(f"{oauth_server.url}/authorize", data=form)
    params = parse_qs(urlsplit(back.headers["location"]).query)
    assert params["state"] == ["st-1"]
    code = params["code"][0]
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": PUBLIC_CLIENT,
    }
    wrong = httpx.post(f"{oauth_server.url}/token", data={**exchange, "code_verifier": "x" * 43})
    assert wrong.json()["error"] == "invalid_grant"
    # the code was spent by the failed attempt too: codes are single use
    again = httpx.post(f"{oauth_server.url}/token", data={**exchange, "code_verifier": verifier})
    assert again.json()["error"] == "invalid_grant"
    back = httpx.post(f"{oauth_server.url}/authorize", data=form)
    exchange["code"] = parse_qs(urlsplit(back.headers["location"]).query)["code"][0]
    good = httpx.post(f"{oauth_server.url}/token", data={**exchange, "code_verifier": verifier})
    assert good.status_code == 200
    assert oauth_server.is_live(good.json()["access_token"])
    denied = httpx.post(f"{oauth_server.url}/authorize", data={**form, "decision": "deny"})
    assert "error=access_denied" in denied.headers["location"]


def test_device_grant_pending_then_approved_and_expired(oauth_server: OAuthServer) -> None:
    start = httpx.post(f"{oauth_server.url}/device", data={"scope": "mail"}, auth=AUTH).json()
    assert start["verification_uri"] == f"{oauth_server.url}/activate"
    poll = {"grant_type": DEVICE_GRANT, "device_code": start["device_code"]}
    assert token(oauth_server, **poll).json()["error"] == "authorization_pending"
    assert oauth_server.pending_user_codes() == [start["user_code"]]
    oauth_server.approve(start["user_code"], "ann@example.com")
    assert "refresh_token" in token(oauth_server, **poll).json()
    assert token(oauth_server, **poll).json()["error"] == "invalid_grant"  # used
    oauth_server.device_ttl = 0
    late = httpx.post(f"{oauth_server.url}/device", data={}, auth=AUTH).json()
    oauth_server.approve(late["user_code"], "ann@example.com")
    assert (
        token(oauth_server, grant_type=DEVICE_GRANT, device_code=late["device_code"]).json()[
            "error"
        ]
        == "expired_token"
    )


def test_refresh_rotates_and_the_old_token_dies(oauth_server: OAuthServer) -> None:
    first = device_tokens(oauth_server)
    second = token(oauth_server, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert second.status_code == 200
    assert second.json()["refresh_token"] != first["refresh_token"]
    reused = token(oauth_server, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert reused.status_code == 400
    assert reused.json() == {
        "error": "invalid_grant",
        "error_description": "refresh token already used",
    }
    assert oauth_server.refreshes() == 2


def test_a_wrong_client_secret_is_invalid_client(oauth_server: OAuthServer) -> None:
    reply = httpx.post(
        f"{oauth_server.url}/token", data={"grant_type": "refresh_token"}, auth=(CLIENT_ID, "no")
    )
    assert reply.status_code == 401
    assert reply.json()["error"] == "invalid_client"


def test_introspection_and_revocation(oauth_server: OAuthServer) -> None:
    tokens = device_tokens(oauth_server)
    url = oauth_server.url
    live = httpx.post(f"{url}/introspect", data={"token": tokens["access_token"]}, auth=AUTH)
    assert live.json()["active"] is True
    assert live.json()["username"] == "ann@example.com"
    assert httpx.post(
        f"{url}/revoke", data={"token": tokens["refresh_token"]}, auth=AUTH
    ).is_success
    dead = httpx.post(f"{url}/introspect", data={"token": tokens["access_token"]}, auth=AUTH)
    assert dead.json() == {"active": False}
    refresh = token(oauth_server, grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refresh.json()["error"] == "invalid_grant"
    unknown = httpx.post(f"{url}/revoke", data={"token": "nothing"}, auth=AUTH)
    assert unknown.status_code == 200  # RFC 7009 2.2


@pytest.mark.parametrize("hook", ["revoke_user", "expire_access_tokens"])
def test_hooks_kill_access_tokens(oauth_server: OAuthServer, hook: str) -> None:
    tokens = device_tokens(oauth_server)
    assert oauth_server.is_live(tokens["access_token"])
    if hook == "revoke_user":
        oauth_server.revoke_user("ann@example.com")
    else:
        oauth_server.expire_access_tokens()
    assert not oauth_server.is_live(tokens["access_token"])
