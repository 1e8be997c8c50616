"""ProxyHeaderReader and build_v2_header: PROXY protocol headers before the mail protocol."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.proxy_header import (
    NO_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    build_v2_header,
    canonical_ip,
    starts_like_header,
)

# Bytes of the mail protocol or a TLS ClientHello that follow a header.
TRAILER = b"\x16\x03\x01\x02\x00a1 CAPABILITY\r\n"

Result = tuple[object, bytes]


def read_whole(reader: ProxyHeaderReader, data: bytes) -> Result:
    reader.feed(data)
    return reader.next_event(), reader.take_buffered()


def read_bytewise(reader: ProxyHeaderReader, data: bytes) -> Result:
    result = None
    for index in range(len(data)):
        reader.feed(data[index : index + 1])
        result = reader.next_event()
        if result is not None:
            rest = reader.take_buffered() + data[index + 1 :]
            return result, rest
    return result, reader.take_buffered()


def read_with_trailer(reader: ProxyHeaderReader, data: bytes) -> Result:
    reader.feed(data + TRAILER)
    result = reader.next_event()
    rest = reader.take_buffered()
    assert rest.endswith(TRAILER)
    return result, rest[: len(rest) - len(TRAILER)]


FEEDS: dict[str, Callable[[ProxyHeaderReader, bytes], Result]] = {
    "whole": read_whole,
    "bytewise": read_bytewise,
    "trailing": read_with_trailer,
}


def v2(command: int, family: int, block: bytes, version: int = 2) -> bytes:
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", version << 4 | command, family, len(block))
        + block
    )


def inet_block(source: str, destination: str, ports: tuple[int, int]) -> bytes:
    return (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", *ports)
    )


V4_BLOCK = inet_block("192.0.2.7", "198.51.100.1", (40000, 143))
V6_BLOCK = inet_block("2001:db8::7", "2001:db8::1", (40000, 993))
TLVS = (
    bytes([0x04]) + struct.pack("!H", 3) + b"abc" + bytes([0x20]) + struct.pack("!H", 0)
)
V1_LONGEST = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)

VALID = {
    "v1 tcp4": (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\n",
        ProxyHeader(1, "PROXY", ("192.0.2.7", 40000), ("198.51.100.1", 143), 45),
    ),
    "v1 tcp6": (
        b"PROXY TCP6 2001:db8::7 2001:DB8::1 0 65535\r\n",
        ProxyHeader(1, "PROXY", ("2001:db8::7", 0), ("2001:db8::1", 65535), 44),
    ),
    "v1 unknown": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", None, None, 15)),
    "v1 unknown with addresses": (
        V1_LONGEST,
        ProxyHeader(1, "PROXY", None, None, 107),
    ),
    "v2 inet": (
        v2(1, 0x11, V4_BLOCK),
        ProxyHeader(2, "PROXY", ("192.0.2.7", 40000), ("198.51.100.1", 143), 28),
    ),
    "v2 inet6": (
        v2(1, 0x21, V6_BLOCK),
        ProxyHeader(2, "PROXY", ("2001:db8::7", 40000), ("2001:db8::1", 993), 52),
    ),
    "v2 inet with tlvs": (
        v2(1, 0x11, V4_BLOCK + TLVS),
        ProxyHeader(2, "PROXY", ("192.0.2.7", 40000), ("198.51.100.1", 143), 37),
    ),
    "v2 local ignores addresses": (
        v2(0, 0x11, V4_BLOCK),
        ProxyHeader(2, "LOCAL", None, None, 28),
    ),
    "v2 local unspec": (v2(0, 0x00, b""), ProxyHeader(2, "LOCAL", None, None, 16)),
    "v2 proxy unspec": (v2(1, 0x00, b""), ProxyHeader(2, "PROXY", None, None, 16)),
    "v2 unix": (v2(1, 0x31, bytes(216)), ProxyHeader(2, "PROXY", None, None, 232)),
}

INVALID = {
    "v1 without line end": b"PROXY UNKNOWN " + b"x" * 120,
    "v1 longer than 107 bytes": V1_LONGEST[:-2] + b"9\r\n",
    "v1 bare lf": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\n",
    "v1 unknown protocol": b"PROXY UDP4 192.0.2.7 198.51.100.1 40000 143\r\n",
    "v1 double space": b"PROXY  TCP4 192.0.2.7 198.51.100.1 40000 143\r\n",
    "v1 missing port": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",
    "v1 extra word": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143 x\r\n",
    "v1 ipv6 in tcp4": b"PROXY TCP4 2001:db8::7 2001:db8::1 40000 143\r\n",
    "v1 ipv4 in tcp6": b"PROXY TCP6 192.0.2.7 198.51.100.1 40000 143\r\n",
    "v1 leading zero in address": b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",
    "v1 host name": b"PROXY TCP4 localhost 198.51.100.1 40000 143\r\n",
    "v1 scoped ipv6": b"PROXY TCP6 fe80::1%eth0 fe80::2 40000 143\r\n",
    "v1 port above 65535": b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 143\r\n",
    "v1 negative port": b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 143\r\n",
    "v1 six digit port": b"PROXY TCP4 192.0.2.7 198.51.100.1 000143 143\r\n",
    "v1 non-ascii": "PROXY TCP4 192.0.2.7 198.51.100.1 4000\u0660 143\r\n".encode(),
    "v2 version 1": v2(1, 0x11, V4_BLOCK, version=1),
    "v2 unknown command": v2(2, 0x11, V4_BLOCK),
    "v2 unknown family": v2(1, 0x41, V4_BLOCK),
    "v2 datagram": v2(1, 0x12, V4_BLOCK),
    "v2 unspecified transport": v2(1, 0x10, V4_BLOCK),
    "v2 short inet block": v2(1, 0x11, V4_BLOCK[:11]),
    "v2 short inet6 block": v2(1, 0x21, V4_BLOCK),
    "v2 longer than cap": v2(1, 0x11, V4_BLOCK + bytes(5000)),
    "tls client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "imap command": b"a1 CAPABILITY\r\n",
    "v1 prefix that diverges": b"PROXIMITY\r\n",
}


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
@pytest.mark.parametrize("data, expected", VALID.values(), ids=VALID.keys())
def test_reader_accepts_valid_header(
    feed: Callable[[ProxyHeaderReader, bytes], Result],
    data: bytes,
    expected: ProxyHeader,
) -> None:
    header, rest = feed(ProxyHeaderReader(), data)

    assert header == expected
    assert rest == b""


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
@pytest.mark.parametrize("data", INVALID.values(), ids=INVALID.keys())
def test_reader_rejects_invalid_header(
    feed: Callable[[ProxyHeaderReader, bytes], Result], data: bytes
) -> None:
    with pytest.raises(ProxyHeaderError):
        feed(ProxyHeaderReader(), data)


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
def test_optional_reader_keeps_mail_bytes(
    feed: Callable[[ProxyHeaderReader, bytes], Result],
) -> None:
    header, rest = feed(ProxyHeaderReader(optional=True), b"a1 CAPABILITY\r\n")

    assert header is NO_HEADER
    assert rest == b"a1 CAPABILITY\r\n"


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
def test_optional_reader_still_parses_header(
    feed: Callable[[ProxyHeaderReader, bytes], Result],
) -> None:
    data, expected = VALID["v2 inet"]

    header, rest = feed(ProxyHeaderReader(optional=True), data)

    assert header == expected
    assert rest == b""


@pytest.mark.parametrize("prefix", [b"P", b"PROXY", b"\r\n\r\n", V2_SIGNATURE])
def test_reader_waits_on_signature_prefix(prefix: bytes) -> None:
    reader = ProxyHeaderReader(optional=True)
    reader.feed(prefix)

    assert reader.next_event() is None


def test_optional_reader_stops_at_divergence() -> None:
    reader = ProxyHeaderReader(optional=True)
    reader.feed(b"PRO")
    assert reader.next_event() is None

    reader.feed(b"BLEM\r\n")

    assert reader.next_event() is NO_HEADER
    assert reader.take_buffered() == b"PROBLEM\r\n"


def test_reader_returns_one_header_only() -> None:
    data, _ = VALID["v1 tcp4"]
    reader = ProxyHeaderReader()
    reader.feed(data + data)
    reader.next_event()

    assert reader.next_event() is None
    assert reader.take_buffered() == data


def test_reader_rejects_oversized_length_early() -> None:
    header = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000)
    reader = ProxyHeaderReader(max_size=1024)
    reader.feed(header)

    with pytest.raises(ProxyHeaderError, match="exceeds the limit of 1024 bytes"):
        reader.next_event()


def test_reader_accepts_header_at_size_cap() -> None:
    block = V4_BLOCK + bytes(1024 - 16 - len(V4_BLOCK))
    reader = ProxyHeaderReader(max_size=1024)
    reader.feed(v2(1, 0x11, block))

    header = reader.next_event()

    assert isinstance(header, ProxyHeader)
    assert header.size == 1024


# Builder


def parse(data: bytes) -> ProxyHeader:
    reader = ProxyHeaderReader()
    reader.feed(data)
    header = reader.next_event()
    assert isinstance(header, ProxyHeader)
    assert reader.take_buffered() == b""
    return header


def test_builder_writes_ipv4_header() -> None:
    data = build_v2_header(("192.0.2.7", 40000), ("198.51.100.1", 143))

    assert data == v2(1, 0x11, V4_BLOCK)


def test_builder_writes_ipv6_header() -> None:
    data = build_v2_header(("2001:db8::7", 40000), ("2001:db8::1", 993))

    assert data == v2(1, 0x21, V6_BLOCK)


def test_builder_unmaps_ipv4_mapped_addresses() -> None:
    header = parse(build_v2_header(("::ffff:192.0.2.7", 1), ("127.0.0.1", 2)))

    assert header.source == ("192.0.2.7", 1)
    assert header.destination == ("127.0.0.1", 2)


def test_builder_maps_mixed_families_to_ipv6() -> None:
    header = parse(build_v2_header(("192.0.2.7", 1), ("2001:db8::1", 2)))

    assert header.source == ("::ffff:c000:207", 1)
    assert header.destination == ("2001:db8::1", 2)


def test_builder_rejects_invalid_port() -> None:
    with pytest.raises(ValueError, match="port 70000"):
        build_v2_header(("192.0.2.7", 70000), ("198.51.100.1", 143))


def test_canonical_ip_unmaps_ipv4() -> None:
    assert canonical_ip("::FFFF:192.0.2.7") == "192.0.2.7"


def test_starts_like_header_detects_both_versions() -> None:
    assert starts_like_header(b"PROXY TCP4 ")
    assert starts_like_header(V2_SIGNATURE + b"\x21")
    assert not starts_like_header(b"a1 LOGIN alice secret\r\n")


# Fuzzing

TOKENS = [
    b"PROXY ",
    b"TCP4 ",
    b"TCP6 ",
    b"UNKNOWN",
    b"192.0.2.7 ",
    b"2001:db8::1 ",
    b"65535 ",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    V2_SIGNATURE,
    b"\x21\x11",
    b"\x20\x00",
    b"\x00\x0c",
    b"\xff\xff",
    b"\x00",
    b"\xff",
]


def run_reader(chunks: list[bytes], optional: bool) -> None:
    reader = ProxyHeaderReader(max_size=512, optional=optional)
    for chunk in chunks:
        reader.feed(chunk)
        try:
            event = reader.next_event()
        except ProxyHeaderError:
            return
        if event is not None:
            assert event is NO_HEADER or event.size <= 512
            return
    # With every byte fed and no result, the reader must be waiting on a prefix that a
    # header could still complete, within its size cap.
    assert reader.buffered_size <= 512


@given(st.lists(st.binary(max_size=40), max_size=20), st.booleans())
def test_fuzz_random_bytes(chunks: list[bytes], optional: bool) -> None:
    run_reader(chunks, optional)


@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.booleans())
def test_fuzz_header_shaped_bytes(tokens: list[bytes], optional: bool) -> None:
    run_reader(tokens, optional)


ip_addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
ports = st.integers(min_value=0, max_value=65535)


@given(ip_addresses, ports, ip_addresses, ports)
def test_fuzz_builder_round_trip(
    source_ip: str, source_port: int, destination_ip: str, destination_port: int
) -> None:
    header = parse(
        build_v2_header((source_ip, source_port), (destination_ip, destination_port))
    )

    source = canonical_ip(source_ip)
    destination = canonical_ip(destination_ip)
    if ":" in source and ":" not in destination:
        destination = str(ipaddress.IPv6Address(f"::ffff:{destination}"))
    elif ":" in destination and ":" not in source:
        source = str(ipaddress.IPv6Address(f"::ffff:{source}"))
    assert header.source == (source, source_port)
    assert header.destination == (destination, destination_port)
