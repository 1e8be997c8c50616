"""Upstreams that fail TLS or misbehave around STARTTLS: no credentials may reach them.

Real Dovecot servers present an untrusted, a wrong-host and an expired certificate, and
scripted IMAP and POP3 servers send a PREAUTH greeting, omit STARTTLS/STLS, send bytes
between their STARTTLS/STLS reply and the handshake, or reply under a wrong tag. In every
case the client gets `* BYE [UNAVAILABLE]` (IMAP) or `-ERR [SYS/TEMP]` (POP3). The server
never receives a login command, except for the server that replies to the login itself
under a wrong tag, where the test checks that the BYE comes at once. Well-behaved
scripted servers show that the same setup does deliver the login, after TLS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.appliance import ApplianceProcess, listener_config, upstream_config
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer
from tests.support.scripted_server import (
    LineClient,
    Script,
    ScriptedServer,
    Step,
    converse,
)

HOST = "127.0.0.1"
TIMEOUT = 30.0
LOG_TIMEOUT = 15.0
# OpenSSL's verify messages, as Python's ssl module reports them.
VERIFY_MESSAGES = {
    "untrusted": "unable to get local issuer certificate",
    "wrong_host": "Hostname mismatch",
    "expired": "certificate has expired",
}
CERT_CASES = [
    (cert, mode) for cert in VERIFY_MESSAGES for mode in ("implicit", "starttls")
]


@dataclass(frozen=True)
class ScriptedCase:
    """A scripted upstream, the TLS mode the proxy uses toward it, and the log reason."""

    script: Script
    upstream_tls: str
    log_text: str


SCRIPTED_CASES = {
    "imap-bytes-after-starttls": ScriptedCase(
        Script(after_starttls_reply=b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),
        "starttls",
        "sent data after its STARTTLS reply",
    ),
    "imap-preauth-starttls": ScriptedCase(
        Script(greeting=b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] Logged in\r\n"),
        "starttls",
        "greeting is PREAUTH",
    ),
    "imap-preauth-plain": ScriptedCase(
        Script(greeting=b"* PREAUTH Logged in\r\n", offer_starttls=False),
        "none",
        "greeting is PREAUTH",
    ),
    "imap-starttls-wrong-tag": ScriptedCase(
        Script(starttls_reply_tag=b"ZZZ"), "starttls", "under a tag the proxy did not send"
    ),
    "imap-no-starttls": ScriptedCase(
        Script(offer_starttls=False), "starttls", "does not offer STARTTLS"
    ),
    "pop3-bytes-after-stls": ScriptedCase(
        Script(protocol="pop3", after_starttls_reply=b"+OK injected\r\n"),
        "starttls",
        "sent data after its STLS reply",
    ),
    "pop3-no-stls": ScriptedCase(
        Script(protocol="pop3", offer_starttls=False),
        "starttls",
        "does not offer STLS",
    ),
    "imap-login-wrong-tag": ScriptedCase(
        Script(offer_starttls=False, login_reply_tag=b"ZZZ"),
        "none",
        "under a tag the proxy did not send",
    ),
    "imap-well-behaved": ScriptedCase(
        Script(login_capabilities=("IMAP4rev1", "STARTTLS", "LOGINDISABLED", "IDLE")),
        "starttls",
        "login succeeded",
    ),
    "pop3-well-behaved": ScriptedCase(
        Script(protocol="pop3"), "starttls", "login succeeded"
    ),
}
# Cases where the upstream misbehaves only after it received the login.
AFTER_LOGIN_CASES = {"imap-login-wrong-tag"}
FAILING_CASES = [
    name
    for name in SCRIPTED_CASES
    if "well-behaved" not in name and name not in AFTER_LOGIN_CASES
]
UNAVAILABLE_GREETINGS = {"imap": b"* BYE [UNAVAILABLE]", "pop3": b"-ERR [SYS/TEMP]"}
LOGIN_ATTEMPTS = {
    "imap": b"a1 LOGIN alice secret\r\n",
    "pop3": b"USER alice\r\nPASS secret\r\n",
}


@pytest.fixture(scope="module")
def bad_cert_servers(dovecot_factory) -> dict[str, DovecotServer]:
    return {cert: dovecot_factory(tls="both", cert=cert) for cert in VERIFY_MESSAGES}


@pytest.fixture(scope="module")
def scripted_servers(pki: TestPKI) -> Iterator[dict[str, ScriptedServer]]:
    cert = pki.issue_server_cert("scripted-imap-upstream")
    servers = {
        name: ScriptedServer(case.script, cert=cert)
        for name, case in SCRIPTED_CASES.items()
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def proxy(
    bad_cert_servers, scripted_servers, pki: TestPKI, tmp_path_factory
) -> Iterator[ApplianceProcess]:
    listeners = {}
    upstreams = {}
    for cert, mode in CERT_CASES:
        name = f"{cert}-{mode}".replace("_", "-")
        upstreams[name] = upstream_config(bad_cert_servers[cert], mode, "imap")
        listeners[name] = listener_config("imap", name)
    for name, case in SCRIPTED_CASES.items():
        upstreams[name] = {
            "host": HOST,
            "port": scripted_servers[name].port,
            "tls": case.upstream_tls,
            "ca_file": str(pki.ca_file),
        }
        listeners[name] = listener_config(case.script.protocol, name)
    config = {"listeners": listeners, "upstreams": upstreams}
    process = ApplianceProcess(config, tmp_path_factory.mktemp("upstream-tls-failures"))
    with process:
        # The start-up port checks open one session per listener; waiting for their ends
        # keeps their log lines out of the counts that the tests take.
        for name in listeners:
            wait_for_log(process, name, "session ended")
        yield process


def listener_log(proxy: ApplianceProcess, listener: str) -> list[str]:
    marker = f"listener={listener}] "
    return [line for line in proxy.log_text().splitlines() if marker in line]


def count_log(proxy: ApplianceProcess, listener: str, text: str) -> int:
    return sum(text in line for line in listener_log(proxy, listener))


def wait_for_log(
    proxy: ApplianceProcess, listener: str, text: str, count: int = 1
) -> None:
    """Wait until `count` lines of the listener's log contain `text`."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        if count_log(proxy, listener, text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(
        f"fewer than {count} log lines with {text!r}:\n{proxy.log_text()}"
    )


def read_new_text(path: Path, offset: int) -> str:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def greet_and_try_login(proxy: ApplianceProcess, listener: str) -> bytes:
    """Return the greeting, then try a login anyway and read until the proxy closes."""
    protocol = proxy.config["listeners"][listener]["protocol"]
    with LineClient(HOST, proxy.port(listener), timeout=TIMEOUT) as client:
        greeting = client.read_line()
        try:
            client.send(LOGIN_ATTEMPTS[protocol])
            client.read_until_closed()
        except OSError:
            pass
    return greeting


@pytest.mark.parametrize(("cert", "mode"), CERT_CASES)
def test_bad_certificate_gets_no_login(proxy, bad_cert_servers, cert, mode):
    server = bad_cert_servers[cert]
    listener = f"{cert}-{mode}".replace("_", "-")
    dovecot_log_offset = server.log_file.stat().st_size
    failures_before = count_log(proxy, listener, "certificate verification failed")

    greeting = greet_and_try_login(proxy, listener)
    assert greeting.startswith(b"* BYE [UNAVAILABLE]"), greeting

    wait_for_log(
        proxy, listener, "certificate verification failed", failures_before + 1
    )
    reason = listener_log(proxy, listener)
    assert any(VERIFY_MESSAGES[cert] in line for line in reason), reason

    # Dovecot logs the end of each connection, and no login can follow on a closed one.
    deadline = time.monotonic() + LOG_TIMEOUT
    while "Disconnected" not in read_new_text(server.log_file, dovecot_log_offset):
        assert time.monotonic() < deadline, "Dovecot logged no disconnect"
        time.sleep(0.05)
    dovecot_log = read_new_text(server.log_file, dovecot_log_offset)
    assert "Login: " not in dovecot_log, dovecot_log
    assert "auth failed" not in dovecot_log, dovecot_log
    assert "passwd-file(" not in dovecot_log, dovecot_log


@pytest.mark.parametrize("name", FAILING_CASES)
def test_misbehaving_upstream_gets_no_login(proxy, scripted_servers, name):
    server = scripted_servers[name]
    case = SCRIPTED_CASES[name]
    connections_before = len(server.records)
    reasons_before = count_log(proxy, name, case.log_text)

    greeting = greet_and_try_login(proxy, name)
    assert greeting.startswith(UNAVAILABLE_GREETINGS[case.script.protocol]), greeting

    wait_for_log(proxy, name, case.log_text, reasons_before + 1)
    assert server.wait_for_connections(connections_before + 1)
    assert server.wait_until_all_closed()
    assert not server.credentials_received(), [r.commands for r in server.records]
    assert b"secret" not in server.received_bytes()


def test_login_reply_wrong_tag_ends_session(proxy, scripted_servers):
    name = "imap-login-wrong-tag"
    reasons_before = count_log(proxy, name, SCRIPTED_CASES[name].log_text)
    started = time.monotonic()
    with LineClient(HOST, proxy.port(name), timeout=TIMEOUT) as client:
        greeting = client.read_line()
        client.send(b"a1 LOGIN alice secret\r\n")
        reply = client.read_until_closed()
    elapsed = time.monotonic() - started

    assert greeting.startswith(b"* OK"), greeting
    assert reply.startswith(b"* BYE [UNAVAILABLE]"), reply
    # The default connect_timeout is 10 s, so an error at once ends well before it.
    assert elapsed < 5, elapsed
    wait_for_log(proxy, name, SCRIPTED_CASES[name].log_text, reasons_before + 1)


def test_well_behaved_imap_upstream_gets_login(proxy, scripted_servers):
    server = scripted_servers["imap-well-behaved"]
    connections_before = len(server.records)
    with LineClient(HOST, proxy.port("imap-well-behaved"), timeout=TIMEOUT) as client:
        greeting = client.read_line()
        assert greeting.startswith(b"* OK"), greeting
        reply = converse(client, [Step(b"a1 LOGIN alice secret\r\n", b"a1 OK")])[-1]
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])

    assert reply.startswith(b"a1 OK [CAPABILITY "), reply
    assert b"STARTTLS" not in reply
    assert b"LOGINDISABLED" not in reply

    assert server.wait_until_all_closed()
    record = server.records[connections_before]
    assert record.tls_active
    assert record.commands.index("STARTTLS") < record.commands.index("AUTHENTICATE")


def test_well_behaved_pop3_upstream_gets_login(proxy, scripted_servers):
    server = scripted_servers["pop3-well-behaved"]
    connections_before = len(server.records)
    with LineClient(HOST, proxy.port("pop3-well-behaved"), timeout=TIMEOUT) as client:
        greeting = client.read_line()
        assert greeting.startswith(b"+OK"), greeting
        client.send(b"USER alice\r\n")
        assert client.read_line().startswith(b"+OK")
        client.send(b"PASS secret\r\n")
        reply = client.read_line()
        client.send(b"QUIT\r\n")
        client.read_until_closed()

    assert reply.startswith(b"+OK"), reply
    assert server.wait_until_all_closed()
    record = server.records[connections_before]
    assert record.tls_active
    assert record.commands.index("STLS") < record.commands.index("AUTH")
