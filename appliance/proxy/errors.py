"""Errors that end a session, named for the side at fault."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be used; the client gets UNAVAILABLE or SYS/TEMP.

    `reason` is a short fixed word (for logs and metric labels); `detail` is for the log only
    and never reaches the client.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class PolicyError(UpstreamError):
    """TLS policy forbids the connection, for example plain text to a server seen with TLS."""
