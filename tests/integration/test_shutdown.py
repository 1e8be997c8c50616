"""Shutdown of the real appliance process on SIGTERM and SIGINT.

Before login a session gets the protocol's goodbye (POP3 `-ERR`, IMAP `* BYE`) when the
grace period ends. In the relay the proxy no longer parses the stream, so it closes
without adding a byte, even in the middle of a message.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_pop3_proxy import HOST, TIMEOUT, Pop3Wire, stuff
from tests.support.appliance import ApplianceProcess, dovecot_config
from tests.support.dovecot import LARGE_MESSAGE_INDEX, DovecotServer, large_message

USER = "alice"
SHORT_GRACE = 2.0
# Long enough that the session of the grace test always finishes first. The appliance
# exits as soon as its last session ends, so the test does not wait this long.
LONG_GRACE = 30.0
# Loopback socket buffers can hold a few megabytes (Linux tcp_wmem allows 4 MiB), so
# the relay test retrieves about 15 MiB to be sure it is mid-message at the deadline.
BIG_MESSAGE = large_message() * 5
CLIENT_RECEIVE_BUFFER = 64 * 1024
REFUSAL_WAIT = 10.0


@pytest.fixture(scope="module")
def server(dovecot_factory: Any) -> DovecotServer:
    server = dovecot_factory(fresh=True, tls="none")
    server.deliver(USER, BIG_MESSAGE)
    return server


def start_appliance(
    server: DovecotServer, workdir: Path, grace: float
) -> ApplianceProcess:
    listeners = {"pop3": ("pop3", "none", "none"), "imap": ("imap", "none", "none")}
    limits = {"shutdown_grace_period": grace}
    config = dovecot_config(server, listeners, limits=limits)
    return ApplianceProcess(config, workdir).start()


def pop3_login(appliance: ApplianceProcess, server: DovecotServer) -> Pop3Wire:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A fixed receive buffer turns off autotuning, so a client that stops reading
    # stops the relay after a bounded number of bytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RECEIVE_BUFFER)
    sock.settimeout(TIMEOUT)
    sock.connect((HOST, appliance.port("pop3")))
    wire = Pop3Wire(sock)
    wire.line()
    wire.command(b"USER " + USER.encode())
    reply = wire.command(b"PASS " + server.users[USER].encode())
    assert reply.startswith(b"+OK"), reply
    return wire


def first_mismatch(received: bytes, expected: bytes) -> int | None:
    """Return the offset where `received` stops matching `expected`, or None."""
    if expected.startswith(received):
        return None
    limit = min(len(received), len(expected))
    return next((i for i in range(limit) if received[i] != expected[i]), limit)


def wait_until_refused(port: int) -> bool:
    """Return whether connecting to `port` fails with ECONNREFUSED within the wait."""
    deadline = time.monotonic() + REFUSAL_WAIT
    while time.monotonic() < deadline:
        try:
            probe = socket.create_connection((HOST, port), timeout=1)
        except ConnectionRefusedError:
            return True
        probe.close()
        time.sleep(0.02)
    return False


# Shutdown with sessions before login and in the relay


@dataclass
class Stopped:
    """What the clients saw when the appliance stopped with open sessions."""

    pop3_reply: bytes
    imap_reply: bytes
    goodbye_delay: float
    relay_status: bytes
    relay_body: bytes
    relay_expected: bytes
    exit_code: int | None
    log: str


@pytest.fixture(
    scope="module", params=[signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def stopped(
    request: pytest.FixtureRequest,
    server: DovecotServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stopped]:
    big_number = server.message_count(USER)
    workdir = tmp_path_factory.mktemp("shutdown")
    appliance = start_appliance(server, workdir, SHORT_GRACE)
    try:
        pop3 = Pop3Wire.connect(appliance.port("pop3"))
        pop3.line()
        imap = Pop3Wire.connect(appliance.port("imap"))
        imap.line()
        relay = pop3_login(appliance, server)
        relay_status = relay.command(f"RETR {big_number}".encode())

        signalled = time.monotonic()
        appliance.send_signal(request.param)
        pop3_reply = pop3.read_to_end()
        goodbye_delay = time.monotonic() - signalled
        imap_reply = imap.read_to_end()
        # Read only after the deadline, so the RETR cannot finish in the grace period.
        relay_body = relay.read_to_end()
        exit_code = appliance.process.wait(TIMEOUT)
        for wire in (pop3, imap, relay):
            wire.close()
    finally:
        appliance.stop()
    log = appliance.log_text()
    yield Stopped(
        pop3_reply=pop3_reply,
        imap_reply=imap_reply,
        goodbye_delay=goodbye_delay,
        relay_status=relay_status,
        relay_body=relay_body,
        relay_expected=stuff(BIG_MESSAGE) + b".\r\n",
        exit_code=exit_code,
        log=log,
    )


def test_pop3_before_login_gets_err(stopped):
    assert stopped.pop3_reply.startswith(b"-ERR [SYS/TEMP] ")
    assert stopped.pop3_reply.count(b"\r\n") == 1
    assert stopped.pop3_reply.endswith(b"\r\n")


def test_imap_before_login_gets_bye(stopped):
    assert stopped.imap_reply.startswith(b"* BYE ")
    assert stopped.imap_reply.count(b"\r\n") == 1
    assert stopped.imap_reply.endswith(b"\r\n")


def test_goodbye_waits_for_grace_period(stopped):
    assert stopped.goodbye_delay >= SHORT_GRACE


def test_relay_cut_without_injected_bytes(stopped):
    assert stopped.relay_status.startswith(b"+OK")
    assert first_mismatch(stopped.relay_body, stopped.relay_expected) is None


def test_relay_cut_in_mid_message(stopped):
    assert len(stopped.relay_body) < len(stopped.relay_expected)


def test_exit_code_zero_after_signal(stopped):
    assert stopped.exit_code == 0


def test_summaries_name_the_shutdown(stopped):
    # The relay's own end, seen as the connections close, must not replace the reason.
    assert stopped.log.count("session ended: shut down in relay after ") == 1
    assert stopped.log.count("session ended: shut down before login after ") == 2


# Shutdown with a session that finishes within the grace period


@dataclass
class Drained:
    """What a logged-in client and new clients saw during a long grace period."""

    refused: bool
    running_when_refused: bool
    stat: bytes
    retrieved: bytes
    expected: bytes
    quit: bytes
    exit_code: int | None
    log: str


@pytest.fixture(scope="module")
def drained(
    server: DovecotServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Drained]:
    workdir = tmp_path_factory.mktemp("shutdown-grace")
    appliance = start_appliance(server, workdir, LONG_GRACE)
    try:
        wire = pop3_login(appliance, server)
        appliance.send_signal(signal.SIGTERM)
        refused = wait_until_refused(appliance.port("pop3"))
        running_when_refused = appliance.process.poll() is None

        stat = wire.command(b"STAT")
        status = wire.command(f"RETR {LARGE_MESSAGE_INDEX + 1}".encode())
        assert status.startswith(b"+OK"), status
        retrieved = b"".join(wire.multiline_body())
        quit_reply = wire.command(b"QUIT")
        wire.close()
        exit_code = appliance.process.wait(TIMEOUT)
    finally:
        appliance.stop()
    yield Drained(
        refused=refused,
        running_when_refused=running_when_refused,
        stat=stat,
        retrieved=retrieved,
        expected=stuff(server.message_bytes(USER, LARGE_MESSAGE_INDEX)),
        quit=quit_reply,
        exit_code=exit_code,
        log=appliance.log_text(),
    )


def test_listener_refuses_during_grace(drained):
    assert drained.refused
    assert drained.running_when_refused


def test_session_in_grace_completes_normally(drained):
    assert drained.stat.startswith(b"+OK ")
    assert drained.retrieved == drained.expected
    assert drained.quit.startswith(b"+OK")


def test_no_session_closed_at_deadline(drained):
    assert "sessions closed at the deadline: 0" in drained.log


def test_exit_code_zero_after_grace(drained):
    assert drained.exit_code == 0
