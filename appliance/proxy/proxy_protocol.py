"""Read the PROXY protocol header of an accepted connection, before any mail protocol
byte or TLS handshake."""

from __future__ import annotations

import asyncio

from appliance.config.models import ProxyProtocolConfig
from appliance.protocols.proxy_header import (
    NO_HEADER,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
)
from appliance.proxy.connection import Connection, ConnectionClosed


async def read_proxy_header(
    connection: Connection, settings: ProxyProtocolConfig
) -> ProxyHeader | None:
    """Read the header from a connection from a trusted network.

    Returns None when `settings.required` is false and the connection starts with
    something else or sends nothing within `settings.timeout`. Bytes after the header
    go back into the connection's buffer, so an implicit-TLS handshake or the mail
    protocol reads them next.

    Raises ProxyHeaderError for an invalid, incomplete or missing required header,
    TimeoutError when a required header does not arrive in time, and
    ConnectionClosed when the client leaves first.
    """
    reader = ProxyHeaderReader(optional=not settings.required)
    # An implicit-TLS listener pauses reading until its handshake starts, but the
    # header comes before the ClientHello.
    if connection.transport is not None:
        connection.transport.resume_reading()
    try:
        async with asyncio.timeout(settings.timeout):
            result = await _next_result(reader, connection)
    except TimeoutError:
        if reader.buffered_size:
            raise ProxyHeaderError(
                f"PROXY header incomplete after {settings.timeout:g}s"
            ) from None
        if settings.required:
            raise
        return None
    connection.push_back(reader.take_buffered())
    return None if result is NO_HEADER else result


async def _next_result(
    reader: ProxyHeaderReader, connection: Connection
) -> ProxyHeader | object:
    while True:
        result = reader.next_event()
        if result is not None:
            return result
        data = await connection.read_some()
        if not data:
            raise ConnectionClosed
        reader.feed(data)
