"""Hypothesis fuzzing of the POP3 readers with random and protocol-shaped bytes."""

import itertools
import string
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocols.errors import ClientProtocolError, UpstreamProtocolError
from appliance.protocols.pop3 import (
    Command,
    CommandReader,
    ContinuationLine,
    Multiline,
    ResponseReader,
    format_command,
    format_multiline,
)

# Generous for a call that scans at most a few MiB, so that a slow CI host passes.
MAX_CALL_SECONDS = 0.5
MAX_EVENTS_PER_FEED = 1_000_000

TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b".",
    b"..",
    b".\r\n",
    b"+",
    b"+ ",
    b"+OK",
    b"-ERR",
    b"[SYS/TEMP]",
    b"USER",
    b"PASS",
    b"AUTH PLAIN",
    b"CAPA",
    b"\xff",
    b"x" * 40,
]

# Whole lines let the readers get past the first line and reach deeper states.
LINES = [
    b"+OK\r\n",
    b"+OK ready <1.2@host>\r\n",
    b"-ERR [SYS/TEMP] later\r\n",
    b"+ dGVzdA==\r\n",
    b"..stuffed\r\n",
    b".\r\n",
    b"SASL PLAIN\r\n",
    b"USER bob\r\n",
    b"PASS a b\r\n",
    b"AUTH PLAIN\r\n",
    b"*\r\n",
    b"\r\n",
]

lines = st.sampled_from(LINES)
# Listing lines three times draws them three times as often as the other kinds.
pieces = st.one_of(lines, lines, lines, st.sampled_from(TOKENS), st.binary(max_size=16))
chunks = st.lists(pieces, max_size=16).map(b"".join)

rarely = st.integers(min_value=0, max_value=9).map(lambda draw: draw == 0)

FUZZ_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def timed_next_event(reader):
    """Call reader.next_event() and fail if it takes longer than MAX_CALL_SECONDS."""
    started = time.perf_counter()
    try:
        return reader.next_event()
    finally:
        elapsed = time.perf_counter() - started
        assert elapsed < MAX_CALL_SECONDS, f"next_event took {elapsed:.3f} s"


def drain_commands(reader: CommandReader) -> list:
    outcomes: list = []
    for _ in range(MAX_EVENTS_PER_FEED):
        try:
            event = timed_next_event(reader)
        except ClientProtocolError as error:
            assert error.fatal is False
            outcomes.append(error)
            continue
        if event is None:
            return outcomes
        outcomes.append(event)
    raise AssertionError("reader kept returning events")


def check_command_event(event: object, max_line_length: int) -> None:
    if isinstance(event, Command):
        assert event.name.isascii()
        assert event.name.isalpha()
        assert event.name.isupper()
        separator = 1 if event.args else 0
        line_length = len(event.name) + separator + len(event.argument) + 2
        assert line_length <= max_line_length
    elif isinstance(event, ContinuationLine):
        assert len(event.data) <= max_line_length - 2
        assert b"\r" not in event.data
        assert b"\n" not in event.data
        assert b"\x00" not in event.data
    else:
        assert isinstance(event, ClientProtocolError)


@FUZZ_SETTINGS
@given(
    max_line_length=st.sampled_from([3, 8, 32, 512]),
    steps=st.lists(st.tuples(chunks, st.booleans()), max_size=8),
)
def test_command_reader_survives_random_bytes(max_line_length: int, steps) -> None:
    reader = CommandReader(max_line_length=max_line_length)
    for data, expect_continuation in steps:
        if expect_continuation:
            reader.expect_continuation_line()
        reader.feed(data)
        for outcome in drain_commands(reader):
            check_command_event(outcome, max_line_length)
        assert reader.buffered_size < max_line_length


@FUZZ_SETTINGS
@given(garbage=st.lists(chunks, max_size=8))
def test_command_reader_resynchronizes_after_garbage(garbage: list[bytes]) -> None:
    reader = CommandReader(max_line_length=64)
    for data in garbage:
        reader.feed(data)
        drain_commands(reader)
    reader.feed(b"\r\nNOOP\r\n")
    assert drain_commands(reader)[-1] == Command("NOOP")


def declare_nothing() -> None:
    """Leave the next response undeclared, as a session does when it expects none."""


def drain_responses(reader: ResponseReader, expect_next) -> list:
    """Return the outcomes until None or a fatal error, calling expect_next() after
    each event and each non-fatal error."""
    outcomes: list = []
    for _ in range(MAX_EVENTS_PER_FEED):
        try:
            event = timed_next_event(reader)
        except UpstreamProtocolError as error:
            outcomes.append(error)
            if error.fatal:
                return outcomes
            expect_next()
            continue
        if event is None:
            return outcomes
        outcomes.append(event)
        expect_next()
    raise AssertionError("reader kept returning events")


def check_fatal_error_repeats(reader: ResponseReader) -> None:
    reader.feed(b"+OK\r\n")
    try:
        timed_next_event(reader)
    except UpstreamProtocolError as error:
        assert error.fatal is True
    else:
        raise AssertionError("reader returned an event after a fatal error")
    assert reader.buffered_size == 0


@FUZZ_SETTINGS
@given(
    max_line_length=st.sampled_from([3, 24, 4096]),
    max_multiline_size=st.sampled_from([8, 256, 65536]),
    steps=st.lists(st.tuples(chunks, rarely), max_size=8),
    data=st.data(),
)
def test_response_reader_survives_random_bytes(
    max_line_length: int, max_multiline_size: int, steps, data
) -> None:
    reader = ResponseReader(max_line_length, max_multiline_size)

    def expect_next() -> None:
        if data.draw(st.booleans(), label="multiline"):
            reader.expect_multiline()
        else:
            reader.expect_status()

    expect_next()
    for chunk, skip_expectation in steps:
        reader.feed(chunk)
        expect_after_event = declare_nothing if skip_expectation else expect_next
        outcomes = drain_responses(reader, expect_after_event)
        if outcomes and getattr(outcomes[-1], "fatal", False):
            check_fatal_error_repeats(reader)
            return
        for outcome in outcomes:
            if isinstance(outcome, Multiline):
                assert len(outcome.raw) <= max_multiline_size
        assert reader.buffered_size < max_line_length + max_multiline_size


line_content = st.binary(max_size=40).filter(
    lambda line: not any(byte in line for byte in (b"\r", b"\n", b"\x00"))
)


def split_at(data: bytes, offsets: list[int]) -> list[bytes]:
    cuts = sorted({0, len(data), *(offset % (len(data) + 1) for offset in offsets)})
    return [data[start:end] for start, end in itertools.pairwise(cuts)]


@FUZZ_SETTINGS
@given(
    body=st.lists(line_content, max_size=12),
    offsets=st.lists(st.integers(min_value=0), max_size=6),
)
def test_multiline_round_trips_at_any_split(
    body: list[bytes], offsets: list[int]
) -> None:
    raw = format_multiline("List follows", body)
    reader = ResponseReader()
    reader.expect_multiline()
    events = []
    for chunk in split_at(raw, offsets):
        reader.feed(chunk)
        events += drain_responses(reader, declare_nothing)
    assert events == [Multiline(events[0].status, tuple(body), raw)]


@FUZZ_SETTINGS
@given(
    name=st.text(alphabet=string.ascii_letters, min_size=1, max_size=16),
    args=st.lists(line_content, max_size=4),
    offsets=st.lists(st.integers(min_value=0), max_size=6),
)
def test_command_round_trips_at_any_split(
    name: str, args: list[bytes], offsets: list[int]
) -> None:
    raw = format_command(name, *args)
    reader = CommandReader(max_line_length=4096)
    events = []
    for chunk in split_at(raw, offsets):
        reader.feed(chunk)
        events += drain_commands(reader)
    argument = b" ".join(args)
    expected_args = tuple(argument.split(b" ")) if args else ()
    assert events == [Command(name.upper(), expected_args, argument)]


def test_many_pipelined_commands_parse_quickly() -> None:
    reader = CommandReader()
    reader.feed(b"NOOP\r\n" * 50_000)
    events = drain_commands(reader)
    assert len(events) == 50_000


def test_megabytes_without_lf_fail_quickly() -> None:
    reader = ResponseReader()
    reader.expect_status()
    reader.feed(b"+OK " + b"x" * 4_000_000)
    events = drain_responses(reader, declare_nothing)
    assert events[0].fatal is True
