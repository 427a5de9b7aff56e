"""trackrelay/serve.py: what a process does for itself at start."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from tests.support.relaykit import MakeSettings
from trackrelay.serve import raise_open_file_limit


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    """This process's soft open-file limit lowered to 1024 (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(
    low_soft_limit: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="trackrelay.serve"):
        limit = raise_open_file_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == limit
    if low_soft_limit != resource.RLIM_INFINITY:
        assert limit == low_soft_limit
    assert f"open-file limit raised from 1024 to {limit}" in caplog.text


def test_a_limit_too_low_for_the_sessions_is_a_warning(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    settings = make_settings(max_sessions=soft)
    with caplog.at_level(logging.WARNING, logger="trackrelay.serve"):
        raise_open_file_limit(settings)
    assert f"TRACKRELAY_MAX_SESSIONS={soft} may use" in caplog.text
