"""ResponseReader: each case is fed whole, one byte at a time, and with a trailer."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import pytest

from appliance.protocols.errors import UpstreamProtocolError
from appliance.protocols.imap.responses import Response, ResponseReader, capabilities

TRAILER = b"z9 OK done\r\n"
TRAILER_OUTCOME = ("tagged", "z9", "OK", None, "done", TRAILER)
SMALL_LIMITS = {"max_line_length": 40, "max_literal_size": 16}


def rejected(*, fatal: bool = False) -> tuple:
    return ("rejected", fatal)


def describe(response: Response) -> tuple:
    """Turn a response into a tuple, so a failing comparison shows every field."""
    return (
        response.kind,
        response.tag,
        response.status,
        response.code,
        response.text,
        response.raw,
    )


def drain(reader: ResponseReader, outcomes: list[tuple]) -> bool:
    """Collect responses until the reader needs input, or False after a fatal error."""
    for _ in range(10_000):
        try:
            response = reader.next_event()
        except UpstreamProtocolError as error:
            outcomes.append(rejected(fatal=error.fatal))
            if error.fatal:
                return False
            continue
        if response is None:
            return True
        outcomes.append(describe(response))
    raise AssertionError("reader returned responses without end")


def run(chunks: list[bytes], **limits: int) -> list[tuple]:
    reader = ResponseReader(**limits)
    outcomes: list[tuple] = []
    for chunk in chunks:
        reader.feed(chunk)
        if not drain(reader, outcomes):
            break
    return outcomes


class Case(NamedTuple):
    name: str
    data: bytes
    expected: list[tuple]
    limits: Mapping[str, int] = MappingProxyType({})


GREETING = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"
ID_RESPONSE = b'* ID ("name" {7}\r\nDovecot "os" {3}\r\na\r\n)\r\n'
FOLLOWING = b"a2 OK next\r\n"
FOLLOWING_OUTCOME = ("tagged", "a2", "OK", None, "next", FOLLOWING)

VALID_CASES = [
    Case(
        "greeting with capability code",
        GREETING,
        [
            (
                "untagged",
                None,
                "OK",
                "CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN",
                "Dovecot ready.",
                GREETING,
            )
        ],
    ),
    Case(
        "untagged capability data",
        b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR\r\n",
        [
            (
                "untagged",
                None,
                None,
                None,
                "CAPABILITY IMAP4rev1 LITERAL+ SASL-IR",
                b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR\r\n",
            )
        ],
    ),
    Case(
        "tagged OK with code",
        b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
        [
            (
                "tagged",
                "a1",
                "OK",
                "CAPABILITY IMAP4rev1 IDLE",
                "Logged in",
                b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            )
        ],
    ),
    Case(
        "tagged NO",
        b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
        [
            (
                "tagged",
                "a1",
                "NO",
                "AUTHENTICATIONFAILED",
                "Authentication failed.",
                b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            )
        ],
    ),
    Case(
        "lower-case status",
        b"a1 bad oops\r\n",
        [("tagged", "a1", "BAD", None, "oops", b"a1 bad oops\r\n")],
    ),
    Case(
        "code without text",
        b"a1 OK [READ-WRITE]\r\n",
        [("tagged", "a1", "OK", "READ-WRITE", "", b"a1 OK [READ-WRITE]\r\n")],
    ),
    Case(
        "status without text",
        b"a1 OK\r\n",
        [("tagged", "a1", "OK", None, "", b"a1 OK\r\n")],
    ),
    Case(
        "unclosed code is text",
        b"a1 OK [ALERT text\r\n",
        [("tagged", "a1", "OK", None, "[ALERT text", b"a1 OK [ALERT text\r\n")],
    ),
    Case(
        "untagged BYE",
        b"* BYE shutting down\r\n",
        [("untagged", None, "BYE", None, "shutting down", b"* BYE shutting down\r\n")],
    ),
    Case(
        "untagged PREAUTH",
        b"* PREAUTH ready\r\n",
        [("untagged", None, "PREAUTH", None, "ready", b"* PREAUTH ready\r\n")],
    ),
    Case(
        "untagged EXISTS",
        b"* 3 EXISTS\r\n",
        [("untagged", None, None, None, "3 EXISTS", b"* 3 EXISTS\r\n")],
    ),
    Case(
        "empty continuation request",
        b"+ \r\n",
        [("continuation", None, None, None, "", b"+ \r\n")],
    ),
    Case(
        "bare plus continuation request",
        b"+\r\n",
        [("continuation", None, None, None, "", b"+\r\n")],
    ),
    Case(
        "continuation request with challenge",
        b"+ VXNlcm5hbWU6\r\n",
        [("continuation", None, None, None, "VXNlcm5hbWU6", b"+ VXNlcm5hbWU6\r\n")],
    ),
    Case(
        "untagged data with literals",
        ID_RESPONSE,
        [("untagged", None, None, None, 'ID ("name" {7}', ID_RESPONSE)],
    ),
    Case(
        "literal that contains CRLF",
        b"* 1 FETCH (BODY[] {4}\r\n\r\n\r\n)\r\n",
        [
            (
                "untagged",
                None,
                None,
                None,
                "1 FETCH (BODY[] {4}",
                b"* 1 FETCH (BODY[] {4}\r\n\r\n\r\n)\r\n",
            )
        ],
    ),
    Case(
        "brace ending status text",
        b"a1 BAD unknown {12}\r\n" + FOLLOWING,
        [
            ("tagged", "a1", "BAD", None, "unknown {12}", b"a1 BAD unknown {12}\r\n"),
            FOLLOWING_OUTCOME,
        ],
    ),
    Case(
        "8-bit text is replaced",
        b"a1 NO \xff failed\r\n",
        [("tagged", "a1", "NO", None, "\ufffd failed", b"a1 NO \xff failed\r\n")],
    ),
    Case(
        "literals at the size limit",
        b"* X {8}\r\n12345678 {8}\r\n12345678\r\n",
        [
            (
                "untagged",
                None,
                None,
                None,
                "X {8}",
                b"* X {8}\r\n12345678 {8}\r\n12345678\r\n",
            )
        ],
        SMALL_LIMITS,
    ),
]

ERROR_CASES = [
    Case(
        "line over the limit",
        b"a1 OK " + b"x" * 40 + b"\r\n" + FOLLOWING,
        [rejected(fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "literal over the limit",
        b"* X {17}\r\n" + b"y" * 17 + b"\r\n",
        [rejected(fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "literals over the total limit",
        b"* X {8}\r\n12345678 {9}\r\n123456789\r\n",
        [rejected(fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "literal size over 64 bits",
        b"* X {18446744073709551617}\r\n",
        [rejected(fatal=True)],
    ),
    Case(
        "literal size of 5000 digits",
        b"* X {" + b"9" * 5000 + b"}\r\n",
        [rejected(fatal=True)],
    ),
    Case("empty line", b"\r\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case("bare LF", b"a1 OK done\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case("bare CR", b"a1 OK do\rne\r\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case("NUL byte", b"a1 OK do\0ne\r\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case(
        "invalid tagged status",
        b"a1 PREAUTH x\r\n" + FOLLOWING,
        [rejected(), FOLLOWING_OUTCOME],
    ),
    Case("tag without status", b"a1\r\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case("invalid tag", b"a*1 OK x\r\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case("empty untagged", b"*\r\n" + FOLLOWING, [rejected(), FOLLOWING_OUTCOME]),
    Case(
        "plus without space",
        b"+abc\r\n" + FOLLOWING,
        [rejected(), FOLLOWING_OUTCOME],
    ),
    Case(
        "bare LF after literal",
        b"* X {2}\r\nab\n" + FOLLOWING,
        [rejected(), FOLLOWING_OUTCOME],
    ),
]


def check_three_ways(case: Case) -> None:
    data = case.data
    whole = run([data], **case.limits)
    bytewise = run([data[i : i + 1] for i in range(len(data))], **case.limits)
    trailer = run([data + TRAILER], **case.limits)

    expected = case.expected
    ends_fatal = expected[-1] == rejected(fatal=True)
    assert whole == expected
    assert bytewise == expected
    assert trailer == (expected if ends_fatal else [*expected, TRAILER_OUTCOME])


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda case: case.name)
def test_reader_parses_valid_responses(case: Case) -> None:
    check_three_ways(case)


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: case.name)
def test_reader_rejects_invalid_responses(case: Case) -> None:
    check_three_ways(case)


def parse_one(data: bytes) -> Response:
    reader = ResponseReader()
    reader.feed(data)
    response = reader.next_event()
    assert response is not None
    return response


def test_capabilities_from_untagged_data() -> None:
    response = parse_one(b"* CAPABILITY IMAP4rev1 Literal+ SASL-IR\r\n")

    assert capabilities(response) == ["IMAP4rev1", "Literal+", "SASL-IR"]


def test_capabilities_from_greeting_code() -> None:
    assert capabilities(parse_one(GREETING)) == ["IMAP4rev1", "STARTTLS", "AUTH=PLAIN"]


def test_capabilities_from_tagged_code() -> None:
    response = parse_one(b"a1 OK [capability IMAP4rev1 IDLE] Logged in\r\n")

    assert capabilities(response) == ["IMAP4rev1", "IDLE"]


def test_capabilities_absent_from_other_responses() -> None:
    assert capabilities(parse_one(b"* 3 EXISTS\r\n")) is None
    assert capabilities(parse_one(b"a1 OK [ALERT] x\r\n")) is None
    assert capabilities(parse_one(b"* OK CAPABILITY in text\r\n")) is None


def test_response_repr_hides_raw_bytes() -> None:
    response = parse_one(b'* ID ("secret" {6}\r\nhunter)\r\n')

    assert "hunter" not in repr(response)


def test_take_buffered_returns_pending_bytes() -> None:
    reader = ResponseReader()
    reader.feed(b"P1 OK Begin TLS\r\n* OK injected\r\n")
    first = reader.next_event()

    pending = reader.take_buffered()

    assert first is not None
    assert first.status == "OK"
    assert pending == b"* OK injected\r\n"
    assert reader.next_event() is None
    assert reader.buffered_size == 0


def test_take_buffered_inside_response_raises() -> None:
    reader = ResponseReader()
    reader.feed(b"* ID ({5}\r\nab")
    reader.next_event()

    with pytest.raises(RuntimeError):
        reader.take_buffered()


def test_fatal_error_repeats() -> None:
    reader = ResponseReader(max_literal_size=4)
    reader.feed(b"* ID ({5}\r\nabcde)\r\n")
    with pytest.raises(UpstreamProtocolError) as first:
        reader.next_event()

    reader.feed(b"a1 OK done\r\n")

    with pytest.raises(UpstreamProtocolError) as second:
        reader.next_event()
    assert first.value.fatal is True
    assert second.value is first.value
    assert reader.buffered_size == 0


def test_over_long_line_is_not_buffered() -> None:
    reader = ResponseReader(max_line_length=100)
    for _ in range(100):
        reader.feed(b"x" * 1000)
        with contextlib.suppress(UpstreamProtocolError):
            reader.next_event()

    assert reader.buffered_size <= 102
