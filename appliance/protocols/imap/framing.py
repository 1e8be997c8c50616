"""Framing shared by the IMAP command and response readers: CRLF lines and literal bytes.

Both directions of IMAP interleave CRLF-terminated lines with literals of announced size
(RFC 3501 section 4.3). `InputBuffer` stores the bytes received and not yet framed, and
cuts lines and literal chunks from them. Each reader keeps its own grammar and limits and
decides what an over-long line means for it.
"""

from __future__ import annotations

from typing import NoReturn


class LineTooLong(Exception):
    """The line in progress is longer than the cap that `take_line` was given."""

    def __init__(self, scanned: int) -> None:
        super().__init__(f"no LF within {scanned} bytes")
        self.scanned = scanned
        """Bytes of the buffer that were scanned for the LF."""


class InputBuffer:
    """Bytes received and not yet framed, with an incremental search for the next LF.

    The search resumes where the previous call stopped, so a line that arrives one byte
    at a time costs linear time overall.
    """

    __slots__ = ("data", "_scan_from")

    def __init__(self) -> None:
        self.data = bytearray()
        self._scan_from = 0

    def __len__(self) -> int:
        return len(self.data)

    def append(self, data: bytes) -> None:
        self.data += data

    def clear(self) -> None:
        self.data.clear()
        self._scan_from = 0

    def take_all(self) -> bytes:
        """Remove and return every buffered byte."""
        data = bytes(self.data)
        self.clear()
        return data

    def take_line(self, max_length: int) -> bytes | None:
        """Remove and return the next line with its LF, or None until it is complete.

        `max_length` caps the line without its CRLF. Raises LineTooLong once that many
        bytes and the CRLF have arrived without an LF, leaving the bytes in the buffer.
        """
        # The LF of a line within the cap sits at most at index max_length + 1.
        limit = max_length + 2
        end = self.data.find(b"\n", self._scan_from, limit)
        if end >= 0:
            line = bytes(self.data[: end + 1])
            del self.data[: end + 1]
            self._scan_from = 0
            return line
        if len(self.data) < limit:
            self._scan_from = len(self.data)
            return None
        raise LineTooLong(limit)

    def take(self, count: int) -> bytearray:
        """Remove and return up to `count` bytes, for example of a literal."""
        chunk = self.data[:count]
        del self.data[:count]
        self._scan_from = 0
        return chunk


def line_content(line: bytes, line_kind: str, error: type[Exception]) -> bytes:
    """Return the line without CRLF, or raise `error` for bare CR, bare LF or NUL.

    `line_kind` names the line in the error message, for example "command line".
    """
    if not line.endswith(b"\r\n"):
        _raise(error, f"{line_kind} must end with CRLF")
    content = line[:-2]
    if b"\r" in content:
        _raise(error, f"bare CR in {line_kind}")
    if b"\0" in content:
        _raise(error, f"NUL byte in {line_kind}")
    return content


def _raise(error: type[Exception], message: str) -> NoReturn:
    raise error(message)
