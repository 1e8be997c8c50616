"""Hostile clients against the real appliance: limits, timeouts and malformed input.

The upstream is `PasswordServer`, a small fake IMAP and POP3 server that accepts the
password `right` for any user and rejects every other. Dovecot would do, but it delays
logins from an address after failed ones by seconds, which would blur the appliance's own
failed-login delay. No test here needs Dovecot.

Each client binds its own loopback source address, so per-address limits and the
failed-login delay of one test never reach another.
"""

from __future__ import annotations

import base64
import itertools
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Self

import pytest

from appliance.proxy.session import (
    GOODBYE_TEXTS,
    LOGIN_SIZE_ERROR,
    MAX_LOGIN_PASSWORD_SIZE,
    MAX_LOGIN_USER_SIZE,
    MAX_SASL_RESPONSE_SIZE,
)
from tests.support.appliance import ApplianceProcess, listener_config
from tests.support.certs import TestPKI
from tests.support.scripted_server import (
    LineClient,
    Script,
    ScriptedServer,
    Step,
    converse,
)

HOST = "127.0.0.1"
TIMEOUT = 20.0
LOG_TIMEOUT = 15.0
RIGHT_PASSWORD = b"right"
STRICT_LIMITS = {
    "max_connections": 4,
    "max_connections_per_address": 2,
    "pre_auth_timeout": 3,
    "max_protocol_errors": 4,
    "max_line_length": 1024,
    "auth_failure_delay": 0,
}
DELAY_LIMITS = {"auth_failure_delay": 1, "auth_failure_delay_max": 4}
SOURCES = (f"127.0.{high}.{low}" for high in range(10, 250) for low in range(1, 255))


def next_source() -> str:
    return next(SOURCES)


# Fake upstream


class PasswordServer(socketserver.ThreadingTCPServer):
    """IMAP or POP3 on loopback that accepts SASL PLAIN with the password `right`.

    `received` collects every byte that clients sent, to check what reached the server.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.received = bytearray()
        self.lock = threading.Lock()
        super().__init__((HOST, 0), _PasswordHandler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def check(self, response: bytes) -> bool:
        try:
            _, _, password = base64.b64decode(response, validate=True).split(b"\0")
        except ValueError:
            return False
        return password == RIGHT_PASSWORD


class _PasswordHandler(socketserver.StreamRequestHandler):
    server: PasswordServer

    def handle(self) -> None:
        self.request.settimeout(TIMEOUT)
        try:
            if self.server.protocol == "imap":
                self._serve_imap()
            else:
                self._serve_pop3()
        except OSError:
            pass

    def _line(self) -> bytes:
        line = self.rfile.readline(65536)
        with self.server.lock:
            self.server.received += line
        return line

    def _serve_imap(self) -> None:
        self.wfile.write(b"* OK Fake IMAP ready\r\n")
        while line := self._line():
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            name, _, argument = rest.partition(b" ")
            name = name.upper()
            if name == b"CAPABILITY":
                self.wfile.write(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID\r\n")
                self.wfile.write(tag + b" OK done\r\n")
            elif name == b"AUTHENTICATE":
                response = argument.partition(b" ")[2]
                if self.server.check(response):
                    self.wfile.write(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
                else:
                    self.wfile.write(tag + b" NO [AUTHENTICATIONFAILED] Failed\r\n")
            elif name == b"LOGOUT":
                self.wfile.write(b"* BYE Logging out\r\n" + tag + b" OK done\r\n")
                return
            else:
                self.wfile.write(tag + b" OK done\r\n")

    def _serve_pop3(self) -> None:
        self.wfile.write(b"+OK Fake POP3 ready\r\n")
        while line := self._line():
            words = line.rstrip(b"\r\n").split(b" ")
            name = words[0].upper()
            if name == b"CAPA":
                self.wfile.write(b"+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n")
            elif name == b"AUTH" and len(words) == 3:
                if self.server.check(words[2]):
                    self.wfile.write(b"+OK Logged in\r\n")
                else:
                    self.wfile.write(b"-ERR [AUTH] Authentication failed\r\n")
            elif name == b"QUIT":
                self.wfile.write(b"+OK Bye\r\n")
                return
            else:
                self.wfile.write(b"+OK\r\n")


# Appliances


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, PasswordServer]]:
    with PasswordServer("imap") as imap, PasswordServer("pop3") as pop3:
        yield {"imap": imap, "pop3": pop3}


def appliance_config(
    upstreams: dict[str, PasswordServer],
    listeners: dict[str, dict[str, Any]],
    limits: dict[str, Any],
) -> dict[str, Any]:
    return {
        "listeners": listeners,
        "upstreams": {
            name: {"host": HOST, "port": server.port, "tls": "none"}
            for name, server in upstreams.items()
        },
        "limits": limits,
        "logging": {"level": "DEBUG"},
    }


@pytest.fixture(scope="module")
def strict(upstreams, pki: TestPKI, tmp_path_factory) -> Iterator[ApplianceProcess]:
    """An appliance with tight limits and no failed-login delay."""
    cert = pki.issue_server_cert("hostile-input")
    listeners = {
        "imap": listener_config("imap", "imap"),
        "pop3": listener_config("pop3", "pop3"),
        "imap_starttls": listener_config("imap", "imap", tls="starttls", cert=cert),
        "pop3_starttls": listener_config("pop3", "pop3", tls="starttls", cert=cert),
        "imap_full": listener_config("imap", "imap"),
        "pop3_full": listener_config("pop3", "pop3"),
        "imap_flood": listener_config("imap", "imap"),
        "imap_implicit": listener_config("imap", "imap", tls="implicit", cert=cert),
        "pop3_implicit": listener_config("pop3", "pop3", tls="implicit", cert=cert),
        "imap_hello": listener_config("imap", "imap"),
    }
    config = appliance_config(upstreams, listeners, STRICT_LIMITS)
    workdir = tmp_path_factory.mktemp("hostile-strict")
    with ApplianceProcess(config, workdir) as process:
        yield process


@pytest.fixture(scope="module")
def delayed(upstreams, tmp_path_factory) -> Iterator[ApplianceProcess]:
    """An appliance with a failed-login delay of 1 s, doubling up to 4 s."""
    listeners = {
        "imap": listener_config("imap", "imap"),
        "pop3": listener_config("pop3", "pop3"),
    }
    config = appliance_config(upstreams, listeners, DELAY_LIMITS)
    workdir = tmp_path_factory.mktemp("hostile-delayed")
    with ApplianceProcess(config, workdir) as process:
        yield process


@pytest.fixture(scope="module")
def no_literals(upstreams, tmp_path_factory) -> Iterator[ApplianceProcess]:
    """An appliance with `max_literal_size: 0`, which rejects literals before login."""
    listeners = {"imap": listener_config("imap", "imap")}
    config = appliance_config(upstreams, listeners, {"max_literal_size": 0})
    workdir = tmp_path_factory.mktemp("hostile-no-literals")
    with ApplianceProcess(config, workdir) as process:
        yield process


# Clients


class SourceClient(LineClient):
    """A LineClient whose socket is bound to a chosen loopback source address."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.source = source or next_source()
        self.sock = socket.create_connection(
            (HOST, port), timeout=TIMEOUT, source_address=(self.source, 0)
        )
        self.buffer = bytearray()


def connect(
    proxy: ApplianceProcess, name: str, source: str | None = None
) -> SourceClient:
    """Connect to listener `name` and read an OK greeting."""
    client = SourceClient(proxy.port(name), source)
    greeting = client.read_line()
    assert greeting.startswith((b"* OK", b"+OK")), greeting
    return client


def plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


def imap_login(client: LineClient, tag: bytes, password: bytes) -> bytes:
    """Log in as `user` with AUTHENTICATE PLAIN and return the tagged reply."""
    client.send(tag + b" AUTHENTICATE PLAIN " + plain(b"user", password) + b"\r\n")
    return client.read_until_tagged(tag)[-1]


def pop3_login(client: LineClient, password: bytes) -> bytes:
    client.send(b"AUTH PLAIN " + plain(b"user", password) + b"\r\n")
    return client.read_line()


def login(protocol: str, client: LineClient, password: bytes) -> bytes:
    if protocol == "imap":
        return imap_login(client, b"L1", password)
    return pop3_login(client, password)


def succeeded(protocol: str, reply: bytes) -> bool:
    return reply.startswith(b"L1 OK" if protocol == "imap" else b"+OK")


def wait_for_log(proxy: ApplianceProcess, text: str) -> str:
    """Return the first log line that contains `text`, waiting for it."""
    return proxy.wait_for_log(text, LOG_TIMEOUT)


def wait_for_summary(proxy: ApplianceProcess, source: str) -> str:
    """Return the session end line of the client at address `source`, waiting for it."""
    return wait_for_log(proxy, f"; client {source}:")


# Maximum connections per listener

BUSY = {"imap": b"* BYE [UNAVAILABLE]", "pop3": b"-ERR [SYS/TEMP]"}


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_listener_full_rejects_excess(strict, protocol):
    name = f"{protocol}_full"
    with ExitStack() as stack:
        for _ in range(STRICT_LIMITS["max_connections"]):
            stack.enter_context(connect(strict, name))
        with SourceClient(strict.port(name)) as excess:
            reply = excess.read_until_closed()
    assert reply.startswith(BUSY[protocol]), reply
    assert reply.count(b"\n") == 1, reply


def test_listener_accepts_again_after_close(strict):
    sources = [next_source() for _ in range(STRICT_LIMITS["max_connections"])]
    with ExitStack() as stack:
        for source in sources:
            stack.enter_context(connect(strict, "imap_full", source))
    deadline = time.monotonic() + TIMEOUT
    while True:
        with SourceClient(strict.port("imap_full")) as client:
            if client.read_line().startswith(b"* OK"):
                break
        assert time.monotonic() < deadline, (
            "listener stayed full after its clients left"
        )
        time.sleep(0.1)


# Maximum connections per client address


def test_address_flood_gets_busy_reply(strict):
    source = next_source()
    with ExitStack() as stack:
        for _ in range(STRICT_LIMITS["max_connections_per_address"]):
            stack.enter_context(connect(strict, "imap_flood", source))
        with SourceClient(strict.port("imap"), source) as excess:
            reply = excess.read_until_closed()
    assert reply.startswith(BUSY["imap"]), reply


def test_address_flood_spares_other_address(strict):
    with ExitStack() as stack:
        for _ in range(STRICT_LIMITS["max_connections_per_address"]):
            stack.enter_context(connect(strict, "imap_flood", "127.0.0.2"))
        with connect(strict, "imap_flood", "127.0.0.3") as other:
            reply = imap_login(other, b"L1", RIGHT_PASSWORD)
    assert reply.startswith(b"L1 OK"), reply


def test_address_limit_counts_all_listeners(strict):
    source = next_source()
    with (
        connect(strict, "imap", source),
        connect(strict, "pop3", source),
        SourceClient(strict.port("pop3_full"), source) as excess,
    ):
        reply = excess.read_until_closed()
    assert reply.startswith(BUSY["pop3"]), reply


def test_address_limit_spares_upstream(strict, upstreams):
    source = next_source()
    before = len(upstreams["imap"].received)
    with ExitStack() as stack:
        for _ in range(STRICT_LIMITS["max_connections_per_address"]):
            stack.enter_context(connect(strict, "imap_flood", source))
        during = len(upstreams["imap"].received)
        for _ in range(5):
            with SourceClient(strict.port("imap_flood"), source) as excess:
                excess.read_until_closed()
        after = len(upstreams["imap"].received)
    assert during > before
    assert after == during


# Pre-authentication timeout

TIMED_OUT = {
    "imap": b"* BYE [UNAVAILABLE] Timed out",
    "pop3": b"-ERR [SYS/TEMP] Timed out",
}


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_silent_client_timed_out(strict, protocol):
    started = time.monotonic()
    with connect(strict, protocol) as client:
        reply = client.read_until_closed()
    elapsed = time.monotonic() - started
    assert reply.startswith(TIMED_OUT[protocol]), reply
    assert elapsed >= STRICT_LIMITS["pre_auth_timeout"] - 0.5


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_one_byte_per_second_timed_out(strict, protocol):
    stop = threading.Event()
    with connect(strict, protocol) as client:

        def trickle() -> None:
            # One byte a second of a line that never ends: a slowloris client.
            for byte in itertools.islice(itertools.cycle(b"a1 LOGIN user "), 30):
                if stop.wait(1.0):
                    return
                try:
                    client.sock.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        started = time.monotonic()
        try:
            reply = client.read_until_closed()
        finally:
            stop.set()
            sender.join(5)
    assert TIMED_OUT[protocol] in reply, reply
    assert time.monotonic() - started < TIMEOUT



def client_hello() -> bytes:
    """Return the first bytes that a TLS client sends: its ClientHello."""
    context = ssl.create_default_context()
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def setup_log_lines(proxy: ApplianceProcess, listener: str, text: str) -> list[str]:
    """Return the log lines of `listener` that contain `text`."""
    return [
        line
        for line in proxy.log_text().splitlines()
        if f"listener={listener}]" in line and text in line
    ]


@pytest.mark.parametrize("protocol", ["imap", "pop3", "imap_starttls", "pop3_starttls"])
def test_tls_client_on_plaintext_port_closed_at_once(strict, protocol):
    # A mail client set to implicit TLS sends a ClientHello and waits; the appliance
    # closes without waiting for the pre-auth timeout.
    started = time.monotonic()
    with connect(strict, protocol) as client:
        client.sock.sendall(client_hello())
        client.read_until_closed()
    assert time.monotonic() - started < STRICT_LIMITS["pre_auth_timeout"] - 0.5
    line = wait_for_log(strict, "started a TLS handshake on a plaintext port")
    assert "expects implicit TLS" in line


def test_tls_on_plaintext_port_repeats_at_debug(strict):
    sources = []
    for _ in range(3):
        with connect(strict, "imap_hello") as client:
            sources.append(client.source)
            client.sock.sendall(client_hello())
            client.read_until_closed()
    for source in sources:
        wait_for_summary(strict, source)

    lines = setup_log_lines(strict, "imap_hello", "started a TLS handshake")
    warnings = [line for line in lines if " WARNING " in line]
    repeats = [line for line in lines if " DEBUG " in line]
    assert len(warnings) == 1, lines
    assert len(repeats) == 2, lines


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_client_hello_split_after_first_byte_closed(strict, protocol):
    started = time.monotonic()
    with connect(strict, protocol) as client:
        client.sock.sendall(b"\x16")
        time.sleep(0.3)
        client.sock.sendall(b"\x03\x01\x00\x05hello")
        reply = client.read_until_closed()
    assert time.monotonic() - started < STRICT_LIMITS["pre_auth_timeout"] - 0.5
    assert reply == b"", reply


@pytest.mark.parametrize(
    ("listener", "command"),
    [("imap_implicit", b"a1 CAPABILITY\r\n"), ("pop3_implicit", b"CAPA\r\n")],
)
def test_plaintext_on_implicit_port_explained(strict, listener, command):
    sources = []
    for _ in range(3):
        client = SourceClient(strict.port(listener))
        sources.append(client.source)
        with client:
            client.send(command)
            reply = client.read_until_closed()
        assert not reply.startswith((b"* ", b"+OK")), reply
    for source in sources:
        wait_for_summary(strict, source)

    lines = setup_log_lines(strict, listener, "it sent data that is not a TLS handshake")
    warnings = [line for line in lines if " WARNING " in line]
    repeats = [line for line in lines if " DEBUG " in line]
    assert len(warnings) == 1, lines
    assert len(repeats) == 2, lines
    assert "(WRONG_VERSION_NUMBER)" in warnings[0]
    assert "Set the client to use TLS (SSL/TLS, not STARTTLS) on this port" in warnings[0]
    assert f"closing connection from {sources[0]}:" in warnings[0]


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_client_leaving_starttls_handshake_named(strict, protocol):
    command = b"a1 STARTTLS\r\n" if protocol == "imap" else b"STLS\r\n"
    with connect(strict, f"{protocol}_starttls") as client:
        client.send(command)
        reply = client.read_line()
    summary = wait_for_summary(strict, client.source)
    assert reply.startswith((b"a1 OK", b"+OK")), reply
    outcome = "client TLS handshake failed: connection closed by the client after "
    assert outcome in summary, summary


# Line and literal limits


def test_overlong_imap_line_bad_then_in_sync(strict):
    with connect(strict, "imap") as client:
        client.send(b"a1 NOOP " + b"x" * 3000 + b"\r\n")
        reply = client.read_line()
        converse(client, [Step(b"a2 NOOP\r\n", b"a2 OK")])
    assert reply.startswith(b"a1 BAD"), reply


@pytest.mark.parametrize("announcement", [b"{11}", b"{11+}", b"~{11}"])
def test_overlong_imap_line_with_literal_closes(strict, upstreams, announcement):
    # The literal follows without a "+", as from a client that does not wait for one.
    line = b"a1 LOGIN " + b"x" * 3000 + b" " + announcement + b"\r\n"
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        client.send(line + b"mypass word\r\n")
        reply = client.read_until_closed()
    first, _, rest = reply.partition(b"\r\n")
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert first == b"a1 BAD command line too long (limit 1024 bytes)", reply
    assert rest == goodbye, reply
    assert b"mypass" not in reply
    assert b"mypass" not in bytes(upstreams["imap"].received[before:])


def test_invalid_tag_with_literal_closes(strict):
    with connect(strict, "imap") as client:
        client.send(b"a*1 LOGIN {11}\r\nmypass word\r\n")
        reply = client.read_until_closed()
    first, _, rest = reply.partition(b"\r\n")
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert first == b"* BAD invalid tag", reply
    assert rest == goodbye, reply
    assert b"mypass" not in reply


def test_overlong_pop3_line_err_then_in_sync(strict):
    with connect(strict, "pop3") as client:
        client.send(b"USER " + b"x" * 3000 + b"\r\n")
        reply = client.read_line()
        login_reply = pop3_login(client, RIGHT_PASSWORD)
    assert reply.startswith(b"-ERR"), reply
    assert login_reply.startswith(b"+OK"), login_reply


@pytest.mark.parametrize("size", [b"4000000000", b"18446744073709551617"])
def test_oversize_literal_bad_without_continuation(strict, size):
    with connect(strict, "imap") as client:
        client.send(b"a1 LOGIN {" + size + b"}\r\n")
        reply = client.read_line()
        rest = client.read_until_closed()
    assert reply.startswith(b"a1 BAD"), reply
    # The literal may follow unasked, so the session closes instead of reading on.
    assert rest.startswith(b"* BYE"), rest
    assert b"+ " not in rest


@pytest.mark.parametrize("size", [b"4000000000", b"18446744073709551617"])
def test_oversize_nonsync_literal_closes(strict, size):
    with connect(strict, "imap") as client:
        client.send(b"a1 LOGIN {" + size + b"+}\r\n" + b"x" * 4096)
        reply = client.read_until_closed()
    first, _, last = reply.partition(b"\r\n")
    assert first.startswith(b"a1 BAD literal too large"), reply
    assert last.startswith(b"* BYE Closing the connection after input"), reply
    assert b"+ " not in reply


def test_zero_literal_size_rejects_literals(no_literals):
    with connect(no_literals, "imap") as client:
        client.send(b"a1 LOGIN {4}\r\n")
        reply = client.read_line()
        rest = client.read_until_closed()
    with connect(no_literals, "imap") as client:
        login_reply = imap_login(client, b"a2", RIGHT_PASSWORD)
    assert reply.startswith(b"a1 BAD literal too large"), reply
    assert rest.startswith(b"* BYE"), rest
    assert login_reply.startswith(b"a2 OK"), login_reply


# Protocol error budget


def test_imap_error_budget_closes(strict):
    budget = STRICT_LIMITS["max_protocol_errors"]
    with connect(strict, "imap") as client:
        replies = []
        for number in range(budget - 1):
            client.send(b"e%d FROB\r\n" % number)
            replies.append(client.read_line())
        client.send(b"last FROB\r\n")
        final = client.read_until_closed()
    assert all(reply.startswith(b"e") and b" BAD " in reply for reply in replies)
    assert final.startswith(b"* BYE Too many invalid commands"), final


def test_pop3_error_budget_closes(strict):
    budget = STRICT_LIMITS["max_protocol_errors"]
    with connect(strict, "pop3") as client:
        replies = []
        for _ in range(budget - 1):
            client.send(b"FROB\r\n")
            replies.append(client.read_line())
        client.send(b"FROB\r\n")
        final = client.read_until_closed()
    assert all(reply.startswith(b"-ERR") for reply in replies), replies
    assert final.startswith(b"-ERR"), final
    assert final.count(b"\n") == 1, final


# Failed-login delay


def timed_login(proxy: ApplianceProcess, protocol: str, source: str, password: bytes):
    """Return (reply, seconds) of one login on a new connection."""
    with connect(proxy, protocol, source) as client:
        started = time.monotonic()
        reply = login(protocol, client, password)
        return reply, time.monotonic() - started


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_failed_login_delay_grows_and_resets(delayed, protocol):
    source = next_source()
    first, _ = timed_login(delayed, protocol, source, b"wrong")
    second, second_time = timed_login(delayed, protocol, source, b"wrong")
    third, third_time = timed_login(delayed, protocol, source, b"wrong")
    success, success_time = timed_login(delayed, protocol, source, RIGHT_PASSWORD)
    after, after_time = timed_login(delayed, protocol, source, b"wrong")

    assert not succeeded(protocol, first), first
    assert not succeeded(protocol, second), second
    assert not succeeded(protocol, third), third
    assert succeeded(protocol, success), success
    assert not succeeded(protocol, after), after
    assert second_time >= 0.9
    assert third_time >= 1.8
    assert success_time >= 3.6
    assert after_time < third_time


def test_parallel_logins_wait_in_turn(delayed):
    """Many connections from one address do not all get the same single delay."""
    source = next_source()
    timed_login(delayed, "imap", source, b"wrong")
    with ThreadPoolExecutor(max_workers=3) as pool:
        attempts = [
            pool.submit(timed_login, delayed, "imap", source, b"wrong") for _ in range(3)
        ]
        results = [attempt.result(timeout=TIMEOUT) for attempt in attempts]

    waits = sorted(seconds for _, seconds in results)
    assert not any(succeeded("imap", reply) for reply, _ in results)
    assert waits[0] >= 0.9
    assert waits[1] >= 1.9
    assert waits[2] >= 2.9


# Each case: protocol, and what the client sends to log in as gone-user.
GONE_LOGINS = {
    "imap-login": ("imap", b"a1 LOGIN gone-user right\r\n"),
    "imap-authenticate-plain": (
        "imap",
        b"a1 AUTHENTICATE PLAIN " + plain(b"gone-user", RIGHT_PASSWORD) + b"\r\n",
    ),
    "imap-authenticate-login": (
        "imap",
        b"a1 AUTHENTICATE LOGIN "
        + base64.b64encode(b"gone-user")
        + b"\r\n"
        + base64.b64encode(RIGHT_PASSWORD)
        + b"\r\n",
    ),
    "pop3-user-pass": ("pop3", b"USER gone-user\r\nPASS right\r\n"),
    "pop3-auth-plain": (
        "pop3",
        b"AUTH PLAIN " + plain(b"gone-user", RIGHT_PASSWORD) + b"\r\n",
    ),
    "pop3-apop": ("pop3", b"APOP gone-user 0123456789abcdef0123456789abcdef\r\n"),
}


@pytest.mark.parametrize("case", GONE_LOGINS, ids=list(GONE_LOGINS))
def test_delayed_login_dropped_when_client_leaves(delayed, upstreams, case):
    protocol, login_bytes = GONE_LOGINS[case]
    source = next_source()
    timed_login(delayed, protocol, source, b"wrong")
    before = len(upstreams[protocol].received)

    with connect(delayed, protocol, source) as client:
        port = client.sock.getsockname()[1]
        client.send(login_bytes)
        # Leave while the login waits out the 1 s failed-login delay.
        time.sleep(0.2)
    cancelled = wait_for_log(delayed, f"login cancelled: client {source} port {port} ")
    summary = wait_for_log(delayed, f"; client {source}:{port};")
    # A turn given back does not delay the next login: one delay, not two.
    reply, seconds = timed_login(delayed, protocol, source, RIGHT_PASSWORD)
    # Past the start that the dropped login had reserved.
    time.sleep(0.5)

    received = bytes(upstreams[protocol].received[before:])
    assert cancelled.endswith(' user "gone-user"'), cancelled
    assert "session ended: client disconnected before login after 0." in summary
    assert succeeded(protocol, reply), reply
    assert 0.9 <= seconds < 1.6
    assert plain(b"gone-user", RIGHT_PASSWORD) not in received, received
    assert b"gone-user" not in received, received


AUTHZID_PASSWORD = b"Authz-Secret-5150"
# SASL PLAIN logins of `user` that request to act as `admin`, by protocol.
FOREIGN_AUTHZID_LOGINS = {
    "imap": b"a1 AUTHENTICATE PLAIN "
    + base64.b64encode(b"admin\0user\0" + AUTHZID_PASSWORD)
    + b"\r\n",
    "pop3": b"AUTH PLAIN "
    + base64.b64encode(b"admin\0user\0" + AUTHZID_PASSWORD)
    + b"\r\n",
}
AUTHENTICATION_FAILED = {
    "imap": b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
    "pop3": b"-ERR [AUTH] Authentication failed.\r\n",
}


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_foreign_authzid_rejected_with_reason(strict, upstreams, protocol):
    source = next_source()
    before = len(upstreams[protocol].received)
    with connect(strict, protocol, source) as client:
        port = client.sock.getsockname()[1]
        client.send(FOREIGN_AUTHZID_LOGINS[protocol])
        reply = client.read_line()
    rejected = wait_for_log(strict, f"login rejected: client {source} port {port} ")
    session = re.search(r"\[session=([0-9a-f]+) ", rejected)[1]
    reasons = [
        line
        for line in strict.log_text().splitlines()
        if f"[session={session} " in line and "authorization identity" in line
    ]
    received = bytes(upstreams[protocol].received[before:])

    assert reply == AUTHENTICATION_FAILED[protocol], reply
    assert rejected.endswith(' user "user"'), rejected
    assert len(reasons) == 1, reasons
    assert " DEBUG " in reasons[0], reasons
    assert 'authorization identity "admin" is not the user name' in reasons[0]
    assert AUTHZID_PASSWORD.decode() not in strict.log_text()
    assert b"admin" not in received, received


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_foreign_authzid_earns_no_delay(delayed, protocol):
    source = next_source()
    with connect(delayed, protocol, source) as client:
        client.send(FOREIGN_AUTHZID_LOGINS[protocol])
        rejected = client.read_line()
    reply, seconds = timed_login(delayed, protocol, source, RIGHT_PASSWORD)

    assert rejected == AUTHENTICATION_FAILED[protocol], rejected
    assert succeeded(protocol, reply), reply
    assert seconds < 0.9


# Logins that the proxy rejects without asking the upstream wait no failed-login delay,
# so each counts toward max_protocol_errors instead. Each case: the listener and one
# rejected login, which the client repeats in one write.
REJECTED_LOGIN_REPEATS = {
    "imap-authzid": ("imap", FOREIGN_AUTHZID_LOGINS["imap"]),
    "imap-mechanism": ("imap", b"a1 AUTHENTICATE X-FROB\r\n"),
    "imap-before-tls": ("imap_starttls", b"a1 LOGIN user right\r\n"),
    "pop3-authzid": ("pop3", FOREIGN_AUTHZID_LOGINS["pop3"]),
    "pop3-mechanism": ("pop3", b"AUTH X-FROB\r\n"),
    "pop3-before-tls": ("pop3_starttls", b"USER user\r\nPASS right\r\n"),
}
TOO_MANY_ERRORS = GOODBYE_TEXTS["protocol"].encode()


@pytest.mark.parametrize(
    "case", REJECTED_LOGIN_REPEATS, ids=list(REJECTED_LOGIN_REPEATS)
)
def test_rejected_logins_use_error_budget(strict, case):
    listener, rejected_login = REJECTED_LOGIN_REPEATS[case]
    budget = STRICT_LIMITS["max_protocol_errors"]
    source = next_source()
    with connect(strict, listener, source) as client:
        client.send(rejected_login * (budget + 5))
        replies = client.read_until_closed().splitlines()
    summary = wait_for_summary(strict, source)
    logged = [
        line
        for line in strict.log_text().splitlines()
        if f"login rejected: client {source} " in line
    ]

    assert len(logged) == budget, logged
    assert replies[-1] in (b"* BYE " + TOO_MANY_ERRORS, b"-ERR " + TOO_MANY_ERRORS)
    assert "session ended: client protocol error" in summary, summary


def test_failed_login_delay_per_address(delayed):
    noisy = next_source()
    for _ in range(3):
        timed_login(delayed, "imap", noisy, b"wrong")
    reply, seconds = timed_login(delayed, "imap", next_source(), RIGHT_PASSWORD)
    assert reply.startswith(b"L1 OK"), reply
    assert seconds < 1.8


def test_syntax_errors_earn_no_delay(delayed):
    source = next_source()
    with connect(delayed, "imap", source) as client:
        for number in range(5):
            converse(
                client,
                [Step(b'b%d LOGIN "unterminated\r\n' % number, b"b%d BAD" % number)],
            )
        started = time.monotonic()
        reply = imap_login(client, b"L1", RIGHT_PASSWORD)
        seconds = time.monotonic() - started
    assert reply.startswith(b"L1 OK"), reply
    assert seconds < 0.9


# Malformed IMAP input keeps the session in sync

IMAP_MALFORMED = {
    "unterminated-quoted": [Step(b'a1 LOGIN "user\r\n', b"a1 BAD")],
    "invalid-escape": [Step(b'a1 LOGIN "us\\er" "x"\r\n', b"a1 BAD")],
    "empty-literal-count": [Step(b"a1 LOGIN {}\r\n", b"a1 BAD")],
    "negative-literal-count": [Step(b"a1 LOGIN {-1}\r\n", b"a1 BAD")],
    "non-numeric-literal-count": [Step(b"a1 LOGIN {abc}\r\n", b"a1 BAD")],
    "nul-byte": [Step(b"a1 NOOP\0\r\n", b"a1 BAD")],
    "nul-in-literal": [
        Step(b"a1 LOGIN {3}\r\n", b"+"),
        Step(b"u\0r pw\r\n", b"a1 BAD"),
    ],
    "bare-cr": [Step(b"a1 NOOP\rx\r\n", b"a1 BAD")],
    "bare-lf": [Step(b"a1 NOOP\n", b"a1 BAD")],
    "unbalanced-parenthesis": [Step(b"a1 ID (\r\n", b"a1 BAD")],
    "missing-command": [Step(b"a1\r\n", b"a1 BAD")],
    "literal-in-unknown-command": [
        Step(b"a1 FROB {20}\r\n", b"+"),
        Step(b"a2 LOGOUT\r\na3 NOOP\r\n\r\n", b"a1 BAD"),
    ],
    "nonsync-literal-in-unknown-command": [
        Step(b"a1 FROB {20+}\r\na2 LOGOUT\r\na3 NOOP\r\n\r\n", b"a1 BAD"),
    ],
    "authenticate-invalid-base64": [
        Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"),
        Step(b"not*base64!\r\n", b"a1 BAD"),
    ],
    "authenticate-initial-invalid-base64": [
        Step(b"a1 AUTHENTICATE PLAIN %%%%\r\n", b"a1 BAD"),
    ],
    "authenticate-plain-without-nul": [
        Step(
            b"a1 AUTHENTICATE PLAIN " + base64.b64encode(b"userpw") + b"\r\n", b"a1 BAD"
        ),
    ],
    "authenticate-cancel": [
        Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"),
        Step(b"*\r\n", b"a1 BAD"),
    ],
    "authenticate-login-cancel": [
        Step(b"a1 AUTHENTICATE LOGIN\r\n", b"+"),
        Step(base64.b64encode(b"user") + b"\r\n", b"+"),
        Step(b"*\r\n", b"a1 BAD"),
    ],
    "authenticate-unknown-mechanism": [
        Step(b"a1 AUTHENTICATE X-FROB\r\n", b"a1 NO"),
    ],
    "eight-bit-atom-user": [Step(b"a1 LOGIN us\xe9r x\r\n", b"a1 BAD")],
    "eight-bit-quoted-user": [Step(b'a1 LOGIN "us\xc3\xa9r" "x"\r\n', b"a1 NO")],
    "invalid-utf8-quoted-user": [Step(b'a1 LOGIN "us\xffr" "x"\r\n', b"a1 NO")],
}


@pytest.mark.parametrize("case", IMAP_MALFORMED, ids=list(IMAP_MALFORMED))
def test_imap_malformed_input_stays_in_sync(strict, case):
    with connect(strict, "imap") as client:
        bad = converse(client, IMAP_MALFORMED[case])
        noop = converse(client, [Step(b"z1 NOOP\r\n", b"z1 OK")])
        reply = imap_login(client, b"L1", RIGHT_PASSWORD)
    assert not any(b"LOGOUT" in line or b"BYE" in line for line in bad + noop)
    assert not any(line.startswith((b"a2 ", b"a3 ")) for line in bad + noop)
    assert reply.startswith(b"L1 OK"), reply


def test_eight_bit_user_escaped_in_log(strict):
    source = next_source()
    with connect(strict, "imap", source) as client:
        converse(client, [Step(b'a1 LOGIN "us\xc3\xa9r\\"x" "x"\r\n', b"a1 NO")])
    line = wait_for_log(strict, f"login failed: client {source} ")
    assert line.endswith('user "us\\xc3\\xa9r\\x22x"'), line


# Malformed POP3 input keeps the session in sync

POP3_MALFORMED = {
    "nul-byte": [b"USER us\0er\r\n"],
    "bare-cr": [b"USER us\rer\r\n"],
    "bare-lf": [b"USER user\n"],
    "empty-line": [b"\r\n"],
    "invalid-keyword": [b"US3R user\r\n"],
    "unknown-command": [b"FROB\r\n"],
    "pass-without-user": [b"PASS x\r\n"],
    "auth-invalid-base64": [b"AUTH PLAIN not*base64!\r\n"],
    "auth-continuation-invalid-base64": [b"AUTH PLAIN\r\n", b"not*base64!\r\n"],
    "auth-cancel": [b"AUTH PLAIN\r\n", b"*\r\n"],
    "auth-login-cancel": [b"AUTH LOGIN\r\n", b"*\r\n"],
    "auth-unknown-mechanism": [b"AUTH X-FROB\r\n"],
    "eight-bit-user": [b"USER us\xe9r\r\n", b"PASS x\r\n"],
}


@pytest.mark.parametrize("case", POP3_MALFORMED, ids=list(POP3_MALFORMED))
def test_pop3_malformed_input_stays_in_sync(strict, case):
    with connect(strict, "pop3") as client:
        replies = []
        for line in POP3_MALFORMED[case]:
            client.send(line)
            replies.append(client.read_line())
        reply = pop3_login(client, RIGHT_PASSWORD)
    assert replies[-1].startswith(b"-ERR"), replies
    assert reply.startswith(b"+OK"), reply


# No "+" for a login before TLS

PRE_TLS_LITERALS = [
    b"a1 LOGIN {4}\r\n",
    b"a1 LOGIN user {5}\r\n",
    b"a1 AUTHENTICATE PLAIN {5}\r\n",
]


@pytest.mark.parametrize("command", PRE_TLS_LITERALS, ids=["user", "password", "sasl"])
def test_login_literal_before_tls_no_continuation(strict, upstreams, command):
    before = len(upstreams["imap"].received)
    with connect(strict, "imap_starttls") as client:
        client.send(command)
        reply = client.read_line()
        rest = client.read_until_closed()
    received = bytes(upstreams["imap"].received[before:])
    assert reply.startswith(b"a1 NO [PRIVACYREQUIRED]"), reply
    assert rest.startswith(b"* BYE"), rest
    assert b"LOGIN" not in received
    assert b"AUTHENTICATE" not in received


def test_literal_before_tls_other_command_continues(strict):
    with connect(strict, "imap_starttls") as client:
        converse(client, [Step(b"a1 ID ({4}\r\n", b"+")])
        converse(client, [Step(b'name "x")\r\n', b"a1 OK")])



@pytest.mark.parametrize(
    "command",
    [b"L1 LOGIN user ~{5+}\r\nright\r\n", b"L1 AUTHENTICATE PLAIN ~{4+}\r\nAAAA\r\n"],
    ids=["login", "authenticate"],
)
def test_literal8_login_argument_rejected(strict, upstreams, command):
    # LOGIN and SASL arguments are strings; a literal8 is binary data (RFC 3516).
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        client.send(command)
        reply = client.read_line()
        converse(client, [Step(b"a2 NOOP\r\n", b"a2 OK")])
        assert succeeded("imap", imap_login(client, b"L1", RIGHT_PASSWORD))
    assert reply.startswith(b"L1 BAD Login arguments are strings"), reply
    received = bytes(upstreams["imap"].received[before:])
    assert received.count(b"AUTHENTICATE") == 1, received


def test_sync_literal8_login_rejected_first(strict, upstreams):
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        client.send(b"L1 LOGIN user ~{5}\r\n")
        reply = client.read_line()
        rest = client.read_until_closed()
    assert reply.startswith(b"L1 BAD Login arguments are strings"), reply
    assert rest.startswith(b"* BYE"), rest
    assert b"LOGIN" not in bytes(upstreams["imap"].received[before:])


def test_literal8_sent_without_waiting_closes(strict):
    with connect(strict, "imap") as client:
        client.send(b"L1 LOGIN user ~{11}\r\nmypass word\r\n")
        reply = client.read_until_closed()
    assert reply.startswith(b"L1 BAD Login arguments are strings"), reply
    assert b"* BYE" in reply, reply
    assert b"mypass" not in reply


def test_sasl_fatal_error_answered_once(strict):
    with connect(strict, "imap") as client:
        client.send(b"A1 AUTHENTICATE PLAIN\r\n")
        assert client.read_line().startswith(b"+")
        client.send(b"ab\rc+}\r\n")
        reply = client.read_until_closed()
    assert reply.count(b"BAD") == 1, reply
    assert reply.startswith(b"A1 BAD bare CR"), reply


def test_login_user_at_size_limit(strict, upstreams):
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        steps = [
            Step(b"L1 LOGIN {%d}\r\n" % MAX_LOGIN_USER_SIZE, b"+"),
            Step(b"u" * MAX_LOGIN_USER_SIZE + b" right\r\n", b"L1 OK"),
        ]
        converse(client, steps)
    assert b"AUTHENTICATE" in bytes(upstreams["imap"].received[before:])


# Literals over the credential limits get NO [LIMIT] in place of "+", so a client that
# waits for "+" never sends them. Each case: the announcement and the user that the log
# line names.
OVERSIZED_LITERALS = {
    "user": (b"L1 LOGIN {%d}\r\n" % (MAX_LOGIN_USER_SIZE + 1), ""),
    "password": (b"L1 LOGIN jo {%d}\r\n" % (MAX_LOGIN_PASSWORD_SIZE + 1), "jo"),
    "sasl": (b"L1 AUTHENTICATE PLAIN {%d}\r\n" % (MAX_SASL_RESPONSE_SIZE + 1), ""),
}
LIMIT_REPLY = b"L1 NO [LIMIT] " + LOGIN_SIZE_ERROR.encode() + b"\r\n"


def literal_size(announcement: bytes) -> int:
    return int(re.search(rb"\{([0-9]+)\+?\}", announcement).group(1))


@pytest.mark.parametrize("case", sorted(OVERSIZED_LITERALS))
def test_oversized_login_literal_gets_no_continuation(strict, upstreams, case):
    announcement, user = OVERSIZED_LITERALS[case]
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        port = client.sock.getsockname()[1]
        client.send(announcement)
        reply = client.read_line()
        # The literal may follow unasked, so the session closes instead of reading on.
        rest = client.read_until_closed()
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert reply == LIMIT_REPLY, reply
    assert rest == goodbye, rest
    received = bytes(upstreams["imap"].received[before:])
    assert b"AUTHENTICATE" not in received, received
    rejected = wait_for_log(strict, f"login rejected: client {client.source} port {port} ")
    assert rejected.endswith(f'user "{user}"'), rejected


@pytest.mark.parametrize("case", sorted(OVERSIZED_LITERALS))
def test_oversized_literal_plus_login_closes(strict, upstreams, case):
    announcement, _ = OVERSIZED_LITERALS[case]
    announcement = announcement.replace(b"}", b"+}")
    literal = b"s" * literal_size(announcement)
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        client.send(announcement + literal + b"\r\n")
        reply = client.read_until_closed()
    # The literal's bytes follow the announcement unasked, so the session closes at
    # once rather than read them.
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert reply == LIMIT_REPLY + goodbye, reply
    assert b"sss" not in reply
    assert b"AUTHENTICATE" not in bytes(upstreams["imap"].received[before:])


def test_oversized_literal_sent_without_waiting_closes(strict):
    announcement, _ = OVERSIZED_LITERALS["password"]
    literal = b"mypass word" + b"s" * (literal_size(announcement) - 11)
    with connect(strict, "imap") as client:
        client.send(announcement + literal + b"\r\n")
        reply = client.read_until_closed()
    assert reply.startswith(LIMIT_REPLY), reply
    assert b"* BYE" in reply, reply
    assert b"mypass" not in reply


# Login literals over the general limits.max_literal_size (65536 bytes by default), which
# the reader checks before the credential limits, each sent without waiting for "+".
GENERAL_LIMIT_LITERALS = {
    "login-user": b"a1 LOGIN {70000}\r\n",
    "login-password": b"a1 LOGIN alice {70000}\r\n",
    "login-third": b"a1 LOGIN alice pw {70000}\r\n",
    "authenticate-mechanism": b"a1 AUTHENTICATE {70000}\r\n",
}


@pytest.mark.parametrize("case", GENERAL_LIMIT_LITERALS, ids=list(GENERAL_LIMIT_LITERALS))
def test_general_limit_login_literal_closes(strict, upstreams, case):
    announcement = GENERAL_LIMIT_LITERALS[case]
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        client.send(announcement + b"secretpw rest\r\n")
        reply = client.read_until_closed()
    first, _, rest = reply.partition(b"\r\n")
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert first == b"a1 BAD literal too large (limit 65536 bytes)", reply
    assert rest == goodbye, reply
    assert b"secretpw" not in reply
    assert b"secretpw" not in bytes(upstreams["imap"].received[before:])


# Login literals that the command cannot use, and the BAD that each gets instead of "+".
UNUSABLE_LOGIN_LITERALS = {
    "login-third": (b"a1 LOGIN alice pw {13}\r\n", b"LOGIN takes at most 2 arguments"),
    "login-in-list": (b"a1 LOGIN (alice {13}\r\n", b"LOGIN takes no parenthesized list"),
    "login-after-list": (b"a1 LOGIN (alice) {13}\r\n", b"LOGIN takes no parenthesized list"),
    "authenticate-mechanism": (
        b"a1 AUTHENTICATE {13}\r\n",
        b"argument 1 of AUTHENTICATE cannot be a literal",
    ),
    "authenticate-third": (
        b"a1 AUTHENTICATE PLAIN " + plain(b"user", RIGHT_PASSWORD) + b" {13}\r\n",
        b"AUTHENTICATE takes at most 2 arguments",
    ),
}


@pytest.mark.parametrize("plus", [False, True], ids=["synchronizing", "literal-plus"])
@pytest.mark.parametrize("case", UNUSABLE_LOGIN_LITERALS, ids=list(UNUSABLE_LOGIN_LITERALS))
def test_unusable_login_literal_closes(strict, upstreams, case, plus):
    announcement, message = UNUSABLE_LOGIN_LITERALS[case]
    if plus:
        announcement = announcement.replace(b"}", b"+}")
    before = len(upstreams["imap"].received)
    with connect(strict, "imap") as client:
        # The literal follows without a "+", as from a client that does not wait.
        client.send(announcement + b"secretpw rest\r\na2 NOOP\r\n")
        reply = client.read_until_closed()
    first, _, rest = reply.partition(b"\r\n")
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert first == b"a1 BAD " + message, reply
    assert rest == goodbye, reply
    assert b"secretpw" not in reply
    assert b"AUTHENTICATE" not in bytes(upstreams["imap"].received[before:])


# Literals of other commands that get BAD instead of "+", and the BAD's text. No valid
# command before login needs them, so the session closes as after a login literal.
REJECTED_OTHER_LITERALS = {
    "over-max-literal-size": (
        b"a1 ID {70000}\r\n",
        b"literal too large (limit 65536 bytes)",
    ),
    "unbalanced": (b"a1 SELECT ) {6}\r\n", b"unbalanced parentheses"),
}


@pytest.mark.parametrize(
    "case", REJECTED_OTHER_LITERALS, ids=list(REJECTED_OTHER_LITERALS)
)
def test_rejected_other_literal_closes(strict, case):
    announcement, message = REJECTED_OTHER_LITERALS[case]
    with connect(strict, "imap") as client:
        # The literal follows without a "+", as from a client that does not wait.
        client.send(announcement + b"secret\r\na2 NOOP\r\n")
        reply = client.read_until_closed()
    first, _, rest = reply.partition(b"\r\n")
    goodbye = b"* BYE " + GOODBYE_TEXTS["unreadable"].encode() + b"\r\n"
    assert first == b"a1 BAD " + message, reply
    assert rest == goodbye, reply
    assert b"secret" not in reply


# Each case: listener, command before TLS, and the user name that the log line names.
PRE_TLS_SASL_USERS = {
    "imap-plain": (
        "imap_starttls",
        b"a1 AUTHENTICATE PLAIN " + plain(b"jo", b"pw"),
        "jo",
    ),
    "imap-plain-authzid": (
        "imap_starttls",
        b"a1 AUTHENTICATE PLAIN " + base64.b64encode(b"jo\0jo\0pw"),
        "jo",
    ),
    "imap-login": (
        "imap_starttls",
        b"a1 AUTHENTICATE LOGIN " + base64.b64encode(b"jo"),
        "jo",
    ),
    "imap-invalid": ("imap_starttls", b"a1 AUTHENTICATE PLAIN bm90IHBsYWlu", ""),
    "imap-empty": ("imap_starttls", b"a1 AUTHENTICATE PLAIN =", ""),
    "pop3-plain": ("pop3_starttls", b"AUTH PLAIN " + plain(b"jo", b"pw"), "jo"),
    "pop3-login": ("pop3_starttls", b"AUTH LOGIN " + base64.b64encode(b"jo"), "jo"),
    "pop3-invalid": ("pop3_starttls", b"AUTH PLAIN not*base64!", ""),
}


@pytest.mark.parametrize("case", PRE_TLS_SASL_USERS, ids=list(PRE_TLS_SASL_USERS))
def test_sasl_before_tls_logs_user(strict, case):
    listener, command, user = PRE_TLS_SASL_USERS[case]
    source = next_source()
    with connect(strict, listener, source) as client:
        client.send(command + b"\r\n")
        reply = client.read_line()
    assert reply.startswith((b"a1 NO [PRIVACYREQUIRED]", b"-ERR [AUTH]")), reply
    line = wait_for_log(strict, f"login rejected: client {source} ")
    assert line.endswith(f'user "{user}"'), line
    assert "pw" not in line.rpartition(" user ")[2], line


def test_pop3_user_before_tls_rejected(strict, upstreams):
    before = len(upstreams["pop3"].received)
    with connect(strict, "pop3_starttls") as client:
        client.send(b"USER user\r\n")
        reply = client.read_line()
    assert reply.startswith(b"-ERR [AUTH]"), reply
    assert b"USER" not in bytes(upstreams["pop3"].received[before:])


def test_pop3_user_pass_before_tls_logged_once(strict):
    source = next_source()
    with connect(strict, "pop3_starttls", source) as client:
        client.send(b"USER jo\r\n")
        user_reply = client.read_line()
        client.send(b"PASS pw\r\n")
        pass_reply = client.read_line()
    wait_for_summary(strict, source)
    logged = [
        line
        for line in strict.log_text().splitlines()
        if f"login rejected: client {source} " in line
    ]

    assert user_reply.startswith(b"-ERR [AUTH] Login is disabled"), user_reply
    assert pass_reply.startswith(b"-ERR [AUTH] Login is disabled"), pass_reply
    assert len(logged) == 1, logged
    assert logged[0].endswith(' user "jo"'), logged


# Process limits


def test_open_files_limit_logged(strict):
    line = wait_for_log(strict, "open files limit")
    figures = re.search(
        r"open files limit(?: raised from (\d+) to the hard limit|: soft (\d+), hard)"
        r" (\d+|unlimited)$",
        line,
    )
    assert figures is not None, line


# POP3 toward a server that takes only USER and PASS


@pytest.fixture(scope="module")
def user_pass_server() -> Iterator[ScriptedServer]:
    script = Script(protocol="pop3", offer_starttls=False, offer_sasl_plain=False)
    with ScriptedServer(script) as server:
        yield server


@pytest.fixture(scope="module")
def user_pass_proxy(
    user_pass_server: ScriptedServer, tmp_path_factory
) -> Iterator[ApplianceProcess]:
    upstream = {"host": HOST, "port": user_pass_server.port, "tls": "none"}
    config = {
        "listeners": {"pop3": listener_config("pop3", "pop3")},
        "upstreams": {"pop3": upstream},
    }
    with ApplianceProcess(config, tmp_path_factory.mktemp("user-pass")) as process:
        yield process


def test_pop3_user_pass_rejects_line_breaks(user_pass_proxy, user_pass_server):
    """A password with CR LF, sent base64-encoded, never becomes two lines upstream."""
    before = len(user_pass_server.received_bytes())
    client = LineClient(HOST, user_pass_proxy.port("pop3"))
    client.read_line()
    client.send(b"AUTH PLAIN " + plain(b"user", b"pw\r\nDELE 1") + b"\r\n")
    rejected = client.read_line()
    client.send(b"AUTH PLAIN " + plain(b"user", b"pw") + b"\r\n")
    accepted = client.read_line()
    client.sock.close()
    received = user_pass_server.received_bytes()[before:]

    assert rejected.startswith(b"-ERR [AUTH] Invalid characters in credentials")
    assert accepted.startswith(b"+OK")
    assert b"DELE" not in received
    assert received.count(b"USER ") == 1


@pytest.mark.parametrize(
    "between",
    [b"NOOP\r\n", b"USER ali\0ce\r\n", b"AUTH LOGIN\r\n*\r\n"],
    ids=["command", "invalid-user", "cancelled-auth"],
)
def test_pop3_pass_needs_user_right_before(
    user_pass_proxy, user_pass_server, between
):
    """PASS pairs with the USER right before it, never with an earlier one."""
    before = len(user_pass_server.received_bytes())
    client = LineClient(HOST, user_pass_proxy.port("pop3"))
    client.read_line()
    client.send(b"USER alice\r\n")
    user_reply = client.read_line()
    client.send(between)
    while client.read_line().startswith(b"+ "):
        pass
    client.send(b"PASS pwd-secret\r\n")
    pass_reply = client.read_line()
    client.sock.close()
    received = user_pass_server.received_bytes()[before:]

    assert user_reply.startswith(b"+OK")
    assert pass_reply.startswith(b"-ERR"), pass_reply
    assert b"pwd-secret" not in received
