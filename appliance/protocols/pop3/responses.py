"""Parser for POP3 server responses in the AUTHORIZATION state (RFC 1939, RFC 2449
CAPA and response codes, RFC 5034 SASL continuations)."""

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.protocols.errors import UpstreamProtocolError
from appliance.protocols.pop3.wire import (
    CRLF,
    RESPONSE_CODE,
    LineBuffer,
    LineTooLongError,
    find_line_defect,
)

# RFC 1939 APOP timestamp: an RFC 822 msg-id such as <1896.697170952@dbc.mtview.ca.us>.
_TIMESTAMP = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")
_TERMINATOR = b"." + CRLF


@dataclass(frozen=True, slots=True)
class StatusResponse:
    """A ``+OK`` or ``-ERR`` status line with its RFC 2449 response code, if any.

    ``text`` follows the code and is decoded as UTF-8, with invalid bytes replaced.
    """

    ok: bool
    code: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Status:
    """A single-line response. ``raw`` is the line as received, with its CRLF."""

    status: StatusResponse
    raw: bytes


@dataclass(frozen=True, slots=True)
class Multiline:
    """A ``+OK`` multi-line response.

    ``lines`` are the body lines without CRLF and dot-unstuffed. ``raw`` is the whole
    response as received, from the status line through the terminating ``.`` line.
    """

    status: StatusResponse
    lines: tuple[bytes, ...]
    raw: bytes


@dataclass(frozen=True, slots=True)
class Continuation:
    """An RFC 5034 SASL challenge ``+ <base64>``. ``data`` is the base64 text."""

    data: bytes


ResponseEvent = Status | Multiline | Continuation


def parse_status(line: bytes) -> StatusResponse:
    """Parse a status line, with or without its CRLF.

    Raises UpstreamProtocolError if the line does not start with ``+OK`` or ``-ERR``
    followed by a space or the line end, or if it contains CR, LF or NUL.
    """
    if line.endswith(CRLF):
        line = line[:-2]
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        raise UpstreamProtocolError("Status line contains CR, LF or NUL")

    if line == b"+OK" or line.startswith(b"+OK "):
        return _parse_status_text(True, line[4:])
    if line == b"-ERR" or line.startswith(b"-ERR "):
        return _parse_status_text(False, line[5:])
    raise UpstreamProtocolError("Status line does not start with +OK or -ERR")


def _parse_status_text(ok: bool, text: bytes) -> StatusResponse:
    code = None
    end = text.find(b"]")
    # Text that starts with "[" but contains no valid code is kept whole as text.
    if text.startswith(b"[") and RESPONSE_CODE.fullmatch(text, 1, max(end, 1)):
        code = text[1:end].decode("ascii")
        text = text[end + 1 :].removeprefix(b" ")
    return StatusResponse(ok, code, text.decode("utf-8", errors="replace"))


def greeting_timestamp(status: StatusResponse) -> bytes | None:
    """Return the APOP timestamp ``<...@...>`` of a ``+OK`` greeting, or None."""
    if not status.ok:
        return None
    match = _TIMESTAMP.search(status.text)
    if match is None:
        return None
    return match.group().encode("ascii")


def parse_capa(lines: Iterable[bytes]) -> list[str]:
    """Return the non-empty lines of a CAPA response body as stripped text."""
    capabilities = []
    for line in lines:
        text = line.decode("utf-8", errors="replace").strip()
        if text:
            capabilities.append(text)
    return capabilities


def sasl_mechanisms(caps: Iterable[str]) -> list[str]:
    """Return the upper-cased mechanisms of the ``SASL`` capabilities, once each."""
    mechanisms: list[str] = []
    for capability in caps:
        words = capability.split()
        if not words or words[0].upper() != "SASL":
            continue
        for word in words[1:]:
            if word.upper() not in mechanisms:
                mechanisms.append(word.upper())
    return mechanisms


class _Expected(enum.Enum):
    NOTHING = enum.auto()
    STATUS = enum.auto()
    MULTILINE = enum.auto()


class ResponseReader:
    """Sans-IO reader of server responses: the session declares which response comes
    next with expect_status() or expect_multiline(), feeds bytes and calls next_event().

    An UpstreamProtocolError with ``fatal=False`` consumed exactly one status line, so
    the stream is still in step. The fatal errors are an overlong line or response,
    an invalid line in a multi-line body, and a line when no response was expected.
    After one of them, every later next_event() raises the same error, and the
    session must close the connection. ``max_line_length`` counts the CRLF, and
    ``max_multiline_size`` counts the whole raw response.
    """

    def __init__(
        self, max_line_length: int = 4096, max_multiline_size: int = 65536
    ) -> None:
        self._lines = LineBuffer(max_line_length)
        self.max_multiline_size = max_multiline_size
        self._expected = _Expected.NOTHING
        # Raw lines of the multi-line response being read, from its status line on.
        self._body: list[bytes] = []
        self._body_size = 0
        self._status: StatusResponse | None = None
        self._failure: UpstreamProtocolError | None = None

    @property
    def max_line_length(self) -> int:
        return self._lines.max_line_length

    @property
    def buffered_size(self) -> int:
        """Number of received bytes that no event has returned yet."""
        return self._lines.buffered_size + self._body_size

    def feed(self, data: bytes) -> None:
        # After a fatal error the stream is out of step, so storing more is pointless.
        if self._failure is None:
            self._lines.feed(data)

    def expect_status(self) -> None:
        """Read the next response as one status line, or as a SASL continuation."""
        self._expect(_Expected.STATUS)

    def expect_multiline(self) -> None:
        """Read the next response as a status line and, after ``+OK``, a body.

        A ``+OK`` response returns a Multiline event, and a ``-ERR`` one a Status.
        """
        self._expect(_Expected.MULTILINE)

    def take_buffered(self) -> bytes:
        """Remove and return the bytes after the last response, and reset the reader.

        Call this when the session stops parsing: after STLS, to discard plaintext
        that arrived before the TLS handshake, or after login, to relay the rest.
        """
        self._reset_response()
        return self._lines.take()

    def next_event(self) -> ResponseEvent | None:
        """Return the next response, or None until more bytes arrive.

        Raises UpstreamProtocolError as described on the class.
        """
        if self._failure is not None:
            raise self._failure
        try:
            return self._read_event()
        except UpstreamProtocolError as error:
            self._reset_response()
            if error.fatal:
                self._failure = error
                self._lines.clear()
            raise

    def _expect(self, expected: _Expected) -> None:
        if self._expected is not _Expected.NOTHING:
            raise RuntimeError("the previous response has not been read yet")
        self._expected = expected

    def _reset_response(self) -> None:
        self._expected = _Expected.NOTHING
        self._body = []
        self._body_size = 0
        self._status = None

    def _read_event(self) -> ResponseEvent | None:
        # Each pass consumes one line, so the loop ends once no whole line is buffered.
        while (line := self._next_line()) is not None:
            if self._status is None:
                event = self._read_status_line(line)
            else:
                event = self._read_body_line(line)
            if event is not None:
                return event
        return None

    def _next_line(self) -> bytes | None:
        try:
            line = self._lines.next_line()
        except LineTooLongError:
            message = f"Response line exceeds {self.max_line_length} octets"
            raise UpstreamProtocolError(message, fatal=True) from None

        if line is not None and self._expected is _Expected.NOTHING:
            message = "Server sent a response when none was expected"
            raise UpstreamProtocolError(message, fatal=True)
        return line

    def _read_status_line(self, line: bytes) -> ResponseEvent | None:
        defect = find_line_defect(line)
        if defect is not None:
            raise UpstreamProtocolError(f"Status line {defect}")

        content = line[:-2]
        if self._expected is _Expected.STATUS and _is_continuation(content):
            self._reset_response()
            return Continuation(content[2:])

        status = parse_status(content)
        if self._expected is _Expected.MULTILINE and status.ok:
            self._status = status
            self._append_body_line(line)
            return None

        self._reset_response()
        return Status(status, line)

    def _read_body_line(self, line: bytes) -> Multiline | None:
        defect = find_line_defect(line)
        if defect is not None:
            raise UpstreamProtocolError(f"Multi-line body {defect}", fatal=True)

        self._append_body_line(line)
        if line != _TERMINATOR:
            return None

        assert self._status is not None
        lines = _unstuff(self._body[1:-1])
        event = Multiline(self._status, lines, b"".join(self._body))
        self._reset_response()
        return event

    def _append_body_line(self, line: bytes) -> None:
        self._body_size += len(line)
        if self._body_size > self.max_multiline_size:
            message = f"Multi-line response exceeds {self.max_multiline_size} octets"
            raise UpstreamProtocolError(message, fatal=True)
        self._body.append(line)


def _is_continuation(line: bytes) -> bool:
    return line == b"+" or line.startswith(b"+ ")


def _unstuff(raw_lines: list[bytes]) -> tuple[bytes, ...]:
    # RFC 1939 section 3: a body line that starts with "." was sent with one more ".".
    lines = []
    for line in raw_lines:
        start = 1 if line.startswith(b".") else 0
        lines.append(line[start:-2])
    return tuple(lines)
