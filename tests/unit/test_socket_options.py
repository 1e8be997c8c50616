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


async def accepted_and_connected_options(host: str) -> list[list[int]]:
    """Return the OPTIONS values of an accepted and a connected socket.

    A byte sent afterwards shows that setting them left both descriptors open.
    """
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    def on_made(connection: Connection) -> None:
        accepted.set_result(connection)

    def accept_side() -> Connection:
        connection = Connection()
        connection.on_made = on_made
        return connection

    server = await loop.create_server(accept_side, host, 0)
    port = server.sockets[0].getsockname()[1]
    _, connected = await loop.create_connection(Connection, host, port)
    connected.send(b"x")
    received = await (await accepted).read_some()
    values = [[received == b"x"]]
    for connection in (await accepted, connected):
        sock = connection.transport.get_extra_info("socket")
        values.append([sock.getsockopt(level, name) for level, name, _ in OPTIONS])
        connection.transport.close()
    server.close()
    await server.wait_closed()
    return values


def ipv6_loopback_missing() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return True
    return False


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_session_sockets_get_tcp_options(loop_name: str, host: str) -> None:
    if host == "::1" and ipv6_loopback_missing():
        pytest.skip("no IPv6 loopback here")
    result: list[list[int]] = []

    async def scenario() -> None:
        result.extend(await accepted_and_connected_options(host))

    run_on_loop(loop_name, scenario, timeout=10)
    expected = [value for _, _, value in OPTIONS]
    assert result[0] == [True]
    assert result[1] == expected
    assert result[2] == expected
