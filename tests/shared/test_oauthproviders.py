"""[oauth.NAME] tables in the TOML config: presets, endpoints, errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import SettingsError, load_settings
from shared.oauthproviders import OAuthProvider


def settings_from(tmp_path: Path, toml: str) -> dict[str, OAuthProvider]:
    config = tmp_path / "trackrelay.toml"
    config.write_text(toml)
    return load_settings(config, var_dir=tmp_path).oauth


def test_microsoft_preset_fills_all_but_the_client_and_takes_a_tenant(tmp_path: Path) -> None:
    providers = settings_from(
        tmp_path, '[oauth.microsoft]\nclient_id = "app-1"\ntenant = "contoso.example"\n'
    )
    ms = providers["microsoft"]
    base = "https://login.microsoftonline.com/contoso.example/oauth2/v2.0"
    assert ms.preset == "microsoft"
    assert ms.token_endpoint == base + "/token"
    assert ms.authorization_endpoint == base + "/authorize"
    assert ms.device_authorization_endpoint == base + "/devicecode"
    assert ms.scopes == [
        "https://outlook.office.com/SMTP.Send",
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "offline_access",
    ]
    assert str(ms.smtp_target) == "smtp+starttls://smtp.office365.com:587"
    assert ms.imap == "imaps://outlook.office365.com:993"
    assert ms.sent_delete == "expunge"
    assert ms.client_secret.get_secret_value() == ""


def test_google_preset_and_a_second_microsoft_tenant_by_preset(tmp_path: Path) -> None:
    providers = settings_from(
        tmp_path,
        '[oauth.google]\nclient_id = "g"\nclient_secret = "s"\n'
        '[oauth.work]\npreset = "microsoft"\nclient_id = "m"\n',
    )
    google = providers["google"]
    assert google.authorization_endpoint.startswith("https://accounts.google.com/")
    assert google.scopes == ["https://mail.google.com/"]
    assert str(google.smtp_target) == "smtp+starttls://smtp.gmail.com:587"
    assert google.imap == "imaps://imap.gmail.com:993"
    assert google.sent_delete == "trash"  # expunging in Sent only takes the label off
    assert google.client_secret.get_secret_value() == "s"
    assert providers["work"].token_endpoint.startswith("https://login.microsoftonline.com/common/")


def test_a_generic_provider_by_issuer_or_endpoints(tmp_path: Path) -> None:
    providers = settings_from(
        tmp_path,
        '[oauth.corp]\nissuer = "https://id.corp.example/"\nclient_id = "c"\n'
        'scopes = ["mail", "offline_access"]\nsmtp = "smtps://mail.corp.example:465"\n'
        '[oauth.lab]\ntoken_endpoint = "http://127.0.0.1:9/token"\nclient_id = "l"\n'
        'smtp = "smtp://127.0.0.1:2525"\nimap = "imap://127.0.0.1:1143"\n',
    )
    assert providers["corp"].issuer == "https://id.corp.example"
    assert providers["corp"].scope == "mail offline_access"
    assert providers["lab"].smtp_target.port == 2525


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('[oauth.x]\nclient_id = "c"\nsmtp = "smtps://m.example"\n', "[oauth.x] set issuer"),
        ('[oauth.google]\nclient_secret = "s"\n', "[oauth.google] client_id: is required"),
        (
            '[oauth.x]\nclient_id = "c"\nissuer = "https://i.example"\n',
            "[oauth.x] smtp: is required",
        ),
        (
            '[oauth.google]\nclient_id = "c"\nsmtp = "smtp://mail.example:25"\n',
            "[oauth.google] smtp: plaintext smtp:// is only allowed to a loopback address",
        ),
        (
            '[oauth.google]\nclient_id = "c"\ntoken_endpoint = "http://id.example/t"\n',
            "[oauth.google] token_endpoint: expected an https:// URL",
        ),
        (
            '[oauth.google]\nclient_id = "c"\nimap = "imap://imap.example"\n',
            "[oauth.google] imap: plaintext imap://",
        ),
        ('[oauth.google]\nclient_id = "c"\nclientid = "d"\n', "[oauth.google] clientid: is not"),
        ('[oauth.x]\npreset = "yahoo"\nclient_id = "c"\n', "[oauth.x] preset:"),
        ('[oauth.google]\nclient_id = "c"\nsent_delete = "bin"\n', "[oauth.google] sent_delete:"),
    ],
)
def test_a_bad_provider_table_is_one_line_naming_the_key(
    tmp_path: Path, toml: str, error: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from(tmp_path, toml)
    assert str(caught.value).startswith(error), str(caught.value)
    assert "\n" not in str(caught.value)


def test_app_passwords_google_yes_microsoft_no_and_a_password_only_provider(
    tmp_path: Path,
) -> None:
    providers = settings_from(
        tmp_path,
        '[oauth.google]\nclient_id = "g"\n'
        '[oauth.microsoft]\nclient_id = "m"\n'
        '[oauth.fast]\napp_passwords = true\nsmtp = "smtps://smtp.fastmail.com:465"\n'
        'imap = "imaps://imap.fastmail.com:993"\n',
    )
    assert providers["google"].app_passwords is True
    assert providers["google"].password_only is False  # OAuth too
    assert providers["microsoft"].app_passwords is False
    fast = providers["fast"]
    assert (fast.app_passwords, fast.password_only) == (True, True)
    assert fast.client_id == ""
    assert str(fast.smtp_target) == "smtps://smtp.fastmail.com:465"


def test_a_preset_gives_way_to_the_tables_app_passwords(tmp_path: Path) -> None:
    providers = settings_from(tmp_path, '[oauth.google]\nclient_id = "g"\napp_passwords = false\n')
    assert providers["google"].app_passwords is False


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        # no app_passwords: an OAuth table, the client is required as before
        ('[oauth.fast]\nsmtp = "smtps://m.example"\n', "[oauth.fast] client_id: is required"),
        ("[oauth.fast]\napp_passwords = true\n", "[oauth.fast] smtp: is required"),
        (
            '[oauth.fast]\napp_passwords = "yes"\nsmtp = "smtps://m.example"\n',
            "[oauth.fast] app_passwords: Input should be a valid boolean",
        ),
        (
            '[oauth.fast]\napp_passwords = true\nsmtp = "smtp://mail.example:25"\n',
            "[oauth.fast] smtp: plaintext smtp:// is only allowed to a loopback address",
        ),
        (
            '[oauth.fast]\napp_passwords = true\nsmtp = "smtps://m.example"\n'
            'imap = "imap://mail.example:143"\n',
            "[oauth.fast] imap: plaintext imap://",
        ),
        # a client without where to use it is still an OAuth table missing its endpoints
        (
            '[oauth.fast]\napp_passwords = true\nclient_id = "c"\nsmtp = "smtps://m.example"\n',
            "[oauth.fast] set issuer",
        ),
        (
            '[oauth.fast]\napp_passwords = true\nissuer = "https://id.example"\n'
            'smtp = "smtps://m.example"\n',
            "[oauth.fast] client_id: is required",
        ),
    ],
)
def test_a_bad_app_password_table_is_one_line_naming_the_key(
    tmp_path: Path, toml: str, error: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from(tmp_path, toml)
    assert str(caught.value).startswith(error), str(caught.value)
    assert "\n" not in str(caught.value)
