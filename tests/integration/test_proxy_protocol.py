"""PROXY protocol on listeners and toward Dovecot, through the real appliance process.

Test clients connect from 127.0.0.2, the listeners' only trusted network, or from
127.0.0.1, which is not trusted. The addresses inside headers come from the
documentation ranges and are data only: nothing connects to them. Dovecot gets
haproxy listeners (`haproxy = yes`, loopback in `haproxy_trusted_networks`) and
trusts the appliance for ID fields (`login_trusted_networks`); its `Login:` lines show
in `rip=` the client address that it received.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.protocols.proxy_header import V2_SIGNATURE, build_v2_header
from tests.support.appliance import (
    ApplianceProcess,
    listener_config,
    upstream_config,
)
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer, find_free_ports
from tests.support.scripted_server import (
    LineClient,
    Script,
    ScriptedServer,
    Step,
    converse,
)

HOST = "127.0.0.1"
TRUSTED_SOURCE = "127.0.0.2"
TIMEOUT = 20.0
LOG_TIMEOUT = 15.0
HEADER_TIMEOUT = 1.0
PASSWORD = b"alice-secret"


@pytest.fixture(scope="module")
def haproxy_ports() -> dict[str, int]:
    names = ("imap", "imaps", "pop3")
    return dict(zip(names, find_free_ports(len(names)), strict=True))


@pytest.fixture(scope="module")
def mail_server(dovecot_factory: Any, haproxy_ports: dict[str, int]) -> DovecotServer:
    extra_config = f"""
haproxy_trusted_networks = 127.0.0.0/8
service imap-login {{
  inet_listener imap_haproxy {{
    port = {haproxy_ports["imap"]}
    haproxy = yes
  }}
  inet_listener imaps_haproxy {{
    port = {haproxy_ports["imaps"]}
    ssl = yes
    haproxy = yes
  }}
}}
service pop3-login {{
  inet_listener pop3_haproxy {{
    port = {haproxy_ports["pop3"]}
    haproxy = yes
  }}
}}
"""
    return dovecot_factory(
        tls="both",
        fresh=True,
        extra_config=extra_config,
        login_trusted_networks=["127.0.0.1/32"],
    )


def header_listener(protocol: str, upstream: str, **settings: Any) -> dict[str, Any]:
    proxy_protocol = {
        "accept": True,
        "trusted_networks": [f"{TRUSTED_SOURCE}/32"],
        "timeout": HEADER_TIMEOUT,
        **settings,
    }
    return listener_config(protocol, upstream, proxy_protocol=proxy_protocol)


@pytest.fixture(scope="module")
def proxy(
    mail_server: DovecotServer,
    haproxy_ports: dict[str, int],
    pki: TestPKI,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApplianceProcess]:
    cert = pki.issue_server_cert("proxy-protocol-tests")
    ca_file = str(mail_server.ca_file)
    upstreams = {
        "plain": upstream_config(mail_server, "none", "imap"),
        "haproxy": {
            "host": "localhost",
            "port": haproxy_ports["imap"],
            "tls": "none",
            "send_client_address": "proxy_v2",
        },
        "haproxy_implicit": {
            "host": "localhost",
            "port": haproxy_ports["imaps"],
            "tls": "implicit",
            "ca_file": ca_file,
            "send_client_address": "proxy_v2",
        },
        "haproxy_pop3": {
            "host": "localhost",
            "port": haproxy_ports["pop3"],
            "tls": "none",
            "send_client_address": "proxy_v2",
        },
        "id": {
            **upstream_config(mail_server, "starttls", "imap"),
            "send_client_address": "imap_id",
        },
        "pop3_plain": upstream_config(mail_server, "none", "pop3"),
    }
    implicit = header_listener("imap", "plain")
    implicit.update(
        tls="implicit", cert_file=str(cert.cert_file), key_file=str(cert.key_file)
    )
    listeners = {
        "required": header_listener("imap", "plain"),
        "optional": header_listener("imap", "plain", required=False),
        "implicit": implicit,
        "pop3": header_listener("pop3", "pop3_plain"),
        "to_haproxy": header_listener("imap", "haproxy"),
        "to_haproxy_implicit": header_listener("imap", "haproxy_implicit"),
        "to_haproxy_pop3": header_listener("pop3", "haproxy_pop3"),
        "to_id": header_listener("imap", "id"),
        "direct_haproxy": listener_config("imap", "haproxy"),
        "direct_plain": listener_config("imap", "plain"),
    }
    config = {"listeners": listeners, "upstreams": upstreams}
    with ApplianceProcess(config, tmp_path_factory.mktemp("proxy-protocol")) as process:
        yield process


def v1_header(source: str, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 143\r\n".encode()


def v2_header(source: str, port: int) -> bytes:
    return build_v2_header((source, port), ("127.0.0.1", 143))


def open_socket(proxy: ApplianceProcess, listener: str, source: str) -> socket.socket:
    return socket.create_connection(
        (HOST, proxy.port(listener)), timeout=TIMEOUT, source_address=(source, 0)
    )


class SocketClient(LineClient):
    """A LineClient on a socket that the test opened, such as one from 127.0.0.2."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()


def client_after_header(
    proxy: ApplianceProcess, listener: str, header: bytes, source: str = TRUSTED_SOURCE
) -> LineClient:
    """Connect from `source`, send `header`, and return a client past the greeting."""
    client = SocketClient(open_socket(proxy, listener, source))
    client.sock.sendall(header)
    greeting = client.read_line()
    assert greeting.startswith((b"* OK", b"+OK")), greeting
    return client


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def wait_for_log(text_of: Any, pattern: str) -> str:
    """Poll a log (a function that returns its text) until a line matches `pattern`."""
    expression = re.compile(pattern)
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        for line in text_of().splitlines():
            if expression.search(line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line matches {pattern!r}:\n{text_of()[-3000:]}")


def dovecot_log(server: DovecotServer) -> Any:
    assert server.log_file is not None
    log_file = server.log_file
    return lambda: log_file.read_text(errors="replace")


def imap_login(client: LineClient) -> None:
    converse(client, [Step(b"a1 LOGIN alice " + PASSWORD + b"\r\n", b"a1 OK")])
    converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])


# Listeners accepting headers


@pytest.mark.parametrize("build", [v1_header, v2_header], ids=["v1", "v2"])
def test_trusted_header_names_client(proxy: ApplianceProcess, build: Any) -> None:
    source = "203.0.113.1" if build is v1_header else "203.0.113.2"
    with client_after_header(proxy, "required", build(source, 40001)) as client:
        imap_login(client)

    version = "1" if build is v1_header else "2"
    line = wait_for_log(
        proxy.log_text, rf"PROXY v{version} header from {TRUSTED_SOURCE}:\d+: client "
    )
    assert line.endswith(f"client {source}:40001")
    wait_for_log(proxy.log_text, rf"login succeeded: client {source} port 40001 ")


# Each case: a header that carries no client address, and how the log names it.
ADDRESSLESS_HEADERS = {
    "v1-unknown": (b"PROXY UNKNOWN\r\n", "PROXY v1 UNKNOWN header"),
    "v2-local": (V2_SIGNATURE + b"\x20\x00\x00\x00", "PROXY v2 LOCAL header"),
    "v2-unspec": (
        V2_SIGNATURE + b"\x21\x00\x00\x00",
        "PROXY v2 header of family UNSPEC or UNIX",
    ),
}


@pytest.mark.parametrize("case", ADDRESSLESS_HEADERS)
def test_addressless_header_named_in_log(proxy: ApplianceProcess, case: str) -> None:
    header, description = ADDRESSLESS_HEADERS[case]
    with client_after_header(proxy, "required", header) as client:
        port = client.sock.getsockname()[1]
        imap_login(client)

    peer = f"{TRUSTED_SOURCE}:{port}"
    line = wait_for_log(proxy.log_text, re.escape(f"] {description} from {peer} "))
    assert line.endswith(f"names no client address, so logs and limits use {peer}")
    wait_for_log(
        proxy.log_text, rf"login succeeded: client {re.escape(TRUSTED_SOURCE)} port {port} "
    )


def test_pop3_listener_reads_header(proxy: ApplianceProcess) -> None:
    with client_after_header(proxy, "pop3", v2_header("203.0.113.3", 40003)) as client:
        client.send(b"USER alice\r\n")
        assert client.read_line().startswith(b"+OK")
        client.send(b"PASS alice-secret\r\n")
        assert client.read_line().startswith(b"+OK")

    wait_for_log(proxy.log_text, r"login succeeded: client 203\.0\.113\.3 port 40003 ")


def test_implicit_tls_follows_header(proxy: ApplianceProcess, pki: TestPKI) -> None:
    sock = open_socket(proxy, "implicit", TRUSTED_SOURCE)
    # The header and the ClientHello may arrive in one segment.
    sock.sendall(v2_header("203.0.113.4", 40004))
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with SocketClient(context.wrap_socket(sock, server_hostname="localhost")) as client:
        assert client.read_line().startswith(b"* OK")
        imap_login(client)

    wait_for_log(proxy.log_text, r"login succeeded: client 203\.0\.113\.4 port 40004 ")


def test_untrusted_source_is_closed(proxy: ApplianceProcess) -> None:
    with open_socket(proxy, "required", HOST) as sock:
        sock.sendall(v2_header("203.0.113.5", 40005))

        assert read_until_closed(sock) == b""


def test_missing_required_header_is_closed(proxy: ApplianceProcess) -> None:
    started = time.monotonic()
    with open_socket(proxy, "required", TRUSTED_SOURCE) as sock:
        data = read_until_closed(sock)

    assert data == b""
    assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9
    wait_for_log(proxy.log_text, r"no PROXY header within 1s")


def test_invalid_header_is_closed(proxy: ApplianceProcess) -> None:
    with open_socket(proxy, "required", TRUSTED_SOURCE) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.6 127.0.0.1 99999 143\r\n")

        assert read_until_closed(sock) == b""
    wait_for_log(proxy.log_text, r"PROXY v1 header has a port above 65535")


def test_mail_bytes_instead_of_header_are_closed(proxy: ApplianceProcess) -> None:
    with open_socket(proxy, "required", TRUSTED_SOURCE) as sock:
        sock.sendall(b"a1 CAPABILITY\r\n")

        assert read_until_closed(sock) == b""


def test_optional_serves_untrusted_without_header(proxy: ApplianceProcess) -> None:
    with LineClient(HOST, proxy.port("optional"), timeout=TIMEOUT) as client:
        assert client.read_line().startswith(b"* OK")
        imap_login(client)


def test_optional_closes_untrusted_header(proxy: ApplianceProcess) -> None:
    with open_socket(proxy, "optional", HOST) as sock:
        assert sock.recv(4096).startswith(b"* OK")
        sock.sendall(v1_header("203.0.113.7", 40007))

        assert read_until_closed(sock) == b""
    wait_for_log(proxy.log_text, r"sent a PROXY header but is not in")


@pytest.mark.parametrize(
    ("version", "split"), [(1, 4), (2, 6)], ids=["v1-in-prefix", "v2-in-signature"]
)
def test_optional_closes_split_untrusted_header(
    proxy: ApplianceProcess, version: int, split: int
) -> None:
    build = v1_header if version == 1 else v2_header
    header = build("203.0.113.8", 40008)
    with open_socket(proxy, "optional", HOST) as sock:
        assert sock.recv(4096).startswith(b"* OK")
        sock.sendall(header[:split])
        time.sleep(0.2)
        sock.sendall(header[split:] + b"a1 LOGIN alice alice-secret\r\n")

        assert read_until_closed(sock) == b""


def test_optional_trusted_without_header_waits(proxy: ApplianceProcess) -> None:
    started = time.monotonic()
    with open_socket(proxy, "optional", TRUSTED_SOURCE) as sock:
        greeting = sock.recv(4096)

    assert greeting.startswith(b"* OK")
    assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9


def test_optional_trusted_header_is_used(proxy: ApplianceProcess) -> None:
    with client_after_header(
        proxy, "optional", v2_header("203.0.113.8", 40008)
    ) as client:
        imap_login(client)

    wait_for_log(proxy.log_text, r"login succeeded: client 203\.0\.113\.8 port 40008 ")


# Upstreams told the client address


@pytest.mark.parametrize(
    "listener, source",
    [("to_haproxy", "203.0.113.21"), ("to_haproxy_implicit", "203.0.113.22")],
)
def test_proxy_v2_tells_dovecot_client(
    proxy: ApplianceProcess, mail_server: DovecotServer, listener: str, source: str
) -> None:
    with client_after_header(proxy, listener, v2_header(source, 40021)) as client:
        imap_login(client)

    line = wait_for_log(
        dovecot_log(mail_server),
        rf"imap-login: .*Login: user=<alice>.*rip={re.escape(source)},",
    )
    assert "lip=127.0.0.1" in line


def test_proxy_v2_for_pop3(proxy: ApplianceProcess, mail_server: DovecotServer) -> None:
    with client_after_header(
        proxy, "to_haproxy_pop3", v1_header("203.0.113.23", 40023)
    ) as client:
        client.send(b"USER alice\r\nPASS alice-secret\r\n")
        assert client.read_line().startswith(b"+OK")
        assert client.read_line().startswith(b"+OK")

    wait_for_log(
        dovecot_log(mail_server),
        r"pop3-login: .*Login: user=<alice>.*rip=203\.0\.113\.23,",
    )


def test_proxy_v2_without_listener_header(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    with SocketClient(open_socket(proxy, "direct_haproxy", "127.0.0.3")) as client:
        assert client.read_line().startswith(b"* OK")
        imap_login(client)

    wait_for_log(dovecot_log(mail_server), r"Login: user=<alice>.*rip=127\.0\.0\.3,")


def test_imap_id_tells_dovecot_client(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    with client_after_header(
        proxy, "to_id", v2_header("203.0.113.31", 40031)
    ) as client:
        # The client's own x-* fields are answered by the proxy and never passed on.
        converse(
            client,
            [
                Step(
                    b'i1 ID ("x-originating-ip" "192.0.2.66" "x-originating-port" "1")\r\n',
                    b"i1 OK",
                )
            ],
        )
        imap_login(client)

    wait_for_log(dovecot_log(mail_server), r"Login: user=<alice>.*rip=203\.0\.113\.31,")
    assert "192.0.2.66" not in dovecot_log(mail_server)()


def test_client_id_fields_not_forwarded(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    with SocketClient(open_socket(proxy, "direct_plain", "127.0.0.4")) as client:
        assert client.read_line().startswith(b"* OK")
        replies = converse(
            client,
            [
                Step(
                    b'i1 ID ("x-originating-ip" "192.0.2.67" "x-originating-port" "2")\r\n',
                    b"i1 OK",
                )
            ],
        )
        imap_login(client)

    assert replies[0] == b"* ID NIL\r\n"
    # Dovecot trusts the appliance's address, so a forwarded field would have won.
    wait_for_log(dovecot_log(mail_server), r"Login: user=<alice>.*rip=127\.0\.0\.1,")
    assert "192.0.2.67" not in dovecot_log(mail_server)()


# IMAP ID toward a server that does not offer it


@pytest.fixture(scope="module")
def server_without_id() -> Iterator[ScriptedServer]:
    with ScriptedServer(Script(protocol="imap", offer_starttls=False)) as server:
        yield server


def imap_id_config(server: ScriptedServer, name: str) -> dict[str, Any]:
    """Return a config whose IMAP listener sends the client address in ID to `server`."""
    upstream = {
        "host": HOST,
        "port": server.port,
        "tls": "none",
        "send_client_address": "imap_id",
    }
    return {
        "listeners": {"imap": listener_config("imap", name)},
        "upstreams": {name: upstream},
        "logging": {"level": "DEBUG"},
    }


@pytest.fixture(scope="module")
def proxy_without_id(
    server_without_id: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApplianceProcess]:
    config = imap_id_config(server_without_id, "no_id")
    with ApplianceProcess(config, tmp_path_factory.mktemp("no-id")) as process:
        yield process


def wait_for_lines(text_of: Any, text: str, count: int) -> list[str]:
    """Poll a log until `count` lines contain `text`, and return those lines."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = [line for line in text_of().splitlines() if text in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_missing_id_warning_rate_limited(
    proxy_without_id: ApplianceProcess, server_without_id: ScriptedServer
) -> None:
    for _ in range(3):
        with LineClient(HOST, proxy_without_id.port("imap"), timeout=TIMEOUT) as client:
            assert client.read_line().startswith(b"* OK")
            imap_login(client)

    lines = wait_for_lines(proxy_without_id.log_text, "does not offer ID", 3)
    warnings = [line for line in lines if " WARNING " in line]
    repeats = [line for line in lines if " DEBUG " in line]
    assert len(warnings) == 1, lines
    # The fixture's check that the port accepts may have opened one more session.
    assert len(repeats) >= 2, lines
    assert f"upstream no_id ({HOST}:{server_without_id.port})" in warnings[0]
    assert "ID" not in server_without_id.records[0].commands


@pytest.fixture(scope="module")
def server_rejecting_id() -> Iterator[ScriptedServer]:
    script = Script(protocol="imap", offer_starttls=False, offer_id=True, id_status=b"NO")
    with ScriptedServer(script) as server:
        yield server


def test_rejected_id_warning_rate_limited(
    server_rejecting_id: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = imap_id_config(server_rejecting_id, "rejects_id")
    with ApplianceProcess(config, tmp_path_factory.mktemp("rejects-id")) as process:
        for _ in range(3):
            with LineClient(HOST, process.port("imap"), timeout=TIMEOUT) as client:
                assert client.read_line().startswith(b"* OK")
                imap_login(client)
        lines = wait_for_lines(process.log_text, "responded NO to the ID command", 3)

    warnings = [line for line in lines if " WARNING " in line]
    repeats = [line for line in lines if " DEBUG " in line]
    assert len(warnings) == 1, lines
    assert len(repeats) >= 2, lines
    assert f"upstream rejects_id ({HOST}:{server_rejecting_id.port})" in warnings[0]
    assert "ID" in server_rejecting_id.records[-1].commands
