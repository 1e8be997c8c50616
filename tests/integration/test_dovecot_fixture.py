"""Checks of the throwaway Dovecot itself, with the standard library's clients."""

from __future__ import annotations

import imaplib
import os
import poplib
import shlex
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.dovecot import (
    LARGE_MESSAGE_INDEX,
    LARGE_MESSAGE_MIN_SIZE,
    SMALL_MESSAGE_COUNT,
    DovecotError,
    DovecotServer,
    build_parser,
    check_message,
    numbered_users,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10
PORTS_BY_TLS = {
    "both": ("imap", "imaps", "pop3", "pop3s"),
    "starttls": ("imap", "pop3"),
    "implicit": ("imaps", "pop3s"),
    "none": ("imap", "pop3"),
}
IMAP_CASES = [
    (tls, port)
    for tls, ports in PORTS_BY_TLS.items()
    for port in ports
    if "imap" in port
]
POP3_CASES = [
    (tls, port)
    for tls, ports in PORTS_BY_TLS.items()
    for port in ports
    if "pop3" in port
]
ALL_INDEXES = [*range(SMALL_MESSAGE_COUNT), LARGE_MESSAGE_INDEX]
# OpenSSL verify codes: X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_HOSTNAME_MISMATCH,
# X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY.
EXPECTED_VERIFY_CODES = {"expired": 10, "wrong_host": 62, "untrusted": 20}


def client_context(server: DovecotServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca_file))


@contextmanager
def imap_login(
    server: DovecotServer, port_name: str, user: str = "alice"
) -> Iterator[imaplib.IMAP4]:
    """Log in over IMAP, upgrading a plain port with STARTTLS when TLS is on."""
    port = server.ports[port_name]
    if port_name == "imaps":
        client = imaplib.IMAP4_SSL(
            server.host, port, ssl_context=client_context(server), timeout=TIMEOUT
        )
    else:
        client = imaplib.IMAP4(server.host, port, timeout=TIMEOUT)
        if server.tls != "none":
            client.starttls(ssl_context=client_context(server))
    try:
        client.login(user, server.users[user])
        yield client
    finally:
        client.logout()


@contextmanager
def pop3_login(
    server: DovecotServer, port_name: str, user: str = "alice"
) -> Iterator[poplib.POP3]:
    """Log in over POP3, upgrading a plain port with STLS when TLS is on."""
    port = server.ports[port_name]
    if port_name == "pop3s":
        client = poplib.POP3_SSL(
            server.host, port, context=client_context(server), timeout=TIMEOUT
        )
    else:
        client = poplib.POP3(server.host, port, timeout=TIMEOUT)
        if server.tls != "none":
            client.stls(context=client_context(server))
    try:
        client.user(user)
        client.pass_(server.users[user])
        yield client
    finally:
        client.quit()


def imap_fetch(client: imaplib.IMAP4, index: int) -> bytes:
    status, data = client.fetch(str(index + 1), "(BODY.PEEK[])")
    assert status == "OK"
    return data[0][1]


def pop3_retr(client: poplib.POP3, index: int) -> bytes:
    # poplib strips CRLF from every line and undoes the dot-stuffing.
    _, lines, _ = client.retr(index + 1)
    return b"".join(line + b"\r\n" for line in lines)


@pytest.mark.parametrize("tls", PORTS_BY_TLS)
def test_enabled_ports_follow_tls_mode(dovecot_factory, tls):
    server = dovecot_factory(tls=tls)
    assert sorted(server.enabled_ports) == sorted(PORTS_BY_TLS[tls])


def test_factory_shares_equal_options(dovecot_factory, dovecot):
    assert dovecot_factory() is dovecot
    assert dovecot_factory(tls="both", cert="valid") is dovecot


def test_factory_fresh_starts_new_server(dovecot_factory, dovecot):
    assert dovecot_factory(fresh=True) is not dovecot


@pytest.mark.parametrize(("tls", "port_name"), IMAP_CASES)
def test_imap_fetch_matches_stored_bytes(dovecot_factory, tls, port_name):
    server = dovecot_factory(tls=tls)
    with imap_login(server, port_name) as client:
        status, data = client.select("INBOX", readonly=True)
        assert status == "OK"
        assert int(data[0]) == len(ALL_INDEXES)
        for index in ALL_INDEXES:
            assert imap_fetch(client, index) == server.message_bytes("alice", index)


@pytest.mark.parametrize(("tls", "port_name"), POP3_CASES)
def test_pop3_retr_matches_stored_bytes(dovecot_factory, tls, port_name):
    server = dovecot_factory(tls=tls)
    with pop3_login(server, port_name) as client:
        count, _ = client.stat()
        assert count == len(ALL_INDEXES)
        for index in ALL_INDEXES:
            assert pop3_retr(client, index) == server.message_bytes("alice", index)


@pytest.mark.parametrize("tls", ["both", "starttls", "none"])
def test_plain_ports_offer_starttls_with_tls(dovecot_factory, tls):
    server = dovecot_factory(tls=tls)
    imap = imaplib.IMAP4(server.host, server.ports["imap"], timeout=TIMEOUT)
    pop3 = poplib.POP3(server.host, server.ports["pop3"], timeout=TIMEOUT)
    try:
        assert ("STARTTLS" in imap.capabilities) == (tls != "none")
        assert ("STLS" in pop3.capa()) == (tls != "none")
    finally:
        imap.logout()
        pop3.quit()


def test_large_message_is_multi_megabyte(dovecot):
    message = dovecot.message_bytes("alice", LARGE_MESSAGE_INDEX)
    assert len(message) >= LARGE_MESSAGE_MIN_SIZE
    assert b"\r\n.\r\n" in message
    assert b"\r\r\n" in message
    assert max(len(line) for line in message.split(b"\r\n")) == 998


def test_password_with_quote_backslash_space(dovecot):
    password = dovecot.users["bob"]
    assert set(' "\\') <= set(password)
    with imap_login(dovecot, "imaps", user="bob") as client:
        client.select("INBOX", readonly=True)
        assert imap_fetch(client, 0) == dovecot.message_bytes("bob", 0)
    with pop3_login(dovecot, "pop3s", user="bob") as client:
        assert pop3_retr(client, 0) == dovecot.message_bytes("bob", 0)


@pytest.mark.parametrize("host_name", ["localhost", "127.0.0.1", "::1"])
def test_valid_cert_verifies(dovecot, host_name):
    address = (dovecot.host, dovecot.ports["imaps"])
    context = client_context(dovecot)
    with (
        socket.create_connection(address, timeout=TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname=host_name) as tls_sock,
    ):
        assert tls_sock.recv(4) == b"* OK"


@pytest.mark.parametrize("cert", sorted(EXPECTED_VERIFY_CODES))
def test_bad_cert_fails_verification(dovecot_factory, cert):
    server = dovecot_factory(tls="implicit", cert=cert)
    context = client_context(server)
    for port_name in ("imaps", "pop3s"):
        address = (server.host, server.ports[port_name])
        with (
            socket.create_connection(address, timeout=TIMEOUT) as sock,
            pytest.raises(ssl.SSLCertVerificationError) as caught,
        ):
            context.wrap_socket(sock, server_hostname="localhost")
        assert caught.value.verify_code == EXPECTED_VERIFY_CODES[cert]


def test_deliver_adds_message_to_inbox(dovecot_factory):
    server = dovecot_factory(tls="none", fresh=True)
    message = b"Subject: delivered\r\n\r\nline\r\n.dot line\r\n"
    index = server.deliver("alice", message)
    assert index == len(ALL_INDEXES)
    with imap_login(server, "imap") as client:
        client.select("INBOX", readonly=True)
        assert imap_fetch(client, index) == message
    with pop3_login(server, "pop3") as client:
        assert pop3_retr(client, index) == message


def test_wrong_password_fails_login(dovecot_factory):
    server = dovecot_factory(tls="none", fresh=True)
    client = imaplib.IMAP4(server.host, server.ports["imap"], timeout=TIMEOUT)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("carol", "not-" + server.users["carol"])
    finally:
        client.logout()


def test_extra_users_can_log_in(dovecot_factory):
    users = numbered_users(200)
    server = dovecot_factory(tls="none", extra_users=users, fresh=True)
    last_user = max(users)
    with pop3_login(server, "pop3", user=last_user) as client:
        assert pop3_retr(client, 0) == server.message_bytes(last_user, 0)


def test_stop_leaves_no_processes_or_files(dovecot_backend):
    if dovecot_backend != "local":
        pytest.skip("checks processes of the local backend")
    server = DovecotServer(tls="both")
    server.start()
    root = server.root
    master_pid = server.pid
    child_pids = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent_pid(entry) == master_pid
    ]
    assert child_pids
    server.stop()
    assert not root.exists()
    for pid in [master_pid, *child_pids]:
        # A zombie has exited and only waits for init to reap it.
        assert _process_state(pid) in (None, "Z"), f"process {pid} still runs"


def _stat_fields(proc_entry: Path) -> list[str] | None:
    try:
        stat = (proc_entry / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _parent_pid(proc_entry: Path) -> int | None:
    fields = _stat_fields(proc_entry)
    return int(fields[1]) if fields else None


def _process_state(pid: int) -> str | None:
    fields = _stat_fields(Path(f"/proc/{pid}"))
    return fields[0] if fields else None


def test_invalid_config_raises_log_tail(dovecot_backend):
    server = DovecotServer(backend=dovecot_backend, extra_config="no_such_setting = 1")
    with pytest.raises(DovecotError, match="no_such_setting"):
        server.start()
    assert server.root is None


def test_invalid_docker_network_raises():
    with pytest.raises(ValueError, match="APPLIANCE_TEST_DOVECOT_NETWORK"):
        DovecotServer(backend="docker", docker_network="bridge")


@pytest.mark.parametrize(
    ("backend", "network", "expected"),
    [
        ("local", None, "127.0.0.1"),
        ("docker", "publish", "*"),
        ("docker", "host", "127.0.0.1"),
    ],
)
def test_listen_address_by_network(monkeypatch, backend, network, expected):
    monkeypatch.delenv("APPLIANCE_TEST_DOVECOT_NETWORK", raising=False)
    server = DovecotServer(backend=backend, docker_network=network)
    assert server.listen_address == expected


def test_docker_network_from_environment(monkeypatch):
    monkeypatch.setenv("APPLIANCE_TEST_DOVECOT_NETWORK", "host")
    server = DovecotServer(backend="docker")
    assert server.docker_network == "host"


@pytest.mark.parametrize(
    "message", [b"bare LF\nline\r\n", b"no final line break", b"a\r\nb\n"]
)
def test_check_message_rejects_non_crlf(message):
    with pytest.raises(ValueError):
        check_message(message)


def test_cli_help_covers_every_option():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings


def test_cli_print_env_then_sigterm(dovecot_backend):
    if dovecot_backend != "local":
        pytest.skip("the CLI test starts the local backend")
    command = [sys.executable, "-m", "tests.support.dovecot", "--print-env"]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        env = {}
        for line in process.stdout:
            key, _, value = line.decode().rstrip("\n").partition("=")
            env[key] = "".join(shlex.split(value))
            if key == "DOVECOT_READY":
                break
        imap_port = int(env["DOVECOT_IMAP_PORT"])
        with socket.create_connection(
            ("127.0.0.1", imap_port), timeout=TIMEOUT
        ) as sock:
            assert sock.recv(4) == b"* OK"
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
    assert returncode == 0
    assert not os.path.exists(env["DOVECOT_ROOT"])
