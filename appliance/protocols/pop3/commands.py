"""Parser for POP3 client lines in the AUTHORIZATION state (RFC 1939, RFC 5034 AUTH)."""

from dataclasses import dataclass, field

from appliance.protocols.errors import ClientProtocolError
from appliance.protocols.pop3.wire import (
    KEYWORD,
    MAX_KEYWORD_LENGTH,
    LineBuffer,
    LineTooLongError,
    find_line_defect,
)


@dataclass(frozen=True, slots=True)
class Command:
    """One client command line, without its CRLF.

    ``argument`` is everything after the first space, verbatim, so a PASS password may
    contain spaces. ``args`` is ``argument`` split at every space, so consecutive or
    trailing spaces give empty items. Both are left out of repr because they may
    contain a credential.
    """

    name: str
    args: tuple[bytes, ...] = field(default=(), repr=False)
    argument: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class ContinuationLine:
    """A client's response to a SASL challenge (RFC 5034), without its CRLF.

    ``data`` is base64, empty, or ``*`` to cancel the exchange.
    """

    data: bytes = field(repr=False)


CommandEvent = Command | ContinuationLine


class CommandReader:
    """Sans-IO reader of client lines: feed() bytes, then call next_event() until None.

    Every ClientProtocolError from next_event() is recoverable: the reader has dropped
    the invalid line, so the session can reply ``-ERR`` and read the next command.
    ``max_line_length`` counts the CRLF. RFC 2449 limits commands to 255 octets, and
    the default of 512 leaves room for clients that exceed that.
    """

    def __init__(self, max_line_length: int = 512) -> None:
        self._lines = LineBuffer(max_line_length)
        self._continuation_expected = False

    @property
    def max_line_length(self) -> int:
        return self._lines.max_line_length

    @property
    def buffered_size(self) -> int:
        """Number of received bytes that no event has returned yet."""
        return self._lines.buffered_size

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)

    def expect_continuation_line(self) -> None:
        """Return the next line as a ContinuationLine instead of parsing a command.

        The expectation covers one line. An error on that line cancels it.
        """
        self._continuation_expected = True

    def take_buffered(self) -> bytes:
        """Remove and return the bytes not yet parsed, and reset the reader.

        Call this when the session stops parsing: after STLS, to discard plaintext
        that arrived before the TLS handshake, or after login, to relay the rest.
        """
        # NOTE: if the reader was dropping an overlong line, the rest of that line
        # arrives after this call and is no longer dropped.
        self._continuation_expected = False
        return self._lines.take()

    def next_event(self) -> CommandEvent | None:
        """Return the next command or continuation line, or None until one is complete.

        Raises ClientProtocolError for an overlong or empty line, a line that does not
        end with CRLF or contains a NUL or a lone CR, and a keyword that is not 1 to 16
        ASCII letters.
        """
        continuation_expected = self._continuation_expected
        line = self._next_line()
        if line is None:
            return None

        self._continuation_expected = False
        defect = find_line_defect(line)
        if defect is not None:
            raise ClientProtocolError(f"Command line {defect}")

        content = line[:-2]
        if continuation_expected:
            return ContinuationLine(content)
        return _parse_command(content)

    def _next_line(self) -> bytes | None:
        try:
            return self._lines.next_line()
        except LineTooLongError:
            self._continuation_expected = False
            raise ClientProtocolError(
                f"Command line exceeds {self.max_line_length} octets including CRLF"
            ) from None


def _parse_command(line: bytes) -> Command:
    if not line:
        raise ClientProtocolError("Command line is empty")

    keyword, space, argument = line.partition(b" ")
    if not KEYWORD.fullmatch(keyword):
        message = f"Command keyword must be 1 to {MAX_KEYWORD_LENGTH} ASCII letters"
        raise ClientProtocolError(message)

    args = tuple(argument.split(b" ")) if space else ()
    return Command(keyword.decode("ascii").upper(), args, argument)
