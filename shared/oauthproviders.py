"""OAuth 2.0 mailbox providers: the ``[oauth.NAME]`` tables of the TOML config.

A provider says where its authorization server is (``issuer``, whose OpenID
discovery document at ``ISSUER/.well-known/openid-configuration`` gives the
endpoints, or the endpoints themselves), which client the relay is there
(``client_id``, ``client_secret`` optional for public clients), which
``scopes`` it asks for, and the mailbox servers the grant opens: ``smtp`` (the
submission server, an upstream URL as ``TRACKRELAY_UPSTREAM`` takes) and
``imap``. ``sent_delete`` says how the Sent folder's cleaner (relay/sentfolder.py)
removes a tracked copy there: ``expunge`` (the default: flagged ``\\Deleted`` and
expunged, gone at Microsoft 365 and most servers) or ``trash`` (moved to the
``\\Trash`` special-use folder and expunged there: at Gmail, expunging in
"[Gmail]/Sent Mail" only takes the label off and the copy stays in All Mail).

The presets ``microsoft`` (with a configurable ``tenant``) and ``google`` fill
everything but the client credentials: a table named after one, or with
``preset = "microsoft"``, needs only ``client_id`` (and ``client_secret`` for a
confidential client). Anything given in the table wins over the preset.
The CLI's device flow works with ``microsoft`` when the app registration
allows public client flows; Google's device flow does not allow the
``https://mail.google.com/`` scope (``invalid_scope``), so Google accounts
connect on the dashboard (the authorization code flow).

``app_passwords`` (default false) lets a person connect with an app password
instead of an OAuth grant (``trackrelay mailbox connect --app-password``, the
dashboard's "Connect with an app password"): the relay then logs in to
``smtp`` and ``imap`` with AUTH PLAIN/LOGIN and IMAP LOGIN. The preset
``google`` sets it (Google accounts with 2-step verification, where the
administrator allows app passwords); ``microsoft`` does not (Microsoft 365 app
passwords are basic authentication, which Microsoft is ending). A table with
``app_passwords = true`` and no ``issuer``, endpoints nor ``client_id`` is a
password-only provider (Fastmail, a company's own IMAP/SMTP): it needs only
``smtp`` (and ``imap`` for the Sent folder and the INBOX watcher).

Errors are one line naming the table and the key, e.g.
``[oauth.work] smtp: plaintext smtp:// is only allowed to a loopback address``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    SecretStr,
    StrictBool,
    field_validator,
    model_validator,
)

from shared.config import Upstream, _is_loopback, parse_upstream

PresetName = Literal["microsoft", "google"]

_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
PRESETS: dict[str, dict[str, Any]] = {
    "microsoft": {
        "authorization_endpoint": _MICROSOFT + "/authorize",
        "token_endpoint": _MICROSOFT + "/token",
        # the device flow (the CLI) needs "Allow public client flows" on the app registration
        "device_authorization_endpoint": _MICROSOFT + "/devicecode",
        # Microsoft identity platform has no RFC 7009 revocation endpoint.
        "revocation_endpoint": "",
        "app_passwords": False,  # basic authentication, which Microsoft is ending
        "scopes": [
            "https://outlook.office.com/SMTP.Send",
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access",
        ],
        "smtp": "smtp+starttls://smtp.office365.com:587",
        "imap": "imaps://outlook.office365.com:993",
    },
    "google": {
        "authorization_endpoint": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_endpoint": "https://oauth2.googleapis.com/token",
        # Google's device flow refuses https://mail.google.com/ (invalid_scope): Google
        # accounts connect with the dashboard's code flow; the CLI says so when refused
        "device_authorization_endpoint": "https://oauth2.googleapis.com/device/code",
        "revocation_endpoint": "https://oauth2.googleapis.com/revoke",
        "app_passwords": True,  # with 2-step verification, where the admin allows them
        "scopes": ["https://mail.google.com/"],
        "smtp": "smtp+starttls://smtp.gmail.com:587",
        "imap": "imaps://imap.gmail.com:993",
        "sent_delete": "trash",
    },
}
ENDPOINTS = (
    "authorization_endpoint",
    "token_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
)


class OAuthProvider(BaseModel):
    """One ``[oauth.NAME]`` table, presets applied (``name`` is set by the settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    preset: PresetName | None = None
    tenant: str = "common"  # microsoft: the directory (tenant id or domain), or common
    issuer: str = ""
    authorization_endpoint: str = ""
    token_endpoint: str = ""
    device_authorization_endpoint: str = ""
    revocation_endpoint: str = ""
    introspection_endpoint: str = ""
    client_id: str = ""  # required unless the table is password-only (see password_only)
    app_passwords: StrictBool = False  # people may connect with an app password too
    client_secret: SecretStr = SecretStr("")
    scopes: list[str] = []
    smtp: str
    imap: str = ""
    sent_delete: Literal["expunge", "trash"] = "expunge"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        preset = values.get("preset") or (
            values.get("name") if values.get("name") in PRESETS else None
        )
        if preset not in PRESETS:
            return values  # a bad preset name is reported by the field
        tenant = str(values.get("tenant") or "common")
        filled = {
            key: value.format(tenant=tenant) if isinstance(value, str) else value
            for key, value in PRESETS[preset].items()
        }
        return {**filled, **values, "preset": preset}

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("client_id is empty")
        return value

    @field_validator("issuer", *ENDPOINTS)
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not _secure_url(value):
            raise ValueError(f"expected an https:// URL (http:// on loopback only), got {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("smtp")
    @classmethod
    def _check_smtp(cls, value: str) -> str:
        if value.startswith("maildir:"):
            raise ValueError("a provider's smtp is a server URL, not maildir:")
        parse_upstream(value, Path("."))
        return value

    @field_validator("imap")
    @classmethod
    def _check_imap(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("imaps", "imap") or not parts.hostname:
            raise ValueError(f"expected imaps://host:993 or imap://127.0.0.1:port, got {value!r}")
        if parts.scheme == "imap" and not _is_loopback(parts.hostname):
            raise ValueError("plaintext imap:// is only allowed to a loopback address")
        return value

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: list[str]) -> list[str]:
        if any(not scope or any(c.isspace() for c in scope) for scope in value):
            raise ValueError("each scope is one word without spaces")
        return value

    @model_validator(mode="after")
    def _check_endpoints(self) -> OAuthProvider:
        if self.password_only:
            return self
        if not self.client_id:
            raise ValueError("client_id: is required")
        if not self.issuer and not self.token_endpoint:
            raise ValueError("set issuer (found by OpenID discovery) or token_endpoint")
        return self

    @property
    def password_only(self) -> bool:
        """App passwords only: no issuer, endpoints nor client (no OAuth sign-in here)."""
        return (
            self.app_passwords
            and not self.issuer
            and not self.client_id
            and not any(getattr(self, key) for key in ENDPOINTS)
        )

    @property
    def smtp_target(self) -> Upstream:
        return parse_upstream(self.smtp, Path("."))

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


def _secure_url(value: str) -> bool:
    parts = urlsplit(value)
    if not parts.hostname:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname))


def parse_providers(tables: dict[str, Any]) -> dict[str, OAuthProvider]:
    """``{NAME: table}`` -> providers; ValueError('[oauth.NAME] key: why') on a bad one."""
    from pydantic import ValidationError

    providers = {}
    for name, table in tables.items():
        if isinstance(table, OAuthProvider):
            providers[name] = table
            continue
        if not isinstance(table, dict):
            raise ValueError(f"[oauth.{name}] must be a table")
        try:
            providers[name] = OAuthProvider(**{**table, "name": name})
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "missing":
                message = "is required"
            elif error["type"] == "extra_forbidden":
                message = "is not a provider setting"
            raise ValueError(f"[oauth.{name}] {key}{': ' if key else ''}{message}") from None
    return providers
