"""Builders for the IMAP lines that the proxy sends to clients and to servers.

Every builder validates its input and raises ValueError rather than emit CR, LF or NUL
where they could end a line early and inject a command or a response. Functions that
may send a synchronizing literal return a list of pieces: the sender writes a piece,
waits for the server's "+" continuation request, then writes the next piece.
"""

from __future__ import annotations

import re

from appliance.protocols.imap.commands import is_valid_tag
from appliance.protocols.imap.responses import Response
from appliance.protocols.sasl import encode_plain

# ATOM-CHAR of RFC 3501, for status words, response keywords and capabilities.
_ATOM_RE = re.compile(r"[\x21\x23\x24\x26\x27\x2b-\x5b\x5e-\x7a\x7c-\x7e]+")
_LINE_BREAK_OR_NUL_RE = re.compile(r"[\x00\r\n]")
_BYTES_LINE_BREAK_OR_NUL_RE = re.compile(rb"[\x00\r\n]")
_QUOTABLE_RE = re.compile(rb"[\x20-\x7e]*")
_CODE_RE = re.compile(r"[^\x00\r\n\]]+")

# Limits of the ID command from RFC 2971, section 3.3.
_MAX_ID_FIELDS = 30
_MAX_ID_FIELD_NAME = 30
_MAX_ID_FIELD_VALUE = 1024


def format_tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """Build a tagged status response such as b"a1 NO [PRIVACYREQUIRED] text\\r\\n"."""
    _check_tag(tag)
    return _format_status_line(tag, status, text, code)


def format_untagged(
    status_or_keyword: str, text: str, code: str | None = None
) -> bytes:
    """Build an untagged response such as b"* OK [ALERT] text\\r\\n"."""
    return _format_status_line("*", status_or_keyword, text, code)


def format_capability(caps: list[str]) -> bytes:
    """Build b"* CAPABILITY A B\\r\\n" from capability names."""
    return format_untagged("CAPABILITY", " ".join(_check_capabilities(caps)))


def format_continuation(text: str = "") -> bytes:
    """Build a continuation request b"+ text\\r\\n"."""
    _check_text(text)
    return b"+ " + text.encode("utf-8") + b"\r\n"


def replace_capability_code(response: Response, caps: list[str]) -> bytes:
    """Return the response's raw bytes with its [CAPABILITY ...] code replaced.

    Every other byte stays as the server sent it. Raises ValueError when the response
    has no CAPABILITY response code.
    """
    code = response.code
    if code is None or code.split(" ", 1)[0].upper() != "CAPABILITY":
        raise ValueError("response has no CAPABILITY response code")
    raw = response.raw
    # A response code follows "tag SP status SP", or "+ " in a continuation request.
    if response.kind == "continuation":
        start = 2
    else:
        start = raw.index(b" ", raw.index(b" ") + 1) + 1
    end = raw.index(b"]", start)
    words = ["CAPABILITY", *_check_capabilities(caps)]
    replacement = "[" + " ".join(words) + "]"
    return raw[:start] + replacement.encode("ascii") + raw[end + 1 :]


def astring(value: bytes, *, literal_plus: bool) -> list[bytes]:
    """Encode value as an IMAP quoted string, or as a literal when it is not 7-bit.

    Atoms are never used, so no value is read as NIL or as a keyword. A synchronizing
    literal yields two pieces: b"{n}\\r\\n", then the value after the server's "+".
    Raises ValueError for NUL, CR or LF, which LOGIN arguments cannot carry.
    """
    if _BYTES_LINE_BREAK_OR_NUL_RE.search(value):
        raise ValueError("IMAP string must not contain NUL, CR or LF")
    if _QUOTABLE_RE.fullmatch(value):
        return [_quoted(value)]
    if literal_plus:
        return [b"{%d+}\r\n" % len(value) + value]
    return [b"{%d}\r\n" % len(value), value]


def format_login(
    tag: str, user: bytes, password: bytes, *, literal_plus: bool
) -> list[bytes]:
    """Build a LOGIN command as pieces, split where a synchronizing literal waits."""
    _check_tag(tag)
    arguments = [
        astring(user, literal_plus=literal_plus),
        astring(password, literal_plus=literal_plus),
    ]
    return _join_pieces(f"{tag} LOGIN".encode("ascii"), arguments)


def format_authenticate_plain(
    tag: str, user: bytes, password: bytes, *, sasl_ir: bool
) -> list[bytes]:
    """Build AUTHENTICATE PLAIN as pieces, with the response inline if SASL-IR.

    Without SASL-IR (RFC 4959) the second piece is the base64 line that the sender
    writes after the server's "+".
    """
    _check_tag(tag)
    command = f"{tag} AUTHENTICATE PLAIN".encode("ascii")
    response = encode_plain(user, password)
    if sasl_ir:
        return [command + b" " + response + b"\r\n"]
    return [command + b"\r\n", response + b"\r\n"]


def format_id(tag: str, fields: dict[str, str | None]) -> bytes:
    """Build an ID command (RFC 2971); a None value is sent as NIL.

    Raises ValueError for more than 30 fields, field names that differ only in case,
    a field name over 30 bytes, a value over 1024 bytes, or text that is not printable
    7-bit ASCII.
    """
    _check_tag(tag)
    if not fields:
        return f"{tag} ID NIL\r\n".encode("ascii")
    if len(fields) > _MAX_ID_FIELDS:
        raise ValueError(f"ID takes at most {_MAX_ID_FIELDS} fields")
    # Field names are case-insensitive, and each may be sent only once.
    if len({name.lower() for name in fields}) != len(fields):
        raise ValueError("ID field names must differ in more than case")
    items: list[bytes] = []
    for name, value in fields.items():
        items.append(_id_string(name, _MAX_ID_FIELD_NAME))
        if value is None:
            items.append(b"NIL")
        else:
            items.append(_id_string(value, _MAX_ID_FIELD_VALUE))
    return f"{tag} ID (".encode("ascii") + b" ".join(items) + b")\r\n"


def _format_status_line(prefix: str, word: str, text: str, code: str | None) -> bytes:
    if not _ATOM_RE.fullmatch(word):
        raise ValueError("response status or keyword must be an atom")
    parts = [prefix, word]
    if code is not None:
        if not _CODE_RE.fullmatch(code):
            raise ValueError("response code must not be empty or contain ], CR or LF")
        parts.append(f"[{code}]")
    if text:
        _check_text(text)
        parts.append(text)
    return (" ".join(parts) + "\r\n").encode("utf-8")


def _join_pieces(head: bytes, arguments: list[list[bytes]]) -> list[bytes]:
    pieces = [head]
    for argument in arguments:
        pieces[-1] += b" " + argument[0]
        pieces.extend(argument[1:])
    pieces[-1] += b"\r\n"
    return pieces


def _quoted(value: bytes) -> bytes:
    escaped = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + escaped + b'"'


def _id_string(text: str, max_size: int) -> bytes:
    data = text.encode("utf-8")
    if not _QUOTABLE_RE.fullmatch(data):
        raise ValueError("ID strings must be printable 7-bit ASCII")
    if len(data) > max_size:
        raise ValueError(f"ID string longer than {max_size} bytes")
    return _quoted(data)


def _check_tag(tag: str) -> None:
    if not is_valid_tag(tag):
        raise ValueError("invalid IMAP tag")


def _check_text(text: str) -> None:
    if _LINE_BREAK_OR_NUL_RE.search(text):
        raise ValueError("response text must not contain NUL, CR or LF")


def _check_capabilities(caps: list[str]) -> list[str]:
    for cap in caps:
        if not _ATOM_RE.fullmatch(cap):
            raise ValueError("capability names must be atoms")
    return caps
