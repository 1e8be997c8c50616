"""POP3 wire format: CRLF line framing for both readers, and the reply and command
builders (RFC 1939, RFC 2449 response codes, RFC 5034 SASL continuations)."""

import re
from collections.abc import Iterable

CRLF = b"\r\n"

# RFC 1939 keywords are 3 or 4 letters. Longer ones up to 16 still parse so that the
# session can reply -ERR to an unknown command instead of a syntax error.
MAX_KEYWORD_LENGTH = 16
KEYWORD = re.compile(rb"[A-Za-z]{1,%d}" % MAX_KEYWORD_LENGTH)

# RFC 2449 resp-code: levels of printable ASCII other than "/" and "]", joined by "/".
_CODE_LEVEL = rb"[\x21-\x2e\x30-\x5c\x5e-\x7e]+"
RESPONSE_CODE = re.compile(_CODE_LEVEL + rb"(?:/" + _CODE_LEVEL + rb")*")

_LINE_BREAKING_BYTES = (b"\r", b"\n", b"\x00")


class LineTooLongError(Exception):
    """A line exceeded the maximum length, and the line buffer dropped it."""


class LineBuffer:
    """Received bytes, split into LF-terminated lines of bounded length.

    A line longer than ``max_line_length`` octets, counting its CRLF, is never stored:
    the buffer drops it through its LF, even when that LF arrives in a later feed. So
    once next_line() returns None, fewer than ``max_line_length`` bytes remain.
    """

    def __init__(self, max_line_length: int) -> None:
        if max_line_length < 3:
            raise ValueError("max_line_length must be at least 3 octets")
        self.max_line_length = max_line_length
        self._buffer = bytearray()
        # Bytes before this offset contain no LF, so the next search can skip them.
        self._scanned = 0
        self._discarding = False

    @property
    def buffered_size(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._discarding:
            data = self._skip_discarded(data)
        self._buffer += data

    def next_line(self) -> bytes | None:
        """Remove and return the next line with its LF, or None until one is complete.

        Raises LineTooLongError once for each overlong line.
        """
        end = self._buffer.find(b"\n", self._scanned, self.max_line_length)
        if end >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._scanned = 0
            return line

        if len(self._buffer) < self.max_line_length:
            self._scanned = len(self._buffer)
            return None

        self._drop_overlong_line()
        raise LineTooLongError

    def take(self) -> bytes:
        """Remove and return every buffered byte, and forget any line being dropped."""
        data = bytes(self._buffer)
        self.clear()
        return data

    def clear(self) -> None:
        self._buffer.clear()
        self._scanned = 0
        self._discarding = False

    def _drop_overlong_line(self) -> None:
        end = self._buffer.find(b"\n", self.max_line_length)
        self._scanned = 0
        if end < 0:
            self._buffer.clear()
            self._discarding = True
        else:
            del self._buffer[: end + 1]

    def _skip_discarded(self, data: bytes) -> bytes:
        end = data.find(b"\n")
        if end < 0:
            return b""
        self._discarding = False
        return data[end + 1 :]


def find_line_defect(line: bytes) -> str | None:
    """Return why a line from LineBuffer breaks RFC 1939 framing, or None if valid.

    A valid line ends in CRLF and contains no other CR and no NUL. The reason is a
    predicate such as "contains a NUL byte" and never quotes the line.
    """
    if not line.endswith(CRLF):
        return "does not end with CRLF"
    if line.find(b"\r") != len(line) - 2:
        return "contains a CR without LF"
    if b"\x00" in line:
        return "contains a NUL byte"
    return None


def format_ok(text: str = "") -> bytes:
    """Build a ``+OK`` status line. Raises ValueError if text contains CR, LF or NUL."""
    return _format_status(b"+OK", _encode_text(text))


def format_err(text: str, code: str | None = None) -> bytes:
    """Build a ``-ERR`` status line with an optional RFC 2449 code such as ``SYS/TEMP``.

    Raises ValueError if text contains CR, LF or NUL, or if code is not a valid
    response code.
    """
    encoded = _encode_text(text)
    if code is not None:
        encoded = _encode_code(code) + (b" " + encoded if encoded else b"")
    return _format_status(b"-ERR", encoded)


def format_multiline(first: str, lines: Iterable[str | bytes]) -> bytes:
    """Build a ``+OK`` multi-line response: status text, dot-stuffed lines, ``.`` line.

    ``str`` lines are encoded as UTF-8. Raises ValueError if any text or line contains
    CR, LF or NUL.
    """
    parts = [format_ok(first)]
    for line in lines:
        encoded = _encode_text(line) if isinstance(line, str) else _check_bytes(line)
        if encoded.startswith(b"."):
            encoded = b"." + encoded
        parts.append(encoded + CRLF)
    parts.append(b"." + CRLF)
    return b"".join(parts)


def format_command(name: str, *args: bytes) -> bytes:
    """Build a command line such as ``PASS secret\\r\\n``, with args joined by spaces.

    An argument may contain spaces, as a PASS password may. Raises ValueError if name is
    not 1 to 16 ASCII letters or an argument contains CR, LF or NUL.
    """
    keyword = name.encode("utf-8")
    if not name.isascii() or not KEYWORD.fullmatch(keyword):
        message = f"command name must be 1 to {MAX_KEYWORD_LENGTH} ASCII letters"
        raise ValueError(message)
    for position, arg in enumerate(args, start=1):
        if _contains_line_breaking_byte(arg):
            raise ValueError(f"command argument {position} contains CR, LF or NUL")
    return b" ".join((keyword, *args)) + CRLF


def format_continuation(data: bytes = b"") -> bytes:
    """Build an RFC 5034 SASL continuation line ``+ <base64>``, which keeps the space
    even when data is empty. Raises ValueError if data contains CR, LF or NUL."""
    return b"+ " + _check_bytes(data) + CRLF


def _format_status(indicator: bytes, text: bytes) -> bytes:
    if not text:
        return indicator + CRLF
    return indicator + b" " + text + CRLF


def _encode_code(code: str) -> bytes:
    encoded = code.encode("utf-8")
    if not code.isascii() or not RESPONSE_CODE.fullmatch(encoded):
        raise ValueError("response code must be printable ASCII levels joined by '/'")
    return b"[" + encoded + b"]"


def _encode_text(text: str) -> bytes:
    return _check_bytes(text.encode("utf-8"))


def _check_bytes(data: bytes) -> bytes:
    if _contains_line_breaking_byte(data):
        raise ValueError("reply text contains CR, LF or NUL")
    return data


def _contains_line_breaking_byte(data: bytes) -> bool:
    return any(byte in data for byte in _LINE_BREAKING_BYTES)
