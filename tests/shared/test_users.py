"""User storage rules shared by the CLI and the dashboard."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from shared.users import (
    UserError,
    add_user,
    check_removable,
    check_username,
    normalize_addresses,
    update_user,
    user_by_id,
)


def test_update_keeps_an_administrator(engine: Engine) -> None:
    ada = add_user(engine, "ada", "password123", "admin")
    tina = add_user(engine, "tina", "password123", "sender", ["tina@example.com"])
    assert ada.id is not None
    assert tina.id is not None
    update_user(
        engine, tina.id, role="admin", addresses=["@Team.example", "tina@example.com"],
        acting_user_id=ada.id,
    )  # fmt: skip
    found = user_by_id(engine, tina.id)
    assert found is not None
    assert found[0].role == "admin"
    assert found[1] == ["@team.example", "tina@example.com"]
    with pytest.raises(UserError, match="your own administrator role") as caught:
        update_user(engine, ada.id, role="sender", addresses=[], acting_user_id=ada.id)
    assert caught.value.field == "role"
    update_user(engine, tina.id, role="sender", addresses=[], acting_user_id=ada.id)
    with pytest.raises(UserError, match="at least one administrator"):
        update_user(engine, ada.id, role="sender", addresses=[], acting_user_id=tina.id)
    with pytest.raises(UserError, match="remove yourself"):
        check_removable(engine, ada.id, acting_user_id=ada.id)
    with pytest.raises(UserError, match="at least one administrator"):
        check_removable(engine, ada.id, acting_user_id=tina.id)
    assert check_removable(engine, tina.id, acting_user_id=ada.id).username == "tina"
    with pytest.raises(UserError, match="no longer exists"):
        check_removable(engine, 999, acting_user_id=ada.id)
    with pytest.raises(UserError, match="needs at least 8 characters"):
        update_user(engine, tina.id, role="sender", addresses=[], password="short")


def test_addresses_and_usernames() -> None:
    assert normalize_addresses(["A@B.example", "a@b.example", "@C.example"]) == [
        "a@b.example",
        "@c.example",
    ]
    with pytest.raises(UserError, match="not an address or @domain: x, y@z") as caught:
        normalize_addresses(["ok@example.com", "x", "y@z"])
    assert caught.value.field == "addresses"
    for name in ("", "two words", "x" * 256):
        with pytest.raises(UserError) as caught:
            check_username(name)
        assert caught.value.field == "username"
