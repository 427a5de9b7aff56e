"""Dev mode keeps ./var private (shared/devsetup.py private_var_dir)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from shared.config import load_settings
from shared.devsetup import private_var_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_dev_mode_command_makes_var_700_and_its_files_600(tmp_path: Path) -> None:
    """The SQLite database was 644: readable by every account on the machine."""
    var = tmp_path / "var"
    (var / "journal").mkdir(parents=True)
    (var / "journal" / "old.jsonl").write_text("{}\n")
    (var / "journal" / "old.jsonl").chmod(0o644)
    var.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", ""), "TRACKRELAY_VAR_DIR": str(var)}
    done = subprocess.run(
        [sys.executable, "-m", "trackrelay", "user", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert mode(var) == 0o700
    assert mode(var / "trackrelay.db") == 0o600
    assert mode(var / "secret_key") == 0o600
    assert mode(var / "journal") == 0o700
    assert mode(var / "journal" / "old.jsonl") == 0o600


def test_outside_dev_mode_nothing_is_changed(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    var.chmod(0o755)
    settings = load_settings(var_dir=var, secret_key="s" * 32, upstream="smtps://mail.example:465")
    private_var_dir(settings)
    assert mode(var) == 0o755


def test_the_server_umask_makes_new_files_600(tmp_path: Path) -> None:
    """serve/relay/receiver: files their processes make later (journal, Maildir) are 600."""
    before = os.umask(0o022)
    try:
        private_var_dir(load_settings(var_dir=tmp_path / "var"), umask=True)
        made = tmp_path / "var" / "new.db"
        made.write_text("x")
        assert mode(made) == 0o600
    finally:
        os.umask(before)
