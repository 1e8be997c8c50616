"""A client's half-close in the relay, over loopback TCP on both loops and both relays.

A client that sends its last commands and then shuts down its write side still expects
the replies. The relay passes the end of stream on to the server and keeps relaying the
server's bytes until the server closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass

import pytest

from appliance.proxy import connection as connection_module
from appliance.proxy import splice as splice_module
from appliance.proxy.connection import Connection, close_flushed, join
from appliance.proxy.relay import relay_outcome
from tests.support.certs import TestPKI
from tests.support.loops import LOOPS, run_on_loop

RELAYS = ["splice", "transport"]


def tcp_pair(buffer_size: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Return the two ends of one loopback TCP connection.

    With `buffer_size` the remote end's receive buffer and the local end's send buffer
    are that small, as on a slow link to the remote end.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        remote = socket.socket()
        if buffer_size is not None:
            # Set before connecting, because the TCP window is agreed in the handshake.
            remote.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
        remote.connect(listener.getsockname())
        local, _ = listener.accept()
    if buffer_size is not None:
        local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
    return local, remote


async def read_to_end(
    sock: socket.socket, size: int = 65536, pause: float = 0.0
) -> bytes:
    """Read from a non-blocking socket until end of stream, `size` bytes at a time.

    A `pause` after each read makes a slow reader.
    """
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await loop.sock_recv(sock, size):
        received += chunk
        if pause:
            await asyncio.sleep(pause)
    return received


@dataclass
class Relayed:
    """A joined client and upstream connection and the remote socket of each."""

    client: Connection
    upstream: Connection
    mail_client: socket.socket
    mail_server: socket.socket

    async def half_close(self, last: bytes = b"") -> bytes:
        """Send `last` from the client and half-close; return what the server read."""
        loop = asyncio.get_running_loop()
        if last:
            await loop.sock_sendall(self.mail_client, last)
        self.mail_client.shutdown(socket.SHUT_WR)
        return await read_to_end(self.mail_server)

    async def ended(self) -> float:
        """Wait until the relay closed both sides, close the sockets, return the wait."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(self.client.closed, self.upstream.closed)
        waited = loop.time() - started
        self.mail_client.close()
        self.mail_server.close()
        return waited

    def outcome(self) -> str:
        return relay_outcome(self.client, self.upstream)


async def joined(client_buffer_size: int | None = None) -> Relayed:
    """Return a joined client and upstream connection and their remote sockets.

    `client_buffer_size` makes the client side's socket buffers that small.
    """
    loop = asyncio.get_running_loop()
    client_side, mail_client = tcp_pair(client_buffer_size)
    upstream_side, mail_server = tcp_pair()
    for sock in (mail_client, mail_server):
        sock.setblocking(False)
    _, client = await loop.connect_accepted_socket(Connection, client_side)
    _, upstream = await loop.connect_accepted_socket(Connection, upstream_side)
    join(client, upstream)
    return Relayed(client, upstream, mail_client, mail_server)


def run(loop_name: str, relay: str, monkeypatch, scenario) -> None:
    monkeypatch.setattr(
        connection_module, "splice_supported", lambda: relay == "splice"
    )
    run_on_loop(loop_name, scenario, timeout=20)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("relay", RELAYS)
def test_replies_after_half_close_delivered(
    loop_name: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined()
        results["splice"] = pair.client.splice is not None
        results["server read"] = await pair.half_close(b"b LOGOUT\r\n")
        await loop.sock_sendall(pair.mail_server, b"* BYE\r\nb OK done\r\n")
        pair.mail_server.close()
        results["client read"] = await read_to_end(pair.mail_client)
        await pair.ended()
        results["outcome"] = pair.outcome()

    run(loop_name, relay, monkeypatch, scenario)
    assert results["splice"] == (relay == "splice")
    assert results["server read"] == b"b LOGOUT\r\n"
    assert results["client read"] == b"* BYE\r\nb OK done\r\n"
    assert results["outcome"] == "closed by client"


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("relay", RELAYS)
def test_silent_server_closed_after_timeout(
    loop_name: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "HALF_CLOSE_TIMEOUT", 0.3)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined()
        started = loop.time()
        # The server reads the end of stream but neither replies nor closes.
        results["server read"] = await pair.half_close()
        results["client read"] = await read_to_end(pair.mail_client)
        results["waited"] = loop.time() - started
        await pair.ended()
        results["outcome"] = pair.outcome()

    run(loop_name, relay, monkeypatch, scenario)
    assert results["server read"] == b""
    assert results["client read"] == b""
    assert results["waited"] >= 0.2
    assert results["outcome"] == "half-close timeout"


def test_unforwarded_end_closed_by_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a half-close toward the server, the client may simply have left."""
    monkeypatch.setattr(connection_module, "UNFORWARDED_END_TIMEOUT", 0.3)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined()
        # A TLS upstream's transport cannot write an end of stream. asyncio's plain
        # transport plays that part here.
        pair.upstream.transport.can_write_eof = lambda: False
        started = loop.time()
        pair.mail_client.shutdown(socket.SHUT_WR)
        results["client read"] = await read_to_end(pair.mail_client)
        results["waited"] = loop.time() - started
        await pair.ended()
        results["outcome"] = pair.outcome()

    run("asyncio", "transport", monkeypatch, scenario)
    assert results["client read"] == b""
    assert results["waited"] >= 0.2
    assert results["outcome"] == "closed by client"


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("relay", RELAYS)
def test_server_bytes_extend_timeout(
    loop_name: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound counts silence, so a long reply is not cut."""
    monkeypatch.setattr(connection_module, "HALF_CLOSE_TIMEOUT", 0.3)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined()
        await pair.half_close()
        for index in range(6):
            await loop.sock_sendall(pair.mail_server, b"* %d EXISTS\r\n" % index)
            await asyncio.sleep(0.1)
        pair.mail_server.close()
        results["client read"] = await read_to_end(pair.mail_client)
        await pair.ended()

    run(loop_name, relay, monkeypatch, scenario)
    expected = b"".join(b"* %d EXISTS\r\n" % index for index in range(6))
    assert results["client read"] == expected


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("relay", RELAYS)
def test_server_end_still_closes_both(
    loop_name: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the client's end is a half-close. The server's end closes the session."""
    results: dict[str, object] = {}

    async def scenario() -> None:
        pair = await joined()
        pair.mail_server.close()
        results["client read"] = await read_to_end(pair.mail_client)
        await pair.ended()
        results["outcome"] = pair.outcome()

    run(loop_name, relay, monkeypatch, scenario)
    assert results["client read"] == b""
    assert results["outcome"] == "closed by upstream"


# 32 MiB: more than the relay's buffers and the loopback socket buffers hold.
LARGE_REPLY = bytes(range(256)) * 131072


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("relay", RELAYS)
def test_slow_reader_keeps_whole_reply(
    loop_name: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes waiting for the client stop the bound, even while the server is paused."""
    monkeypatch.setattr(connection_module, "HALF_CLOSE_TIMEOUT", 0.2)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined()
        await pair.half_close()

        async def serve() -> None:
            await loop.sock_sendall(pair.mail_server, LARGE_REPLY)
            pair.mail_server.close()

        sending = asyncio.create_task(serve())
        # Flow control pauses the server long before the client starts to read.
        await asyncio.sleep(1.0)
        results["client read"] = await read_to_end(pair.mail_client)
        await sending
        await pair.ended()

    run(loop_name, relay, monkeypatch, scenario)
    assert len(results["client read"]) == len(LARGE_REPLY)
    assert results["client read"] == LARGE_REPLY


@pytest.mark.parametrize("loop_name", LOOPS)
def test_stalled_reader_aborted_after_flush_timeout(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closing spliced relay does not wait forever for a client that never reads."""
    monkeypatch.setattr(splice_module, "FLUSH_TIMEOUT", 0.3)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined()
        results["splice"] = pair.client.splice is not None
        reply = loop.sock_sendall(pair.mail_server, LARGE_REPLY)
        sending = asyncio.create_task(reply)
        await asyncio.sleep(0.5)
        # As the idle timer does: the relay cannot flush to a client that never reads.
        pair.client.close()
        pair.upstream.close()
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        results["waited"] = await pair.ended()

    run(loop_name, "splice", monkeypatch, scenario)
    assert results["splice"] is True
    assert results["waited"] >= 0.2


# TLS has no half-close, so a TLS client's end closes the connection.


def implicit_tls_connection() -> Connection:
    """Return a connection that starts TLS at once, as on an implicit-TLS listener."""
    connection = Connection()
    connection.tls_on_connect = True
    return connection


@pytest.mark.parametrize("loop_name", LOOPS)
def test_tls_end_in_last_flight_no_warning(
    loop_name: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """The end of stream that arrives with the client's Finished is not kept open.

    Until start_tls returns, the connection's transport is still the plain one, and
    asyncio warns when a TLS protocol is asked to stay open after the end of stream.
    """
    pki = TestPKI(tmp_path)
    cert = pki.issue_server_cert("half-close")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert.cert_file, cert.key_file)
    client_context = ssl.create_default_context(cafile=str(pki.ca_file))
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server_side, mail_client = tcp_pair()
        mail_client.setblocking(False)
        _, connection = await loop.connect_accepted_socket(
            implicit_tls_connection, server_side
        )
        upgrade = asyncio.create_task(
            connection.start_tls(server_context, server_side=True, handshake_timeout=5)
        )

        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(mail_client, outgoing.read())
                incoming.write(await loop.sock_recv(mail_client, 65536))

        # Finished, a command and close_notify in one segment, then the TCP end.
        tls.write(b"a CAPABILITY\r\n")
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        await loop.sock_sendall(mail_client, outgoing.read())
        mail_client.shutdown(socket.SHUT_WR)
        await asyncio.gather(upgrade, return_exceptions=True)

        results["read"] = await connection.read_some()
        connection.close()
        await connection.closed
        mail_client.close()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run_on_loop(loop_name, scenario, timeout=20)
    assert results["read"] == b"a CAPABILITY\r\n"
    assert "eof_received" not in caplog.text


# Closing: bytes still on their way to a client that reads slowly are written out.
SLOW_REPLY = bytes(range(256)) * 2400  # 600 KiB
SMALL_BUFFER = 16 * 1024


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("relay", RELAYS)
def test_slow_reader_gets_reply_at_close(
    loop_name: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush bound counts stalls, not the whole flush after the server's end."""
    monkeypatch.setattr(splice_module, "FLUSH_TIMEOUT", 0.3)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined(SMALL_BUFFER)
        # 16 KiB every 50 ms is about 320 KiB/s.
        slow_read = read_to_end(pair.mail_client, SMALL_BUFFER, pause=0.05)
        reading = asyncio.create_task(slow_read)
        await loop.sock_sendall(pair.mail_server, SLOW_REPLY)
        pair.mail_server.close()
        await pair.upstream.closed
        # As a session does when its relay ends.
        await close_flushed([pair.client, pair.upstream])
        results["client read"] = await reading
        await pair.ended()

    run(loop_name, relay, monkeypatch, scenario)
    assert len(results["client read"]) == len(SLOW_REPLY)
    assert results["client read"] == SLOW_REPLY


@pytest.mark.parametrize("loop_name", LOOPS)
def test_stalled_reader_aborted_at_close(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the transport relay a client that never reads is aborted after a stall."""
    monkeypatch.setattr(splice_module, "FLUSH_TIMEOUT", 0.3)
    results: dict[str, object] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pair = await joined(SMALL_BUFFER)
        sending = asyncio.create_task(loop.sock_sendall(pair.mail_server, SLOW_REPLY))
        # Flow control stops the relay once the client's buffers are full.
        await asyncio.sleep(0.5)
        started = loop.time()
        await close_flushed([pair.client, pair.upstream])
        results["waited"] = loop.time() - started
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await pair.ended()

    run(loop_name, "transport", monkeypatch, scenario)
    assert results["waited"] >= 0.2
    assert results["waited"] < 5.0
