"""IMAP builders, checked byte for byte and by parsing their output back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.imap.commands import (
    Command,
    CommandReader,
    ContinuationRequest,
)
from appliance.protocols.imap.responses import ResponseReader
from appliance.protocols.imap.wire import (
    astring,
    format_authenticate_plain,
    format_capability,
    format_continuation,
    format_id,
    format_login,
    format_tagged,
    format_untagged,
    replace_capability_code,
)
from appliance.protocols.sasl import decode_plain


def parse_response(data: bytes):
    reader = ResponseReader()
    reader.feed(data)
    response = reader.next_event()
    assert response is not None
    return response


def parse_command_pieces(pieces: list[bytes]) -> tuple[Command, int]:
    """Parse pieces as a server would, and return the command and the "+" count."""
    reader = CommandReader()
    continuations = 0
    for piece in pieces:
        reader.feed(piece)
        event = reader.next_event()
        while isinstance(event, ContinuationRequest):
            continuations += 1
            event = reader.next_event()
        if event is not None:
            assert reader.next_event() is None
            return event, continuations
    raise AssertionError("pieces did not form a command")


def test_tagged_with_code() -> None:
    line = format_tagged("a1", "NO", "TLS is required", code="PRIVACYREQUIRED")

    assert line == b"a1 NO [PRIVACYREQUIRED] TLS is required\r\n"


def test_tagged_without_code() -> None:
    assert format_tagged("a1", "OK", "done") == b"a1 OK done\r\n"


def test_untagged_with_code() -> None:
    line = format_untagged("OK", "ready", code="CAPABILITY IMAP4rev1")

    assert line == b"* OK [CAPABILITY IMAP4rev1] ready\r\n"


def test_untagged_bye() -> None:
    assert format_untagged("BYE", "shutting down") == b"* BYE shutting down\r\n"


def test_capability_line() -> None:
    line = format_capability(["IMAP4rev1", "STARTTLS", "AUTH=PLAIN"])

    assert line == b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n"


def test_continuation_with_text() -> None:
    assert format_continuation("Ready") == b"+ Ready\r\n"


def test_continuation_without_text() -> None:
    assert format_continuation() == b"+ \r\n"


@pytest.mark.parametrize(
    "build",
    [
        lambda: format_tagged("a1", "OK", "done\r\na2 OK forged"),
        lambda: format_tagged("a 1", "OK", "done"),
        lambda: format_tagged("a1", "O K", "done"),
        lambda: format_tagged("a1", "OK", "done", code="ALERT] x"),
        lambda: format_untagged("OK", "ready\n"),
        lambda: format_capability(["IMAP4rev1", "X\r\n"]),
        lambda: format_capability(["AUTH PLAIN"]),
        lambda: format_continuation("a\rb"),
    ],
    ids=[
        "text with CRLF",
        "tag with space",
        "status with space",
        "code with bracket",
        "untagged text with LF",
        "capability with CRLF",
        "capability with space",
        "continuation with CR",
    ],
)
def test_builder_rejects_line_injection(build) -> None:
    with pytest.raises(ValueError):
        build()


def test_capability_code_replaced_in_greeting() -> None:
    greeting = parse_response(
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Caf\xc3\xa9 ready.\r\n"
    )

    line = replace_capability_code(greeting, ["IMAP4rev1", "AUTH=PLAIN"])

    assert line == b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Caf\xc3\xa9 ready.\r\n"


def test_capability_code_replaced_in_tagged() -> None:
    response = parse_response(b"a]1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")

    line = replace_capability_code(response, ["IMAP4rev1"])

    assert line == b"a]1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"


def test_capability_code_replaced_without_text() -> None:
    response = parse_response(b"a1 OK [CAPABILITY IMAP4rev1 IDLE]\r\n")

    line = replace_capability_code(response, ["IMAP4rev1"])

    assert line == b"a1 OK [CAPABILITY IMAP4rev1]\r\n"


def test_capability_code_required() -> None:
    response = parse_response(b"* OK [ALERT] ready\r\n")

    with pytest.raises(ValueError):
        replace_capability_code(response, ["IMAP4rev1"])


def test_capability_data_has_no_code() -> None:
    response = parse_response(b"* CAPABILITY IMAP4rev1\r\n")

    with pytest.raises(ValueError):
        replace_capability_code(response, ["IMAP4rev1"])


@pytest.mark.parametrize(
    ("value", "literal_plus", "pieces"),
    [
        (b"alice", False, [b'"alice"']),
        (b"", False, [b'""']),
        (b"NIL", False, [b'"NIL"']),
        (b'p a"s\\s', False, [b'"p a\\"s\\\\s"']),
        (b"j\xc3\xb6rg", False, [b"{5}\r\n", b"j\xc3\xb6rg"]),
        (b"j\xc3\xb6rg", True, [b"{5+}\r\nj\xc3\xb6rg"]),
        (b"tab\there", False, [b"{8}\r\n", b"tab\there"]),
    ],
    ids=[
        "plain",
        "empty",
        "NIL is quoted",
        "quote and backslash",
        "8-bit synchronizing",
        "8-bit LITERAL+",
        "control byte",
    ],
)
def test_astring_encoding(
    value: bytes, literal_plus: bool, pieces: list[bytes]
) -> None:
    assert astring(value, literal_plus=literal_plus) == pieces


@pytest.mark.parametrize("value", [b"a\0b", b"a\rb", b"a\nb"], ids=["NUL", "CR", "LF"])
def test_astring_rejects_line_bytes(value: bytes) -> None:
    with pytest.raises(ValueError):
        astring(value, literal_plus=True)


def test_login_quoted_is_one_piece() -> None:
    pieces = format_login("a1", b"alice", b'se "cret\\', literal_plus=False)

    assert pieces == [b'a1 LOGIN "alice" "se \\"cret\\\\"\r\n']


def test_login_synchronizing_literals_split() -> None:
    pieces = format_login("a1", b"j\xc3\xb6rg", b"p\xc3\xa4ss", literal_plus=False)

    assert pieces == [
        b"a1 LOGIN {5}\r\n",
        b"j\xc3\xb6rg {5}\r\n",
        b"p\xc3\xa4ss\r\n",
    ]


def test_login_literal_plus_is_one_piece() -> None:
    pieces = format_login("a1", b"j\xc3\xb6rg", b"pw", literal_plus=True)

    assert pieces == [b'a1 LOGIN {5+}\r\nj\xc3\xb6rg "pw"\r\n']


def test_login_rejects_invalid_tag() -> None:
    with pytest.raises(ValueError):
        format_login("a*1", b"alice", b"pw", literal_plus=True)


safe_bytes = st.binary(max_size=40).filter(
    lambda value: not any(byte in value for byte in b"\0\r\n")
)


@settings(max_examples=200, deadline=None)
@given(user=safe_bytes, password=safe_bytes, literal_plus=st.booleans())
def test_login_round_trips_through_reader(
    user: bytes, password: bytes, literal_plus: bool
) -> None:
    pieces = format_login("a1", user, password, literal_plus=literal_plus)

    command, continuations = parse_command_pieces(pieces)

    assert command == Command("a1", "LOGIN", (user, password))
    assert continuations == len(pieces) - 1


def test_authenticate_plain_with_sasl_ir() -> None:
    pieces = format_authenticate_plain("a1", b"alice", b"secret", sasl_ir=True)

    assert pieces == [b"a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"]


def test_authenticate_plain_without_sasl_ir() -> None:
    pieces = format_authenticate_plain("a1", b"alice", b"secret", sasl_ir=False)

    assert pieces == [b"a1 AUTHENTICATE PLAIN\r\n", b"AGFsaWNlAHNlY3JldA==\r\n"]


def test_authenticate_plain_decodes_back() -> None:
    pieces = format_authenticate_plain("a1", b"j\xc3\xb6rg", b"p w\r\n", sasl_ir=False)

    assert decode_plain(pieces[1].rstrip(b"\r\n")) == (b"", b"j\xc3\xb6rg", b"p w\r\n")


def test_id_with_fields_and_nil() -> None:
    line = format_id(
        "a1", {"name": 'Mail "proxy"', "x-originating-ip": "192.0.2.7", "os": None}
    )

    assert line == (
        b'a1 ID ("name" "Mail \\"proxy\\"" "x-originating-ip" "192.0.2.7" "os" NIL)\r\n'
    )


def test_id_without_fields() -> None:
    assert format_id("a1", {}) == b"a1 ID NIL\r\n"


def test_id_parses_back() -> None:
    line = format_id("a1", {"x-originating-ip": "2001:db8::1", "name": None})

    command, _ = parse_command_pieces([line])

    assert command == Command(
        "a1", "ID", ((b"x-originating-ip", b"2001:db8::1", b"name", None),)
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "a\r\nb"},
        {"name": "caf\u00e9"},
        {"x" * 31: "v"},
        {"name": "v" * 1025},
        {f"field{i}": "v" for i in range(31)},
        {"name": "a", "Name": "b"},
    ],
    ids=[
        "CRLF in value",
        "non-ASCII value",
        "field name over 30 bytes",
        "value over 1024 bytes",
        "more than 30 fields",
        "field names differing in case",
    ],
)
def test_id_rejects_invalid_fields(fields: dict[str, str | None]) -> None:
    with pytest.raises(ValueError):
        format_id("a1", fields)
