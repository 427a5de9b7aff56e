from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.tokens import InvalidToken, Signer, new_message_id

KEY = b"k" * 32
signer = Signer([KEY])


def test_open_token_round_trip() -> None:
    message_id = new_message_id()
    token = signer.open_token(message_id, recipient=3)
    assert signer.verify_open(token).message_id == message_id
    assert signer.verify_open(token).recipient == 3
    assert len(token) < 50


@given(
    st.integers(1, 2**63 - 1),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.text(max_size=300),
)
def test_click_token_round_trip(message_id: int, recipient: int, link: int, url: str) -> None:
    token = signer.click_token(message_id, recipient, link, url)
    assert token.isascii()
    assert "=" not in token
    click = signer.verify_click(token)
    assert (click.message_id, click.recipient, click.link, click.url) == (
        message_id,
        recipient,
        link,
        url,
    )


def test_long_urls_are_deflated() -> None:
    url = "https://example.com/path?" + "&".join(f"utm_param{i}=value{i}" for i in range(40))
    assert len(signer.click_token(1, 0, 1, url)) < len(url)


def test_kind_swap_is_refused() -> None:
    with pytest.raises(InvalidToken):
        signer.verify_click(signer.open_token(5))
    with pytest.raises(InvalidToken):
        signer.verify_open(signer.click_token(5, 0, 1, "https://example.com/"))


def test_forged_and_truncated_tokens_are_refused() -> None:
    token = signer.click_token(5, 0, 1, "https://example.com/")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[15] ^= 1
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    for bad in (forged, token[:-2], token[:20], "", "!!!", "é"):
        with pytest.raises(InvalidToken):
            signer.verify_click(bad)
    with pytest.raises(InvalidToken):
        Signer([b"another key"]).verify_click(token)


def test_old_keys_keep_verifying_after_rotation() -> None:
    old_token = Signer([b"old"]).open_token(9)
    rotated = Signer([b"new", b"old"])
    assert rotated.verify_open(old_token).message_id == 9
    assert Signer([b"new"]).verify_open(rotated.open_token(9)).message_id == 9


@given(st.binary(min_size=1, max_size=200), st.sampled_from([1, 2]), st.binary(max_size=300))
def test_precomputed_hmac_equals_the_stdlib(key: bytes, kind: int, payload: bytes) -> None:
    from shared.tokens import _KeyedMac, _mac

    assert _KeyedMac(key)(kind, payload) == _mac(key, kind, payload)
