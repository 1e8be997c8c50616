"""Security properties of IMAP sessions before login, through the real appliance.

Covers the capabilities that clients see before and after TLS, the refusal of logins
before STARTTLS, commands injected behind STARTTLS, failed logins and the absence of
credentials from a TRACE-level log. The Dovecot server is private to this module,
because failed logins make Dovecot delay later logins from the same address.
"""

from __future__ import annotations

import base64
import re
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.support.appliance import ApplianceProcess, dovecot_config
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer
from tests.support.scripted_server import (
    LineClient,
    Step,
    converse,
    imap_login_exchanges,
    imap_quoted,
)

HOST = "127.0.0.1"
TIMEOUT = 30.0
LOG_TIMEOUT = 15.0
# Listener name: (client-side TLS, upstream TLS).
LISTENERS = {
    "plain": ("none", "starttls"),
    "starttls": ("starttls", "starttls"),
    "implicit": ("implicit", "implicit"),
    "injection": ("starttls", "implicit"),
}
WRONG_PASSWORD = 'wrong "pass\\ word'


@pytest.fixture(scope="module")
def mail_server(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="both", fresh=True)


@pytest.fixture(scope="module")
def proxy(mail_server, pki: TestPKI, tmp_path_factory) -> Iterator[ApplianceProcess]:
    cert = pki.issue_server_cert("imap-security-module")
    listeners = {name: ("imap", *modes) for name, modes in LISTENERS.items()}
    # A certificate on the plain listener too, so that the check that it offers no
    # STARTTLS cannot pass merely for lack of one.
    config = dovecot_config(
        mail_server, listeners, cert, cert_on_plain=True, logging={"level": "TRACE"}
    )
    with ApplianceProcess(config, tmp_path_factory.mktemp("imap-security")) as process:
        yield process


@pytest.fixture(scope="module")
def tls_context(pki: TestPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def connect(
    proxy: ApplianceProcess, listener: str, context: ssl.SSLContext
) -> LineClient:
    """Connect to a listener, TLS first on an implicit one, and return the client."""
    implicit = LISTENERS[listener][0] == "implicit"
    return LineClient(
        HOST,
        proxy.port(listener),
        context=context if implicit else None,
        timeout=TIMEOUT,
    )


def read_greeting(client: LineClient) -> bytes:
    greeting = client.read_line()
    assert greeting.startswith(b"* OK"), greeting
    return greeting


def start_tls(client: LineClient, context: ssl.SSLContext) -> None:
    converse(client, [Step(b"s1 STARTTLS\r\n", b"s1 OK")])
    client.start_tls(context)


def greeting_capabilities(greeting: bytes) -> list[bytes]:
    match = re.match(rb"\* OK \[CAPABILITY ([^\]]*)\]", greeting)
    assert match is not None, greeting
    return match.group(1).upper().split()


def capability_command(client: LineClient, tag: bytes = b"c1") -> list[bytes]:
    replies = converse(client, [Step(tag + b" CAPABILITY\r\n", tag + b" OK")])
    lines = [reply for reply in replies if reply.upper().startswith(b"* CAPABILITY ")]
    assert len(lines) == 1, replies
    return lines[0].upper().split()[2:]


def listener_log(proxy: ApplianceProcess, listener: str) -> list[str]:
    marker = f"listener={listener}] "
    return [line for line in proxy.log_text().splitlines() if marker in line]


def wait_for_log(
    proxy: ApplianceProcess, listener: str, text: str, count: int = 1
) -> None:
    """Wait until `count` lines of the listener's log contain `text`."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        if sum(text in line for line in listener_log(proxy, listener)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(
        f"fewer than {count} log lines with {text!r}:\n{proxy.log_text()}"
    )


# Capabilities


@pytest.mark.parametrize(
    ("listener", "offered"), [("plain", False), ("starttls", True), ("implicit", False)]
)
def test_greeting_offers_starttls_only_before_tls(
    proxy, tls_context, listener, offered
):
    with connect(proxy, listener, tls_context) as client:
        caps = greeting_capabilities(read_greeting(client))
        assert (b"STARTTLS" in caps) == offered, caps
        assert (b"STARTTLS" in capability_command(client)) == offered


@pytest.mark.parametrize(
    ("listener", "disabled"),
    [("plain", False), ("starttls", True), ("implicit", False)],
)
def test_logindisabled_only_before_starttls(proxy, tls_context, listener, disabled):
    with connect(proxy, listener, tls_context) as client:
        caps = greeting_capabilities(read_greeting(client))
        assert (b"LOGINDISABLED" in caps) == disabled, caps
        assert (b"LOGINDISABLED" in capability_command(client)) == disabled
        assert (b"AUTH=PLAIN" in caps) == (not disabled), caps


def test_capabilities_after_starttls_allow_login(proxy, tls_context):
    with connect(proxy, "starttls", tls_context) as client:
        read_greeting(client)
        start_tls(client, tls_context)
        caps = capability_command(client)
        assert b"STARTTLS" not in caps
        assert b"LOGINDISABLED" not in caps
        assert b"AUTH=PLAIN" in caps


@pytest.mark.parametrize(
    "command",
    [
        b"a1 LOGIN alice secret\r\n",
        b"a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"a1 AUTHENTICATE PLAIN\r\n",
        b"a1 AUTHENTICATE LOGIN\r\n",
    ],
    ids=["login", "plain-initial-response", "plain", "login-mechanism"],
)
def test_login_before_starttls_privacyrequired(proxy, tls_context, command):
    with connect(proxy, "starttls", tls_context) as client:
        read_greeting(client)
        client.send(command)
        reply = client.read_line()
        assert reply.startswith(b"a1 NO [PRIVACYREQUIRED]"), reply


def test_login_ok_lists_capabilities_without_starttls(proxy, mail_server, tls_context):
    password = mail_server.users["alice"].encode()
    with connect(proxy, "starttls", tls_context) as client:
        read_greeting(client)
        start_tls(client, tls_context)
        steps = imap_login_exchanges(b"alice", password)["login-quoted"]
        reply = converse(client, steps)[-1]
        assert reply.startswith(b"a1 OK [CAPABILITY "), reply
        assert b"STARTTLS" not in reply.upper()
        assert b"LOGINDISABLED" not in reply.upper()


@pytest.mark.parametrize("listener", ["plain", "implicit"])
def test_starttls_without_offer_rejected(proxy, tls_context, listener):
    with connect(proxy, listener, tls_context) as client:
        read_greeting(client)
        converse(client, [Step(b"a1 STARTTLS\r\n", b"a1 BAD")])


def test_second_starttls_rejected(proxy, tls_context):
    with connect(proxy, "starttls", tls_context) as client:
        read_greeting(client)
        start_tls(client, tls_context)
        converse(client, [Step(b"a1 STARTTLS\r\n", b"a1 BAD")])


# STARTTLS command injection (pipelined plaintext must not run after the upgrade)


def test_command_after_starttls_never_runs(proxy, tls_context):
    ended_before = sum(
        "session ended" in line for line in listener_log(proxy, "injection")
    )
    with connect(proxy, "injection", tls_context) as client:
        read_greeting(client)
        client.send(b"a1 STARTTLS\r\na2 LOGIN alice secret\r\n")
        reply = client.read_line()
        assert reply.startswith(b"a1 OK"), reply
        client.start_tls(tls_context)

        replies = converse(client, [Step(b"a3 NOOP\r\n", b"a3 OK")])
        client.send(b"a4 LOGOUT\r\n")
        replies += [client.read_until_closed()]
    assert not any(b"a2 " in reply for reply in replies), replies

    wait_for_log(proxy, "injection", "session ended", ended_before + 1)
    log = listener_log(proxy, "injection")
    assert not any(re.search(r"login \w+: client ", line) for line in log), log


# Failed logins


def test_wrong_password_then_login_succeeds(proxy, mail_server, tls_context):
    password = mail_server.users["carol"].encode()
    with connect(proxy, "plain", tls_context) as client:
        read_greeting(client)
        wrong = imap_quoted(WRONG_PASSWORD.encode())
        converse(client, [Step(b"a1 LOGIN carol " + wrong + b"\r\n", b"a1 NO")])
        # Dovecot delays the next login from this address after a failure.
        converse(
            client,
            [Step(b"a2 LOGIN carol " + imap_quoted(password) + b"\r\n", b"a2 OK")],
        )
        converse(client, [Step(b"a3 SELECT INBOX\r\n", b"a3 OK")])


# Credentials in the log (this test runs last, so its check covers the whole module)


def secret_forms(user: bytes, password: bytes) -> list[bytes]:
    """Return the forms in which a password could leak: raw, quoted and SASL base64."""
    return [
        password,
        imap_quoted(password),
        base64.b64encode(password),
        base64.b64encode(b"\0" + user + b"\0" + password),
    ]


def count_logins(log: str, result: str, user: str) -> int:
    """Count the log lines of login outcome `result` for `user`."""
    pattern = re.compile(rf'login {result}: client \S+ port \d+ user "{user}"$')
    return sum(pattern.search(line) is not None for line in log.splitlines())


def test_trace_log_contains_no_credentials(proxy, mail_server, tls_context):
    bob_password = mail_server.users["bob"].encode()
    carol_password = mail_server.users["carol"].encode()
    logins_before = count_logins(proxy.log_text(), "succeeded", "bob")
    exchanges = imap_login_exchanges(b"bob", bob_password)
    for listener in ("plain", "starttls"):
        for steps in exchanges.values():
            with connect(proxy, listener, tls_context) as client:
                read_greeting(client)
                if listener == "starttls":
                    start_tls(client, tls_context)
                converse(client, steps)
    with connect(proxy, "starttls", tls_context) as client:
        read_greeting(client)
        refused = b"a1 LOGIN bob " + imap_quoted(bob_password) + b"\r\n"
        converse(client, [Step(refused, b"a1 NO [PRIVACYREQUIRED]")])
    with connect(proxy, "plain", tls_context) as client:
        read_greeting(client)
        # Invalid base64 takes the error path with the password as the SASL response.
        steps = [
            Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"),
            Step(bob_password + b"\r\n", b"a1 BAD"),
        ]
        converse(client, steps)
    with connect(proxy, "implicit", tls_context) as client:
        read_greeting(client)
        wrong = imap_quoted(WRONG_PASSWORD.encode())
        converse(client, [Step(b"a1 LOGIN carol " + wrong + b"\r\n", b"a1 NO")])
        converse(
            client,
            [
                Step(
                    b"a2 LOGIN carol " + imap_quoted(carol_password) + b"\r\n", b"a2 OK"
                )
            ],
        )

    expected_logins = logins_before + 2 * len(exchanges)
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        log = proxy.log_text()
        if count_logins(log, "succeeded", "bob") >= expected_logins:
            break
        time.sleep(0.05)
    log_bytes = proxy.log_file.read_bytes()
    log_text = log_bytes.decode(errors="replace")
    assert count_logins(log_text, "succeeded", "bob") >= expected_logins
    assert count_logins(log_text, "failed", "carol") >= 1
    secrets = [
        *secret_forms(b"bob", bob_password),
        *secret_forms(b"carol", carol_password),
        *secret_forms(b"carol", WRONG_PASSWORD.encode()),
    ]
    for secret in secrets:
        assert secret not in log_bytes, f"log contains a credential form {secret!r}"
