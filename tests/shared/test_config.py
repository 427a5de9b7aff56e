from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import Settings, SettingsError, load_settings
from trackrelay.serve import banner


def test_defaults_are_dev_mode_with_a_kept_secret(tmp_path: Path) -> None:
    settings = load_settings(var_dir=tmp_path)
    assert settings.dev_mode
    assert settings.upstream_target.is_sink
    assert settings.upstream_target.path == tmp_path / "outbox"
    assert settings.db_url == f"sqlite:///{tmp_path / 'trackrelay.db'}"
    secret = settings.secret_key.get_secret_value()
    assert len(secret) >= 32
    assert load_settings(var_dir=tmp_path).secret_key.get_secret_value() == secret


@pytest.mark.parametrize(
    ("value", "scheme", "host", "port"),
    [
        ("smtp+starttls://mail.example.com", "smtp+starttls", "mail.example.com", 587),
        ("smtps://mail.example.com:2465", "smtps", "mail.example.com", 2465),
        ("smtp://127.0.0.1:2526", "smtp", "127.0.0.1", 2526),
    ],
)
def test_upstream_urls(value: str, scheme: str, host: str, port: int) -> None:
    target = load_settings(upstream=value, secret_key="s" * 32).upstream_target
    assert (target.scheme, target.host, target.port) == (scheme, host, port)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"upstream": "smtp://mail.example.com:25", "secret_key": "x" * 32}, "TRACKRELAY_UPSTREAM"),
        ({"upstream": "ftp://x"}, "TRACKRELAY_UPSTREAM"),
        ({"upstream": "smtps://mail.example.com"}, "TRACKRELAY_SECRET_KEY"),
        (
            {"upstream": "smtps://mail.example.com", "secret_key": "change-me"},
            "TRACKRELAY_SECRET_KEY",
        ),
        ({"smtp_port": 70000}, "TRACKRELAY_SMTP_PORT"),
        ({"trusted_networks": "10.0.0.0/8, nonsense"}, "TRACKRELAY_TRUSTED_NETWORKS"),
        ({"auth_mode": "open"}, "TRACKRELAY_AUTH_MODE"),
        ({"public_url": "track.example.com"}, "TRACKRELAY_PUBLIC_URL"),
        ({"tls_cert": "/x.pem"}, "TRACKRELAY_TLS_CERT"),
    ],
)
def test_invalid_settings_name_the_setting(
    tmp_path: Path, overrides: dict[str, object], names: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(var_dir=tmp_path, **overrides)
    message = str(info.value)
    assert names in message
    assert "\n" not in message


def test_toml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "trackrelay.toml"
    config.write_text(f'smtp_port = 2600\nhttp_port = 9000\nvar_dir = "{tmp_path}"\n')
    monkeypatch.setenv("TRACKRELAY_HTTP_PORT", "9100")
    settings = load_settings(config)
    assert settings.smtp_port == 2600
    assert settings.http_port == 9100


def test_unknown_key_in_toml_is_named(tmp_path: Path) -> None:
    config = tmp_path / "trackrelay.toml"
    config.write_text("smtp_prot = 25\n")
    with pytest.raises(SettingsError, match="smtp_prot"):
        load_settings(config)


def test_cli_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    env = {"TRACKRELAY_SMTP_PORT": "many", "TRACKRELAY_VAR_DIR": str(tmp_path), "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-m", "trackrelay", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "TRACKRELAY_SMTP_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_public_url_problems_outside_dev_mode(tmp_path: Path) -> None:
    """With a real upstream, tracked mail must point at a URL recipients can reach."""
    real = {"var_dir": tmp_path, "secret_key": "s" * 32, "upstream": "smtps://mail.example:465"}
    assert load_settings(var_dir=tmp_path).public_url_problem() == ""  # dev mode
    missing = load_settings(**real, host="0.0.0.0").public_url_problem()
    assert "TRACKRELAY_PUBLIC_URL is not set" in missing
    assert "http://0.0.0.0:8080" in missing
    assert "https://" in load_settings(**real, public_url="http://t.example").public_url_problem()
    assert load_settings(**real, public_url="https://t.example").public_url_problem() == ""
    lines = banner(load_settings(**real), None, receiver=True)
    assert any(line.startswith("  WARNING: TRACKRELAY_PUBLIC_URL is not set") for line in lines)


def test_the_readme_settings_tables_list_every_setting_once() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `TRACKRELAY_")]
    listed = [name for row in rows for name in re.findall(r"`(TRACKRELAY_\w+)`", row.split("|")[1])]
    settings = {f"TRACKRELAY_{name.upper()}" for name in Settings.model_fields}
    assert sorted(settings - set(listed)) == []  # undocumented
    assert sorted(set(listed) - settings) == []  # documented, but no such setting
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("command", ["relay", "serve"])
def test_a_relay_for_real_mail_refuses_to_start_without_a_public_url(
    tmp_path: Path, command: str
) -> None:
    """Links to this host's listening address would be dead for every recipient."""
    env = {
        "TRACKRELAY_VAR_DIR": str(tmp_path),
        "TRACKRELAY_SECRET_KEY": "s" * 32,
        "TRACKRELAY_UPSTREAM": "smtps://mail.example:465",
        "PATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "trackrelay", command],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "TRACKRELAY_PUBLIC_URL is not set" in result.stderr
    assert "set TRACKRELAY_PUBLIC_URL to the receiver's public https:// address" in result.stderr
    assert "Traceback" not in result.stderr
