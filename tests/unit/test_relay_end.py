"""Which side ended a transport relay, over loopback TCP on both event loops."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from appliance.proxy import relay
from appliance.proxy.connection import Connection
from tests.support.loops import LOOPS, run_on_loop

# SO_LINGER with a zero timeout makes close() send a reset instead of a FIN.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Return the two ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        remote = socket.create_connection(listener.getsockname())
        local, _ = listener.accept()
    return local, remote


def end(sock: socket.socket, ending: str) -> None:
    """Close `sock` with a FIN, or with a reset when `ending` is "reset"."""
    if ending == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    sock.close()


async def relay_outcome(first: str, second: str, upstream_paused: bool) -> str:
    """Relay two TCP connections, end the remote sides in order and return the outcome.

    `first` and `second` are "client FIN", "server reset" and the like. A paused
    upstream leaves the server's end unread in the kernel, as when both sides end
    within one pass of the event loop.
    """
    loop = asyncio.get_running_loop()
    client_side, mail_client = tcp_pair()
    upstream_side, mail_server = tcp_pair()
    _, client = await loop.connect_accepted_socket(Connection, client_side)
    _, upstream = await loop.connect_accepted_socket(Connection, upstream_side)
    client.relay_to(upstream)
    upstream.relay_to(client)
    if upstream_paused:
        upstream.transport.pause_reading()
    remotes = {"client": mail_client, "server": mail_server}
    for step in (first, second):
        side, ending = step.split()
        end(remotes[side], ending)
        await asyncio.sleep(0.05)
    await asyncio.gather(client.closed, upstream.closed)
    return relay.relay_outcome(client, upstream)


def run_relay(loop_name: str, first: str, second: str, paused: bool) -> str:
    result: list[str] = []

    async def scenario() -> None:
        result.append(await relay_outcome(first, second, paused))

    run_on_loop(loop_name, scenario, timeout=10)
    return result[0]


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("server_end", ["server FIN", "server reset"])
def test_unread_server_end_counts_first(loop_name: str, server_end: str) -> None:
    outcome = run_relay(loop_name, server_end, "client FIN", paused=True)
    assert outcome == "closed by upstream"


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("client_end", ["client FIN", "client reset"])
def test_client_end_counts_client(loop_name: str, client_end: str) -> None:
    outcome = run_relay(loop_name, client_end, "server FIN", paused=False)
    assert outcome == "closed by client"


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("server_end", ["server FIN", "server reset"])
def test_server_end_counts_upstream(loop_name: str, server_end: str) -> None:
    outcome = run_relay(loop_name, server_end, "client FIN", paused=False)
    assert outcome == "closed by upstream"
