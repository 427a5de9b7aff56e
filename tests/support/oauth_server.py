"""A real OAuth 2.0 authorization server for tests, on 127.0.0.1 (a Starlette app under uvicorn).

It plays the provider of a mailbox connection (Microsoft 365, Google) the way
the recording upstream plays its SMTP server: real HTTP, real grants, and
hooks for what a test needs to happen.

* OpenID discovery at ``/.well-known/openid-configuration`` (``issuer`` is
  :attr:`OAuthServer.url`).
* Authorization code with PKCE (RFC 7636, S256 only; a request without a
  challenge is refused): ``GET /authorize`` shows a consent page with Allow and
  Deny; ``POST /authorize`` redirects back with ``code`` and ``state``.
* Device authorization grant (RFC 8628): ``POST /device`` gives a device code
  and a user code; :meth:`OAuthServer.approve` (or :meth:`deny`) is the person
  consenting at ``/activate``; the token endpoint answers
  ``authorization_pending`` until then and ``expired_token`` after
  ``device_ttl``.
* Refresh with rotation: every refresh gives a new refresh token and the old
  one stops working (using it again is ``invalid_grant``, as is any refresh
  after :meth:`revoke_user`).
* Introspection (RFC 7662) at ``/introspect`` and revocation (RFC 7009) at
  ``/revoke``: revoking a refresh token revokes the access tokens it gave.

Clients authenticate with HTTP Basic or ``client_secret_post``; a client
registered without a secret is public (change :attr:`OAuthServer.clients` to
play a client secret that expired: every request is then ``invalid_client``).
:attr:`token_requests` lists the ``grant_type`` of every token request that
arrived, so a test can count the refreshes that reached the server;
``token_delay`` makes each token answer slow (two refreshers racing).

Hooks for providers that answer otherwise:

* ``revoke_like_google``: ``/revoke`` answers ``400 invalid_token`` for a
  token it does not know or that was revoked (Google's answer; RFC 7009 2.2
  has 200), ``revoke_down``: ``/revoke`` answers 503;
* ``issue_refresh = False``: no ``refresh_token`` in any token answer (a
  provider not asked for offline access);
* ``token_answer``: every token request gets this JSON object with 200
  (a malformed answer, e.g. one without ``access_token``);
* ``device_scope_refused``: ``/device`` answers ``invalid_scope`` for this
  scope (Google's device flow and ``https://mail.google.com/``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import html
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "trackrelay-test"
CLIENT_SECRET = "test-client-secret"  # the test server's own client
PUBLIC_CLIENT = "trackrelay-public"


class OAuthError(Exception):
    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(error)
        self.error, self.description, self.status = error, description, status

    def response(self) -> JSONResponse:
        body = {"error": self.error, "error_description": self.description or self.error}
        return JSONResponse(body, status_code=self.status, headers={"Cache-Control": "no-store"})


@dataclass
class Grant:
    """What one consent gave: who, to which client, for which scopes."""

    client_id: str
    username: str
    scope: str
    revoked: bool = False


@dataclass
class Device:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    username: str = ""
    denied: bool = False


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    username: str
    expires_at: float


@dataclass
class OAuthServer:
    clients: dict[str, str | None] = field(
        default_factory=lambda: {CLIENT_ID: CLIENT_SECRET, PUBLIC_CLIENT: None}
    )
    access_ttl: int = 3600
    device_ttl: float = 600.0
    device_interval: int = 1
    token_delay: float = 0.0
    token_requests: list[str] = field(default_factory=list)
    introspections: int = 0
    discoveries: int = 0
    discovery_down: bool = False  # True: the discovery document answers 503
    revoke_like_google: bool = False  # unknown or revoked token: 400 invalid_token
    revoke_down: bool = False  # /revoke answers 503
    issue_refresh: bool = True  # False: token answers carry no refresh_token
    token_answer: dict[str, Any] | None = None  # every token request: this, 200
    device_scope_refused: str = ""  # /device: invalid_scope when the scope has this
    url: str = ""

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: dict[str, Code] = {}
        self.devices: dict[str, Device] = {}
        self.access: dict[str, tuple[Grant, float]] = {}  # token -> (grant, expires at)
        self.refresh: dict[str, Grant] = {}  # live refresh tokens only
        self.used_refresh: set[str] = set()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # --- test hooks ---

    def approve(self, user_code: str, username: str) -> None:
        """The person signs in at the verification page and allows the device."""
        with self.lock:
            self._device_by_user_code(user_code).username = username

    def deny(self, user_code: str) -> None:
        with self.lock:
            self._device_by_user_code(user_code).denied = True

    def pending_user_codes(self) -> list[str]:
        with self.lock:
            return [d.user_code for d in self.devices.values() if not d.username]

    def revoke_user(self, username: str) -> None:
        """The person (or an admin) revokes the app at the provider: every token dies."""
        with self.lock:
            for grant in [*self.refresh.values(), *(g for g, _ in self.access.values())]:
                if grant.username == username:
                    grant.revoked = True

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now (the relay thinks they live on)."""
        with self.lock:
            self.access = {t: (g, 0.0) for t, (g, _) in self.access.items()}

    def is_live(self, token: str) -> bool:
        with self.lock:
            entry = self.access.get(token)
            return entry is not None and not entry[0].revoked and entry[1] > time.time()

    def refreshes(self) -> int:
        return self.token_requests.count("refresh_token")

    def _device_by_user_code(self, user_code: str) -> Device:
        for device in self.devices.values():
            if device.user_code == user_code:
                return device
        raise KeyError(user_code)

    # --- the app ---

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/authorize", self.authorize_page, methods=["GET"]),
                Route("/authorize", self.authorize_decision, methods=["POST"]),
                Route("/device", self.device_authorization, methods=["POST"]),
                Route("/activate", self.activate_page, methods=["GET"]),
                Route("/token", self.token, methods=["POST"]),
                Route("/introspect", self.introspect, methods=["POST"]),
                Route("/revoke", self.revoke, methods=["POST"]),
            ]
        )

    async def discovery(self, request: Request) -> Response:
        self.discoveries += 1
        if self.discovery_down:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
        return JSONResponse(
            {
                "issuer": self.url,
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "device_authorization_endpoint": f"{self.url}/device",
                "introspection_endpoint": f"{self.url}/introspect",
                "revocation_endpoint": f"{self.url}/revoke",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_GRANT],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "none",
                ],
            }
        )

    async def authorize_page(self, request: Request) -> Response:
        query = request.query_params
        if query.get("client_id") not in self.clients or not query.get("redirect_uri"):
            return HTMLResponse("<h1>Unknown client or no redirect_uri</h1>", status_code=400)
        if query.get("response_type") != "code":
            return self._redirect_error(query, "unsupported_response_type")
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return self._redirect_error(query, "invalid_request", "PKCE S256 is required")
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in query.items()
        )
        return HTMLResponse(
            "<!doctype html><title>Consent</title><h1>Allow access to your mailbox?</h1>"
            f'<form method="post">{hidden}'
            '<label>Account <input name="username" required></label>'
            '<button name="decision" value="allow">Allow</button>'
            '<button name="decision" value="deny">Deny</button></form>'
        )

    async def authorize_decision(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        if form.get("client_id") not in self.clients or not form.get("redirect_uri"):
            return HTMLResponse("<h1>Unknown client or no redirect_uri</h1>", status_code=400)
        if form.get("decision") != "allow":
            return self._redirect_error(form, "access_denied")
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.codes[code] = Code(
                form["client_id"],
                form["redirect_uri"],
                form.get("code_challenge", ""),
                form.get("scope", ""),
                form.get("username", ""),
                time.time() + 600,
            )
        return self._redirect(form, {"code": code})

    def _redirect_error(self, params: Any, error: str, description: str = "") -> Response:
        return self._redirect(params, {"error": error, "error_description": description or error})

    def _redirect(self, params: Any, values: dict[str, str]) -> Response:
        if params.get("state"):
            values["state"] = params["state"]
        return RedirectResponse(f"{params['redirect_uri']}?{urlencode(values)}", status_code=302)

    async def device_authorization(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        try:
            client_id = self._client(request, form)
            scopes = form.get("scope", "").split()
            if self.device_scope_refused and self.device_scope_refused in scopes:
                raise OAuthError("invalid_scope", f"{self.device_scope_refused} is not allowed")
        except OAuthError as exc:
            return exc.response()
        device = Device(
            secrets.token_urlsafe(32),
            "-".join(secrets.token_hex(2).upper() for _ in range(2)),
            client_id,
            form.get("scope", ""),
            time.time() + self.device_ttl,
        )
        with self.lock:
            self.devices[device.device_code] = device
        return JSONResponse(
            {
                "device_code": device.device_code,
                "user_code": device.user_code,
                "verification_uri": f"{self.url}/activate",
                "verification_uri_complete": f"{self.url}/activate?user_code={device.user_code}",
                "expires_in": max(1, int(self.device_ttl)),
                "interval": self.device_interval,
            }
        )

    async def activate_page(self, request: Request) -> Response:
        return HTMLResponse("<h1>Enter the code shown on your device</h1>")

    async def token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        grant_type = form.get("grant_type", "")
        self.token_requests.append(grant_type)
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if self.token_answer is not None:
            return JSONResponse(self.token_answer)
        try:
            client_id = self._client(request, form)
            with self.lock:
                grant, rotate = self._grant(grant_type, client_id, form)
                return self._issue(grant, rotate)
        except OAuthError as exc:
            return exc.response()

    def _grant(self, grant_type: str, client_id: str, form: dict[str, str]) -> tuple[Grant, bool]:
        if grant_type == "authorization_code":
            return self._code_grant(client_id, form), True
        if grant_type == DEVICE_GRANT:
            return self._device_grant(client_id, form), True
        if grant_type == "refresh_token":
            return self._refresh_grant(client_id, form), True
        raise OAuthError("unsupported_grant_type", grant_type)

    def _code_grant(self, client_id: str, form: dict[str, str]) -> Grant:
        code = self.codes.pop(form.get("code", ""), None)
        if code is None or code.client_id != client_id or code.expires_at < time.time():
            raise OAuthError("invalid_grant", "unknown, used or expired code")
        if code.redirect_uri != form.get("redirect_uri"):
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization")
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != code.challenge:
            raise OAuthError("invalid_grant", "code_verifier does not match the challenge")
        return Grant(client_id, code.username, code.scope)

    def _device_grant(self, client_id: str, form: dict[str, str]) -> Grant:
        device = self.devices.get(form.get("device_code", ""))
        if device is None or device.client_id != client_id:
            raise OAuthError("invalid_grant", "unknown device code")
        if device.expires_at < time.time():
            raise OAuthError("expired_token", "the device code expired")
        if device.denied:
            raise OAuthError("access_denied", "the person declined")
        if not device.username:
            raise OAuthError("authorization_pending", "waiting for the person")
        del self.devices[device.device_code]
        return Grant(client_id, device.username, device.scope)

    def _refresh_grant(self, client_id: str, form: dict[str, str]) -> Grant:
        token = form.get("refresh_token", "")
        grant = self.refresh.pop(token, None)
        if grant is None or grant.client_id != client_id or grant.revoked:
            reason = "refresh token already used" if token in self.used_refresh else "revoked"
            raise OAuthError("invalid_grant", reason)
        self.used_refresh.add(token)
        return Grant(client_id, grant.username, grant.scope)

    def _issue(self, grant: Grant, rotate: bool) -> JSONResponse:
        access = "at-" + secrets.token_urlsafe(24)
        self.access[access] = (grant, time.time() + self.access_ttl)
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "scope": grant.scope,
        }
        if rotate and self.issue_refresh:
            refresh = "rt-" + secrets.token_urlsafe(24)
            self.refresh[refresh] = grant
            body["refresh_token"] = refresh
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def introspect(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        try:
            self._client(request, form)
        except OAuthError as exc:
            return exc.response()
        self.introspections += 1
        token = form.get("token", "")
        with self.lock:
            if token in self.access:
                grant, expires_at = self.access[token]
                live = not grant.revoked and expires_at > time.time()
            elif token in self.refresh:
                grant, expires_at, live = self.refresh[token], 0.0, not self.refresh[token].revoked
            else:
                return JSONResponse({"active": False})
        if not live:
            return JSONResponse({"active": False})
        body = {
            "active": True,
            "client_id": grant.client_id,
            "username": grant.username,
            "sub": grant.username,
            "scope": grant.scope,
            "token_type": "Bearer",
        }
        if expires_at:
            body["exp"] = int(expires_at)
        return JSONResponse(body)

    async def revoke(self, request: Request) -> Response:
        if self.revoke_down:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
        form = {k: str(v) for k, v in (await request.form()).items()}
        try:
            client_id = self._client(request, form)
        except OAuthError as exc:
            return exc.response()
        token = form.get("token", "")
        with self.lock:
            grant = self.refresh.get(token) or self.access.get(token, (None, 0.0))[0]
            if self.revoke_like_google and (grant is None or grant.revoked):
                return OAuthError("invalid_token", "Token expired or revoked").response()
            if grant is not None and grant.client_id == client_id:
                # RFC 7009 2.1: revoking a refresh token revokes the grant's access tokens
                for other in [*self.refresh.values(), *(g for g, _ in self.access.values())]:
                    if other.username == grant.username and other.client_id == client_id:
                        other.revoked = True
        return Response(status_code=200)  # also for unknown tokens (RFC 7009 2.2)

    def _client(self, request: Request, form: dict[str, str]) -> str:
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:]).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError("invalid_client", "bad Basic header", 401) from None
            client_id, _, secret = decoded.partition(":")
        if client_id not in self.clients:
            raise OAuthError("invalid_client", "unknown client", 401)
        expected = self.clients[client_id]
        if expected is not None and secret != expected:
            raise OAuthError("invalid_client", "wrong client secret", 401)
        return client_id

    # --- running ---

    def start(self) -> OAuthServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        self._socket = sock
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None
            self._socket.close()


def provider_table(server: OAuthServer, smtp: str, **extra: str) -> str:
    """An ``[oauth.test]`` TOML table for this server (found by discovery)."""
    lines = [
        "[oauth.test]",
        f'issuer = "{server.url}"',
        f'client_id = "{CLIENT_ID}"',
        f'client_secret = "{CLIENT_SECRET}"',
        'scopes = ["mail.send", "offline_access"]',
        f'smtp = "{smtp}"',
        *(f'{key} = "{value}"' for key, value in extra.items()),
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def oauth_server() -> Iterator[OAuthServer]:
    server = OAuthServer().start()
    yield server
    server.stop()


def provider_settings(server: OAuthServer, smtp: str = "smtp://127.0.0.1:9") -> dict[str, Any]:
    """The ``oauth`` setting naming this server as provider ``test`` (found by discovery)."""
    return {
        "test": {
            "issuer": server.url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scopes": ["mail.send", "offline_access"],
            "smtp": smtp,
        }
    }
