"""loguru setup: one sink on standard error, text or JSON, with the session context.

Log records carry `session`, `client`, `listener` and `upstream` in `extra` when a session
binds them. Nothing here redacts: credentials are never passed to the logger in the first
place, and peer-supplied text goes through `escape` so CR/LF cannot forge a line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Hashable

from loguru import logger

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "{extra[context]}<level>{message}</level>"
)


def _add_context(record: dict) -> None:
    extra = record["extra"]
    parts = [f"{key}={extra[key]}" for key in ("session", "listener") if key in extra]
    extra["context"] = f"[{' '.join(parts)}] " if parts else ""


def configure_logging(level: str = "INFO", json_output: bool = False) -> None:
    """Replace loguru's sinks with one standard-error sink at `level`."""
    logger.remove()
    logger.configure(patcher=_add_context)
    if json_output:
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format=TEXT_FORMAT,
            colorize=None,
            backtrace=False,
            diagnose=False,
        )


def escape(value: bytes | str, limit: int = 128) -> str:
    """Return peer-supplied text safe for one log line: printable ASCII, escaped, capped.

    Every other byte, the backslash included, becomes `\\xHH`, so a name that contains
    the text `\\x0d` cannot pass for one that contains a carriage return.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    text = "".join(_ESCAPED_BYTES[byte] for byte in value[:limit])
    return text + ("..." if len(value) > limit else "")


# Words for exceptions that carry no text. asyncio raises a bare ConnectionResetError
# when the peer ends the stream during a TLS handshake (asyncio/sslproto.py, Python 3.11).
_TEXTS_BY_TYPE: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionResetError, "connection closed by the {peer}"),
    (BrokenPipeError, "connection closed by the {peer}"),
    (ConnectionAbortedError, "connection aborted"),
    (ConnectionRefusedError, "connection refused"),
    (TimeoutError, "timed out"),
    (ConnectionError, "connection failed"),
)


def describe_error(error: BaseException, peer: str = "peer") -> str:
    """Return a one-line, never empty text for an exception, for log lines.

    An OSError gives its error number's text, another exception its message. One
    without either gives words for its type, naming `peer` (client or server) where
    the peer ended the connection, or else the type's name.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    if text:
        return text
    for kind, words in _TEXTS_BY_TYPE:
        if isinstance(error, kind):
            return words.format(peer=peer)
    return type(error).__name__


_ESCAPED_BYTES = tuple(
    chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}"
    for byte in range(256)
)


class RepeatLimiter:
    """A limit of one log line per key every `interval` seconds, counting the rest.

    For warnings that any peer can cause, such as a client that speaks plain text to a
    TLS port, so that a scanner cannot flood the log with them. Keys should come from a
    bounded set, such as config names and fixed words, because each is kept.
    """

    def __init__(
        self, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._last_allowed: dict[Hashable, float] = {}
        self._held_back: dict[Hashable, int] = {}

    def allow(self, key: Hashable, weight: int = 1) -> int | None:
        """Return None to hold a line back, or the count held back since the last one.

        `weight` is what this event adds to the count, such as the records that one
        eviction removed; the returned count leaves out the event's own weight.
        """
        now = self._clock()
        last = self._last_allowed.get(key)
        if last is not None and now - last < self.interval:
            self._held_back[key] = self._held_back.get(key, 0) + weight
            return None
        self._last_allowed[key] = now
        return self._held_back.pop(key, 0)
