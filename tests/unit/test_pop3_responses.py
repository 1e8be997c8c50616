"""ResponseReader, status parsing, CAPA helpers and reply builders for POP3."""

from dataclasses import dataclass, field

import pytest

from appliance.protocols.errors import UpstreamProtocolError
from appliance.protocols.pop3 import (
    Continuation,
    Multiline,
    ResponseReader,
    Status,
    StatusResponse,
    format_continuation,
    format_err,
    format_multiline,
    format_ok,
    greeting_timestamp,
    parse_capa,
    parse_status,
    sasl_mechanisms,
)

MAX_EVENTS_PER_FEED = 1000
TRAILER = b"+OK next\r\n"
TRAILER_EVENT = Status(StatusResponse(True, None, "next"), TRAILER)

CAPA_RESPONSE = (
    b"+OK Capability list follows\r\n"
    b"CAPA\r\n"
    b"TOP\r\n"
    b"SASL PLAIN LOGIN\r\n"
    b"..X-DOT-STUFFED\r\n"
    b"..\r\n"
    b"STLS\r\n"
    b".\r\n"
)
CAPA_EVENT = Multiline(
    StatusResponse(True, None, "Capability list follows"),
    (b"CAPA", b"TOP", b"SASL PLAIN LOGIN", b".X-DOT-STUFFED", b".", b"STLS"),
    CAPA_RESPONSE,
)


@dataclass(frozen=True)
class Rejected:
    message: str
    fatal: bool


@dataclass(frozen=True)
class Case:
    # One of "status" or "multiline" for each response, declared before it is read.
    expectations: list[str]
    data: bytes
    expected: list
    limits: dict = field(default_factory=dict)


def status_event(line: bytes) -> Status:
    return Status(parse_status(line), line)


VALID_CASES = {
    "greeting": Case(
        ["status"],
        b"+OK Dovecot ready. <1.2@mail>\r\n",
        [status_event(b"+OK Dovecot ready. <1.2@mail>\r\n")],
    ),
    "bare ok": Case(["status"], b"+OK\r\n", [status_event(b"+OK\r\n")]),
    "err with code": Case(
        ["status"],
        b"-ERR [AUTH] Authentication failed.\r\n",
        [status_event(b"-ERR [AUTH] Authentication failed.\r\n")],
    ),
    "status with 8-bit text": Case(
        ["status"],
        b"+OK caf\xc3\xa9 \xff\r\n",
        [status_event(b"+OK caf\xc3\xa9 \xff\r\n")],
    ),
    "sasl continuation then ok": Case(
        ["status", "status"],
        b"+ \r\n+OK Logged in.\r\n",
        [Continuation(b""), status_event(b"+OK Logged in.\r\n")],
    ),
    "sasl continuation with challenge": Case(
        ["status"], b"+ VXNlcm5hbWU6\r\n", [Continuation(b"VXNlcm5hbWU6")]
    ),
    "sasl continuation without space": Case(["status"], b"+\r\n", [Continuation(b"")]),
    "capa with dot-stuffed lines": Case(["multiline"], CAPA_RESPONSE, [CAPA_EVENT]),
    "empty multiline": Case(
        ["multiline"],
        b"+OK\r\n.\r\n",
        [Multiline(StatusResponse(True, None, ""), (), b"+OK\r\n.\r\n")],
    ),
    "multiline body looks like status": Case(
        ["multiline"],
        b"+OK\r\n-ERR\r\n+ \r\n.\r\n",
        [
            Multiline(
                StatusResponse(True, None, ""),
                (b"-ERR", b"+ "),
                b"+OK\r\n-ERR\r\n+ \r\n.\r\n",
            )
        ],
    ),
    "multiline refused with err": Case(
        ["multiline"],
        b"-ERR [SYS/TEMP] later\r\n",
        [status_event(b"-ERR [SYS/TEMP] later\r\n")],
    ),
    "multiline then status": Case(
        ["multiline", "status"],
        CAPA_RESPONSE + b"+OK bob\r\n",
        [CAPA_EVENT, status_event(b"+OK bob\r\n")],
    ),
    "line of exactly max length": Case(
        ["status"],
        b"+OK " + b"x" * 10 + b"\r\n",
        [status_event(b"+OK " + b"x" * 10 + b"\r\n")],
        limits={"max_line_length": 16},
    ),
    "multiline of exactly max size": Case(
        ["multiline"],
        b"+OK\r\n" + b"x" * 6 + b"\r\n.\r\n",
        [
            Multiline(
                StatusResponse(True, None, ""),
                (b"x" * 6,),
                b"+OK\r\n" + b"x" * 6 + b"\r\n.\r\n",
            )
        ],
        limits={"max_multiline_size": 16},
    ),
}

ERROR_CASES = {
    "unknown status": Case(
        ["status"],
        b"HELLO\r\n",
        [Rejected("Status line does not start with +OK or -ERR", False)],
    ),
    "lower case status": Case(
        ["status"],
        b"+ok\r\n",
        [Rejected("Status line does not start with +OK or -ERR", False)],
    ),
    "continuation when multiline expected": Case(
        ["multiline"],
        b"+ abc\r\n",
        [Rejected("Status line does not start with +OK or -ERR", False)],
    ),
    "nul in status line": Case(
        ["status"],
        b"+OK a\x00b\r\n",
        [Rejected("Status line contains a NUL byte", False)],
    ),
    "bare cr in status line": Case(
        ["status"],
        b"+OK a\rb\r\n",
        [Rejected("Status line contains a CR without LF", False)],
    ),
    "bare lf status line": Case(
        ["status"], b"+OK\n", [Rejected("Status line does not end with CRLF", False)]
    ),
    "nul in body": Case(
        ["multiline"],
        b"+OK\r\nSA\x00SL\r\n.\r\n",
        [Rejected("Multi-line body contains a NUL byte", True)],
    ),
    "bare lf in body": Case(
        ["multiline"],
        b"+OK\r\nSASL\n.\r\n",
        [Rejected("Multi-line body does not end with CRLF", True)],
    ),
    "bare lf terminator": Case(
        ["multiline"],
        b"+OK\r\n.\n",
        [Rejected("Multi-line body does not end with CRLF", True)],
    ),
    "status line too long": Case(
        ["status"],
        b"+OK " + b"x" * 11 + b"\r\n",
        [Rejected("Response line exceeds 16 octets", True)],
        limits={"max_line_length": 16},
    ),
    "body line too long": Case(
        ["multiline"],
        b"+OK\r\n" + b"x" * 100 + b"\r\n.\r\n",
        [Rejected("Response line exceeds 16 octets", True)],
        limits={"max_line_length": 16},
    ),
    "multiline too large": Case(
        ["multiline"],
        b"+OK\r\n" + b"x\r\n" * 6 + b".\r\n",
        [Rejected("Multi-line response exceeds 16 octets", True)],
        limits={"max_multiline_size": 16},
    ),
    "response when none expected": Case(
        [],
        b"+OK\r\n",
        [Rejected("Server sent a response when none was expected", True)],
    ),
    "second response unexpected": Case(
        ["status"],
        b"+OK\r\n-ERR bye\r\n",
        [
            status_event(b"+OK\r\n"),
            Rejected("Server sent a response when none was expected", True),
        ],
    ),
}

ALL_CASES = {**VALID_CASES, **ERROR_CASES}


class SimulatedSession:
    """Declares each expected response before the reader reaches it."""

    def __init__(self, reader: ResponseReader, expectations: list[str]) -> None:
        self.reader = reader
        self.pending = list(expectations)

    def expect_next(self) -> None:
        if not self.pending:
            return
        if self.pending.pop(0) == "multiline":
            self.reader.expect_multiline()
        else:
            self.reader.expect_status()


def drain(session: SimulatedSession, outcomes: list) -> bool:
    """Append the reader's events to outcomes and return False after a fatal error."""
    for _ in range(MAX_EVENTS_PER_FEED):
        try:
            event = session.reader.next_event()
        except UpstreamProtocolError as error:
            outcomes.append(Rejected(error.message, error.fatal))
            if error.fatal:
                return False
            session.expect_next()
            continue
        if event is None:
            return True
        outcomes.append(event)
        session.expect_next()
    raise AssertionError("reader kept returning events")


def run(
    case: Case, chunks: list[bytes], extra_expectations: list[str] | None = None
) -> list:
    session = SimulatedSession(ResponseReader(**case.limits), case.expectations)
    session.pending += extra_expectations or []
    session.expect_next()
    outcomes: list = []
    for chunk in chunks:
        session.reader.feed(chunk)
        if not drain(session, outcomes):
            break
    return outcomes


def one_byte_chunks(data: bytes) -> list[bytes]:
    return [data[index : index + 1] for index in range(len(data))]


def ends_fatal(case: Case) -> bool:
    return any(getattr(outcome, "fatal", False) for outcome in case.expected)


def trailer_expectations(case: Case) -> list[str]:
    # A fatal case gets no extra expectation, which would turn an unexpected line
    # into an expected one.
    return [] if ends_fatal(case) else ["status"]


def with_trailer(case: Case) -> list:
    """Return the case's outcomes and then the trailer's, unless the case ends fatal."""
    if ends_fatal(case):
        return case.expected
    return [*case.expected, TRAILER_EVENT]


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_responses_fed_whole(case: Case) -> None:
    assert run(case, [case.data]) == case.expected


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_responses_fed_one_byte_at_a_time(case: Case) -> None:
    assert run(case, one_byte_chunks(case.data)) == case.expected


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_responses_then_trailing_status_parses(case: Case) -> None:
    outcomes = run(case, [case.data + TRAILER], trailer_expectations(case))
    assert outcomes == with_trailer(case)


@pytest.mark.parametrize("case", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_responses_split_at_every_byte(case: Case) -> None:
    data = case.data + TRAILER
    for split in range(len(data) + 1):
        chunks = [data[:split], data[split:]]
        outcomes = run(case, chunks, trailer_expectations(case))
        assert outcomes == with_trailer(case), f"split at {split}"


def test_fatal_error_repeats_on_later_calls() -> None:
    reader = ResponseReader(max_line_length=16)
    reader.expect_status()
    reader.feed(b"x" * 20)
    with pytest.raises(UpstreamProtocolError):
        reader.next_event()
    reader.feed(b"\r\n+OK\r\n")
    with pytest.raises(UpstreamProtocolError) as caught:
        reader.next_event()
    assert caught.value.fatal is True


def test_fatal_error_frees_buffer() -> None:
    reader = ResponseReader(max_multiline_size=16)
    reader.expect_multiline()
    reader.feed(b"+OK\r\n" + b"x\r\n" * 6 + b"more")
    with pytest.raises(UpstreamProtocolError):
        reader.next_event()
    reader.feed(b"+OK\r\n")
    assert reader.buffered_size == 0


def test_partial_multiline_counts_as_buffered() -> None:
    reader = ResponseReader()
    reader.expect_multiline()
    reader.feed(b"+OK\r\nTOP\r\nUI")
    assert reader.next_event() is None
    assert reader.buffered_size == 12


def test_expecting_twice_raises_runtime_error() -> None:
    reader = ResponseReader()
    reader.expect_status()
    with pytest.raises(RuntimeError):
        reader.expect_multiline()


def test_take_buffered_returns_rest() -> None:
    reader = ResponseReader()
    reader.expect_status()
    reader.feed(b"+OK Logged in.\r\nextra")
    reader.next_event()
    assert reader.take_buffered() == b"extra"


def test_take_buffered_clears_expectation() -> None:
    reader = ResponseReader()
    reader.expect_multiline()
    reader.take_buffered()
    reader.expect_status()
    reader.feed(b"+OK\r\n")
    assert reader.next_event() == status_event(b"+OK\r\n")


def test_formatted_multiline_parses_back() -> None:
    lines = [b".", b"..", b".x", b"", b"TOP", "ünïcode".encode()]
    reader = ResponseReader()
    reader.expect_multiline()
    reader.feed(format_multiline("List follows", lines))
    event = reader.next_event()
    assert isinstance(event, Multiline)
    assert event.lines == tuple(lines)


STATUS_LINES = {
    "bare ok": (b"+OK", StatusResponse(True, None, "")),
    "ok with text": (
        b"+OK dovecot ready.",
        StatusResponse(True, None, "dovecot ready."),
    ),
    "ok with crlf": (b"+OK ready\r\n", StatusResponse(True, None, "ready")),
    "bare err": (b"-ERR", StatusResponse(False, None, "")),
    "err with code": (
        b"-ERR [SYS/TEMP] Upstream unavailable",
        StatusResponse(False, "SYS/TEMP", "Upstream unavailable"),
    ),
    "err with code only": (b"-ERR [IN-USE]", StatusResponse(False, "IN-USE", "")),
    "code without space": (
        b"-ERR [AUTH]failed",
        StatusResponse(False, "AUTH", "failed"),
    ),
    "ok with code": (b"+OK [X-A/B] text", StatusResponse(True, "X-A/B", "text")),
    "unclosed bracket": (
        b"-ERR [broken text",
        StatusResponse(False, None, "[broken text"),
    ),
    "empty brackets": (b"-ERR [] text", StatusResponse(False, None, "[] text")),
    "space in brackets": (
        b"-ERR [A B] text",
        StatusResponse(False, None, "[A B] text"),
    ),
    "empty code level": (
        b"-ERR [SYS/] text",
        StatusResponse(False, None, "[SYS/] text"),
    ),
    "utf8 text": (b"+OK caf\xc3\xa9", StatusResponse(True, None, "café")),
    "invalid utf8 text": (b"+OK \xff", StatusResponse(True, None, "\ufffd")),
}


@pytest.mark.parametrize(
    ("line", "expected"), STATUS_LINES.values(), ids=STATUS_LINES.keys()
)
def test_parse_status_result(line: bytes, expected: StatusResponse) -> None:
    assert parse_status(line) == expected


INVALID_STATUS_LINES = [
    b"",
    b"+OKAY",
    b"+ok",
    b"OK",
    b"-ERROR",
    b"+ dGVzdA==",
    b"* OK",
    b" +OK",
    b"+OK a\x00b",
    b"+OK a\rb",
    b"+OK a\nb",
    b"+OK\n",
]


@pytest.mark.parametrize("line", INVALID_STATUS_LINES)
def test_parse_status_rejects_invalid_line(line: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_status(line)


TIMESTAMPS = {
    "rfc 1939 example": (
        "POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
        b"<1896.697170952@dbc.mtview.ca.us>",
    ),
    "dovecot style": ("Dovecot ready. <4b2.1.6f@mail>", b"<4b2.1.6f@mail>"),
    "no timestamp": ("Dovecot ready.", None),
    "no at sign": ("ready <1896.697170952>", None),
    "empty brackets": ("ready <>", None),
    "space inside": ("ready <a b@c>", None),
    "non-ascii inside": ("ready <ä@c>", None),
}


@pytest.mark.parametrize(
    ("text", "expected"), TIMESTAMPS.values(), ids=TIMESTAMPS.keys()
)
def test_greeting_timestamp_result(text: str, expected: bytes | None) -> None:
    assert greeting_timestamp(StatusResponse(True, None, text)) == expected


def test_greeting_timestamp_ignores_err() -> None:
    assert greeting_timestamp(StatusResponse(False, None, "<1.2@host>")) is None


def test_parse_capa_strips_and_drops_empty() -> None:
    lines = [b"CAPA", b"  TOP ", b"", b"SASL PLAIN", b"IMPLEMENTATION caf\xc3\xa9"]
    expected = ["CAPA", "TOP", "SASL PLAIN", "IMPLEMENTATION café"]
    assert parse_capa(lines) == expected


def test_parse_capa_of_capa_response() -> None:
    assert parse_capa(CAPA_EVENT.lines) == [
        "CAPA",
        "TOP",
        "SASL PLAIN LOGIN",
        ".X-DOT-STUFFED",
        ".",
        "STLS",
    ]


def test_sasl_mechanisms_upper_cased_once() -> None:
    caps = ["CAPA", "sasl plain LOGIN", "SASL PLAIN XOAUTH2", "TOP"]
    assert sasl_mechanisms(caps) == ["PLAIN", "LOGIN", "XOAUTH2"]


def test_sasl_mechanisms_without_sasl_line() -> None:
    assert sasl_mechanisms(["CAPA", "SASLX PLAIN", "", "TOP"]) == []


FORMATTED_REPLIES = {
    "ok bare": (format_ok, (), b"+OK\r\n"),
    "ok with text": (format_ok, ("Ready",), b"+OK Ready\r\n"),
    "ok utf8": (format_ok, ("prêt",), "+OK prêt\r\n".encode()),
    "err": (format_err, ("No such command",), b"-ERR No such command\r\n"),
    "err with code": (
        format_err,
        ("Upstream unavailable", "SYS/TEMP"),
        b"-ERR [SYS/TEMP] Upstream unavailable\r\n",
    ),
    "err code only": (format_err, ("", "AUTH"), b"-ERR [AUTH]\r\n"),
    "err empty": (format_err, ("",), b"-ERR\r\n"),
    "continuation empty": (format_continuation, (), b"+ \r\n"),
    "continuation": (format_continuation, (b"dGVzdA==",), b"+ dGVzdA==\r\n"),
    "multiline": (
        format_multiline,
        ("Capability list follows", ["CAPA", b".dot", ".", "", "STLS"]),
        b"+OK Capability list follows\r\nCAPA\r\n..dot\r\n..\r\n\r\nSTLS\r\n.\r\n",
    ),
    "multiline empty": (format_multiline, ("", []), b"+OK\r\n.\r\n"),
}


@pytest.mark.parametrize(
    ("builder", "args", "expected"),
    FORMATTED_REPLIES.values(),
    ids=FORMATTED_REPLIES.keys(),
)
def test_reply_builder_output(builder, args: tuple, expected: bytes) -> None:
    assert builder(*args) == expected


INVALID_REPLIES = {
    "ok with crlf": (format_ok, ("a\r\n-ERR b",)),
    "ok with nul": (format_ok, ("a\x00",)),
    "err with lf": (format_err, ("a\nb",)),
    "err code with space": (format_err, ("x", "SYS TEMP")),
    "err code with bracket": (format_err, ("x", "SYS]")),
    "err empty code level": (format_err, ("x", "SYS/")),
    "err empty code": (format_err, ("x", "")),
    "err non-ascii code": (format_err, ("x", "SŸS")),
    "continuation with cr": (format_continuation, (b"a\r",)),
    "multiline status with lf": (format_multiline, ("a\nb", [])),
    "multiline bytes line with lf": (format_multiline, ("", [b"a\nb"])),
    "multiline text line with cr": (format_multiline, ("", ["a\rb"])),
}


@pytest.mark.parametrize(
    ("builder", "args"), INVALID_REPLIES.values(), ids=INVALID_REPLIES.keys()
)
def test_reply_builder_rejects_invalid_input(builder, args: tuple) -> None:
    with pytest.raises(ValueError):
        builder(*args)


def test_formatted_err_parses_back() -> None:
    status = parse_status(format_err("Upstream unavailable", "SYS/TEMP"))
    assert status == StatusResponse(False, "SYS/TEMP", "Upstream unavailable")
