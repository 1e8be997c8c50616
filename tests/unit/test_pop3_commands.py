"""CommandReader and format_command: POP3 client lines before login."""

from dataclasses import dataclass

import pytest

from appliance.protocols.errors import ClientProtocolError
from appliance.protocols.pop3 import (
    Command,
    CommandReader,
    ContinuationLine,
    format_command,
)

MAX_EVENTS_PER_FEED = 1000
TRAILER = b"NOOP\r\n"
TRAILER_EVENT = Command("NOOP")

EMPTY = "Command line is empty"
NUL = "Command line contains a NUL byte"
BARE_CR = "Command line contains a CR without LF"
BARE_LF = "Command line does not end with CRLF"
BAD_KEYWORD = "Command keyword must be 1 to 16 ASCII letters"
TOO_LONG = "Command line exceeds 512 octets including CRLF"


@dataclass(frozen=True)
class Rejected:
    message: str


@dataclass(frozen=True)
class Case:
    data: bytes
    expected: list
    # Continuation lines that the simulated session requests after an AUTH command.
    continuations: int = 0


def command(name: str, argument: bytes | None = None) -> Command:
    if argument is None:
        return Command(name)
    return Command(name, tuple(argument.split(b" ")), argument)


VALID_CASES = {
    "user": Case(b"USER bob\r\n", [command("USER", b"bob")]),
    "user lower case keyword": Case(b"user bob\r\n", [command("USER", b"bob")]),
    "user utf8 name": Case(
        "USER jürgen@例え.jp\r\n".encode(),
        [command("USER", "jürgen@例え.jp".encode())],
    ),
    "pass with spaces": Case(
        b"PASS correct horse battery\r\n",
        [command("PASS", b"correct horse battery")],
    ),
    "pass with quote and backslash": Case(
        b"PASS a\"b\\c'd\r\n", [command("PASS", b"a\"b\\c'd")]
    ),
    "pass utf8": Case(
        "PASS pässwörd€\r\n".encode(), [command("PASS", "pässwörd€".encode())]
    ),
    "pass leading and trailing space": Case(
        b"PASS  pw \r\n", [Command("PASS", (b"", b"pw", b""), b" pw ")]
    ),
    "pass empty": Case(b"PASS \r\n", [Command("PASS", (b"",), b"")]),
    "apop": Case(
        b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
        [command("APOP", b"mrose c4c9334bac560ecc979e58001b3e22fb")],
    ),
    "auth plain initial response": Case(
        b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n",
        [command("AUTH", b"PLAIN AGJvYgBzZWNyZXQ=")],
    ),
    "auth plain continuation": Case(
        b"AUTH PLAIN\r\nAGJvYgBzZWNyZXQ=\r\n",
        [command("AUTH", b"PLAIN"), ContinuationLine(b"AGJvYgBzZWNyZXQ=")],
        continuations=1,
    ),
    "auth login two continuations": Case(
        b"AUTH LOGIN\r\nYm9i\r\nc2VjcmV0\r\n",
        [
            command("AUTH", b"LOGIN"),
            ContinuationLine(b"Ym9i"),
            ContinuationLine(b"c2VjcmV0"),
        ],
        continuations=2,
    ),
    "auth cancelled with star": Case(
        b"AUTH PLAIN\r\n*\r\n",
        [command("AUTH", b"PLAIN"), ContinuationLine(b"*")],
        continuations=1,
    ),
    "auth empty continuation": Case(
        b"AUTH PLAIN\r\n\r\n",
        [command("AUTH", b"PLAIN"), ContinuationLine(b"")],
        continuations=1,
    ),
    "auth continuation with nonsense": Case(
        b"AUTH PLAIN\r\n \t\x7f\xff\r\n",
        [command("AUTH", b"PLAIN"), ContinuationLine(b" \t\x7f\xff")],
        continuations=1,
    ),
    "auth no argument": Case(b"AUTH\r\n", [Command("AUTH")]),
    "capa": Case(b"CAPA\r\n", [Command("CAPA")]),
    "capa trailing space": Case(b"CAPA \r\n", [Command("CAPA", (b"",), b"")]),
    "quit": Case(b"QUIT\r\n", [Command("QUIT")]),
    "stls": Case(b"stls\r\n", [Command("STLS")]),
    "unknown 16 letter keyword": Case(
        b"Xabcdefghijklmno\r\n", [Command("XABCDEFGHIJKLMNO")]
    ),
    "pipelined commands": Case(
        b"CAPA\r\nUSER bob\r\nPASS pw\r\n",
        [Command("CAPA"), command("USER", b"bob"), command("PASS", b"pw")],
    ),
    "line of exactly max length": Case(
        b"PASS " + b"x" * 505 + b"\r\n", [command("PASS", b"x" * 505)]
    ),
}

# Every error input contains "s3cret" so that a test can check messages never quote it.
ERROR_CASES = {
    "empty line": Case(b"\r\n", [Rejected(EMPTY)]),
    "nul byte": Case(b"PASS s3\x00cret\r\n", [Rejected(NUL)]),
    "bare cr inside line": Case(b"PASS s3\rcret\r\n", [Rejected(BARE_CR)]),
    "bare cr before crlf": Case(b"PASS s3cret\r\r\n", [Rejected(BARE_CR)]),
    "bare lf ending": Case(b"PASS s3cret\n", [Rejected(BARE_LF)]),
    "lone lf": Case(b"\n", [Rejected(BARE_LF)]),
    "keyword with digit": Case(b"PA55 s3cret\r\n", [Rejected(BAD_KEYWORD)]),
    "keyword with 8-bit byte": Case(b"P\xc3\xa4SS s3cret\r\n", [Rejected(BAD_KEYWORD)]),
    "keyword of 17 letters": Case(
        b"Xabcdefghijklmnop s3cret\r\n", [Rejected(BAD_KEYWORD)]
    ),
    "leading space": Case(b" PASS s3cret\r\n", [Rejected(BAD_KEYWORD)]),
    "tab separator": Case(b"PASS\ts3cret\r\n", [Rejected(BAD_KEYWORD)]),
    "line one octet too long": Case(
        b"PASS s3cret" + b"x" * 500 + b"\r\n", [Rejected(TOO_LONG)]
    ),
    "line far too long": Case(
        b"PASS s3cret" + b"x" * 5000 + b"\r\n", [Rejected(TOO_LONG)]
    ),
    "long line without cr": Case(
        b"PASS s3cret" + b"x" * 600 + b"\n", [Rejected(TOO_LONG)]
    ),
    "error between commands": Case(
        b"USER bob\r\nPASS s3\x00cret\r\nQUIT\r\n",
        [command("USER", b"bob"), Rejected(NUL), Command("QUIT")],
    ),
    "error in continuation": Case(
        b"AUTH PLAIN\r\ns3\x00cret\r\n",
        [command("AUTH", b"PLAIN"), Rejected(NUL)],
        continuations=1,
    ),
    "overlong continuation": Case(
        b"AUTH PLAIN\r\ns3cret" + b"A" * 600 + b"\r\n",
        [command("AUTH", b"PLAIN"), Rejected(TOO_LONG)],
        continuations=1,
    ),
}

ALL_CASES = {**VALID_CASES, **ERROR_CASES}


class SimulatedSession:
    """Requests continuation lines after an AUTH command, as the proxy session does."""

    def __init__(self, continuations: int) -> None:
        self.remaining = continuations

    def on_event(self, reader: CommandReader, event: object) -> None:
        opens_exchange = isinstance(event, Command) and event.name == "AUTH"
        if self.remaining and (opens_exchange or isinstance(event, ContinuationLine)):
            self.remaining -= 1
            reader.expect_continuation_line()


def drain(reader: CommandReader, session: SimulatedSession, outcomes: list) -> None:
    for _ in range(MAX_EVENTS_PER_FEED):
        try:
            event = reader.next_event()
        except ClientProtocolError as error:
            outcomes.append(Rejected(error.message))
            continue
        if event is None:
            return
        outcomes.append(event)
        session.on_event(reader, event)
    raise AssertionError("reader kept returning events")


def run(chunks: list[bytes], continuations: int = 0) -> list:
    reader = CommandReader()
    session = SimulatedSession(continuations)
    outcomes: list = []
    for chunk in chunks:
        reader.feed(chunk)
        drain(reader, session, outcomes)
    return outcomes


def one_byte_chunks(data: bytes) -> list[bytes]:
    return [data[index : index + 1] for index in range(len(data))]


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_commands_fed_whole(case: Case) -> None:
    assert run([case.data], case.continuations) == case.expected


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_commands_fed_one_byte_at_a_time(case: Case) -> None:
    assert run(one_byte_chunks(case.data), case.continuations) == case.expected


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_commands_then_trailing_command_parses(case: Case) -> None:
    outcomes = run([case.data + TRAILER], case.continuations)
    assert outcomes == [*case.expected, TRAILER_EVENT]


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_commands_split_at_every_byte(case: Case) -> None:
    data = case.data + TRAILER
    for split in range(len(data) + 1):
        outcomes = run([data[:split], data[split:]], case.continuations)
        assert outcomes == [*case.expected, TRAILER_EVENT], f"split at {split}"


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error_messages_never_quote_input(case: Case) -> None:
    for outcome in run([case.data], case.continuations):
        assert "s3" not in getattr(outcome, "message", "")


def test_command_repr_hides_password() -> None:
    assert "s3cret" not in repr(command("PASS", b"s3cret"))


def test_continuation_repr_hides_response() -> None:
    assert "AGJvYg" not in repr(ContinuationLine(b"AGJvYgBzZWNyZXQ="))


def test_error_is_not_fatal() -> None:
    reader = CommandReader()
    reader.feed(b"\r\n")
    with pytest.raises(ClientProtocolError) as caught:
        reader.next_event()
    assert caught.value.fatal is False


def test_continuation_expectation_covers_one_line() -> None:
    reader = CommandReader()
    reader.expect_continuation_line()
    reader.feed(b"AUTH\r\nCAPA\r\n")
    assert reader.next_event() == ContinuationLine(b"AUTH")
    assert reader.next_event() == Command("CAPA")


def test_overlong_line_is_not_buffered() -> None:
    reader = CommandReader()
    reader.feed(b"x" * 1_000_000)
    with pytest.raises(ClientProtocolError):
        reader.next_event()
    reader.feed(b"y" * 1_000_000)
    assert reader.buffered_size == 0


def test_incomplete_line_stays_under_max_length() -> None:
    reader = CommandReader(max_line_length=16)
    reader.feed(b"PASS 0123456789")
    assert reader.next_event() is None
    assert reader.buffered_size == 15


def test_take_buffered_returns_pipelined_bytes() -> None:
    reader = CommandReader()
    reader.feed(b"PASS pw\r\nSTAT\r\nLIST")
    reader.next_event()
    assert reader.take_buffered() == b"STAT\r\nLIST"
    assert reader.buffered_size == 0


def test_take_buffered_ends_overlong_discard() -> None:
    reader = CommandReader(max_line_length=16)
    reader.feed(b"x" * 20)
    with pytest.raises(ClientProtocolError):
        reader.next_event()
    reader.take_buffered()
    reader.feed(b"CAPA\r\n")
    assert reader.next_event() == Command("CAPA")


def test_take_buffered_cancels_continuation() -> None:
    reader = CommandReader()
    reader.expect_continuation_line()
    reader.take_buffered()
    reader.feed(b"CAPA\r\n")
    assert reader.next_event() == Command("CAPA")


FORMATTED_COMMANDS = {
    "no argument": (("CAPA",), b"CAPA\r\n"),
    "one argument": (("USER", b"bob"), b"USER bob\r\n"),
    "argument with spaces": (("PASS", b"a b c"), b"PASS a b c\r\n"),
    "empty argument": (("PASS", b""), b"PASS \r\n"),
    "two arguments": (("AUTH", b"PLAIN", b"="), b"AUTH PLAIN =\r\n"),
    "utf8 argument": (("USER", "jürgen".encode()), "USER jürgen\r\n".encode()),
}


@pytest.mark.parametrize(
    ("call", "expected"), FORMATTED_COMMANDS.values(), ids=FORMATTED_COMMANDS.keys()
)
def test_format_command_output(call: tuple, expected: bytes) -> None:
    assert format_command(*call) == expected


@pytest.mark.parametrize("argument", [b"a\rb", b"a\nb", b"a\x00b", b"\r\n"])
def test_format_command_rejects_line_breaking_argument(argument: bytes) -> None:
    with pytest.raises(ValueError):
        format_command("PASS", argument)


@pytest.mark.parametrize("name", ["", "US3R", "ÜSER", "USER ", "Xabcdefghijklmnop"])
def test_format_command_rejects_invalid_name(name: str) -> None:
    with pytest.raises(ValueError):
        format_command(name, b"bob")


def test_format_command_error_omits_argument() -> None:
    with pytest.raises(ValueError) as caught:
        format_command("PASS", b"s3cret\r\n")
    assert "s3cret" not in str(caught.value)


def test_formatted_command_parses_back() -> None:
    reader = CommandReader()
    reader.feed(format_command("PASS", 'pä ss\\"'.encode()))
    assert reader.next_event() == command("PASS", 'pä ss\\"'.encode())
