"""SASL PLAIN (RFC 4616) and LOGIN exchange helpers shared by IMAP and POP3.

Each SASL step travels as base64 text (RFC 4422). Error messages never contain the
input, because the decoded bytes carry the password.
"""

import base64
import binascii

from appliance.protocols.errors import ClientProtocolError

# The server's two SASL LOGIN challenges: base64 of "Username:" and "Password:".
# Clients send the user name after the first and the password after the second,
# whatever their text.
LOGIN_CHALLENGES = (base64.b64encode(b"Username:"), base64.b64encode(b"Password:"))


def encode_base64(data: bytes) -> bytes:
    return base64.b64encode(data)


def decode_login_step(data: bytes) -> bytes:
    """Decode one base64 step of SASL LOGIN: the user name or the password."""
    return _decode_base64(data)


def decode_plain(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Decode a PLAIN response into (authzid, authcid, password).

    Raises ClientProtocolError for invalid base64, for a message without exactly two
    NUL separators, and for an empty authcid or password.
    """
    message = _decode_base64(data)
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise ClientProtocolError("invalid PLAIN response")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise ClientProtocolError("invalid PLAIN response")
    return authzid, authcid, password


def encode_plain(authcid: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    """Build the base64 PLAIN response; raises ValueError if a part contains NUL."""
    if b"\0" in authcid or b"\0" in password or b"\0" in authzid:
        raise ValueError("SASL PLAIN values must not contain NUL")
    return encode_base64(b"\0".join((authzid, authcid, password)))


def initial_response_user(mechanism: str, initial: bytes | None) -> bytes | None:
    """Return the user name in a PLAIN or LOGIN initial response (RFC 4959, RFC 5034).

    Returns None for another mechanism and for a response that is missing, empty
    ("=") or invalid. The password of a PLAIN response is never returned.
    """
    if initial is None or initial == b"=":
        return None
    try:
        if mechanism == "PLAIN":
            return decode_plain(initial)[1]
        if mechanism == "LOGIN":
            return decode_login_step(initial) or None
    except ClientProtocolError:
        return None
    return None


def is_cancel(line: bytes) -> bool:
    """Return whether a client's SASL response is "*", which aborts the exchange."""
    return line.rstrip(b"\r\n") == b"*"


def _decode_base64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientProtocolError("invalid base64") from None
