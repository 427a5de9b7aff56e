"""The dashboard's ``client``: the app on the seeded database (tests/support/dashboardkit.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver.app import create_app
from shared.config import Settings
from tests.support.dashboardkit import seed


@pytest.fixture
def client(engine: Engine, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The app on the seeded database, in a TestClient (lifespan running)."""
    seed(engine)
    with TestClient(create_app(make_settings(), engine)) as client:
        yield client
