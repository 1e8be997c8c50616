"""Upstream-to-proxy IMAP response parsing (RFC 3501 and RFC 9051 syntax).

ResponseReader splits what a server sends before authentication into responses and
keeps each response's exact bytes, so the proxy can forward or rewrite them. Only
untagged data responses (such as "* ID" or "* 1 FETCH") may carry literals. The
grammar allows none in status responses and continuation requests, so a "{5}" that
ends their text, possibly echoed from the client, cannot desynchronize the reader.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, NoReturn

from appliance.protocols.errors import UpstreamProtocolError
from appliance.protocols.imap.commands import is_valid_tag
from appliance.protocols.imap.framing import InputBuffer, LineTooLong, line_content

ResponseKind = Literal["tagged", "untagged", "continuation"]

_TAGGED_STATUSES = frozenset({b"OK", b"NO", b"BAD"})
_UNTAGGED_STATUSES = _TAGGED_STATUSES | {b"PREAUTH", b"BYE"}
_LITERAL_END_RE = re.compile(rb"~?\{([0-9]+)\}\Z")


@dataclass(frozen=True)
class Response:
    """One server response.

    status is OK, NO, BAD, PREAUTH or BYE, or None for untagged data such as
    "* CAPABILITY ...". code is the text between "[" and "]" of a response code. text
    follows the status and code, or the "*" of untagged data. For a response with
    literals, text covers only its first line, while raw has every byte including the
    final CRLF.
    """

    kind: ResponseKind
    tag: str | None
    status: str | None
    code: str | None
    text: str
    raw: bytes = field(repr=False)


class _Head(NamedTuple):
    kind: ResponseKind
    tag: str | None
    status: str | None
    code: str | None
    text: str
    may_carry_literals: bool


class _State(enum.Enum):
    LINE = enum.auto()
    LITERAL = enum.auto()


def capabilities(response: Response) -> list[str] | None:
    """Return the capability list of "* CAPABILITY ..." or a [CAPABILITY ...] code.

    Order and case are kept as the server sent them. Returns None when the response
    carries no capability list.
    """
    if response.kind == "untagged" and response.status is None:
        words = response.text.split()
        if words and words[0].upper() == "CAPABILITY":
            return words[1:]
    if response.code is not None:
        words = response.code.split()
        if words and words[0].upper() == "CAPABILITY":
            return words[1:]
    return None


class ResponseReader:
    """Incremental parser of server responses: feed() bytes, then call next_event().

    max_line_length caps the text of one response without CRLF and literal bytes, and
    max_literal_size caps the sum of its literal bytes. Exceeding either raises a fatal
    UpstreamProtocolError and drops everything buffered.
    """

    def __init__(
        self, max_line_length: int = 65536, max_literal_size: int = 1 << 20
    ) -> None:
        if max_line_length < 1 or max_literal_size < 0:
            raise ValueError(
                "ResponseReader max_line_length must be positive, and max_literal_size "
                "at least 0"
            )
        self._max_line_length = max_line_length
        self._max_literal_size = max_literal_size
        self._input = InputBuffer()
        self._failure: UpstreamProtocolError | None = None
        self._clear_response()

    @property
    def buffered_size(self) -> int:
        """Bytes held for unparsed input and the response in progress."""
        return len(self._input) + len(self._raw)

    def feed(self, data: bytes) -> None:
        # After a fatal error the stream is out of sync, so storing more is pointless.
        if self._failure is None:
            self._input.append(data)

    def take_buffered(self) -> bytes:
        """Remove and return the bytes that no response has covered yet.

        Call it between responses: after STARTTLS to discard plaintext that arrived
        before the TLS handshake, or after login to relay the rest. Raises RuntimeError
        while a response is partly read, because its consumed bytes are gone.
        """
        if self._head is not None:
            raise RuntimeError("take_buffered() called inside a response")
        data = self._input.take_all()
        self._clear_response()
        return data

    def next_event(self) -> Response | None:
        """Return the next complete response, or None until more bytes are fed.

        Raises UpstreamProtocolError for an invalid response. A fatal error means that
        the byte stream is out of sync: every later call raises it again, and the
        session must close.
        """
        if self._failure is not None:
            raise self._failure
        while True:
            if self._state is _State.LITERAL:
                if not self._read_literal():
                    return None
                continue
            line = self._take_line()
            if line is None:
                return None
            response = self._process_line(line)
            if response is not None:
                return response

    def _clear_response(self) -> None:
        self._state = _State.LINE
        self._raw = bytearray()
        self._head: _Head | None = None
        self._text_size = 0
        self._literal_total = 0
        self._literal_remaining = 0

    def _take_line(self) -> bytes | None:
        # The cap covers the text of the whole response, across its literals.
        try:
            return self._input.take_line(self._max_line_length - self._text_size)
        except LineTooLong:
            self._fail(f"response line too long (limit {self._max_line_length} bytes)")

    def _process_line(self, line: bytes) -> Response | None:
        try:
            content = line_content(line, "response line", UpstreamProtocolError)
            head = self._head or _parse_head(content)
        except UpstreamProtocolError:
            self._clear_response()
            raise
        self._head = head
        self._raw += line
        self._text_size += len(content)
        if head.may_carry_literals:
            literal = _LITERAL_END_RE.search(content)
            if literal is not None:
                self._announce_literal(literal.group(1))
                return None
        response = Response(
            head.kind, head.tag, head.status, head.code, head.text, bytes(self._raw)
        )
        self._clear_response()
        return response

    def _announce_literal(self, digits: bytes) -> None:
        remaining = self._max_literal_size - self._literal_total
        # Comparing digit counts first rejects huge sizes without a big int conversion.
        significant = digits.lstrip(b"0") or b"0"
        if len(significant) <= len(str(remaining)):
            size = int(significant)
            if size <= remaining:
                self._literal_remaining = size
                self._state = _State.LITERAL
                return
        limit = self._max_literal_size
        self._fail(f"response literals too large (limit {limit} bytes)")

    def _read_literal(self) -> bool:
        chunk = self._input.take(self._literal_remaining)
        self._raw += chunk
        self._literal_remaining -= len(chunk)
        self._literal_total += len(chunk)
        if self._literal_remaining:
            return False
        self._state = _State.LINE
        return True

    def _fail(self, message: str) -> NoReturn:
        self._input.clear()
        self._clear_response()
        self._failure = UpstreamProtocolError(message, fatal=True)
        raise self._failure


def _parse_head(content: bytes) -> _Head:
    """Parse the first line of a response."""
    if content == b"+" or content.startswith(b"+ "):
        code, text = _split_code(content[2:])
        return _Head("continuation", None, None, code, text, False)
    tag, _, rest = content.partition(b" ")
    if tag == b"*":
        return _parse_untagged(rest)
    if not is_valid_tag(tag):
        raise UpstreamProtocolError("invalid tag in response")
    word, _, after = rest.partition(b" ")
    status = word.upper()
    if status not in _TAGGED_STATUSES:
        raise UpstreamProtocolError("invalid status in tagged response")
    code, text = _split_code(after)
    return _Head(
        "tagged", tag.decode("ascii"), status.decode("ascii"), code, text, False
    )


def _parse_untagged(rest: bytes) -> _Head:
    if not rest:
        raise UpstreamProtocolError("empty untagged response")
    word, _, after = rest.partition(b" ")
    status = word.upper()
    if status in _UNTAGGED_STATUSES:
        code, text = _split_code(after)
        return _Head("untagged", None, status.decode("ascii"), code, text, False)
    return _Head("untagged", None, None, None, _decode(rest), True)


def _split_code(resp_text: bytes) -> tuple[str | None, str]:
    """Split '[CODE] text' into code and text. Without a "]" all of it is text."""
    if not resp_text.startswith(b"["):
        return None, _decode(resp_text)
    end = resp_text.find(b"]")
    if end < 0:
        return None, _decode(resp_text)
    text = resp_text[end + 1 :]
    if text.startswith(b" "):
        text = text[1:]
    return _decode(resp_text[1:end]), _decode(text)


def _decode(data: bytes) -> str:
    # Servers may send 8-bit text because RFC 9051 allows UTF-8. Invalid UTF-8 bytes
    # are replaced.
    return data.decode("utf-8", errors="replace")
