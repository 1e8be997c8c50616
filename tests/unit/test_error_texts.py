"""Texts that log lines and session outcomes give for exceptions, empty ones included."""

from __future__ import annotations

import errno
import os
import ssl

import pytest

from appliance.logs import describe_error
from appliance.proxy.upstream import describe_tls_error


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ConnectionResetError(), "connection closed by the client"),
        (BrokenPipeError(), "connection closed by the client"),
        (ConnectionAbortedError(), "connection aborted"),
        (ConnectionRefusedError(), "connection refused"),
        (TimeoutError(), "timed out"),
        (ConnectionError(), "connection failed"),
        (RuntimeError(), "RuntimeError"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_empty_error_named_by_type(error: BaseException, text: str) -> None:
    assert describe_error(error, "client") == text


def test_error_number_text_preferred() -> None:
    error = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    assert describe_error(error) == os.strerror(errno.ECONNRESET)


def test_error_message_kept() -> None:
    error = ConnectionAbortedError("SSL handshake is taking longer than 5 seconds")
    assert describe_error(error) == "SSL handshake is taking longer than 5 seconds"


def test_unnamed_peer_called_peer() -> None:
    assert describe_error(ConnectionResetError()) == "connection closed by the peer"


def test_tls_reset_names_client() -> None:
    # asyncio raises the bare class when the client ends the stream mid-handshake.
    text = describe_tls_error(ConnectionResetError(), "client")
    assert text == "TLS handshake failed: connection closed by the client"


def test_tls_reset_names_server_by_default() -> None:
    text = describe_tls_error(ConnectionResetError())
    assert text == "TLS handshake failed: connection closed by the server"


def test_tls_text_never_ends_in_separator() -> None:
    for error in (ConnectionResetError(), ConnectionError(), OSError()):
        text = describe_tls_error(error, "client")
        assert not text.endswith((":", " ")), text
        assert "  " not in text, text


def test_tls_error_uses_openssl_reason() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    assert describe_tls_error(error) == "TLS handshake failed: WRONG_VERSION_NUMBER"
