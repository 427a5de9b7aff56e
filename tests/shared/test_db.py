"""shared/db.py: migrations at start say what they did and nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared import db


def test_upgrade_logs_only_the_migrations_it_ran(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with caplog.at_level(logging.INFO):
        db.upgrade(url)
    assert [r.getMessage() for r in caplog.records][:1] == [
        "Running upgrade  -> 0001, initial schema"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        db.upgrade(url)  # every later start: already up to date, nothing to say
    assert caplog.records == []
