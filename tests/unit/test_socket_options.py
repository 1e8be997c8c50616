"""TCP options that every session socket gets, on both event loops."""

from __future__ import annotations

import asyncio
import socket

import pytest

from appliance.proxy.connection import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    Connection,
)
from tests.support.loops import LOOPS, run_on_loop

OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
]


async def accepted_and_connected_options() -> list[list[int]]:
    """Return the OPTIONS values of an accepted and a connected socket."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    def on_made(connection: Connection) -> None:
        accepted.set_result(connection)

    def accept_side() -> Connection:
        connection = Connection()
        connection.on_made = on_made
        return connection

    server = await loop.create_server(accept_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, connected = await loop.create_connection(Connection, "127.0.0.1", port)
    values = []
    for connection in (await accepted, connected):
        sock = connection.transport.get_extra_info("socket")
        values.append([sock.getsockopt(level, name) for level, name, _ in OPTIONS])
        connection.transport.close()
    server.close()
    await server.wait_closed()
    return values


@pytest.mark.parametrize("loop_name", LOOPS)
def test_session_sockets_get_tcp_options(loop_name: str) -> None:
    result: list[list[int]] = []

    async def scenario() -> None:
        result.extend(await accepted_and_connected_options())

    run_on_loop(loop_name, scenario, timeout=10)
    expected = [value for _, _, value in OPTIONS]
    assert result[0] == expected
    assert result[1] == expected
