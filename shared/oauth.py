"""The one OAuth 2.0 client of trackrelay: token requests to a mailbox provider.

Built on Authlib's httpx client (``authlib.integrations.httpx_client``, on
httpx2 as Authlib now prefers), so
the token requests, client authentication, refresh, device-code polling and
revocation are a maintained library's, not hand-written. What this module
adds:

* the endpoints of a provider (shared/oauthproviders.py): given in its table,
  or found by OpenID discovery at ``ISSUER/.well-known/openid-configuration``
  (fetched once per process and issuer; a discovery that failed is not tried
  again for :data:`DISCOVERY_RETRY` seconds, so a provider that is away costs
  one timeout, not one per page that names it);
* the authorization code grant with PKCE (RFC 7636, S256):
  :func:`authorization_request` gives the URL to send the person to (and the
  state and verifier to keep in their session), :func:`exchange_code` checks
  the redirect's ``state`` and trades its code for a token;
* the device authorization grant (RFC 8628): :func:`start_device` and
  :func:`poll_device` (``authorization_pending`` waits ``interval``,
  ``slow_down`` adds five seconds, ``expired_token``/``access_denied`` end it);
* errors as two kinds: :class:`OAuthRefused` (the provider answered with an
  OAuth error: ``invalid_grant`` means the grant is gone; ``invalid_client``
  and the others of :data:`CLIENT_ERRORS` mean the relay's client is wrong)
  and :class:`ProviderUnavailable` (no answer, or not one we can read: also an
  answer Authlib trips over, or a token answer without ``access_token``; one
  line, never a traceback);
* revocation (RFC 7009) that tells a revoked grant from a refused request:
  Google answers ``400 invalid_token`` for a token already revoked or expired,
  where RFC 7009 2.2 has the server answer 200 (an invalid token is no error
  the client could do anything about), so both mean "nothing left to revoke".

Tokens pass through as :class:`Token` values; nothing here logs one.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx2
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.httpx_client import OAuth2Client

from shared.oauthproviders import ENDPOINTS, OAuthProvider

T = TypeVar("T")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# httpx2 logs every request at INFO: a line per device-code poll in the CLI's output.
logging.getLogger("httpx2").setLevel(logging.WARNING)
DEFAULT_TIMEOUT = 15.0
DISCOVERY_RETRY = 30.0  # seconds before a failed discovery is tried again
#: Token-endpoint errors about the relay's client (its [oauth.NAME] client_id /
#: client_secret, or what its app registration allows), not about a person's grant.
CLIENT_ERRORS = ("invalid_client", "unauthorized_client", "unsupported_grant_type")


class OAuthRefused(Exception):
    """The provider answered with an OAuth error (``error`` is its code)."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description


class ProviderUnavailable(Exception):
    """The provider could not be reached or answered with something unreadable."""


@dataclass(frozen=True)
class Token:
    """A token response; ``expires_at`` in epoch seconds (0: not said)."""

    access_token: str
    refresh_token: str
    expires_at: float
    scope: str = ""
    token_type: str = "Bearer"  # noqa: S105 - a token type, not a secret

    @classmethod
    def from_response(cls, values: Mapping[str, Any], previous_refresh: str = "") -> Token:
        """The token of an answer; ProviderUnavailable when it has no access token."""
        if not isinstance(values, Mapping) or not values.get("access_token"):
            raise ProviderUnavailable("the token answer has no access_token")
        try:
            expires_at = float(values.get("expires_at") or 0)
            if not expires_at and values.get("expires_in"):
                expires_at = time.time() + float(values["expires_in"])
        except (TypeError, ValueError):
            raise ProviderUnavailable("the token answer has an unreadable expiry") from None
        return cls(
            access_token=str(values["access_token"]),
            # no refresh_token in a refresh answer: the old one stays valid (RFC 6749 6)
            refresh_token=str(values.get("refresh_token") or previous_refresh),
            expires_at=expires_at,
            scope=str(values.get("scope") or ""),
            token_type=str(values.get("token_type") or "Bearer"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "token_type": self.token_type,
        }


@dataclass(frozen=True)
class DeviceStart:
    """What the person is shown (RFC 8628 3.2) and what the client polls with."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_at: float
    interval: float


_discovered: dict[str, dict[str, str]] = {}
_discovery_failed: dict[str, tuple[float, str]] = {}  # issuer -> (when, why)
_discovery_lock = threading.Lock()


def endpoints(provider: OAuthProvider, timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """The provider's endpoints: its table's, else its issuer's discovery document's."""
    given = {name: getattr(provider, name) for name in ENDPOINTS}
    if not provider.issuer or all(given.values()):
        return given
    with _discovery_lock:
        document = _discovered.get(provider.issuer)
        failed = _discovery_failed.get(provider.issuer)
    if document is None:
        if failed is not None and time.monotonic() - failed[0] < DISCOVERY_RETRY:
            raise ProviderUnavailable(f"{failed[1]} (tried again after {DISCOVERY_RETRY:.0f} s)")
        try:
            document = _discover(provider.issuer, timeout)
        except ProviderUnavailable as exc:
            with _discovery_lock:
                _discovery_failed[provider.issuer] = (time.monotonic(), str(exc))
            raise
        with _discovery_lock:
            _discovered[provider.issuer] = document
            _discovery_failed.pop(provider.issuer, None)
    return {name: given[name] or document.get(name, "") for name in ENDPOINTS}


def _discover(issuer: str, timeout: float) -> dict[str, str]:
    url = f"{issuer}/.well-known/openid-configuration"
    try:
        response = httpx2.get(url, timeout=timeout)
        response.raise_for_status()
        document = response.json()
    except (httpx2.HTTPError, ValueError) as exc:
        raise ProviderUnavailable(f"OpenID discovery at {url} failed: {exc}") from None
    if not isinstance(document, dict):
        raise ProviderUnavailable(f"OpenID discovery at {url}: not a JSON object")
    return {name: str(document[name]) for name in ENDPOINTS if document.get(name)}


def _endpoint(provider: OAuthProvider, name: str, timeout: float) -> str:
    url = endpoints(provider, timeout)[name]
    if not url:
        raise OAuthRefused("unsupported", f"[oauth.{provider.name}] has no {name}")
    return url


def _client(provider: OAuthProvider, timeout: float) -> OAuth2Client:
    secret = provider.client_secret.get_secret_value()
    return OAuth2Client(
        client_id=provider.client_id,
        client_secret=secret or None,
        token_endpoint_auth_method="client_secret_basic" if secret else "none",
        revocation_endpoint_auth_method="client_secret_basic" if secret else "none",
        scope=provider.scope,
        code_challenge_method="S256",
        timeout=timeout,
    )


def _call(request: Callable[[OAuth2Client], T], provider: OAuthProvider, timeout: float) -> T:
    """Run one Authlib request; its errors become OAuthRefused / ProviderUnavailable.

    An answer Authlib cannot take apart (a JSON list, a token answer without
    ``access_token``, a refresh with no refresh token) surfaces as an
    AttributeError, KeyError or TypeError from inside it: unreadable, one line."""
    with _client(provider, timeout) as client:
        try:
            return request(client)
        except AuthlibBaseError as exc:
            raise OAuthRefused(str(exc.error), str(exc.description or "")) from None
        except ProviderUnavailable as exc:
            raise ProviderUnavailable(f"[oauth.{provider.name}]: {exc}") from None
        except (httpx2.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"[oauth.{provider.name}]: {_line(exc)}") from None
        except (AttributeError, KeyError, TypeError) as exc:
            why = f"unexpected answer ({type(exc).__name__}: {_line(exc)})"
            raise ProviderUnavailable(f"[oauth.{provider.name}]: {why}") from None


def _line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def refresh(provider: OAuthProvider, refresh_token: str, timeout: float = DEFAULT_TIMEOUT) -> Token:
    """A new access token (and, with rotation, a new refresh token) for a grant."""
    url = _endpoint(provider, "token_endpoint", timeout)
    return _call(
        lambda c: Token.from_response(
            c.refresh_token(url, refresh_token=refresh_token), refresh_token
        ),
        provider,
        timeout,
    )


@dataclass(frozen=True)
class Authorization:
    """Where to send the person, and what to keep until they come back (never shown)."""

    url: str
    state: str
    verifier: str
    redirect_uri: str


def authorization_request(
    provider: OAuthProvider, redirect_uri: str, timeout: float = DEFAULT_TIMEOUT
) -> Authorization:
    """The authorization URL with a fresh state and an S256 code challenge."""
    url = _endpoint(provider, "authorization_endpoint", timeout)
    verifier = secrets.token_urlsafe(64)  # 86 characters: within RFC 7636's 43..128
    extra = {}
    if provider.preset == "google":  # Google gives a refresh token only when asked so
        extra = {"access_type": "offline", "prompt": "consent"}
    with _client(provider, timeout) as client:
        uri, state = client.create_authorization_url(
            url, code_verifier=verifier, redirect_uri=redirect_uri, **extra
        )
    return Authorization(str(uri), str(state), verifier, redirect_uri)


def exchange_code(
    provider: OAuthProvider,
    authorization: Authorization,
    callback: Mapping[str, str],
    timeout: float = DEFAULT_TIMEOUT,
) -> Token:
    """The token for the redirect's query (``code`` and ``state``); OAuthRefused when
    the state is not ours, or the person declined (``error`` in the redirect)."""
    if not secrets.compare_digest(callback.get("state", ""), authorization.state):
        raise OAuthRefused("invalid_state", "the sign-in did not start here, or started again")
    if callback.get("error"):
        raise OAuthRefused(callback["error"], callback.get("error_description", ""))
    url = _endpoint(provider, "token_endpoint", timeout)
    return _call(
        lambda c: Token.from_response(
            c.fetch_token(
                url,
                grant_type="authorization_code",
                code=callback.get("code", ""),
                code_verifier=authorization.verifier,
                redirect_uri=authorization.redirect_uri,
            )
        ),
        provider,
        timeout,
    )


def start_device(provider: OAuthProvider, timeout: float = DEFAULT_TIMEOUT) -> DeviceStart:
    """Ask for a device code and a user code (RFC 8628 3.1)."""
    url = _endpoint(provider, "device_authorization_endpoint", timeout)

    def ask(client: OAuth2Client) -> Any:
        # RFC 8628 3.1: client authentication as at the token endpoint
        data = {"client_id": provider.client_id, "scope": provider.scope}
        secret = provider.client_secret.get_secret_value()
        auth = (provider.client_id, secret) if secret else None
        response = client.request("POST", url, data=data, auth=auth, withhold_token=True)
        values = response.json()
        if isinstance(values, dict) and "error" in values:
            raise OAuthRefused(str(values["error"]), str(values.get("error_description", "")))
        response.raise_for_status()
        return values

    values = _call(ask, provider, timeout)
    try:
        return DeviceStart(
            device_code=str(values["device_code"]),
            user_code=str(values["user_code"]),
            # Microsoft once said verification_url; RFC 8628 says verification_uri
            verification_uri=str(values.get("verification_uri") or values["verification_url"]),
            verification_uri_complete=str(values.get("verification_uri_complete") or ""),
            expires_at=time.time() + float(values.get("expires_in") or 600),
            interval=float(values.get("interval") or 5),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProviderUnavailable(f"[oauth.{provider.name}]: odd device answer ({exc})") from None


def poll_device(
    provider: OAuthProvider,
    device: DeviceStart,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = DEFAULT_TIMEOUT,
) -> Token:
    """Poll the token endpoint until the person consents; OAuthRefused when they
    decline (``access_denied``) or the code runs out (``expired_token``)."""
    url = _endpoint(provider, "token_endpoint", timeout)
    interval = device.interval
    while True:
        if time.time() > device.expires_at:
            raise OAuthRefused("expired_token", "the code expired before it was confirmed")
        try:
            token = _call(
                lambda c: Token.from_response(
                    c.fetch_token(url, grant_type=DEVICE_GRANT, device_code=device.device_code)
                ),
                provider,
                timeout,
            )
        except OAuthRefused as exc:
            if exc.error == "slow_down":
                interval += 5
            elif exc.error != "authorization_pending":
                raise
            sleep(interval)
            continue
        return token


Revoked = Literal["revoked", "invalid", "unsupported"]


def revoke(provider: OAuthProvider, token: str, timeout: float = DEFAULT_TIMEOUT) -> Revoked:
    """Revoke a refresh token at the provider (RFC 7009): ``revoked``; ``invalid`` when
    the provider says the token is no longer valid (``400 invalid_token``, Google's
    answer for one already revoked or expired: nothing is left to revoke);
    ``unsupported`` when it has no revocation endpoint. OAuthRefused for another
    OAuth error (e.g. ``invalid_client``), ProviderUnavailable when it does not answer."""
    url = endpoints(provider, timeout)["revocation_endpoint"]
    if not url:
        return "unsupported"

    def send(client: OAuth2Client) -> Revoked:
        response = client.revoke_token(url, token=token, token_type_hint="refresh_token")  # noqa: S106
        if 400 <= response.status_code < 500:
            try:
                values = response.json()
            except ValueError:
                values = None
            if isinstance(values, dict) and values.get("error"):
                error = str(values["error"])
                if error == "invalid_token":
                    return "invalid"
                raise OAuthRefused(error, str(values.get("error_description") or ""))
        response.raise_for_status()
        return "revoked"

    return _call(send, provider, timeout)
