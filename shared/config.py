"""One typed settings object for the relay, the receiver and the CLI.

Settings come from environment variables prefixed ``TRACKRELAY_`` and from an
optional TOML file (``--config PATH``); the environment wins. The names are a
contract documented in the README.

Dev mode is on when no real upstream is configured (``TRACKRELAY_UPSTREAM``
unset or a ``maildir:`` sink), so no mail can leave the machine. Only then may
the program generate a secret key, a self-signed certificate and a first user
under ``var_dir``. With a real upstream a missing or default secret stops the
program: a leaked default key would let anyone forge click tokens.

Invalid settings raise :class:`SettingsError` whose message is one line naming
the setting, which the CLI prints and exits with.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "TRACKRELAY_"
DEFAULT_SECRET = "change-me"  # noqa: S105 - the value we refuse outside dev mode

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(Exception):
    """A setting is invalid; ``str(error)`` is one line that names it."""


@dataclass(frozen=True)
class Upstream:
    """Where the relay delivers: an SMTP server or a Maildir sink (dev mode)."""

    scheme: Literal["smtp+starttls", "smtps", "smtp", "maildir"]
    host: str = ""
    port: int = 0
    path: Path | None = None

    @property
    def is_sink(self) -> bool:
        return self.scheme == "maildir"

    @property
    def implicit_tls(self) -> bool:
        return self.scheme == "smtps"

    @property
    def starttls(self) -> bool:
        return self.scheme == "smtp+starttls"

    def __str__(self) -> str:
        if self.path is not None:
            return f"maildir:{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}"


_DEFAULT_PORTS = {"smtp+starttls": 587, "smtps": 465, "smtp": 25}


def parse_upstream(value: str, var_dir: Path) -> Upstream:
    """Parse ``TRACKRELAY_UPSTREAM``; plaintext ``smtp://`` only to loopback."""
    if value.startswith("maildir:"):
        path = Path(unquote(value.removeprefix("maildir:")) or var_dir / "outbox")
        return Upstream("maildir", path=path)
    parts = urlsplit(value)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(
            "expected smtp+starttls://host:587, smtps://host:465, "
            f"smtp://127.0.0.1:port or maildir:PATH, got {value!r}"
        )
    if not parts.hostname:
        raise ValueError(f"no host in {value!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"bad port in {value!r}") from exc
    if parts.scheme == "smtp" and not _is_loopback(parts.hostname):
        raise ValueError(
            "plaintext smtp:// is only allowed to a loopback address; "
            "use smtp+starttls:// or smtps:// for a real server"
        )
    return Upstream(parts.scheme, host=parts.hostname, port=port)  # type: ignore[arg-type]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every knob of trackrelay. Field ``x`` is read from ``TRACKRELAY_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # --- where mail goes, who may send ---
    upstream: str = ""
    upstream_user: str = ""
    upstream_password: SecretStr = SecretStr("")
    upstream_timeout: float = 60.0
    upstream_verify_tls: bool = True
    auth_mode: Literal["passthrough", "local", "none"] = "passthrough"
    trusted_networks: str = ""

    # --- listeners ---
    host: str = "127.0.0.1"
    smtp_port: int = Field(2525, ge=0, le=65535)
    smtps_port: int = Field(4650, ge=0, le=65535)
    plain_port: int | None = Field(None, ge=0, le=65535)
    http_port: int = Field(8080, ge=0, le=65535)
    hostname: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # --- limits ---
    max_message_size: int = Field(50 * 1024 * 1024, gt=0)
    max_recipients: int = Field(100, gt=0)
    idle_timeout: float = Field(300.0, gt=0)
    data_timeout: float = Field(600.0, gt=0)  # the longest one DATA upload (354 to dot) may take
    max_commands_without_mail: int = Field(100, gt=0)  # then 421 (NOOP/RSET loops)
    auth_failures_per_ip: int = Field(10, gt=0)
    auth_failures_per_user: int = Field(5, gt=0)
    auth_failure_window: float = Field(900.0, gt=0)
    relay_workers: int = Field(1, gt=0)  # processes for `trackrelay relay`, sharing the ports

    # --- SMTP sessions: limits and timeouts against one client taking the process down ---
    max_sessions: int = Field(300, gt=0)  # SMTP sessions per relay (all workers); more get 421
    max_sessions_per_ip: int = Field(50, gt=0)  # of those, from one client address
    greeting_timeout: float = Field(30.0, gt=0)  # the first command must come within this
    upstream_data_timeout: float = Field(600.0, gt=0)  # the upstream's reply to the final dot
    local_check_from_header: bool = False  # local mode: From: must be the user's too (553)

    # --- storage and secrets ---
    var_dir: Path = Path("./var")
    database_url: str = ""
    secret_key: SecretStr = SecretStr("")
    old_secret_keys: SecretStr = SecretStr("")

    # --- tracking ---
    public_url: str = ""
    tracking_header: str = "X-Track"

    # --- receiver ---
    operator_name: str = "the sender's organisation"
    operator_contact: str = ""
    store_full_ip: bool = False
    event_flush_interval: float = Field(0.1, gt=0)
    event_batch_size: int = Field(500, gt=0)
    receiver_workers: int = Field(1, gt=0)

    # --- webhooks and notifications ---
    webhook_timeout: float = Field(10.0, gt=0)  # seconds per delivery attempt
    webhook_retry_period: float = Field(3 * 86400.0, ge=0)  # give up this long after the event
    webhook_retry_base: float = Field(30.0, gt=0)  # first retry delay; doubles per attempt
    webhook_retry_max_interval: float = Field(3600.0, gt=0)  # ceiling of the retry delay
    webhook_poll_interval: float = Field(1.0, gt=0)  # how often the worker looks for due rows
    notify_from: str = ""  # From address of notification mail; empty = no notification mail

    # --- hardening of the web side (webhook targets, /metrics, the public form) ---
    webhook_allow_private: bool = False  # let webhooks reach loopback/private addresses
    metrics_public: bool = False  # /metrics for anyone; else loopback or the token only
    metrics_token: SecretStr = SecretStr("")  # `Authorization: Bearer ...` opens /metrics
    public_form_limit: int = Field(10, gt=0)  # "stop tracking me" requests per IP per window
    public_form_window: float = Field(600.0, gt=0)  # seconds those requests are counted

    # --- privacy ---
    retention_days: int = Field(395, ge=0)  # events and message details; 0 = keep forever
    purge_interval: float = Field(3600.0, gt=0)  # seconds between automatic purges

    # --- gateway mode (the organisation's MTA) and the Bcc commands ---
    gateway_port: int | None = Field(None, ge=0, le=65535)  # off unless set
    gateway_networks: str = ""  # CIDRs the organisation's MTA connects from
    gateway_client_names: str = ""  # TLS client certificate names accepted (empty: any)
    gateway_client_ca: Path | None = None  # CA for those certificates (besides the system's)
    gateway_require_tls: bool = False  # STARTTLS before MAIL
    gateway_domains: str = ""  # MAIL FROM domains the gateway carries
    gateway_upstream: str = ""  # the return path (default: TRACKRELAY_UPSTREAM)
    command_domain: str = "trackrelay.invalid"  # Bcc track@/opens@/clicks@/notrack@ here
    # --- answers: the intake listener (issue 15; relay/intake.py) ---
    intake_port: int | None = Field(None, ge=0, le=65535)  # off unless set
    intake_networks: str = ""  # CIDRs of the organisation's mail servers that send copies
    intake_max_size: int = Field(26_214_400, gt=0)  # largest copy accepted (bytes)
    # --- mailbox connections (OAuth 2.0; issue 16): [oauth.NAME] tables, shared/oauthproviders.py
    oauth: dict[str, Any] = {}  # NAME -> OAuthProvider, presets applied
    mailbox_refresh_margin: float = Field(300.0, ge=0)  # refresh access tokens this early (s)
    mailbox_lease: float = Field(30.0, gt=0)  # seconds one process may hold a grant's refresh
    # --- mailboxes over IMAP (issue 16; relay/imapsession.py, sentfolder.py, inboxwatch.py)
    imap_watch: bool = True  # serve/relay watch each ok connection's INBOX for answers
    imap_timeout: float = Field(30.0, gt=0)  # seconds for connecting and each IMAP command
    imap_poll_interval: float = Field(60.0, gt=0)  # seconds between looks without IDLE
    imap_idle_timeout: float = Field(600.0, gt=0)  # seconds one IDLE waits before renewing
    imap_backoff_max: float = Field(300.0, gt=0)  # longest wait before reconnecting (s)
    imap_sent_window: float = Field(30.0, ge=0)  # seconds to look for the provider's copies
    imap_sent_interval: float = Field(2.0, gt=0)  # seconds between looks into Sent

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file (model_config["toml_file"], set by load_settings) is
        # read last, so environment variables override it.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator("trusted_networks", "gateway_networks", "intake_networks")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        for item in _split(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a CIDR network") from exc
        return value

    @field_validator("oauth")
    @classmethod
    def _check_oauth(cls, value: dict[str, Any]) -> dict[str, Any]:
        from shared.oauthproviders import parse_providers  # it builds on parse_upstream

        return dict(parse_providers(value))

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected an http(s) base URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("tracking_header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        if not value or any(c in value for c in ": \t\r\n") or not value.isascii():
            raise ValueError(f"{value!r} is not a header field name")
        return value

    @field_validator("gateway_domains", "command_domain")
    @classmethod
    def _check_domains(cls, value: str) -> str:
        for item in _split(value):
            if not _DOMAIN.fullmatch(item):
                raise ValueError(f"{item!r} is not a domain name")
        return value.lower()

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        upstream = self.upstream_target  # raises with the setting's name
        self._check_gateway()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TRACKRELAY_TLS_CERT and TRACKRELAY_TLS_KEY go together")
        if not self.dev_mode:
            secret = self.secret_key.get_secret_value()
            if not secret or secret == DEFAULT_SECRET:
                raise ValueError(
                    f"TRACKRELAY_SECRET_KEY must be set to a random value when the upstream "
                    f"is a real server ({upstream})"
                )
            if self.auth_mode == "none" and not self.trusted_networks:
                raise ValueError("TRACKRELAY_AUTH_MODE=none needs TRACKRELAY_TRUSTED_NETWORKS")
        if self.auth_mode == "local" and not self.dev_mode and not self.upstream_user:
            raise ValueError("TRACKRELAY_AUTH_MODE=local needs TRACKRELAY_UPSTREAM_USER")
        return self

    def _check_gateway(self) -> None:
        _ = self.gateway_upstream_target  # raises with the setting's name
        if not self.command_domain or "," in self.command_domain:
            raise ValueError("TRACKRELAY_COMMAND_DOMAIN: expected one domain name")
        if self.gateway_port is None:
            return
        if not self.gateway_networks:
            raise ValueError(
                "TRACKRELAY_GATEWAY_NETWORKS: the gateway needs the networks of the "
                "organisation's MTA (CIDRs)"
            )
        if not self.gateway_domains:
            raise ValueError(
                "TRACKRELAY_GATEWAY_DOMAINS: the gateway needs the organisation's sender domains"
            )
        ca = self.gateway_client_ca
        if ca is not None and not ca.exists():
            raise ValueError(f"TRACKRELAY_GATEWAY_CLIENT_CA: no such file or directory: {ca}")
        if ca is not None and not self.gateway_client_names:
            raise ValueError(
                "TRACKRELAY_GATEWAY_CLIENT_CA needs TRACKRELAY_GATEWAY_CLIENT_NAMES "
                "(the certificate names to accept)"
            )

    @property
    def gateway_upstream_target(self) -> Upstream:
        """The gateway's return path: TRACKRELAY_GATEWAY_UPSTREAM, else the upstream."""
        if not self.gateway_upstream:
            return self.upstream_target
        try:
            return parse_upstream(self.gateway_upstream, self.var_dir)
        except ValueError as exc:
            raise ValueError(f"TRACKRELAY_GATEWAY_UPSTREAM: {exc}") from exc

    @property
    def gateway_network_list(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in _split(self.gateway_networks)]

    @property
    def gateway_client_name_list(self) -> list[str]:
        return [n.lower() for n in _split(self.gateway_client_names)]

    @property
    def gateway_domain_list(self) -> frozenset[str]:
        return frozenset(_split(self.gateway_domains))

    # --- derived values ---

    @property
    def upstream_target(self) -> Upstream:
        try:
            return parse_upstream(self.upstream or "maildir:", self.var_dir)
        except ValueError as exc:
            raise ValueError(f"TRACKRELAY_UPSTREAM: {exc}") from exc

    @property
    def dev_mode(self) -> bool:
        """No mail can leave the machine: no upstream, or a Maildir sink."""
        return not self.upstream or self.upstream.startswith("maildir:")

    @property
    def networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in _split(self.trusted_networks)]

    @property
    def intake_network_list(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in _split(self.intake_networks)]

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'trackrelay.db'}"

    @property
    def base_url(self) -> str:
        """The receiver's public base URL, as recipients reach it."""
        return self.public_url or f"http://{self.host}:{self.http_port}"

    @property
    def smtp_hostname(self) -> str:
        return self.hostname or self.host

    def public_url_problem(self) -> str:
        """Why recipients may not reach the links in tracked mail ('' if all is well).

        Dev mode keeps mail on this machine, so anything goes there. With a real
        upstream, links and pixels point at :attr:`base_url`: without
        TRACKRELAY_PUBLIC_URL that is this host's listening address (loopback or
        ``0.0.0.0``), dead links for every recipient.
        """
        if self.dev_mode:
            return ""
        if not self.public_url:
            return (
                f"TRACKRELAY_PUBLIC_URL is not set: links and pixels in tracked mail point at "
                f"{self.base_url}, which recipients cannot reach"
            )
        if self.public_url.startswith("http://"):
            return (
                "TRACKRELAY_PUBLIC_URL is http://: recipients' clicks and opens travel "
                "unencrypted and many mail clients block http images; use https://"
            )
        return ""

    def signing_keys(self) -> list[bytes]:
        """The current secret first, then older ones that still verify."""
        keys = [self.secret_key.get_secret_value()]
        keys += _split(self.old_secret_keys.get_secret_value())
        return [k.encode() for k in keys if k]


_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}", re.I)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; on a bad value raise SettingsError naming the setting."""
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"--config: no such file: {config_file}")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        settings = cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None
    except ValueError as exc:  # a TOML syntax error
        raise SettingsError(f"--config {config_file}: {exc}") from None
    return ensure_dev_secret(settings)


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith(("TRACKRELAY_", "[oauth.")):
        return message
    field = ".".join(str(part) for part in error["loc"]) or "settings"
    if error["type"] == "extra_forbidden":
        return f"unknown setting {field!r} in the config file"
    return f"{ENV_PREFIX}{field.upper()}: {message}"


def ensure_dev_secret(settings: Settings) -> Settings:
    """In dev mode, create and keep a random secret under var_dir if none is set."""
    if settings.secret_key.get_secret_value() or not settings.dev_mode:
        return settings
    path = settings.var_dir / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return settings.model_copy(update={"secret_key": SecretStr(path.read_text().strip())})
