"""The same TLS paths work on asyncio's standard loop and on uvloop.

Implicit TLS on the client side, STARTTLS on both sides and a large relayed message are the
paths where the two loops' transports differ most (early reads, start_tls, flow control).
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.appliance import ApplianceProcess, dovecot_config

LARGE_INDEX = 3


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def appliance(request, dovecot, pki, tmp_path_factory) -> Iterator[ApplianceProcess]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    cert = pki.issue_server_cert(f"loops-{request.param}")
    listeners = {
        "imaps": ("imap", "implicit", "starttls"),
        "imap": ("imap", "starttls", "implicit"),
        "pop3s": ("pop3", "implicit", "starttls"),
        "plain": ("imap", "none", "implicit"),
    }
    limits = {"shutdown_grace_period": 1}
    config = dovecot_config(dovecot, listeners, cert, limits=limits)
    workdir = Path(tmp_path_factory.mktemp(f"loop-{request.param}"))
    process = ApplianceProcess(config, workdir, env={"APPLIANCE_EVENT_LOOP": request.param})
    with process:
        yield process


@pytest.fixture(scope="module")
def client_context(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def test_loop_in_use_is_logged(appliance: ApplianceProcess) -> None:
    expected = appliance.extra_env["APPLIANCE_EVENT_LOOP"]

    assert expected in appliance.log_text()


def test_implicit_imap_fetches_large_message(appliance, dovecot, client_context) -> None:
    client = imaplib.IMAP4_SSL(
        "localhost", appliance.port("imaps"), ssl_context=client_context, timeout=30
    )
    client.login("alice", dovecot.users["alice"])
    client.select("INBOX", readonly=True)
    _, data = client.fetch(str(LARGE_INDEX + 1), "(BODY.PEEK[])")
    client.logout()

    assert data[0][1] == dovecot.message_bytes("alice", LARGE_INDEX)


def test_starttls_imap_logs_in(appliance, dovecot, client_context) -> None:
    client = imaplib.IMAP4("localhost", appliance.port("imap"), timeout=30)
    client.starttls(client_context)
    status, _ = client.login("bob", dovecot.users["bob"])
    client.logout()

    assert status == "OK"


def test_implicit_pop3_retrieves_large_message(appliance, dovecot, client_context) -> None:
    client = poplib.POP3_SSL(
        "localhost", appliance.port("pop3s"), context=client_context, timeout=30
    )
    client.user("alice")
    client.pass_(dovecot.users["alice"])
    _, lines, _ = client.retr(LARGE_INDEX + 1)
    client.quit()
    expected = dovecot.message_bytes("alice", LARGE_INDEX)

    assert b"\r\n".join(lines) + b"\r\n" == expected


def test_client_gone_after_login_is_clean(appliance, dovecot) -> None:
    """A client that closes right after sending LOGIN ends its session without an error."""
    password = dovecot.users["alice"].encode()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", appliance.port("plain")), 10) as sock:
            sock.recv(4096)
            sock.sendall(b"a1 LOGIN alice " + password + b"\r\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ended = [
            line
            for line in appliance.log_text().splitlines()
            if "listener=plain]" in line and "session ended" in line
        ]
        if len(ended) >= 5:
            break
        time.sleep(0.2)

    assert len(ended) >= 5
    assert "internal error" not in appliance.log_text()
