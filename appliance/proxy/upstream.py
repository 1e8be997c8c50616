"""Open TCP and TLS connections to an upstream, with timeouts and readable failures."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from appliance.logs import describe_error
from appliance.proxy.connection import Connection
from appliance.proxy.errors import UpstreamCertificateError, UpstreamError
from appliance.proxy.resolver import RESOLVER
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
    starttls_if_offered: bool = False
    """For `none` learned by `tls: auto`: upgrade when the server offers STARTTLS, so a
    probe that an attacker stripped of STARTTLS does not send passwords in plain text."""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def describe_tls_error(exc: BaseException, peer: str = "server") -> str:
    """Return a one-line reason for a failed handshake, for logs.

    `peer` names the other side (client or server) in reasons such as the connection
    closed by the client.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {describe_error(exc, peer)}"


async def open_upstream(
    target: UpstreamTarget, timeout: float, preface: bytes = b"", log: Any = None
) -> Connection:
    """Connect to the target; with implicit TLS the handshake is part of the connect.

    `preface`, a PROXY protocol header, is sent first, before any TLS handshake. `log`
    is the session's logger for `connect_first`.
    """
    implicit = target.mode == "implicit" and not preface
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            connection = await connect_first(
                target.host,
                target.port,
                deadline,
                context=target.context if implicit else None,
                server_name=target.server_name,
                log=log,
            )
    except ssl.SSLError as exc:
        raise tls_failure(target, exc) from None
    except TimeoutError:
        RESOLVER.forget(target.host)
        raise UpstreamError("timeout", f"{target.address}: connect timed out") from None
    except OSError as exc:
        RESOLVER.forget(target.host)
        detail = f"{target.address}: {_connect_failure(exc)}"
        raise UpstreamError("connect", detail) from None
    if preface:
        connection.send(preface)
        if target.mode == "implicit":
            await upgrade_upstream(connection, target, timeout)
    return connection


class AllAddressesFailed(OSError):
    """Every address of a host name failed to connect. The message names each error."""

    def __init__(self, errors: list[tuple[str, OSError]]) -> None:
        super().__init__("; ".join(f"{a}: {_error_text(e)}" for a, e in errors))
        self.errors = errors
        """Each address with its error, in the order they were tried."""


def _connect_failure(exc: OSError) -> str:
    """Describe a failed lookup or connect alike on both event loops."""
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed: {exc.strerror or exc}"
    return f"connect failed: {_error_text(exc)}"


def _error_text(exc: OSError) -> str:
    """Return the error number's text, which both event loops share, or the message.

    asyncio words a refused connect "Connect call failed (address)", uvloop by errno.
    """
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return describe_error(exc)


async def connect_first(
    host: str,
    port: int,
    deadline: float,
    *,
    context: ssl.SSLContext | None = None,
    server_name: str | None = None,
    log: Any = None,
) -> Connection:
    """Connect to the first address of `host` that accepts, in order, as asyncio does.

    The addresses come from the shared resolver cache. With `context` the TLS handshake
    is part of the connect. A TLS error ends the attempt. Any other OSError moves on to
    the next address, also one during a TLS handshake, where asyncio would have stopped.
    Each address but the last gets an equal share of the time left before `deadline`
    (event loop time), so a server that drops packets without a reply does not use up
    the whole timeout. `log`, a session's logger, gets a DEBUG line for each address
    that failed before the next one is tried.
    """
    loop = asyncio.get_running_loop()
    addresses = await RESOLVER.addresses(host)
    errors: list[OSError] = []
    for index, address in enumerate(addresses):
        last = index == len(addresses) - 1
        # Kept above zero, which asyncio requires of a handshake timeout.
        share = max((deadline - loop.time()) / (len(addresses) - index), 0.001)
        try:
            async with asyncio.timeout(None if last else share):
                _, connection = await loop.create_connection(
                    Connection,
                    address,
                    port,
                    ssl=context,
                    server_hostname=server_name if context is not None else None,
                    ssl_handshake_timeout=share if context is not None else None,
                )
        except ssl.SSLError:
            raise
        except TimeoutError:
            # Only a share's own timeout lands here, because the caller's arrives as
            # a cancellation.
            errors.append(OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)))
        except OSError as exc:
            errors.append(exc)
        else:
            return connection
        if log is not None and not last:
            log.debug(
                "upstream address {} port {} failed: {}; trying {}",
                address,
                port,
                _error_text(errors[-1]),
                addresses[index + 1],
            )
    if not errors:
        raise OSError(f"{host} has no address")
    if len(errors) == 1:
        raise errors[0]
    raise AllAddressesFailed(list(zip(addresses, errors)))


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
        raise tls_failure(target, exc) from None


def tls_failure(target: UpstreamTarget, exc: BaseException) -> UpstreamError:
    """Return the UpstreamError for a failed handshake with `target`.

    A certificate that failed verification gives an UpstreamCertificateError.
    """
    detail = f"{target.address}: {describe_tls_error(exc)}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamCertificateError(detail, exc.verify_message)
    return UpstreamError("tls", detail)


def remember_tls_session(connection: Connection, target: UpstreamTarget) -> None:
    """Keep the upstream's TLS session for resumption by the next connection."""
    ssl_object = connection.extra("ssl_object")
    if ssl_object is not None and isinstance(target.context, UpstreamContext):
        target.context.remember_session(ssl_object)
