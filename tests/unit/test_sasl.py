"""SASL PLAIN and LOGIN helpers."""

from __future__ import annotations

import base64

import pytest

from appliance.protocols.errors import ClientProtocolError
from appliance.protocols.sasl import (
    decode_login_step,
    decode_plain,
    encode_base64,
    encode_plain,
    initial_response_user,
    is_cancel,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_plain_without_authzid() -> None:
    assert decode_plain(b64(b"\0alice\0secret")) == (b"", b"alice", b"secret")


def test_plain_with_authzid() -> None:
    assert decode_plain(b64(b"admin\0alice\0secret")) == (b"admin", b"alice", b"secret")


def test_plain_keeps_utf8_and_spaces() -> None:
    message = b'\0j\xc3\xb6rg\0p a"s\\s'

    assert decode_plain(b64(message)) == (b"", b"j\xc3\xb6rg", b'p a"s\\s')


@pytest.mark.parametrize(
    "data",
    [b"not base64!", b"YWJj\n", b"YQ", b"=", b"\xff\xfe"],
    ids=["punctuation", "trailing LF", "missing padding", "empty marker", "8-bit"],
)
def test_plain_rejects_invalid_base64(data: bytes) -> None:
    with pytest.raises(ClientProtocolError, match="invalid base64"):
        decode_plain(data)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"alice\0hunter2",
        b"\0alice\0hunter2\0",
        b"\0\0hunter2",
        b"\0alice\0",
    ],
    ids=["empty", "one NUL", "three NULs", "empty authcid", "empty password"],
)
def test_plain_rejects_invalid_message(message: bytes) -> None:
    with pytest.raises(ClientProtocolError, match="invalid PLAIN response") as caught:
        decode_plain(b64(message))

    assert "hunter2" not in str(caught.value)


def test_plain_errors_are_not_fatal() -> None:
    with pytest.raises(ClientProtocolError) as caught:
        decode_plain(b"!")

    assert caught.value.fatal is False


def test_encode_plain_round_trip() -> None:
    encoded = encode_plain(b"alice", b"s\xc3\xa9cret", authzid=b"admin")

    assert decode_plain(encoded) == (b"admin", b"alice", b"s\xc3\xa9cret")


def test_encode_plain_without_authzid() -> None:
    assert encode_plain(b"alice", b"secret") == b"AGFsaWNlAHNlY3JldA=="


def test_encode_plain_rejects_nul() -> None:
    with pytest.raises(ValueError):
        encode_plain(b"alice", b"se\0cret")


def test_login_step_decodes() -> None:
    assert decode_login_step(b"YWxpY2U=") == b"alice"


def test_login_step_allows_empty() -> None:
    assert decode_login_step(b"") == b""


def test_login_step_rejects_invalid_base64() -> None:
    with pytest.raises(ClientProtocolError, match="invalid base64"):
        decode_login_step(b"YWxpY2U")


def test_encode_base64() -> None:
    assert encode_base64(b"Username:") == b"VXNlcm5hbWU6"


@pytest.mark.parametrize(
    ("line", "cancel"),
    [(b"*", True), (b"*\r\n", True), (b"**", False), (b"", False), (b"Kg==", False)],
)
def test_is_cancel(line: bytes, cancel: bool) -> None:
    assert is_cancel(line) is cancel


@pytest.mark.parametrize(
    ("mechanism", "initial", "user"),
    [
        ("PLAIN", base64.b64encode(b"\0jo\0pw"), b"jo"),
        ("PLAIN", base64.b64encode(b"admin\0jo\0pw"), b"jo"),
        ("PLAIN", base64.b64encode(b"jo\0pw"), None),
        ("PLAIN", b"not*base64!", None),
        ("PLAIN", b"=", None),
        ("PLAIN", None, None),
        ("LOGIN", base64.b64encode(b"jo"), b"jo"),
        ("LOGIN", b"", None),
        ("CRAM-MD5", base64.b64encode(b"jo"), None),
    ],
)
def test_initial_response_user(mechanism, initial, user):
    assert initial_response_user(mechanism, initial) == user
