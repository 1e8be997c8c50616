"""Open TCP and TLS connections to an upstream, with timeouts and readable failures."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from appliance.proxy.connection import Connection
from appliance.proxy.errors import UpstreamError
from appliance.tls.contexts import UpstreamContext


@dataclass(frozen=True)
class UpstreamTarget:
    """Where and how one session connects: a concrete mode, never `auto`."""

    name: str
    host: str
    port: int
    mode: str
    """`implicit`, `starttls` or `none`."""
    context: ssl.SSLContext
    server_name: str

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def describe_tls_error(exc: BaseException) -> str:
    """Return a one-line reason for a failed handshake, for logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


async def open_upstream(
    target: UpstreamTarget, timeout: float, preface: bytes = b""
) -> Connection:
    """Connect to the target; with implicit TLS the handshake is part of the connect.

    `preface`, a PROXY protocol header, is sent first, before any TLS handshake.
    """
    loop = asyncio.get_running_loop()
    implicit = target.mode == "implicit" and not preface
    try:
        async with asyncio.timeout(timeout):
            _, connection = await loop.create_connection(
                Connection,
                target.host,
                target.port,
                ssl=target.context if implicit else None,
                server_hostname=target.server_name if implicit else None,
                ssl_handshake_timeout=timeout if implicit else None,
            )
    except ssl.SSLError as exc:
        raise UpstreamError("tls", f"{target.address}: {describe_tls_error(exc)}") from None
    except TimeoutError:
        raise UpstreamError("timeout", f"{target.address}: connect timed out") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UpstreamError("connect", f"{target.address}: connect failed: {reason}") from None
    if preface:
        connection.send(preface)
        if target.mode == "implicit":
            await upgrade_upstream(connection, target, timeout)
    return connection


async def upgrade_upstream(connection: Connection, target: UpstreamTarget, timeout: float) -> None:
    """Perform the client-side TLS handshake after STARTTLS/STLS."""
    try:
        await connection.start_tls(
            target.context,
            server_side=False,
            server_hostname=target.server_name,
            handshake_timeout=timeout,
        )
    except (ssl.SSLError, TimeoutError, ConnectionError) as exc:
        raise UpstreamError("tls", f"{target.address}: {describe_tls_error(exc)}") from None


def remember_tls_session(connection: Connection, target: UpstreamTarget) -> None:
    """Keep the upstream's TLS session for resumption by the next connection."""
    ssl_object = connection.extra("ssl_object")
    if ssl_object is not None and isinstance(target.context, UpstreamContext):
        target.context.remember_session(ssl_object)
