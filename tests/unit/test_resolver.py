"""The upstream resolution cache, with a stub getaddrinfo and a hand-moved clock."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest

from appliance.proxy import resolver as resolver_module
from appliance.proxy.errors import UpstreamError
from appliance.proxy.resolver import Resolver, _address_text, is_address
from appliance.proxy.upstream import UpstreamTarget, open_upstream
from appliance.tls.probe import ProbeSettings, probe_client_context, probe_server
from tests.support.loops import LOOPS, run_on_loop

HOST = "mail.example.test"


class StubResolution:
    """A getaddrinfo stand-in that counts calls and returns set addresses."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.calls = 0
        self.error: OSError | None = None
        self.release: asyncio.Event | None = None

    async def getaddrinfo(self, host: str, port: int | None, **_: Any) -> list[tuple]:
        self.calls += 1
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in self.addresses
        ]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stub() -> StubResolution:
    return StubResolution(["192.0.2.10", "192.0.2.11", "192.0.2.10"])


def resolver_for(stub: StubResolution, clock: Clock | None = None) -> Resolver:
    return Resolver(ttl=30.0, clock=clock or Clock(), getaddrinfo=stub.getaddrinfo)


async def test_result_reused_within_ttl(stub: StubResolution) -> None:
    clock = Clock()
    resolver = resolver_for(stub, clock)
    first = await resolver.addresses(HOST)
    clock.now += 29.0
    second = await resolver.addresses(HOST)
    assert first == ["192.0.2.10", "192.0.2.11"]
    assert second == first
    assert stub.calls == 1


async def test_result_expires_after_ttl(stub: StubResolution) -> None:
    clock = Clock()
    resolver = resolver_for(stub, clock)
    await resolver.addresses(HOST)
    clock.now += 30.0
    stub.addresses = ["192.0.2.20"]
    assert await resolver.addresses(HOST) == ["192.0.2.20"]
    assert stub.calls == 2


async def test_forget_resolves_again(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    await resolver.addresses(HOST)
    resolver.forget(HOST)
    await resolver.addresses(HOST)
    assert stub.calls == 2


async def test_address_bypasses_lookup(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    assert await resolver.addresses("2001:db8::1") == ["2001:db8::1"]
    assert await resolver.addresses("192.0.2.1") == ["192.0.2.1"]
    assert stub.calls == 0


async def test_failure_not_cached(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    stub.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(socket.gaierror):
        await resolver.addresses(HOST)
    stub.error = None
    assert await resolver.addresses(HOST) == ["192.0.2.10", "192.0.2.11"]
    assert stub.calls == 2


async def test_concurrent_sessions_share_lookup(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    stub.release = asyncio.Event()
    waiters = [asyncio.create_task(resolver.addresses(HOST)) for _ in range(5)]
    await asyncio.sleep(0)
    stub.release.set()
    results = await asyncio.gather(*waiters)
    assert all(result == ["192.0.2.10", "192.0.2.11"] for result in results)
    assert stub.calls == 1


async def test_cancelled_waiter_keeps_lookup(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    stub.release = asyncio.Event()
    impatient = asyncio.create_task(resolver.addresses(HOST))
    patient = asyncio.create_task(resolver.addresses(HOST))
    await asyncio.sleep(0)
    impatient.cancel()
    stub.release.set()
    assert await patient == ["192.0.2.10", "192.0.2.11"]
    assert impatient.cancelled()


async def test_only_waiter_cancelled_keeps_result(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    stub.release = asyncio.Event()
    waiter = asyncio.create_task(resolver.addresses(HOST))
    await asyncio.sleep(0)
    waiter.cancel()
    stub.release.set()
    await asyncio.sleep(0.01)
    assert await resolver.addresses(HOST) == ["192.0.2.10", "192.0.2.11"]
    assert stub.calls == 1


async def test_clear_resolves_again(stub: StubResolution) -> None:
    resolver = resolver_for(stub)
    await resolver.addresses(HOST)
    resolver.clear()
    await resolver.addresses(HOST)
    assert stub.calls == 2


async def test_oldest_result_makes_room(
    stub: StubResolution, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "MAX_RESULTS", 2)
    resolver = resolver_for(stub)
    for name in ("a.example.test", "b.example.test", "c.example.test"):
        await resolver.addresses(name)
    await resolver.addresses("c.example.test")
    await resolver.addresses("a.example.test")
    assert stub.calls == 4


@pytest.mark.parametrize("loop_name", LOOPS)
def test_lookup_of_closed_loop_not_reused(stub: StubResolution, loop_name: str) -> None:
    resolver = resolver_for(stub)
    stub.release = asyncio.Event()
    closed = asyncio.new_event_loop()
    pending = closed.create_task(resolver.addresses(HOST))
    closed.run_until_complete(asyncio.sleep(0.01))
    pending.cancel()
    closed.run_until_complete(asyncio.sleep(0))
    closed.close()
    stub.release = None
    result: list[list[str]] = []

    async def scenario() -> None:
        result.append(await resolver.addresses(HOST))

    run_on_loop(loop_name, scenario, timeout=10)
    assert result == [["192.0.2.10", "192.0.2.11"]]


@pytest.mark.parametrize("drop", ["clear", "forget"])
async def test_lookup_before_drop_not_kept(stub: StubResolution, drop: str) -> None:
    resolver = resolver_for(stub)
    stub.release = asyncio.Event()
    early = asyncio.create_task(resolver.addresses(HOST))
    await asyncio.sleep(0)
    if drop == "clear":
        resolver.clear()
    else:
        resolver.forget(HOST)
    stub.release.set()
    await early
    stub.release = None
    stub.addresses = ["192.0.2.30"]
    assert await resolver.addresses(HOST) == ["192.0.2.30"]
    assert stub.calls == 2


def test_scoped_address_keeps_scope() -> None:
    assert _address_text(("fe80::1", 0, 0, 2)) == "fe80::1%2"
    assert _address_text(("2001:db8::1", 0, 0, 0)) == "2001:db8::1"
    assert _address_text(("192.0.2.1", 0)) == "192.0.2.1"


@pytest.mark.parametrize(
    ("host", "expected"),
    [("192.0.2.1", True), ("::1", True), ("fe80::1%eth0", True), ("localhost", False)],
)
def test_is_address(host: str, expected: bool) -> None:
    assert is_address(host) is expected


def plain_target(port: int, host: str = HOST) -> UpstreamTarget:
    return UpstreamTarget(
        name="mail",
        host=host,
        port=port,
        mode="none",
        context=ssl.create_default_context(),
        server_name=host,
    )


def refused_port() -> int:
    """Return a loopback port that nothing listens on any more."""
    with socket.create_server(("127.0.0.1", 0)) as unused:
        return unused.getsockname()[1]


@pytest.fixture
def upstream_stub(
    stub: StubResolution, monkeypatch: pytest.MonkeyPatch
) -> StubResolution:
    """Make open_upstream resolve through `stub`."""
    monkeypatch.setattr("appliance.proxy.upstream.RESOLVER", resolver_for(stub))
    return stub


async def test_connects_reuse_result(upstream_stub: StubResolution) -> None:
    stub = upstream_stub
    stub.addresses = ["127.0.0.1"]
    server = await asyncio.start_server(
        lambda _, writer: writer.close(), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    for _ in range(2):
        connection = await open_upstream(plain_target(port), timeout=5)
        connection.close()
    server.close()
    await server.wait_closed()
    assert stub.calls == 1


async def test_failed_connect_drops_result(upstream_stub: StubResolution) -> None:
    stub = upstream_stub
    port = refused_port()
    stub.addresses = ["127.0.0.1"]
    for _ in range(2):
        with pytest.raises(UpstreamError, match="connect failed"):
            await open_upstream(plain_target(port), timeout=5)
    assert stub.calls == 2


async def test_refused_address_tries_next(upstream_stub: StubResolution) -> None:
    stub = upstream_stub
    server = await asyncio.start_server(
        lambda _, writer: writer.close(), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    # The server listens on 127.0.0.1 only, so 127.0.0.2 refuses the same port.
    stub.addresses = ["127.0.0.2", "127.0.0.1"]
    connection = await open_upstream(plain_target(port), timeout=5)
    peer = connection.extra("peername")
    connection.close()
    server.close()
    await server.wait_closed()
    assert peer[0] == "127.0.0.1"


class DebugLines:
    """A stand-in for a session's logger that keeps its DEBUG lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, message: str, *args: object) -> None:
        self.lines.append(message.format(*args))


async def test_failed_address_logged_before_next(
    upstream_stub: StubResolution,
) -> None:
    server = await asyncio.start_server(
        lambda _, writer: writer.close(), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    upstream_stub.addresses = ["127.0.0.2", "127.0.0.1"]
    log = DebugLines()
    try:
        connection = await open_upstream(plain_target(port), timeout=5, log=log)
        connection.close()
    finally:
        server.close()
        await server.wait_closed()
    expected = (
        f"upstream address 127.0.0.2 port {port} failed: Connection refused; "
        "trying 127.0.0.1"
    )
    assert log.lines == [expected]


async def test_all_refused_names_each_address(upstream_stub: StubResolution) -> None:
    stub = upstream_stub
    port = refused_port()
    stub.addresses = ["127.0.0.2", "127.0.0.1"]
    with pytest.raises(UpstreamError) as failure:
        await open_upstream(plain_target(port), timeout=5)
    assert "127.0.0.2: Connection refused" in str(failure.value)
    assert "127.0.0.1: Connection refused" in str(failure.value)


async def test_failed_lookup_named_as_resolution(upstream_stub: StubResolution) -> None:
    stub = upstream_stub
    stub.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(UpstreamError, match="name resolution failed: Name or service"):
        await open_upstream(plain_target(993), timeout=5)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_refused_reason_same_on_both_loops(loop_name: str) -> None:
    port = refused_port()
    target = plain_target(port, host="127.0.0.1")
    failures: list[str] = []

    async def scenario() -> None:
        with pytest.raises(UpstreamError) as failure:
            await open_upstream(target, timeout=5)
        failures.append(str(failure.value))

    run_on_loop(loop_name, scenario, timeout=10)
    assert failures[0].endswith("connect failed: Connection refused")


async def test_silent_address_leaves_time_for_next(
    upstream_stub: StubResolution,
) -> None:
    live = await asyncio.start_server(lambda _, writer: writer.close(), "127.0.0.1", 0)
    port = live.sockets[0].getsockname()[1]
    # A listener whose accept queue is full drops further SYNs without a reply.
    silent = socket.socket()
    silent.bind(("127.0.0.2", port))
    silent.listen(0)
    queued = [socket.socket() for _ in range(3)]
    for sock in queued:
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.2", port))
    upstream_stub.addresses = ["127.0.0.2", "127.0.0.1"]
    try:
        connection = await open_upstream(plain_target(port), timeout=3)
        peer = connection.extra("peername")
        connection.close()
    finally:
        for sock in [*queued, silent]:
            sock.close()
        live.close()
        await live.wait_closed()
    assert peer[0] == "127.0.0.1"


async def serve_plain_imap(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Send a greeting, list no STARTTLS in CAPABILITY, and reply OK to every command."""
    writer.write(b"* OK IMAP ready\r\n")
    try:
        while line := await reader.readline():
            tag, _, command = line.decode("ascii", "replace").strip().partition(" ")
            if command.upper() == "CAPABILITY":
                writer.write(b"* CAPABILITY IMAP4rev1\r\n")
            writer.write(f"{tag} OK done\r\n".encode())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
def probe_stub(stub: StubResolution, monkeypatch: pytest.MonkeyPatch) -> Resolver:
    """Make the probe resolve through `stub`, and return the resolver it uses."""
    resolver = resolver_for(stub)
    monkeypatch.setattr("appliance.proxy.upstream.RESOLVER", resolver)
    monkeypatch.setattr("appliance.tls.probe.RESOLVER", resolver)
    return resolver


def probe_settings(port: int) -> ProbeSettings:
    return ProbeSettings(
        host=HOST,
        protocol="imap",
        port=port,
        context=probe_client_context(None, verify=False),
        server_name=HOST,
        timeout=5,
    )


async def test_probe_uses_the_cache(stub: StubResolution, probe_stub: Resolver) -> None:
    server = await asyncio.start_server(serve_plain_imap, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # 127.0.0.2 refuses the port, so the probe must move on as sessions do.
    stub.addresses = ["127.0.0.2", "127.0.0.1"]
    settings = probe_settings(port)
    try:
        report = await probe_server(settings)
    finally:
        server.close()
        await server.wait_closed()
    # The implicit-TLS and the plain-port connection share one lookup.
    assert stub.calls == 1
    assert report.mode("none").reached
    assert report.mode("none").address == "127.0.0.1"
    assert report.mode("none").usable
    assert not report.mode("starttls").offered


async def test_probe_names_each_refused_address(
    stub: StubResolution, probe_stub: Resolver
) -> None:
    stub.addresses = ["127.0.0.2", "127.0.0.1"]
    report = await probe_server(probe_settings(refused_port()))
    assert (
        report.mode("implicit").detail == "connection refused at 127.0.0.2, 127.0.0.1"
    )
    assert not report.reachable


async def test_unreachable_probe_forgets_addresses(
    stub: StubResolution, probe_stub: Resolver
) -> None:
    stub.addresses = ["127.0.0.1"]
    port = refused_port()
    await probe_server(probe_settings(port))
    await probe_server(probe_settings(port))
    # One lookup per probe: its two connections share it, and the failure drops it.
    assert stub.calls == 2


async def test_probe_reset_on_every_address_reached(
    stub: StubResolution, probe_stub: Resolver
) -> None:
    """Addresses that accept and then reset the handshake were reached."""

    async def reset(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    second = await asyncio.start_server(reset, "127.0.0.2", port)
    stub.addresses = ["127.0.0.2", "127.0.0.1"]
    try:
        report = await probe_server(probe_settings(port))
    finally:
        for listening in (server, second):
            listening.close()
            await listening.wait_closed()
    implicit = report.mode("implicit")
    assert implicit.reached
    assert not implicit.offered
    assert implicit.detail.startswith("the port does not speak TLS")
