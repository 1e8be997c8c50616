"""One side of a session: an asyncio protocol with a pre-login read API and a fast relay.

Before login the session pulls bytes with `read_some` and feeds them to a sans-IO parser.
After login `join` relays between two connections. Two plain TCP connections are joined
by `SpliceRelay`, which moves bytes inside the kernel. Otherwise each `data_received`
writes straight into the peer's transport, and flow control pauses the reading side while
the peer's write buffer is above its high-water mark. Either way a slow reader never makes
the proxy buffer a whole message.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from asyncio import trsock
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from appliance.proxy import splice
from appliance.proxy.splice import SpliceRelay, can_splice, splice_supported

# Bytes buffered before login while no reader takes them; reading pauses above this.
PRE_AUTH_BUFFER_LIMIT = 64 * 1024
# Transport write buffer watermarks for the relay (bytes); reading pauses above the high mark.
RELAY_HIGH_WATER = 256 * 1024
RELAY_LOW_WATER = 64 * 1024
# TCP keepalive: first probe after 5 minutes idle, so NAT and load balancers keep IDLE
# sessions, which last up to 30 minutes between client commands.
KEEPALIVE_IDLE = 300
KEEPALIVE_INTERVAL = 60
KEEPALIVE_COUNT = 5
INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# Linux TCP states (include/net/tcp_states.h) after the remote side's reset or FIN.
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
# Seconds the upstream may stay silent after the client's end of stream (a half-close)
# before the relay closes both sides. The server still replies to the commands sent
# before the end, and one that waits for more commands is not kept for the idle timeout.
HALF_CLOSE_TIMEOUT = 60.0
# The same bound when the end cannot be passed on, because TLS has no half-close. The
# server then waits for more commands, and the client may be gone rather than half-closed,
# so the relay keeps only replies that follow each other closely.
UNFORWARDED_END_TIMEOUT = 2.0


class ConnectionClosed(Exception):
    """The peer closed the connection, or it was lost."""


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """Set TCP_NODELAY and TCP keepalive on the transport's socket, where it has one."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in INET_FAMILIES:
        return
    if isinstance(sock, trsock.TransportSocket):
        _set_options(sock)
        return
    # uvloop's socket stand-in builds a socket object, with a getsockname call, for
    # every setsockopt. One object for all options makes one such call instead of five.
    with _socket_for(sock) as raw:
        _set_options(raw)


@contextmanager
def _socket_for(sock: Any) -> Iterator[socket.socket]:
    """Yield a socket object for a transport's descriptor, detached again afterwards.

    The transports' own socket objects lack recv and, on uvloop, build a new socket
    object for every call.
    """
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        yield raw
    finally:
        raw.detach()


def _set_options(sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Connection(asyncio.Protocol):
    """A TCP connection with TLS upgrade, bounded pre-login reads and a relay mode."""

    # Each session holds two, so instances have no __dict__, which keeps idle sessions
    # small.
    __slots__ = (
        "_buffer",
        "_drain_waiter",
        "_eof",
        "_half_close_timer",
        "_peer",
        "_read_waiter",
        "_tls",
        "_tls_info",
        "_write_paused",
        "bytes_received",
        "bytes_sent",
        "closed",
        "closed_here",
        "half_close",
        "half_close_expired",
        "last_activity",
        "on_made",
        "remote_end",
        "splice",
        "tls_on_connect",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.last_activity = time.monotonic()
        self.closed = asyncio.get_running_loop().create_future()
        # Set when the appliance starts the close (close(), abort() or the splice relay),
        # so the loss that follows is not recorded as the remote side's end.
        self.closed_here = False
        # When the remote side ended the stream (end of file, reset, loss), or None.
        self.remote_end: float | None = None
        self._buffer = bytearray()
        self._eof = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._peer: Connection | None = None
        # Called once the transport exists; listeners use it to start a session.
        self.on_made: Callable[[Connection], None] | None = None
        # Implicit TLS: nothing may be read before the handshake starts.
        self.tls_on_connect = False
        # Set when TLS starts. Until start_tls returns, the transport is still the plain
        # one, and the TLS layer may already call eof_received.
        self._tls = False
        self._tls_info: tuple[str, str] | None = None
        # Set while a SpliceRelay moves this connection's bytes instead of the transport.
        self.splice: SpliceRelay | None = None
        # The client's side: in the relay its end of stream is passed on as a half-close,
        # and the other direction runs until the peer ends it. Set by `join`.
        self.half_close = False
        # Set when the relay closed because the peer received this side's end of stream
        # and then sent nothing for HALF_CLOSE_TIMEOUT. The session logs that outcome.
        self.half_close_expired = False
        self._half_close_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        tune_socket(transport)
        if self.tls_on_connect:
            # Keep the ClientHello in the kernel until start_tls hands the socket to the
            # TLS layer; read into this buffer, it would be discarded there.
            transport.pause_reading()
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self.last_activity = time.monotonic()
        peer = self._peer
        if peer is not None:
            peer.send(data)
            return
        self._buffer += data
        if len(self._buffer) > PRE_AUTH_BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        first = not self._eof
        self._eof = True
        if not self.closed_here:
            self.note_remote_end()
        self._wake_reader()
        plain = not self.uses_tls()
        if self._peer is None:
            # Before the relay the session still replies to commands that came before the
            # end, so a plain transport stays open for writing until the session ends.
            # A TLS transport closes anyway, and asyncio warns when asked to keep it.
            return plain
        if self.half_close and plain:
            if first:
                self.end_relayed_stream()
            return True
        # The peer's pending bytes are flushed before its transport closes.
        self._peer.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._half_close_timer is not None:
            self._half_close_timer.cancel()
            self._half_close_timer = None
        if not self.closed_here:
            # A transport may report the peer's close only here, without eof_received.
            self.note_remote_end()
        self._eof = True
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._peer is not None:
            self._peer.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._peer is not None and self._peer.transport is not None:
            self._peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        # The remote side read the buffered bytes, which counts as activity.
        self.last_activity = time.monotonic()
        if self._peer is not None and self._peer.transport is not None:
            self._peer.transport.resume_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # Reading before login

    async def read_some(self) -> bytes:
        """Return the bytes received so far, waiting for at least one; b"" at end of stream."""
        while not self._buffer:
            if self._eof:
                return b""
            loop = asyncio.get_running_loop()
            self._read_waiter = loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        return self.take_buffer()

    async def wait_for_end(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the remote side's end of stream.

        Returns whether it came. Bytes that arrive meanwhile stay buffered for
        `read_some`. NOTE: reading pauses above PRE_AUTH_BUFFER_LIMIT buffered bytes, and
        an end of stream behind those is not seen.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._eof:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter = loop.create_future()
            self._read_waiter = waiter
            try:
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                self._read_waiter = None
                waiter.cancel()
        return True

    def take_buffer(self) -> bytes:
        """Remove and return every byte received and not yet read."""
        data = bytes(self._buffer)
        self._buffer.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        return data

    def push_back(self, data: bytes) -> None:
        """Put bytes that a reader took but did not use back in front of the buffer."""
        self._buffer[:0] = data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # Writing

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.splice is not None:
            raise RuntimeError("send() on a spliced connection would reorder bytes")
        self.bytes_sent += len(data)
        self.last_activity = time.monotonic()
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionClosed
        if not self._write_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
        if self.transport.is_closing():
            raise ConnectionClosed

    # TLS

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        handshake_timeout: float = 30.0,
    ) -> None:
        """Upgrade to TLS; bytes still buffered from before the upgrade are discarded."""
        assert self.transport is not None
        self._tls = True
        # Stop reading before anything can yield, so bytes sent after this point (the peer's
        # handshake) reach the TLS layer, and bytes already read are dropped as plaintext.
        self.transport.pause_reading()
        # With implicit TLS no byte is plaintext. uvloop starts reading after
        # connection_made even when it paused there, so the ClientHello may be buffered.
        preface = bytes(self._buffer) if self.tls_on_connect and server_side else b""
        # The ClientHello is not application data, which is all that bytes_received counts.
        self.bytes_received -= len(preface)
        self._buffer.clear()
        await self.drain()
        loop = asyncio.get_running_loop()
        if preface:
            # Queued before start_tls queues its TLS protocol's connection_made, so the
            # ClientHello is in that protocol's buffer before the handshake starts.
            loop.call_soon(_feed_protocol, self.transport, preface)
        transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
        if transport is None:
            raise ConnectionClosed
        self.transport = transport

    def uses_tls(self) -> bool:
        """Return whether this connection speaks TLS, or is about to."""
        return self._tls or self.tls_on_connect or self.extra("ssl_object") is not None

    @property
    def tls_info(self) -> tuple[str, str] | None:
        """Return the negotiated (TLS version, cipher name), or None on plain text."""
        if self._tls_info is not None or self.transport is None:
            return self._tls_info
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        version = ssl_object.version()
        info = (version or "?", cipher[0] if cipher else "?")
        if version:
            # Cached because the SSL object no longer reports the version once the connection closes.
            self._tls_info = info
        return info

    def extra(self, name: str) -> Any:
        return None if self.transport is None else self.transport.get_extra_info(name)

    # Relay after login

    def relay_to(self, peer: Connection) -> None:
        """Send everything received from now on straight to `peer`."""
        self._peer = peer
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing():
            # The peer left between its last command and the relay; uvloop raises on any
            # call to a closed transport, so only pass the close on.
            peer.close()
            return
        transport.set_write_buffer_limits(high=RELAY_HIGH_WATER, low=RELAY_LOW_WATER)
        if self._eof:
            if self.half_close:
                self.end_relayed_stream()
            else:
                peer.close()
        elif not peer._write_paused:
            transport.resume_reading()

    def end_relayed_stream(self) -> None:
        """Pass this side's end of stream on to the peer as a half-close.

        The peer's transport shuts down its write side once its buffer is flushed (the
        spliced relay does the same itself). The other direction keeps running until the
        peer ends it, or until HALF_CLOSE_TIMEOUT seconds pass with no bytes either way
        and none waiting for this side. A TLS peer cannot get the end, so there the
        bound is UNFORWARDED_END_TIMEOUT.
        """
        peer = self._peer
        if peer is None or self._half_close_timer is not None:
            return
        peer_transport = peer.transport
        forwarded = peer.splice is not None
        if (
            not forwarded
            and peer_transport is not None
            and not peer_transport.is_closing()
            and peer_transport.can_write_eof()
        ):
            peer_transport.write_eof()
            forwarded = True
        timeout = HALF_CLOSE_TIMEOUT if forwarded else UNFORWARDED_END_TIMEOUT
        self._half_close_timer = asyncio.get_running_loop().call_later(
            timeout, self._check_half_close, timeout, forwarded
        )

    def _check_half_close(self, timeout: float, forwarded: bool) -> None:
        peer = self._peer
        if peer is None:
            self._half_close_timer = None
            return
        loop = asyncio.get_running_loop()
        # Bytes written to this side count too, and so do bytes still waiting for it:
        # flow control stops reading the peer while this side reads slowly. A reader
        # that never reads is bounded by the idle timeout.
        last = max(peer.last_activity, self.last_activity)
        remaining = last + timeout - time.monotonic()
        if remaining <= 0 and self.unsent() > 0:
            remaining = timeout
        if remaining > 0:
            self._half_close_timer = loop.call_later(
                remaining, self._check_half_close, timeout, forwarded
            )
            return
        self._half_close_timer = None
        # Without the end passed on, the client may simply have closed its socket.
        self.half_close_expired = forwarded
        self.close()
        peer.close()

    # Closing

    def note_remote_end(self) -> None:
        """Record that the remote side ended the stream, unless an earlier end is recorded.

        When the relayed connection's end of stream already waits in the kernel, both
        sides ended before either end was passed on, so both get the same time.
        """
        if self.remote_end is not None:
            return
        now = time.monotonic()
        self.remote_end = now
        other = self._peer
        if other is not None and other.remote_end is None and other._ended_unnoticed():
            other.remote_end = now

    def _ended_unnoticed(self) -> bool:
        """Return whether the remote side ended the stream without a callback yet."""
        transport = self.transport
        if transport is not None and transport.is_closing() and not self.closed_here:
            # The transport hit an error, such as a reset, and queued connection_lost.
            return True
        return self._end_waiting()

    def _end_waiting(self) -> bool:
        """Return whether the remote side's FIN or reset reached this host, unread."""
        sock = self.extra("socket")
        if sock is None or self.closed.done() or sock.fileno() < 0:
            return False
        try:
            with _socket_for(sock) as raw:
                if hasattr(socket, "TCP_INFO") and raw.family in INET_FAMILIES:
                    # The first byte of Linux's struct tcp_info is the TCP state. It
                    # shows the end even behind unread bytes, such as a TLS alert.
                    state = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                    return state in (TCP_CLOSE, TCP_CLOSE_WAIT)
                return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except ConnectionError:
            return True
        except OSError:
            return False

    def unsent(self) -> int:
        """Return the bytes for this side that are read or written but not yet sent."""
        if self.splice is not None:
            return self.splice.pending_to(self)
        transport = self.transport
        if transport is None or (transport.is_closing() and self.closed.done()):
            return 0
        return transport.get_write_buffer_size()

    def close(self) -> None:
        """Close after flushing bytes already written."""
        self.closed_here = True
        if self.splice is not None:
            # Closes both sides once the bytes already read are written.
            self.splice.close()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self.transport is None and not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        """Close at once, dropping unsent bytes."""
        self.closed_here = True
        if self.splice is not None:
            self.splice.abort()
        elif self.transport is not None:
            self.transport.abort()
        elif not self.closed.done():
            self.closed.set_result(None)


def _feed_protocol(transport: asyncio.BaseTransport, data: bytes) -> None:
    """Pass bytes that were read too early to the transport's current protocol."""
    # asyncio's and uvloop's TLS protocols both have get_buffer and buffer_updated, but
    # uvloop's does not subclass asyncio.BufferedProtocol.
    protocol: Any = transport.get_protocol()
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


async def close_flushed(connections: list[Connection]) -> None:
    """Close the connections once their unsent bytes are written, or abort them.

    They are aborted when FLUSH_TIMEOUT seconds pass in which no unsent byte went out,
    or when FLUSH_LIMIT seconds pass in all (both in splice.py, which applies the same
    limits to a closing spliced relay).
    """
    for connection in connections:
        connection.close()
    waiting = {c.closed for c in connections if not c.closed.done()}
    limit = time.monotonic() + splice.FLUSH_LIMIT
    unsent = sum(c.unsent() for c in connections)
    while waiting:
        _, waiting = await asyncio.wait(waiting, timeout=splice.FLUSH_TIMEOUT)
        now_unsent = sum(c.unsent() for c in connections)
        if waiting and (now_unsent >= unsent or time.monotonic() >= limit):
            break
        unsent = now_unsent
    if waiting:
        for connection in connections:
            connection.abort()


def join(client: Connection, upstream: Connection) -> None:
    """Relay both directions between two connections whose pre-login bytes are flushed.

    Two plain TCP connections are joined by splice(2) where Linux offers it; TLS on
    either side needs the bytes in Python, so those use the transports.
    """
    client.half_close = True
    if splice_supported() and can_splice(client) and can_splice(upstream):
        try:
            relay = SpliceRelay(client, upstream)
        except OSError:
            # Out of descriptors for the duplicates: the transports can still relay.
            relay = None
        if relay is not None:
            client._peer, upstream._peer = upstream, client
            relay.start()
            return
    client.relay_to(upstream)
    upstream.relay_to(client)
