"""CommandReader: each case is fed whole, one byte at a time, and with a trailer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest

from appliance.protocols.errors import ClientProtocolError
from appliance.protocols.imap.commands import (
    Command,
    CommandReader,
    ContinuationLine,
    ContinuationRequest,
    Literal8,
    LiteralRejected,
    LiteralTooLarge,
)

TRAILER = b"z9 NOOP\r\n"
TRAILER_OUTCOME = ("command", "z9", "NOOP", ())
CONTINUE = ("continue",)
SMALL_LIMITS = {"max_line_length": 40, "max_literal_size": 16, "max_literals": 2}


def command(tag: str, name: str, *args: Any) -> tuple:
    return ("command", tag, name, args)


def rejected(tag: str | None, *, fatal: bool = False) -> tuple:
    return ("rejected", tag, fatal)


def describe(event: Any) -> tuple:
    """Turn an event into a tuple, so a failing comparison shows every field."""
    if isinstance(event, Command):
        return command(event.tag, event.name, *event.args)
    if isinstance(event, ContinuationRequest):
        return CONTINUE
    if isinstance(event, ContinuationLine):
        return ("line", event.data)
    raise AssertionError(f"unexpected event {event!r}")


def drain(
    reader: CommandReader,
    outcomes: list[tuple],
    on_command: Callable[[CommandReader, Command], None] | None,
) -> bool:
    """Collect events until the reader needs input, or False after a fatal error."""
    for _ in range(10_000):
        try:
            event = reader.next_event()
        except ClientProtocolError as error:
            outcomes.append(rejected(error.tag, fatal=error.fatal))
            if error.fatal:
                return False
            continue
        if event is None:
            return True
        outcomes.append(describe(event))
        if on_command is not None and isinstance(event, Command):
            on_command(reader, event)
    raise AssertionError("reader returned events without end")


def run(
    chunks: list[bytes],
    on_command: Callable[[CommandReader, Command], None] | None = None,
    **limits: int,
) -> list[tuple]:
    reader = CommandReader(**limits)
    outcomes: list[tuple] = []
    for chunk in chunks:
        reader.feed(chunk)
        if not drain(reader, outcomes, on_command):
            break
    return outcomes


def feed_three_ways(
    data: bytes,
    on_command: Callable[[CommandReader, Command], None] | None = None,
    **limits: int,
) -> dict[str, list[tuple]]:
    return {
        "whole": run([data], on_command, **limits),
        "bytewise": run(
            [data[i : i + 1] for i in range(len(data))], on_command, **limits
        ),
        "trailer": run([data + TRAILER], on_command, **limits),
    }


def expected_three_ways(expected: list[tuple]) -> dict[str, list[tuple]]:
    ends_fatal = bool(expected) and expected[-1][0] == "rejected" and expected[-1][2]
    trailer = expected if ends_fatal else [*expected, TRAILER_OUTCOME]
    return {"whole": expected, "bytewise": expected, "trailer": trailer}


class Case(NamedTuple):
    name: str
    data: bytes
    expected: list[tuple]
    limits: Mapping[str, int] = MappingProxyType({})


VALID_CASES = [
    Case(
        "login with atoms",
        b"a1 LOGIN alice secret\r\n",
        [command("a1", "LOGIN", "alice", "secret")],
    ),
    Case(
        "login with quoted strings",
        b'a1 LOGIN "alice" "p a\\"s\\\\s"\r\n',
        [command("a1", "LOGIN", b"alice", b'p a"s\\s')],
    ),
    Case(
        "login with synchronizing literals",
        b'a1 LOGIN {5}\r\nalice {8}\r\np a"s\\\\s\r\n',
        [CONTINUE, CONTINUE, command("a1", "LOGIN", b"alice", b'p a"s\\\\s')],
    ),
    Case(
        "login with LITERAL+ literals",
        b"a1 LOGIN {5+}\r\nalice {6+}\r\nse\r\nt!\r\n",
        [command("a1", "LOGIN", b"alice", b"se\r\nt!")],
    ),
    Case(
        "login with UTF-8 quoted user",
        b'a1 LOGIN "j\xc3\xb6rg" pw\r\n',
        [command("a1", "LOGIN", b"j\xc3\xb6rg", "pw")],
    ),
    Case(
        "command name upper-cased",
        b"a1 login alice secret\r\n",
        [command("a1", "LOGIN", "alice", "secret")],
    ),
    Case(
        "extra spaces between arguments",
        b"a1 LOGIN  alice   secret \r\n",
        [command("a1", "LOGIN", "alice", "secret")],
    ),
    Case(
        "authenticate with SASL-IR",
        b"a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        [command("a1", "AUTHENTICATE", "PLAIN", "AGFsaWNlAHNlY3JldA==")],
    ),
    Case(
        "authenticate with empty SASL-IR",
        b"a1 AUTHENTICATE PLAIN =\r\n",
        [command("a1", "AUTHENTICATE", "PLAIN", "=")],
    ),
    Case(
        "id with list and NIL",
        b'a1 ID ("name" "Thunderbird" "version" NIL)\r\n',
        [command("a1", "ID", (b"name", b"Thunderbird", b"version", None))],
    ),
    Case("id with NIL", b"a1 ID nil\r\n", [command("a1", "ID", None)]),
    Case(
        "nested and empty lists",
        b'a1 X (a (b ()) "c") ()\r\n',
        [command("a1", "X", ("a", ("b", ()), b"c"), ())],
    ),
    Case(
        "literal inside a list",
        b'a1 ID ("name" {3}\r\nabc)\r\n',
        [CONTINUE, command("a1", "ID", (b"name", b"abc"))],
    ),
    Case(
        "literal of unknown command",
        b"a1 XYZ {6}\r\na2 L\r\n\r\n",
        [CONTINUE, command("a1", "XYZ", b"a2 L\r\n")],
    ),
    Case("literal8", b"a1 X ~{3}\r\na\0b\r\n", [CONTINUE, command("a1", "X", b"a\0b")]),
    Case(
        "empty literals",
        b"a1 LOGIN {0}\r\n {0+}\r\n\r\n",
        [CONTINUE, command("a1", "LOGIN", b"", b"")],
    ),
    Case(
        "literal size with leading zeros",
        b"a1 X {0003}\r\nabc\r\n",
        [CONTINUE, command("a1", "X", b"abc")],
    ),
    Case(
        "fetch items and sequence set",
        b"a1 UID FETCH 1:* (FLAGS BODY.PEEK[]<0.10>)\r\n",
        [command("a1", "UID", "FETCH", "1:*", ("FLAGS", "BODY.PEEK[]<0.10>"))],
    ),
    Case(
        "header list inside fetch item",
        b"a1 FETCH 1 BODY[HEADER.FIELDS (FROM)]\r\n",
        [command("a1", "FETCH", "1", "BODY[HEADER.FIELDS", ("FROM",), "]")],
    ),
    Case(
        "flags with backslash",
        b"a1 STORE 1 +FLAGS (\\Seen)\r\n",
        [command("a1", "STORE", "1", "+FLAGS", ("\\Seen",))],
    ),
    Case("no arguments", b"a1 NOOP\r\n", [command("a1", "NOOP")]),
    Case("tag with bracket", b"a]1 NOOP\r\n", [command("a]1", "NOOP")]),
    Case(
        "text at the line limit",
        b"a1 LOGIN " + b"x" * 31 + b"\r\n",
        [command("a1", "LOGIN", "x" * 31)],
        SMALL_LIMITS,
    ),
    Case(
        "literal at the size limit",
        b"a1 X {16}\r\n" + b"y" * 16 + b"\r\n",
        [CONTINUE, command("a1", "X", b"y" * 16)],
        SMALL_LIMITS,
    ),
    Case(
        "literals at the count limit",
        b"a1 X {1}\r\na {1}\r\nb\r\n",
        [CONTINUE, CONTINUE, command("a1", "X", b"a", b"b")],
        SMALL_LIMITS,
    ),
]

NOOP = b"a2 NOOP\r\n"
NOOP_OUTCOME = command("a2", "NOOP")

ERROR_CASES = [
    Case(
        "line over the limit",
        b"a1 LOGIN " + b"x" * 40 + b"\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "text over the limit after a literal",
        b"a1 X {1}\r\na " + b"x" * 35 + b"\r\n" + NOOP,
        [CONTINUE, rejected("a1"), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "synchronizing literal too large",
        b"a1 LOGIN {17}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "LITERAL+ literal too large",
        b"a1 LOGIN {17+}\r\n" + b"z" * 17 + b"\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "four billion byte literal",
        b"a1 LOGIN {4000000000}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "literal size over 64 bits",
        b"a1 LOGIN {18446744073709551617}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "literal size of 5000 digits",
        b"a1 LOGIN {" + b"9" * 5000 + b"}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "empty literal size", b"a1 LOGIN {}\r\n" + NOOP, [rejected("a1"), NOOP_OUTCOME]
    ),
    Case(
        "negative literal size",
        b"a1 LOGIN {-1}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "non-numeric literal size",
        b"a1 LOGIN {1x}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "too many synchronizing literals",
        b"a1 X {1}\r\na {1}\r\nb {1}\r\n" + NOOP,
        [CONTINUE, CONTINUE, rejected("a1"), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "too many LITERAL+ literals",
        b"a1 X {1+}\r\na {1+}\r\nb {1+}\r\nc\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
    Case("missing tag", b" NOOP\r\n" + NOOP, [rejected(None), NOOP_OUTCOME]),
    Case("empty line", b"\r\n" + NOOP, [rejected(None), NOOP_OUTCOME]),
    Case("tag with asterisk", b"a*1 NOOP\r\n" + NOOP, [rejected(None), NOOP_OUTCOME]),
    Case("tag with plus", b"a+1 NOOP\r\n" + NOOP, [rejected(None), NOOP_OUTCOME]),
    Case("quoted tag", b'"a1" NOOP\r\n' + NOOP, [rejected(None), NOOP_OUTCOME]),
    Case("missing command name", b"a1\r\n" + NOOP, [rejected("a1"), NOOP_OUTCOME]),
    Case(
        "missing name after space",
        b"a1 \r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "quoted command name",
        b'a1 "LOGIN"\r\n' + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "unterminated quoted string",
        b'a1 LOGIN "alice\r\n' + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "quoted string ending in backslash",
        b'a1 LOGIN "alice\\\r\n' + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "invalid escape",
        b'a1 LOGIN "a\\nb" x\r\n' + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "NUL in command line",
        b"a1 LOGIN al\0ice x\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "NUL in literal",
        b"a1 LOGIN {3}\r\na\0b x\r\n" + NOOP,
        [CONTINUE, rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "NUL in literal then LITERAL+",
        b"a1 LOGIN {3}\r\na\0b {1+}\r\nx\r\n",
        [CONTINUE, rejected("a1", fatal=True)],
    ),
    Case(
        "NUL in literal then literal",
        b"a1 LOGIN {3}\r\na\0b {6}\r\nsecret\r\n",
        [CONTINUE, rejected("a1", fatal=True)],
    ),
    Case("bare CR", b"a1 LOGIN a\rb c\r\n" + NOOP, [rejected("a1"), NOOP_OUTCOME]),
    Case("bare LF", b"a1 NOOP\n" + NOOP, [rejected("a1"), NOOP_OUTCOME]),
    Case("lone LF", b"\n" + NOOP, [rejected(None), NOOP_OUTCOME]),
    Case("unclosed list", b"a1 ID (a\r\n" + NOOP, [rejected("a1"), NOOP_OUTCOME]),
    Case("unopened list", b"a1 ID a)\r\n" + NOOP, [rejected("a1"), NOOP_OUTCOME]),
    Case(
        "lists nested too deeply",
        b"a1 X " + b"(" * 100 + b")" * 100 + b"\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "8-bit byte in atom",
        b"a1 LOGIN j\xc3\xb6rg x\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "missing space between strings",
        b'a1 LOGIN "a""b"\r\n' + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "literal before more text",
        b"a1 LOGIN {3} x\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
    ),
    Case(
        "rejected line ending in LITERAL+",
        b'a1 LOGIN "x {3+}\r\nabc\r\n',
        [rejected("a1", fatal=True)],
    ),
    Case(
        "invalid tag before literal",
        b"a*1 LOGIN {6}\r\nsecret\r\n",
        [rejected(None, fatal=True)],
    ),
    Case(
        "invalid command name before literal",
        b"a1 LOG\x01IN {6}\r\nsecret\r\n",
        [rejected("a1", fatal=True)],
    ),
    Case(
        "over-long line",
        b"a1 LOGIN " + b"x" * 40 + b"\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "over-long line ending in brace",
        b"a1 ID " + b"x" * 40 + b"}\r\n" + NOOP,
        [rejected("a1"), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "over-long line ending in LITERAL+",
        b"a1 LOGIN " + b"x" * 40 + b" {3+}\r\nabc\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "over-long line ending in literal",
        b"a1 LOGIN " + b"x" * 40 + b" {6}\r\nsecret\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "over-long line ending in literal8",
        b"a1 LOGIN " + b"x" * 40 + b" ~{6}\r\nsecret\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "over-long line ending in long literal size",
        b"a1 LOGIN x {" + b"0" * 60 + b"6}\r\nsecret\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
    Case(
        "over-long line ending in bare LF literal",
        b"a1 LOGIN " + b"x" * 40 + b" {6}\nsecret\r\n",
        [rejected("a1", fatal=True)],
        SMALL_LIMITS,
    ),
]


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda case: case.name)
def test_reader_parses_valid_commands(case: Case) -> None:
    outcomes = feed_three_ways(case.data, **case.limits)

    expected = expected_three_ways(case.expected)
    assert outcomes["whole"] == expected["whole"]
    assert outcomes["bytewise"] == expected["bytewise"]
    assert outcomes["trailer"] == expected["trailer"]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: case.name)
def test_reader_rejects_then_recovers(case: Case) -> None:
    outcomes = feed_three_ways(case.data, **case.limits)

    expected = expected_three_ways(case.expected)
    assert outcomes["whole"] == expected["whole"]
    assert outcomes["bytewise"] == expected["bytewise"]
    assert outcomes["trailer"] == expected["trailer"]


def expect_line_after_authenticate(reader: CommandReader, event: Command) -> None:
    if event.name == "AUTHENTICATE":
        reader.expect_continuation_line()


AUTHENTICATE_CASES = [
    Case(
        "PLAIN response line",
        b"a1 AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n" + NOOP,
        [
            command("a1", "AUTHENTICATE", "PLAIN"),
            ("line", b"AGFsaWNlAHNlY3JldA=="),
            NOOP_OUTCOME,
        ],
    ),
    Case(
        "cancellation line",
        b"a1 AUTHENTICATE PLAIN\r\n*\r\n" + NOOP,
        [command("a1", "AUTHENTICATE", "PLAIN"), ("line", b"*"), NOOP_OUTCOME],
    ),
    Case(
        "line that looks like a command",
        b"a1 AUTHENTICATE LOGIN\r\na3 LOGOUT {5+}\r\n" + NOOP,
        [
            command("a1", "AUTHENTICATE", "LOGIN"),
            ("line", b"a3 LOGOUT {5+}"),
            NOOP_OUTCOME,
        ],
    ),
    Case(
        "empty response line",
        b"a1 AUTHENTICATE PLAIN\r\n\r\n" + NOOP,
        [command("a1", "AUTHENTICATE", "PLAIN"), ("line", b""), NOOP_OUTCOME],
    ),
    Case(
        "response line over the limit",
        b"a1 AUTHENTICATE PLAIN\r\n" + b"QQ" * 30 + b"\r\n" + NOOP,
        [command("a1", "AUTHENTICATE", "PLAIN"), rejected(None), NOOP_OUTCOME],
        SMALL_LIMITS,
    ),
    Case(
        "response line with bare LF",
        b"a1 AUTHENTICATE PLAIN\r\nQUJD\n" + NOOP,
        [command("a1", "AUTHENTICATE", "PLAIN"), rejected(None), NOOP_OUTCOME],
    ),
]


@pytest.mark.parametrize("case", AUTHENTICATE_CASES, ids=lambda case: case.name)
def test_authenticate_reads_continuation_lines(case: Case) -> None:
    outcomes = feed_three_ways(case.data, expect_line_after_authenticate, **case.limits)

    expected = expected_three_ways(case.expected)
    assert outcomes["whole"] == expected["whole"]
    assert outcomes["bytewise"] == expected["bytewise"]
    assert outcomes["trailer"] == expected["trailer"]


def test_errors_never_echo_input() -> None:
    secret = b"hunter2"
    broken_lines = [
        b'a1 LOGIN alice "hunter2\r\n',
        b'a1 LOGIN alice "hunter2\\x"\r\n',
        b"a1 LOGIN alice hunter2\0\r\n",
        b"a1 LOGIN alice hunter2\n",
        b"a1 LOGIN alice {hunter2}\r\n",
        b"a1 LOGIN alice " + secret * 2000 + b"\r\n",
        b"hunter2*tag LOGIN\r\n",
    ]
    for line in broken_lines:
        reader = CommandReader()
        reader.feed(line)
        with pytest.raises(ClientProtocolError) as caught:
            reader.next_event()
        assert "hunter2" not in str(caught.value), line
        assert "hunter2" not in caught.value.message, line


def test_command_repr_hides_arguments() -> None:
    reader = CommandReader()
    reader.feed(b"a1 LOGIN alice hunter2\r\n")

    event = reader.next_event()

    assert "hunter2" not in repr(event)


def test_continuation_line_repr_hides_data() -> None:
    assert "QUJD" not in repr(ContinuationLine(b"QUJD"))


def test_over_long_line_is_not_buffered() -> None:
    reader = CommandReader(max_line_length=100)
    reader.feed(b"a1 LOGIN ")
    for _ in range(100):
        reader.feed(b"x" * 1000)
        with contextlib.suppress(ClientProtocolError):
            reader.next_event()

    assert reader.buffered_size <= 102


def test_literal_bytes_are_counted_in_buffer() -> None:
    reader = CommandReader()
    reader.feed(b"a1 LOGIN {10}\r\nabcd")
    reader.next_event()

    assert reader.next_event() is None
    assert reader.buffered_size == len(b"a1 LOGIN {10}") + 4


def test_take_buffered_returns_pipelined_bytes() -> None:
    reader = CommandReader()
    reader.feed(b"a1 STARTTLS\r\na2 LOGIN {5}\r\nalice x\r\n")
    first = reader.next_event()

    pending = reader.take_buffered()

    assert first == Command("a1", "STARTTLS")
    assert pending == b"a2 LOGIN {5}\r\nalice x\r\n"
    assert reader.next_event() is None
    assert reader.buffered_size == 0


def test_take_buffered_inside_command_raises() -> None:
    reader = CommandReader()
    reader.feed(b"a1 LOGIN {5+}\r\nali")
    reader.next_event()

    with pytest.raises(RuntimeError):
        reader.take_buffered()


def test_fatal_error_repeats() -> None:
    reader = CommandReader(max_literal_size=4)
    reader.feed(b"a1 LOGIN {5+}\r\nalice x\r\n")
    with pytest.raises(ClientProtocolError) as first:
        reader.next_event()

    reader.feed(NOOP)

    with pytest.raises(ClientProtocolError) as second:
        reader.next_event()
    assert first.value.fatal is True
    assert second.value is first.value
    assert reader.buffered_size == 0


def test_expect_line_inside_command_raises() -> None:
    reader = CommandReader()
    reader.feed(b"a1 LOGIN {5}\r\n")
    reader.next_event()

    with pytest.raises(RuntimeError):
        reader.expect_continuation_line()


def test_nonpositive_limit_raises() -> None:
    with pytest.raises(ValueError):
        CommandReader(max_literals=0)
    with pytest.raises(ValueError):
        CommandReader(max_literal_size=-1)


def test_zero_literal_size_rejects_literals() -> None:
    reader = CommandReader(max_literal_size=0)
    reader.feed(b'a1 LOGIN {5}\r\na2 LOGIN "alice" "secret"\r\n')

    with pytest.raises(ClientProtocolError) as rejected:
        reader.next_event()
    quoted = reader.next_event()

    assert rejected.value.fatal is False
    assert isinstance(quoted, Command)
    assert quoted.tag == "a2"
    assert quoted.args == (b"alice", b"secret")


def event_objects_three_ways(data: bytes) -> list[list[object]]:
    """Return the event objects of `data` fed whole, one byte at a time and with a
    trailer; unlike feed_three_ways, they keep their types and flags."""
    results = []
    for chunks in ([data], [bytes([b]) for b in data], [data + TRAILER]):
        reader = CommandReader()
        events = []
        for chunk in chunks:
            reader.feed(chunk)
            while (event := reader.next_event()) is not None:
                events.append(event)
        results.append(events)
    return results


def test_literal8_data_is_marked() -> None:
    for events in event_objects_three_ways(b"a1 X ~{2+}\r\nab {2+}\r\ncd\r\n"):
        command = events[0]
        assert command.args == (b"ab", b"cd")
        assert isinstance(command.args[0], Literal8)
        assert not isinstance(command.args[1], Literal8)


def test_continuation_request_marks_literal8() -> None:
    for events in event_objects_three_ways(b"a1 LOGIN ~{4}\r\nabcd x\r\n"):
        assert events[0] == ContinuationRequest()
        assert events[0].binary
    for events in event_objects_three_ways(b"a1 LOGIN {4}\r\nabcd x\r\n"):
        assert not events[0].binary


# Lower literal caps for chosen arguments, such as the LOGIN user name and password

ARGUMENT_LIMITS = {"LOGIN": (4, 8), "AUTHENTICATE": (None, 12)}


def literal_outcomes(data: bytes) -> dict[str, list[tuple]]:
    return feed_three_ways(data, argument_literal_limits=ARGUMENT_LIMITS)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a1 LOGIN {5}\r\n", [rejected("a1")]),
        (b"a1 LOGIN alice {9}\r\n", [rejected("a1")]),
        (b'a1 LOGIN "al" {9}\r\n', [rejected("a1")]),
        (b"a1 login al {9}\r\n", [rejected("a1")]),
        (b"a1 AUTHENTICATE PLAIN {13}\r\n", [rejected("a1")]),
        (b"a1 LOGIN {5+}\r\nalice\r\n", [rejected("a1", fatal=True)]),
        (b"a1 LOGIN al {9+}\r\n123456789\r\n", [rejected("a1", fatal=True)]),
    ],
    ids=["user", "password", "quoted-user", "lower-case", "sasl", "user+", "password+"],
)
def test_argument_limit_rejects_at_announcement(data, expected):
    assert literal_outcomes(data) == expected_three_ways(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"a1 LOGIN {4}\r\nalic {8}\r\n12345678\r\n",
            [CONTINUE, CONTINUE, command("a1", "LOGIN", b"alic", b"12345678")],
        ),
        (
            b"a1 LOGIN {4+}\r\nalic {8+}\r\n12345678\r\n",
            [command("a1", "LOGIN", b"alic", b"12345678")],
        ),
        # A command without limits takes literals anywhere, lists included.
        (b"a1 ID {13}\r\n" + b"x" * 13 + b"\r\n", [CONTINUE, command("a1", "ID", b"x" * 13)]),
        (
            b"a1 ID (a {13}\r\n" + b"x" * 13 + b")\r\n",
            [CONTINUE, command("a1", "ID", ("a", b"x" * 13))],
        ),
    ],
    ids=["at-limit", "at-limit+", "other-command", "other-command-list"],
)
def test_argument_limit_allows(data, expected):
    assert literal_outcomes(data) == expected_three_ways(expected)


# Literals that a command with argument limits cannot use. Each case: input, the
# "+" requests before the rejection, and the rejection's message.
UNUSABLE_LITERALS = {
    "mechanism": (
        b"a1 AUTHENTICATE {5}\r\n",
        0,
        "argument 1 of AUTHENTICATE cannot be a literal",
    ),
    "sasl-third": (
        b"a1 AUTHENTICATE PLAIN x {5}\r\n",
        0,
        "AUTHENTICATE takes at most 2 arguments",
    ),
    "third": (b"a1 LOGIN a b {5}\r\n", 0, "LOGIN takes at most 2 arguments"),
    "third-after-quoted": (
        b'a1 LOGIN "a" "b" {5}\r\n',
        0,
        "LOGIN takes at most 2 arguments",
    ),
    "third-after-literals": (
        b"a1 LOGIN {1}\r\na {1}\r\nb {5}\r\n",
        2,
        "LOGIN takes at most 2 arguments",
    ),
    "fourth": (b"a1 LOGIN a b c {5}\r\n", 0, "LOGIN takes at most 2 arguments"),
    "in-list": (b"a1 LOGIN ({5}\r\n", 0, "LOGIN takes no parenthesized list"),
    "in-nested-list": (b"a1 LOGIN a ((b {5}\r\n", 0, "LOGIN takes no parenthesized list"),
    "after-list": (b"a1 LOGIN (a) {5}\r\n", 0, "LOGIN takes no parenthesized list"),
    "sasl-in-list": (
        b"a1 AUTHENTICATE PLAIN ({5}\r\n",
        0,
        "AUTHENTICATE takes no parenthesized list",
    ),
}


@pytest.mark.parametrize("case", UNUSABLE_LITERALS, ids=list(UNUSABLE_LITERALS))
def test_argument_limit_rejects_unusable_literal(case: str) -> None:
    data, requests, _ = UNUSABLE_LITERALS[case]
    expected = [CONTINUE] * requests + [rejected("a1")]

    assert literal_outcomes(data) == expected_three_ways(expected)


@pytest.mark.parametrize("case", UNUSABLE_LITERALS, ids=list(UNUSABLE_LITERALS))
def test_unusable_literal_error_names_command(case: str) -> None:
    data, requests, message = UNUSABLE_LITERALS[case]
    reader = CommandReader(argument_literal_limits=ARGUMENT_LIMITS)
    reader.feed(data + NOOP)
    for _ in range(requests):
        assert isinstance(reader.next_event(), ContinuationRequest)

    with pytest.raises(LiteralRejected) as raised:
        reader.next_event()

    error = raised.value
    assert not isinstance(error, LiteralTooLarge)
    assert error.command == data.split(b" ")[1].decode()
    assert error.tag == "a1"
    assert error.fatal is False
    assert error.message == message
    # A client that waits for "+" sends no literal, so the next line is a command.
    assert reader.next_event() == Command("a2", "NOOP")


@pytest.mark.parametrize("case", UNUSABLE_LITERALS, ids=list(UNUSABLE_LITERALS))
def test_unusable_literal_plus_is_fatal(case: str) -> None:
    data, _, _ = UNUSABLE_LITERALS[case]
    # Every announcement becomes LITERAL+, so the client sends each literal unasked.
    data = data.replace(b"}\r\n", b"+}\r\n") + b"hello\r\n"
    expected = [rejected("a1", fatal=True)]

    assert literal_outcomes(data) == expected_three_ways(expected)


def test_argument_limit_error_describes_literal() -> None:
    reader = CommandReader(argument_literal_limits=ARGUMENT_LIMITS)
    reader.feed(b"a1 LOGIN alice {9}\r\n" + NOOP)

    with pytest.raises(LiteralTooLarge) as raised:
        reader.next_event()

    error = raised.value
    assert error.tag == "a1"
    assert error.fatal is False
    assert error.command == "LOGIN"
    assert error.position == 1
    assert error.size == 9
    assert error.limit == 8
    assert error.preceding == ("alice",)
    assert error.message == "literal too large for argument 2 of LOGIN (limit 8 bytes)"
    assert reader.next_event() == Command("a2", "NOOP")
    assert reader.buffered_size == 0


def test_general_literal_limit_checked_first() -> None:
    reader = CommandReader(max_literal_size=6, argument_literal_limits=ARGUMENT_LIMITS)
    reader.feed(b"a1 LOGIN alice {9}\r\n")

    with pytest.raises(ClientProtocolError) as raised:
        reader.next_event()

    assert not isinstance(raised.value, LiteralTooLarge)
    assert raised.value.message == "literal too large (limit 6 bytes)"


def test_general_limit_rejection_names_command() -> None:
    reader = CommandReader(max_literal_size=16)
    reader.feed(b"a1 LOGIN alice {70}\r\nsecretpw rest\r\n")

    with pytest.raises(LiteralRejected) as raised:
        reader.next_event()

    error = raised.value
    assert error.command == "LOGIN"
    assert error.tag == "a1"
    assert error.fatal is False
    assert error.message == "literal too large (limit 16 bytes)"
    # The session decides whether bytes after the announcement are a literal or commands.
    assert reader.buffered_size == len(b"secretpw rest\r\n")


# Each case: input, and the command of each error in order (None for an error that is
# not a LiteralRejected).
LITERAL_REJECTIONS = {
    "general-limit": (b"a1 LOGIN alice {70}\r\n", ["LOGIN"]),
    "mechanism": (b"a1 AUTHENTICATE {70}\r\n", ["AUTHENTICATE"]),
    "accepted": (b"a1 LOGIN {3}\r\n", []),
    "too-many": (b"a1 LOGIN {1}\r\nx {2}\r\nyy {3}\r\n", ["LOGIN"]),
    "in-quote": (b'a1 LOGIN "alice {70}\r\n', ["LOGIN"]),
    "no-literal": (b'a1 LOGIN "alice\r\n', [None]),
}


@pytest.mark.parametrize("case", LITERAL_REJECTIONS, ids=list(LITERAL_REJECTIONS))
def test_literal_rejection_by_line_end(case: str) -> None:
    data, expected = LITERAL_REJECTIONS[case]
    reader = CommandReader(max_literal_size=16, max_literals=2)
    reader.feed(data)
    errors = []
    for _ in range(10):
        try:
            event = reader.next_event()
        except ClientProtocolError as error:
            errors.append(error)
            continue
        if event is None:
            break
    commands = [
        error.command if isinstance(error, LiteralRejected) else None for error in errors
    ]
    assert commands == expected


def test_literal_plus_rejection_stays_fatal() -> None:
    reader = CommandReader(max_literal_size=16)
    reader.feed(b"a1 LOGIN alice {70+}\r\n")

    with pytest.raises(LiteralRejected) as raised:
        reader.next_event()

    assert raised.value.fatal is True
    assert raised.value.command == "LOGIN"


def test_over_long_continuation_line_is_not_buffered() -> None:
    # An AUTHENTICATE response line has max_line_length as its bound, as a command has.
    reader = CommandReader(max_line_length=100)
    reader.expect_continuation_line()
    errors = []
    for _ in range(100):
        reader.feed(b"A" * 1000)
        try:
            reader.next_event()
        except ClientProtocolError as error:
            errors.append(error)

    assert reader.buffered_size <= 102
    # The error waits for the end of the line.
    assert errors == []
    reader.feed(b"AAAA\r\n" + NOOP)
    with pytest.raises(ClientProtocolError) as raised:
        reader.next_event()
    assert raised.value.tag is None
    assert raised.value.fatal is False
    assert reader.next_event() == Command("a2", "NOOP")
