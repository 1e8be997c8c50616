"""Client-to-proxy IMAP command parsing (RFC 3501 and RFC 9051 syntax).

CommandReader turns the bytes that a client sends before authentication into events.
It frames synchronizing literals, LITERAL+ literals (RFC 7888) and literal8, and it
bounds every read: the command text, each literal and the number of literals in one
command. Error messages never contain input bytes, because the input may contain a
password.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

from appliance.protocols.errors import ClientProtocolError
from appliance.protocols.imap.framing import InputBuffer, LineTooLong, line_content

Value: TypeAlias = "str | bytes | None | tuple[Value, ...]"


class Literal8(bytes):
    """The data of a literal8 (RFC 3516): binary, valid only where a command allows it.

    LOGIN and AUTHENTICATE take strings, so the session rejects a Literal8 there.
    """

# ATOM-CHAR of RFC 3501: printable ASCII except atom-specials.
_COMMAND_NAME_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2b-\x5b\x5e-\x7a\x7c-\x7e]+")
# A tag is any ASTRING-CHAR except "+", so it may contain "]" but not "*" or "%".
_TAG_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")
# Argument atoms also take "%", "*", "]" and "\", so list patterns, sequence sets,
# flags and fetch items such as BODY.PEEK[]<0.10> stay one token.
_ARGUMENT_ATOM_RE = re.compile(rb"[\x21\x23-\x27\x2a-\x7a\x7c-\x7e]+")
_QUOTED_SPECIAL_RE = re.compile(rb'["\\]')
_LITERAL_MARKER_RE = re.compile(rb"(~?)\{([^{}]*)\}")
_LITERAL_SIZE_RE = re.compile(rb"([0-9]+)(\+?)")
# A rejected line that ends like "{5+}" may announce a LITERAL+ literal. The client
# sends its bytes without waiting, so they would be read as commands.
_LITERAL_PLUS_END_RE = re.compile(rb"\+\}\r?\n\Z")
# A rejected line that ends like "{5}" or "{5+}" announced a literal.
_LITERAL_END_RE = re.compile(rb"\{[0-9]+\+?\}\r?\n\Z")
# The end of an announcement whose "{" lies before the kept tail of a discarded line.
_LITERAL_SIZE_END_RE = re.compile(rb"[0-9]+\+?\}\r?\n")
# Bytes kept from the end of a discarded line, to tell whether it announced a literal.
_DISCARD_TAIL_SIZE = 32

_SP = 0x20
_DQUOTE = 0x22
_OPEN = 0x28
_CLOSE = 0x29
_LBRACE = 0x7B
_RBRACKET = 0x5D

# Keeps nested tuples far below Python's recursion limit in comparisons and repr.
# NOTE: no RFC sets this bound. It is a guess that real commands, which nest a few
# levels deep, stay well below.
_MAX_LIST_DEPTH = 64


@dataclass(frozen=True)
class Command:
    """Complete tagged command.

    Atoms are str, quoted strings and literals are bytes, NIL is None, and
    parenthesized lists are tuples.
    """

    tag: str
    name: str
    # Hidden from repr because LOGIN arguments contain the password.
    args: tuple[Value, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ContinuationRequest:
    """Announcement of a synchronizing literal, so the session must send "+" next.

    A session that refuses the literal calls CommandReader.reject_literal() and
    replies with a tagged NO or BAD instead.
    """

    # The command that announced the literal. Events compare without them.
    tag: str = field(default="", compare=False)
    name: str = field(default="", compare=False)
    binary: bool = field(default=False, compare=False)
    """The announced literal is a literal8 (RFC 3516)."""


@dataclass(frozen=True)
class ContinuationLine:
    """Raw line read after expect_continuation_line(), without its CRLF."""

    # Hidden from repr because AUTHENTICATE responses contain credentials.
    data: bytes = field(repr=False)


Event: TypeAlias = Command | ContinuationRequest | ContinuationLine


def is_valid_tag(tag: str | bytes) -> bool:
    """Return whether tag matches the RFC 3501 tag grammar."""
    if isinstance(tag, str):
        if not tag.isascii():
            return False
        tag = tag.encode("ascii")
    return _TAG_RE.fullmatch(tag) is not None


class LiteralRejected(ClientProtocolError):
    """A command rejected on a line that announced a literal.

    The reader has dropped the command. After a synchronizing literal it reads the next
    line as a new command, because the client sends no literal bytes until it gets "+".
    A client that sends them without waiting would have them read as commands, so the
    proxy's session closes after this error. After a LITERAL+ literal the error is
    fatal.
    """

    def __init__(self, message: str, *, tag: str | None, fatal: bool, command: str) -> None:
        super().__init__(message, tag=tag, fatal=fatal)
        self.command = command
        """Name of the rejected command, in upper case."""


class LiteralTooLarge(LiteralRejected):
    """A literal announced larger than the limit of its argument.

    The limits come from CommandReader's argument_literal_limits. The reader has dropped
    the command. After a synchronizing literal it reads the next line as a new command,
    because the client sends no literal bytes until it gets "+". After a
    non-synchronizing literal the error is fatal, because the literal bytes follow.
    """

    def __init__(
        self,
        message: str,
        *,
        tag: str,
        fatal: bool,
        command: str,
        position: int,
        size: int,
        limit: int,
        preceding: tuple[Value, ...],
    ) -> None:
        super().__init__(message, tag=tag, fatal=fatal, command=command)
        self.position = position
        """Index of the literal's argument, from 0."""
        self.size = size
        """Announced size of the literal in bytes."""
        self.limit = limit
        # The arguments before the literal. For a LOGIN password this is the user name.
        self.preceding = preceding


class _Rejected(Exception):
    """Syntax error in a command line. The reader adds the tag and the fatal flag."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _LiteralOverLimit(_Rejected):
    """Literal over its argument's limit, which the reader raises as LiteralTooLarge."""

    def __init__(
        self,
        message: str,
        position: int,
        size: int,
        limit: int,
        preceding: tuple[Value, ...],
    ) -> None:
        super().__init__(message)
        self.position = position
        self.size = size
        self.limit = limit
        self.preceding = preceding


class _LiteralMarker(NamedTuple):
    digits: bytes
    non_synchronizing: bool
    binary: bool


class _State(enum.Enum):
    LINE = enum.auto()
    LITERAL = enum.auto()
    DISCARD = enum.auto()


class _CommandBuilder:
    """Arguments of one command whose text may be split by literals."""

    def __init__(self, tag: str, name: str) -> None:
        self.tag = tag
        self.name = name
        self._lists: list[list[Value]] = [[]]
        # After a value or ")" the next token needs a space before it.
        self._needs_space = True
        self._spaced = False
        self._after_close = False

    def add_text(self, content: bytes, pos: int) -> _LiteralMarker | None:
        """Parse command text from pos, and return the literal marker ending it."""
        end = len(content)
        while pos < end:
            byte = content[pos]
            if byte == _SP:
                self._spaced = True
                pos += 1
            elif byte == _CLOSE:
                self._close_list()
                pos += 1
            elif byte == _LBRACE or content.startswith(b"~{", pos):
                self._check_space(content, pos)
                return _read_literal_marker(content, pos)
            else:
                self._check_space(content, pos)
                pos = self._add_token(content, pos)
        return None

    def add_literal(self, data: bytes) -> None:
        self._append(data)

    def top_level_arguments(self) -> tuple[Value, ...] | None:
        """Return the arguments so far, or None inside a parenthesized list."""
        if len(self._lists) != 1:
            return None
        return tuple(self._lists[0])

    def finish(self) -> Command:
        if len(self._lists) != 1:
            raise _Rejected("unbalanced parentheses")
        return Command(self.tag, self.name, tuple(self._lists[0]))

    def _add_token(self, content: bytes, pos: int) -> int:
        byte = content[pos]
        if byte == _OPEN:
            self._open_list()
            return pos + 1
        if byte == _DQUOTE:
            value, pos = _read_quoted(content, pos)
            self._append(value)
            return pos
        match = _ARGUMENT_ATOM_RE.match(content, pos)
        if match is None:
            raise _Rejected("invalid character in command")
        self._append(_atom_value(match.group()))
        return match.end()

    def _check_space(self, content: bytes, pos: int) -> None:
        if self._spaced or not self._needs_space:
            return
        # A fetch item such as BODY[HEADER.FIELDS (FROM)] continues after the list.
        if self._after_close and content[pos] == _RBRACKET:
            return
        raise _Rejected("missing space between arguments")

    def _append(self, value: Value) -> None:
        self._lists[-1].append(value)
        self._mark_token(needs_space=True)

    def _open_list(self) -> None:
        if len(self._lists) > _MAX_LIST_DEPTH:
            raise _Rejected("parenthesized lists nested too deeply")
        self._lists.append([])
        self._mark_token(needs_space=False)

    def _close_list(self) -> None:
        if len(self._lists) == 1:
            raise _Rejected("unbalanced parentheses")
        items = tuple(self._lists.pop())
        self._lists[-1].append(items)
        self._mark_token(needs_space=True)
        self._after_close = True

    def _mark_token(self, *, needs_space: bool) -> None:
        self._needs_space = needs_space
        self._spaced = False
        self._after_close = False


class CommandReader:
    """Incremental parser of client commands: feed() bytes, then call next_event().

    max_line_length caps the command text of one command, without CRLF and without
    literal bytes. max_literal_size caps each literal and max_literals their number per
    command. argument_literal_limits maps a command name to lower caps, in bytes, for
    the literals of its arguments by position, for example {"LOGIN": (1024, 4096)}. A
    literal over such a cap raises LiteralTooLarge when it is announced. A listed
    command takes literals only at the positions that have a cap, and only while no
    parenthesized list precedes or contains them. Any other literal of that command,
    at a position whose cap is None or after the last position, raises LiteralRejected
    when it is announced. Literals of commands that are not listed have
    max_literal_size only. After a non-fatal error the reader continues with the next
    command.
    """

    def __init__(
        self,
        max_line_length: int = 8192,
        max_literal_size: int = 65536,
        max_literals: int = 8,
        argument_literal_limits: Mapping[str, Sequence[int | None]] | None = None,
    ) -> None:
        if min(max_line_length, max_literals) < 1 or max_literal_size < 0:
            raise ValueError(
                "CommandReader limits must be positive, and max_literal_size at least 0"
            )
        self._max_line_length = max_line_length
        self._max_literal_size = max_literal_size
        self._max_literals = max_literals
        self._argument_literal_limits = {
            name.upper(): tuple(limits)
            for name, limits in (argument_literal_limits or {}).items()
        }
        self._input = InputBuffer()
        self._expect_continuation = False
        self._failure: ClientProtocolError | None = None
        self._clear_command()

    @property
    def buffered_size(self) -> int:
        """Bytes held for unparsed input and the command in progress."""
        return (
            len(self._input)
            + len(self._literal)
            + self._text_size
            + self._literal_total
        )

    def feed(self, data: bytes) -> None:
        # After a fatal error the stream is out of sync, so storing more is pointless.
        if self._failure is None:
            self._input.append(data)

    def take_buffered(self) -> bytes:
        """Remove and return the bytes that no event has covered yet.

        Call it between commands: after STARTTLS to discard plaintext that arrived
        before the TLS handshake, or after login to relay the rest. Raises RuntimeError
        while a command is partly read, because its consumed bytes are gone.
        """
        if self._command is not None or self._state is not _State.LINE:
            raise RuntimeError("take_buffered() called inside a command")
        data = self._input.take_all()
        self._expect_continuation = False
        self._clear_command()
        return data

    def reject_literal(self) -> None:
        """Drop the command whose synchronizing literal was announced last.

        Call it instead of sending "+". The client then sends no literal (RFC 3501
        section 7.5), so the next line is read as a new command. Raises RuntimeError
        unless the last event was a ContinuationRequest.
        """
        if not self._literal_announced:
            raise RuntimeError("reject_literal() called without a literal announcement")
        self._clear_command()

    def expect_continuation_line(self) -> None:
        """Make next_event() return the next line raw, as a ContinuationLine.

        AUTHENTICATE needs this for each client response. Call it only between
        commands, because inside a command it raises RuntimeError.
        """
        if self._command is not None or self._state is not _State.LINE:
            raise RuntimeError("expect_continuation_line() called inside a command")
        self._expect_continuation = True

    def next_event(self) -> Event | None:
        """Return the next complete event, or None until more bytes are fed.

        Raises ClientProtocolError for an invalid command. A fatal error means that
        the byte stream may be out of sync: every later call raises it again, and the
        session must close.
        """
        if self._failure is not None:
            raise self._failure
        try:
            return self._read_event()
        except ClientProtocolError as error:
            if error.fatal:
                self._failure = error
                self._input.clear()
                self._clear_command()
            raise

    def _read_event(self) -> Event | None:
        while True:
            if self._state is _State.DISCARD:
                self._discard_through_line_end()
                return None
            if self._state is _State.LITERAL:
                if not self._read_literal():
                    return None
                continue
            line = self._take_line()
            if line is None:
                if self._state is _State.DISCARD:
                    continue
                return None
            event = self._process_line(line)
            if event is not None:
                return event

    def _clear_command(self) -> None:
        self._state = _State.LINE
        self._command: _CommandBuilder | None = None
        self._text_size = 0
        self._literal_count = 0
        self._literal_total = 0
        self._literal = bytearray()
        self._literal_remaining = 0
        self._literal_binary = False
        self._discard_tag: str | None = None
        self._discard_error: str | None = None
        self._discard_tail = b""
        self._literal_announced = False

    def _take_line(self) -> bytes | None:
        """Return the next line, or None until it is complete or while it is discarded."""
        # The cap covers the text of the whole command, across its literals.
        try:
            return self._input.take_line(self._max_line_length - self._text_size)
        except LineTooLong as too_long:
            self._reject_long_line(too_long.scanned)
            return None

    def _reject_long_line(self, scanned: int) -> None:
        if self._expect_continuation:
            self._expect_continuation = False
            tag = None
        else:
            tag = self._current_tag(self._input.data, scanned)
        message = f"command line too long (limit {self._max_line_length} bytes)"
        self._start_discard(tag, message)

    def _process_line(self, line: bytes) -> Event | None:
        expecting = self._expect_continuation
        self._expect_continuation = False
        try:
            content = line_content(line, "command line", _Rejected)
            if expecting:
                return ContinuationLine(content)
            self._text_size += len(content)
            return self._process_command_text(content)
        except _Rejected as rejected:
            tag = None if expecting else self._current_tag(line, len(line))
            fatal = _LITERAL_PLUS_END_RE.search(line) is not None
            name = self._command.name if self._command is not None else ""
            self._clear_command()
            if isinstance(rejected, _LiteralOverLimit):
                assert tag is not None
                raise LiteralTooLarge(
                    rejected.message,
                    tag=tag,
                    fatal=fatal,
                    command=name,
                    position=rejected.position,
                    size=rejected.size,
                    limit=rejected.limit,
                    preceding=rejected.preceding,
                ) from None
            announced = _LITERAL_END_RE.search(line) is not None
            if name and announced:
                message = rejected.message
                raise LiteralRejected(message, tag=tag, fatal=fatal, command=name) from None
            # Without a command name the session cannot tell whether an announced literal
            # is a password, which a client that does not wait for "+" sends anyway.
            fatal = fatal or announced
            raise ClientProtocolError(rejected.message, tag=tag, fatal=fatal) from None

    def _process_command_text(self, content: bytes) -> Event | None:
        if self._command is None:
            self._command, pos = _start_command(content)
        else:
            pos = 0
        marker = self._command.add_text(content, pos)
        if marker is None:
            command = self._command.finish()
            self._clear_command()
            return command
        return self._announce_literal(marker)

    def _announce_literal(self, marker: _LiteralMarker) -> Event | None:
        size = _parse_literal_size(marker.digits, self._max_literal_size)
        if self._literal_count == self._max_literals:
            raise _Rejected(f"too many literals (limit {self._max_literals})")
        self._check_argument_literal(size)
        self._literal_count += 1
        self._literal_remaining = size
        self._literal_binary = marker.binary
        self._state = _State.LITERAL
        if marker.non_synchronizing:
            return None
        self._literal_announced = True
        return ContinuationRequest(self._command.tag, self._command.name, marker.binary)

    def _check_argument_literal(self, size: int) -> None:
        """Reject a literal that argument_literal_limits does not allow where it sits."""
        assert self._command is not None
        name = self._command.name
        limits = self._argument_literal_limits.get(name)
        if limits is None:
            return
        preceding = self._command.top_level_arguments()
        if preceding is None or any(isinstance(arg, tuple) for arg in preceding):
            raise _Rejected(f"{name} takes no parenthesized list")
        position = len(preceding)
        if position >= len(limits):
            raise _Rejected(f"{name} takes at most {len(limits)} arguments")
        limit = limits[position]
        if limit is None:
            raise _Rejected(f"argument {position + 1} of {name} cannot be a literal")
        if size > limit:
            message = (
                f"literal too large for argument {position + 1} of "
                f"{name} (limit {limit} bytes)"
            )
            raise _LiteralOverLimit(message, position, size, limit, preceding)

    def _read_literal(self) -> bool:
        self._literal_announced = False
        chunk = self._input.take(self._literal_remaining)
        self._literal += chunk
        self._literal_remaining -= len(chunk)
        if self._literal_remaining:
            return False
        data = bytes(self._literal)
        self._literal.clear()
        self._literal_total += len(data)
        self._state = _State.LINE
        # literal8 (RFC 3516) may carry NUL, but an ordinary literal is CHAR8 only.
        if not self._literal_binary and b"\0" in data:
            self._start_discard(self._command.tag, "NUL byte in literal")
            return True
        self._command.add_literal(Literal8(data) if self._literal_binary else data)
        return True

    def _start_discard(self, tag: str | None, message: str) -> None:
        """Drop the command in progress and skip input through the next LF.

        The error with `message` is raised when the LF arrives. So one line gets one
        reply, and by then the reader has seen whether the line ended in a literal
        announcement.
        """
        self._clear_command()
        self._state = _State.DISCARD
        self._discard_tag = tag
        self._discard_error = message

    def _discard_through_line_end(self) -> None:
        """Skip input through the next LF, then raise the error of the discarded line.

        Returns without an error while the LF has not arrived. The error is fatal when
        the line ended in a literal announcement such as "{5}" or "{5+}". Its command is
        gone, so the reader cannot tell whether the literal is a password, and a client
        that does not wait for "+" sends it anyway.
        """
        data = self._input.data
        end = data.find(b"\n")
        if end < 0:
            tail = self._discard_tail + data[-_DISCARD_TAIL_SIZE:]
            self._discard_tail = tail[-_DISCARD_TAIL_SIZE:]
            self._input.clear()
            return
        start = max(0, end + 1 - _DISCARD_TAIL_SIZE)
        tail = (self._discard_tail + data[start : end + 1])[-_DISCARD_TAIL_SIZE:]
        tag = self._discard_tag
        message = self._discard_error
        assert message is not None
        self._input.take(end + 1)
        self._clear_command()
        raise ClientProtocolError(message, tag=tag, fatal=_ends_with_announcement(tail))

    def _current_tag(self, data: bytes | bytearray, end: int) -> str | None:
        if self._command is not None:
            return self._command.tag
        return _peek_tag(data, end)


def _ends_with_announcement(tail: bytes) -> bool:
    """Return whether a line that ends with `tail` ended in a literal announcement.

    `tail` contains at most _DISCARD_TAIL_SIZE bytes. When digits fill all of it, the
    "{" may lie before it, so the line counts as an announcement.
    """
    if _LITERAL_END_RE.search(tail):
        return True
    full = len(tail) == _DISCARD_TAIL_SIZE
    return full and _LITERAL_SIZE_END_RE.fullmatch(tail) is not None


def _peek_tag(data: bytes | bytearray, end: int) -> str | None:
    """Return the tag that starts a line too broken to parse, if valid.

    Only data[:end] counts, so the result does not depend on how many bytes of an
    over-long line have arrived.
    """
    match = _TAG_RE.match(data, 0, end)
    if match is None or match.end() == end:
        return None
    if data[match.end()] not in b" \r\n":
        return None
    return match.group().decode("ascii")


def _start_command(content: bytes) -> tuple[_CommandBuilder, int]:
    """Parse the tag and command name, and return the builder and the next offset."""
    if not content:
        raise _Rejected("empty command line")
    tag_match = _TAG_RE.match(content)
    if tag_match is None:
        raise _Rejected("missing tag" if content[0] == _SP else "invalid tag")
    pos = tag_match.end()
    if pos < len(content) and content[pos] != _SP:
        raise _Rejected("invalid tag")
    name_match = _COMMAND_NAME_RE.match(content, pos + 1)
    if name_match is None:
        at_end = pos + 1 >= len(content)
        raise _Rejected("missing command name" if at_end else "invalid command name")
    pos = name_match.end()
    if pos < len(content) and content[pos] != _SP:
        raise _Rejected("invalid command name")
    tag = tag_match.group().decode("ascii")
    name = name_match.group().decode("ascii").upper()
    return _CommandBuilder(tag, name), pos


def _read_quoted(content: bytes, pos: int) -> tuple[bytes, int]:
    """Unescape the quoted string at pos, and return it and the offset after it."""
    value = bytearray()
    pos += 1
    while True:
        special = _QUOTED_SPECIAL_RE.search(content, pos)
        if special is None:
            raise _Rejected("unterminated quoted string")
        start = special.start()
        value += content[pos:start]
        if content[start] == _DQUOTE:
            return bytes(value), start + 1
        escaped = content[start + 1 : start + 2]
        if not escaped:
            raise _Rejected("unterminated quoted string")
        if escaped not in (b"\\", b'"'):
            raise _Rejected("invalid escape in quoted string")
        value += escaped
        pos = start + 2


def _read_literal_marker(content: bytes, pos: int) -> _LiteralMarker:
    marker = _LITERAL_MARKER_RE.match(content, pos)
    if marker is None:
        raise _Rejected("invalid literal")
    if marker.end() != len(content):
        raise _Rejected("literal must end the command line")
    size = _LITERAL_SIZE_RE.fullmatch(marker.group(2))
    if size is None:
        raise _Rejected("invalid literal size")
    return _LiteralMarker(
        digits=size.group(1),
        non_synchronizing=bool(size.group(2)),
        binary=bool(marker.group(1)),
    )


def _parse_literal_size(digits: bytes, maximum: int) -> int:
    # Comparing digit counts first rejects huge sizes without a big int conversion.
    significant = digits.lstrip(b"0") or b"0"
    too_large = f"literal too large (limit {maximum} bytes)"
    if len(significant) > len(str(maximum)):
        raise _Rejected(too_large)
    size = int(significant)
    if size > maximum:
        raise _Rejected(too_large)
    return size


def _atom_value(atom: bytes) -> str | None:
    text = atom.decode("ascii")
    if text.upper() == "NIL":
        return None
    return text
