"""Sans-IO reader of PROXY protocol headers (versions 1 and 2) and a version 2 builder.

A load balancer that speaks the PROXY protocol (HAProxy's specification, "The PROXY
protocol", versions 1 and 2) sends one header before the client's first byte. The header
carries the address of the original client and the address that client connected to.
Version 1 is one text line of at most 107 bytes: `PROXY TCP4|TCP6|UNKNOWN ... CRLF`.
Version 2 is binary: a 12-byte signature, a version and command byte, an address family
byte, a 16-bit length, then the addresses and optional TLVs.

The reader takes exactly the header's bytes. Bytes after it belong to the mail protocol
or to a TLS handshake, and `take_buffered` hands them back.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from appliance.protocols.errors import ProtocolError

V1_PREFIX = b"PROXY "
# Maximum length of a version 1 line, CRLF included: "PROXY UNKNOWN" with two full
# IPv6 addresses and two 5-digit ports.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
# Version 2 headers from HAProxy carry TLVs (ALPN, authority, SSL details) of a few
# hundred bytes. The format allows 65,535 bytes after the fixed part; a longer header
# than this cap is rejected rather than buffered.
DEFAULT_MAX_SIZE = 4096

_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM = 0x0, 0x1
# Bytes of the address block per family: two addresses and, for IP, two ports.
_ADDRESS_BLOCK_SIZES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

Address = tuple[str, int]


class ProxyHeaderError(ProtocolError):
    """The bytes before the mail protocol are not a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed PROXY protocol header."""

    version: int
    """1 (text) or 2 (binary)."""
    command: str
    """`PROXY` for a relayed connection, `LOCAL` for one the load balancer opened
    itself, such as a health check. Version 1 has only `PROXY`."""
    source: Address | None
    """Original client (IP address, port), or None when the header carries no IP
    address: `LOCAL`, version 1 `UNKNOWN`, and the version 2 UNSPEC and UNIX families."""
    destination: Address | None
    """Address and port that the original client connected to, None like `source`."""
    size: int
    """Bytes that the header took from the stream."""


@dataclass(frozen=True)
class NoProxyHeader:
    """The stream does not start with a PROXY protocol header."""


NO_HEADER = NoProxyHeader()


class ProxyHeaderReader:
    """Read a PROXY protocol header from the start of a stream, fed in any pieces.

    `next_event` returns a ProxyHeader, NO_HEADER when `optional` is set and the first
    bytes cannot start a header, or None while more bytes are needed. It raises
    ProxyHeaderError for an invalid header, for a header longer than `max_size`, and,
    unless `optional` is set, for a stream that does not start with a header.
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE, optional: bool = False):
        self.max_size = max(max_size, V1_MAX_LENGTH, V2_FIXED_LENGTH)
        self.optional = optional
        self._buffer = bytearray()
        self._done = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered_size(self) -> int:
        return len(self._buffer)

    def take_buffered(self) -> bytes:
        """Remove and return the bytes that are not part of the header."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_event(self) -> ProxyHeader | NoProxyHeader | None:
        if self._done or not self._buffer:
            return None
        if _is_prefix(self._buffer, V1_PREFIX):
            result = self._read_v1()
        elif _is_prefix(self._buffer, V2_SIGNATURE):
            result = self._read_v2()
        elif self.optional:
            result = NO_HEADER
        else:
            raise ProxyHeaderError("connection does not start with a PROXY header")
        if result is not None:
            self._done = True
        return result

    def _read_v1(self) -> ProxyHeader | None:
        end = self._buffer.find(b"\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(self._buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(
                    f"PROXY v1 header has no line end within {V1_MAX_LENGTH} bytes"
                )
            return None
        if end == 0 or self._buffer[end - 1] != ord("\r"):
            raise ProxyHeaderError("PROXY v1 header does not end with CRLF")
        line = bytes(self._buffer[: end - 1])
        del self._buffer[: end + 1]
        source, destination = parse_v1_addresses(line)
        return ProxyHeader(1, "PROXY", source, destination, end + 1)

    def _read_v2(self) -> ProxyHeader | None:
        if len(self._buffer) < V2_FIXED_LENGTH:
            return None
        version_command, family, length = struct.unpack_from(
            "!BBH", self._buffer, len(V2_SIGNATURE)
        )

        size = V2_FIXED_LENGTH + length
        if size > self.max_size:
            raise ProxyHeaderError(
                f"PROXY v2 header of {size} bytes exceeds the limit of "
                f"{self.max_size} bytes"
            )
        if version_command >> 4 != 2:
            raise ProxyHeaderError(
                f"PROXY v2 header has version {version_command >> 4}, expected 2"
            )
        command = _V2_COMMANDS.get(version_command & 0x0F)
        if command is None:
            raise ProxyHeaderError(
                f"PROXY v2 header has unknown command {version_command & 0x0F}"
            )
        if len(self._buffer) < size:
            return None

        block = bytes(self._buffer[V2_FIXED_LENGTH:size])
        del self._buffer[:size]
        source, destination = parse_v2_addresses(family, block)
        if command == "LOCAL":
            # The load balancer opened this connection itself, so the real
            # endpoints apply and the address block is ignored.
            return ProxyHeader(2, command, None, None, size)
        return ProxyHeader(2, command, source, destination, size)


def parse_v1_addresses(line: bytes) -> tuple[Address | None, Address | None]:
    """Parse a version 1 line without its CRLF into (source, destination)."""
    if not line.isascii():
        raise ProxyHeaderError("PROXY v1 header contains non-ASCII bytes")
    words = line.decode("ascii").split(" ")
    protocol = words[1] if len(words) > 1 else ""
    if protocol == "UNKNOWN":
        # The sender may append addresses after UNKNOWN; the receiver ignores them.
        return None, None
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 header names no TCP4, TCP6 or UNKNOWN")
    if len(words) != 6:
        raise ProxyHeaderError("PROXY v1 header needs two addresses and two ports")
    version = 4 if protocol == "TCP4" else 6
    source = (_v1_ip(words[2], version), _v1_port(words[4]))
    destination = (_v1_ip(words[3], version), _v1_port(words[5]))
    return source, destination


def parse_v2_addresses(
    family: int, block: bytes
) -> tuple[Address | None, Address | None]:
    """Parse a version 2 address block; TLVs after the addresses are ignored."""
    address_family, transport = family >> 4, family & 0x0F
    if address_family == _AF_UNSPEC:
        return None, None
    required = _ADDRESS_BLOCK_SIZES.get(address_family)
    if required is None:
        raise ProxyHeaderError(f"PROXY v2 header has unknown family {address_family}")
    if transport != _PROTO_STREAM:
        kind = "unspecified" if transport == _PROTO_UNSPEC else f"type {transport}"
        raise ProxyHeaderError(f"PROXY v2 header describes a {kind} transport, not TCP")
    if len(block) < required:
        raise ProxyHeaderError(
            f"PROXY v2 address block of {len(block)} bytes is shorter than the "
            f"{required} bytes its family needs"
        )
    if address_family == _AF_UNIX:
        return None, None
    width = 4 if address_family == _AF_INET else 16
    source_ip = ipaddress.ip_address(block[:width])
    destination_ip = ipaddress.ip_address(block[width : 2 * width])
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * width)
    return (str(source_ip), source_port), (str(destination_ip), destination_port)


def build_v2_header(source: Address, destination: Address) -> bytes:
    """Build a version 2 PROXY header for a TCP connection, without TLVs.

    IPv4-mapped IPv6 addresses are sent as IPv4. When the two addresses still differ in
    family, the IPv4 one is sent as an IPv4-mapped IPv6 address, because one header has
    one family.
    """
    source_ip = _unmapped(source[0])
    destination_ip = _unmapped(destination[0])
    if source_ip.version != destination_ip.version:
        source_ip, destination_ip = _as_ipv6(source_ip), _as_ipv6(destination_ip)
    family = _AF_INET if source_ip.version == 4 else _AF_INET6
    block = (
        source_ip.packed
        + destination_ip.packed
        + struct.pack("!HH", _port(source[1]), _port(destination[1]))
    )
    fixed = struct.pack("!BBH", 0x21, (family << 4) | _PROTO_STREAM, len(block))
    return V2_SIGNATURE + fixed + block


def canonical_ip(address: str) -> str:
    """Return an IP address in standard form, IPv4-mapped IPv6 as plain IPv4."""
    return str(_unmapped(address))


def starts_like_header(data: bytes) -> bool:
    """Return whether `data` starts with the v1 prefix or the v2 signature."""
    return data.startswith((V1_PREFIX, V2_SIGNATURE))


def may_start_header(data: bytes) -> bool:
    """Return whether `data` is too short to tell, but could begin either signature."""
    return any(
        len(data) < len(signature) and signature.startswith(data)
        for signature in (V1_PREFIX, V2_SIGNATURE)
    )


def _is_prefix(data: bytearray, signature: bytes) -> bool:
    """Return whether the buffered bytes agree with `signature` as far as they go."""
    size = min(len(data), len(signature))
    return data[:size] == signature[:size]


def _v1_ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError("PROXY v1 header has an invalid IP address") from None
    # An IPv6 scope ("%eth0") names an interface of the sender, not an address.
    if address.version != version or "%" in text:
        raise ProxyHeaderError(f"PROXY v1 header has an invalid IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isdigit() and len(text) <= 5):
        raise ProxyHeaderError("PROXY v1 header has an invalid port")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("PROXY v1 header has a port above 65535")
    return port


def _unmapped(
    address: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_ipv6(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} is outside 0 to 65535")
    return value
