"""Protocol errors, named for the side that is at fault.

The session maps each error to its wire reply (IMAP ``BAD``/``BYE``, POP3 ``-ERR``) in one
place. ``message`` is safe to send to the peer: it never echoes the peer's input, because that
input may contain a credential.
"""


class ProtocolError(Exception):
    """A peer sent bytes that break the protocol."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        # A fatal error leaves the byte stream out of sync, so the session must close.
        self.fatal = fatal


class ClientProtocolError(ProtocolError):
    """The mail client sent an invalid command."""

    def __init__(self, message: str, *, tag: str | None = None, fatal: bool = False) -> None:
        super().__init__(message, fatal=fatal)
        # The IMAP tag of the failed command when it could be read, so BAD can carry it.
        self.tag = tag


class TooManyProtocolErrors(ClientProtocolError):
    """The client used up its budget of invalid commands, so the session closes."""

    def __init__(self, last_message: str) -> None:
        super().__init__(last_message, fatal=True)


class UpstreamProtocolError(ProtocolError):
    """The mail server sent an invalid response."""
