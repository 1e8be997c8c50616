"""Hypothesis fuzzing of the IMAP readers with random bytes and random token mixes.

Invariants: only the reader's protocol error escapes, every next_event() call returns
quickly, buffered memory stays within the configured limits, and the events do not
depend on how the input is split into segments.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocols.errors import ClientProtocolError, UpstreamProtocolError
from appliance.protocols.imap.commands import Command, CommandReader
from appliance.protocols.imap.responses import ResponseReader

COMMAND_LIMITS = {"max_line_length": 64, "max_literal_size": 16, "max_literals": 2}
COMMAND_MEMORY_BOUND = 64 + 16 * 2 + 2
RESPONSE_LIMITS = {"max_line_length": 64, "max_literal_size": 32}
RESPONSE_MEMORY_BOUND = 64 + 32 + 2
# Generous, so that a loaded CI machine does not flake. Parsing these short inputs
# is far faster, so only a runaway loop would come near it.
MAX_CALL_SECONDS = 0.5

COMMAND_FRAGMENTS = [
    b"a1",
    b"a2 ",
    b" ",
    b"LOGIN",
    b"AUTHENTICATE PLAIN",
    b"NOOP",
    b"ID",
    b"NIL",
    b'"',
    b'"x y"',
    b"\\",
    b'\\"',
    b"(",
    b")",
    b"{",
    b"}",
    b"{3}",
    b"{3+}",
    b"{0}",
    b"~{2}",
    b"{17}",
    b"{17+}",
    b"{99999999999999999999}",
    b"{-1}",
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"\xc3\xa9",
    b"abc",
    b"*",
    b"[",
    b"]",
    b"BODY[]<0.1>",
    b"x" * 50,
]

RESPONSE_FRAGMENTS = [
    b"* ",
    b"+ ",
    b"+",
    b"a1 ",
    b"OK",
    b"NO ",
    b"BAD",
    b"BYE",
    b"PREAUTH",
    b"CAPABILITY",
    b"ID (",
    b"3 EXISTS",
    b"[",
    b"]",
    b"{3}",
    b"{0}",
    b"{40}",
    b"{99999999999999999999}",
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"text",
    b" ",
    b"\xff",
    b"x" * 50,
]

command_streams = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from(COMMAND_FRAGMENTS), max_size=80).map(b"".join),
)
response_streams = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from(RESPONSE_FRAGMENTS), max_size=80).map(b"".join),
)
cut_points = st.lists(st.integers(min_value=0, max_value=600), max_size=40)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def describe_command_event(event: Any) -> tuple:
    if isinstance(event, Command):
        return (type(event).__name__, event.tag, event.name, event.args)
    return (type(event).__name__, getattr(event, "data", None))


def drain(
    reader: Any,
    error_type: type[Exception],
    describe: Any,
    outcomes: list[tuple],
    on_event: Any = None,
) -> bool:
    """Collect events until the reader needs input, or False after a fatal error."""
    for _ in range(10_000):
        started = time.perf_counter()
        try:
            event = reader.next_event()
        except error_type as error:
            assert time.perf_counter() - started < MAX_CALL_SECONDS
            outcomes.append(("error", getattr(error, "tag", None), error.fatal))
            if error.fatal:
                return False
            continue
        assert time.perf_counter() - started < MAX_CALL_SECONDS
        if event is None:
            return True
        outcomes.append(describe(event))
        if on_event is not None:
            on_event(reader, event)
    raise AssertionError("reader returned events without end")


def expect_line_after_authenticate(reader: CommandReader, event: Any) -> None:
    if isinstance(event, Command) and event.name == "AUTHENTICATE":
        reader.expect_continuation_line()


def run_commands(chunks: list[bytes]) -> list[tuple]:
    reader = CommandReader(**COMMAND_LIMITS)
    outcomes: list[tuple] = []
    for chunk in chunks:
        reader.feed(chunk)
        settled = drain(
            reader,
            ClientProtocolError,
            describe_command_event,
            outcomes,
            expect_line_after_authenticate,
        )
        assert reader.buffered_size <= COMMAND_MEMORY_BOUND
        if not settled:
            break
    return outcomes


def describe_response(response: Any) -> tuple:
    return (
        response.kind,
        response.tag,
        response.status,
        response.code,
        response.text,
        response.raw,
    )


def run_responses(chunks: list[bytes]) -> list[tuple]:
    reader = ResponseReader(**RESPONSE_LIMITS)
    outcomes: list[tuple] = []
    for chunk in chunks:
        reader.feed(chunk)
        settled = drain(reader, UpstreamProtocolError, describe_response, outcomes)
        assert reader.buffered_size <= RESPONSE_MEMORY_BOUND
        if not settled:
            break
    return outcomes


fuzz_settings = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@fuzz_settings
@given(data=command_streams, cuts=cut_points)
def test_command_reader_survives_any_input(data: bytes, cuts: list[int]) -> None:
    chunked = run_commands(split(data, cuts))
    whole = run_commands([data])

    assert chunked == whole


@fuzz_settings
@given(data=command_streams)
def test_command_reader_bytewise_matches_whole(data: bytes) -> None:
    bytewise = run_commands([data[i : i + 1] for i in range(len(data))])
    whole = run_commands([data])

    assert bytewise == whole


@fuzz_settings
@given(data=response_streams, cuts=cut_points)
def test_response_reader_survives_any_input(data: bytes, cuts: list[int]) -> None:
    chunked = run_responses(split(data, cuts))
    whole = run_responses([data])

    assert chunked == whole


@fuzz_settings
@given(data=response_streams)
def test_response_reader_bytewise_matches_whole(data: bytes) -> None:
    bytewise = run_responses([data[i : i + 1] for i in range(len(data))])
    whole = run_responses([data])

    assert bytewise == whole


@settings(max_examples=50, deadline=None)
@given(size=st.integers(min_value=1_000, max_value=200_000))
def test_large_input_stays_bounded(size: int) -> None:
    reader = CommandReader(**COMMAND_LIMITS)
    outcomes: list[tuple] = []
    reader.feed(b"a1 LOGIN " + b"x" * size)
    drain(reader, ClientProtocolError, describe_command_event, outcomes)
    buffered = reader.buffered_size
    reader.feed(b"\r\n")
    drain(reader, ClientProtocolError, describe_command_event, outcomes)

    assert buffered <= COMMAND_MEMORY_BOUND
    # The reader reports an over-long line at its end.
    assert outcomes == [("error", "a1", False)]
