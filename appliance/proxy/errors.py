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


class UpstreamCertificateError(UpstreamError):
    """The upstream's certificate failed verification during the TLS handshake.

    Its reason is `tls`, as for other handshake failures. The fix lies in the CA file
    or the server name of the upstream's config, or in the server's certificate, so
    `tls: auto` does not report it as a possible downgrade.
    """

    def __init__(self, detail: str, verify_message: str) -> None:
        super().__init__("tls", detail)
        self.verify_message = verify_message
        """OpenSSL's reason, such as a host name mismatch."""


class PolicyError(UpstreamError):
    """TLS policy forbids the connection, for example plain text to a server seen with TLS."""
