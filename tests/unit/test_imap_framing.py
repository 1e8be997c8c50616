"""InputBuffer and line_content, the framing shared by both IMAP readers."""

from __future__ import annotations

import pytest

from appliance.protocols.imap.framing import InputBuffer, LineTooLong, line_content


def lines_of(chunks: list[bytes], max_length: int) -> list[bytes]:
    buffer = InputBuffer()
    lines = []
    for chunk in chunks:
        buffer.append(chunk)
        while (line := buffer.take_line(max_length)) is not None:
            lines.append(line)
    return lines


DATA = b"a1 NOOP\r\nb2 LOGOUT\r\n"


@pytest.mark.parametrize(
    "chunks",
    [[DATA], [DATA[i : i + 1] for i in range(len(DATA))], [DATA + b"c3 X"]],
    ids=["whole", "bytewise", "trailing"],
)
def test_take_line_cuts_at_each_lf(chunks: list[bytes]) -> None:
    assert lines_of(chunks, 100) == [b"a1 NOOP\r\n", b"b2 LOGOUT\r\n"]


def test_take_line_allows_exactly_the_cap() -> None:
    assert lines_of([b"abcd\r\n"], 4) == [b"abcd\r\n"]


def test_take_line_rejects_past_the_cap() -> None:
    buffer = InputBuffer()
    buffer.append(b"abcde\r\n")
    with pytest.raises(LineTooLong) as raised:
        buffer.take_line(4)
    assert raised.value.scanned == 6
    assert len(buffer) == 7


def test_take_line_waits_below_the_cap() -> None:
    buffer = InputBuffer()
    for byte in b"abcde":
        buffer.append(bytes([byte]))
        assert buffer.take_line(4) is None
    buffer.append(b"\r")
    with pytest.raises(LineTooLong):
        buffer.take_line(4)


def test_take_returns_at_most_count() -> None:
    buffer = InputBuffer()
    buffer.append(b"abc")
    assert buffer.take(5) == b"abc"
    buffer.append(b"defgh\r\n")
    assert buffer.take(2) == b"de"
    assert buffer.take_line(10) == b"fgh\r\n"


def test_take_all_empties_buffer() -> None:
    buffer = InputBuffer()
    buffer.append(b"partial line")
    assert buffer.take_line(100) is None
    assert buffer.take_all() == b"partial line"
    assert len(buffer) == 0
    buffer.append(b"x\r\n")
    assert buffer.take_line(100) == b"x\r\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"a1 NOOP\n", "command line must end with CRLF"),
        (b"a1\rNOOP\r\n", "bare CR in command line"),
        (b"a1 \0NOOP\r\n", "NUL byte in command line"),
    ],
)
def test_line_content_rejects_bad_line(line: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        line_content(line, "command line", ValueError)


def test_line_content_strips_crlf() -> None:
    assert line_content(b"a1 NOOP\r\n", "command line", ValueError) == b"a1 NOOP"
