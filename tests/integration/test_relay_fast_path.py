"""The spliced relay between two plain TCP connections, on asyncio and on uvloop.

Each test builds the two connections the way a session has them after login: a client
connection accepted by the proxy and an upstream connection the proxy opened, both with
`Connection` protocols, then joins them. The far ends are plain sockets of the test:
`client` plays the mail client and `server` plays the mail server.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from appliance.proxy import splice
from appliance.proxy.connection import Connection, join
from tests.support.loops import LOOPS, run_on_loop

HOST = "127.0.0.1"
STEP_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(
    not splice.splice_supported(), reason="needs splice(2) and RLIMIT_NOFILE >= 8192"
)


@dataclass
class Joined:
    client: socket.socket
    server: socket.socket
    proxy_client: Connection
    proxy_upstream: Connection


def run(loop_name: str, test: Callable[[], Awaitable[None]]) -> None:
    run_on_loop(loop_name, test, STEP_TIMEOUT * 3)


async def joined_pair() -> Joined:
    loop = asyncio.get_running_loop()
    with (
        socket.create_server((HOST, 0)) as client_side,
        socket.create_server((HOST, 0)) as server_side,
    ):
        client_side.setblocking(False)
        server_side.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, client_side.getsockname())
        accepted, _ = await loop.sock_accept(client_side)
        _, proxy_client = await loop.connect_accepted_socket(Connection, accepted)
        _, proxy_upstream = await loop.create_connection(
            Connection, *server_side.getsockname()
        )
        server, _ = await loop.sock_accept(server_side)
    server.setblocking(False)
    join(proxy_client, proxy_upstream)
    return Joined(client, server, proxy_client, proxy_upstream)


async def receive_exactly(sock: socket.socket, size: int, chunk: int = 65536) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        part = await asyncio.wait_for(
            loop.sock_recv(sock, min(chunk, size - len(data))), STEP_TIMEOUT
        )
        if not part:
            break
        data += part
    return bytes(data)


async def receive_until_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while part := await asyncio.wait_for(loop.sock_recv(sock, 65536), STEP_TIMEOUT):
        data += part
    return bytes(data)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)




@pytest.mark.parametrize("loop_name", LOOPS)
def test_plain_pair_is_spliced(loop_name: str) -> None:
    async def scenario() -> None:
        pair = await joined_pair()
        assert pair.proxy_client.splice is not None
        assert pair.proxy_upstream.splice is pair.proxy_client.splice
        pair.client.close()
        pair.server.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_large_streams_both_ways_exact(loop_name: str) -> None:
    downstream = payload(8 * 1024 * 1024 + 17, seed=1)
    upstream = payload(3 * 1024 * 1024 + 5, seed=2)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined_pair()
        sending = [
            asyncio.ensure_future(loop.sock_sendall(pair.server, downstream)),
            asyncio.ensure_future(loop.sock_sendall(pair.client, upstream)),
        ]
        at_client = await receive_exactly(pair.client, len(downstream))
        at_server = await receive_exactly(pair.server, len(upstream))
        await asyncio.gather(*sending)
        assert at_client == downstream
        assert at_server == upstream
        assert pair.proxy_client.bytes_sent == len(downstream)
        assert pair.proxy_client.bytes_received == len(upstream)
        pair.client.close()
        pair.server.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_slow_reader_stops_upstream_reads(loop_name: str) -> None:
    message = payload(32 * 1024 * 1024, seed=3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined_pair()
        sending = asyncio.ensure_future(loop.sock_sendall(pair.server, message))
        # The client reads nothing, so socket buffers and one pipe fill up and the
        # proxy stops reading; the server cannot finish sending 32 MiB.
        await asyncio.sleep(1.0)
        assert not sending.done()
        received = bytearray()
        while len(received) < len(message):
            received += await receive_exactly(pair.client, 4096, chunk=4096)
            if len(received) % (1024 * 1024) == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(sending, STEP_TIMEOUT)
        assert bytes(received) == message
        pair.client.close()
        pair.server.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_server_close_delivers_then_closes(loop_name: str) -> None:
    message = payload(2 * 1024 * 1024, seed=4)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined_pair()
        await loop.sock_sendall(pair.server, message)
        pair.server.close()
        assert await receive_until_eof(pair.client) == message
        await asyncio.wait_for(pair.proxy_client.closed, STEP_TIMEOUT)
        await asyncio.wait_for(pair.proxy_upstream.closed, STEP_TIMEOUT)
        pair.client.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_close_flushes_bytes_already_read(loop_name: str) -> None:
    message = payload(4 * 1024 * 1024, seed=5)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined_pair()
        sending = asyncio.ensure_future(loop.sock_sendall(pair.server, message))
        await asyncio.sleep(0.5)
        # As on shutdown: close while the client is behind. Bytes the proxy already
        # read reach the client, nothing is injected, then the client sees the end.
        pair.proxy_client.close()
        received = await receive_until_eof(pair.client)
        assert message.startswith(received)
        await asyncio.wait_for(pair.proxy_upstream.closed, STEP_TIMEOUT)
        sending.cancel()
        pair.server.close()
        pair.client.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_abort_releases_descriptors(loop_name: str) -> None:
    async def scenario() -> None:
        pair = await joined_pair()
        relay = pair.proxy_client.splice
        assert relay is not None
        duplicates = [
            fd for pump in relay.pumps for fd in (pump.source_fd, pump.destination_fd)
        ]
        pair.proxy_upstream.abort()
        await asyncio.wait_for(pair.proxy_client.closed, STEP_TIMEOUT)
        await asyncio.wait_for(pair.proxy_upstream.closed, STEP_TIMEOUT)
        for fd in duplicates:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert await receive_until_eof(pair.client) == b""
        pair.client.close()
        pair.server.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_buffered_bytes_keep_transport_relay(loop_name: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server((HOST, 0)) as listener:
            listener.setblocking(False)
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, listener.getsockname())
            accepted, _ = await loop.sock_accept(listener)
            _, connection = await loop.connect_accepted_socket(Connection, accepted)
        await loop.sock_sendall(client, b"a NOOP\r\n")
        for _ in range(200):
            if connection.buffered:
                break
            await asyncio.sleep(0.01)
        assert connection.buffered == len(b"a NOOP\r\n")
        assert not splice.can_splice(connection)
        connection.abort()
        client.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_no_descriptors_keeps_transport_relay(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_dup(fd: int) -> int:
        raise OSError(24, "Too many open files")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(splice.os, "dup", fail_dup)
        pair = await joined_pair()
        monkeypatch.undo()
        assert pair.proxy_client.splice is None
        message = payload(1024 * 1024, seed=6)
        await loop.sock_sendall(pair.server, message)
        assert await receive_exactly(pair.client, len(message)) == message
        pair.client.close()
        pair.server.close()

    run(loop_name, scenario)
