"""IMAP sessions through the real appliance process to a real Dovecot.

One appliance process serves the whole module with one listener per combination of
client-side and upstream TLS mode, named `<client mode>-<upstream mode>`. The Dovecot
server is private to this module, because IDLE and APPEND add messages to INBOX.
"""

from __future__ import annotations

import base64
import imaplib
import random
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from appliance.proxy.session import (
    LOGIN_SIZE_ERROR,
    MAX_LOGIN_PASSWORD_SIZE,
    MAX_LOGIN_USER_SIZE,
)
from tests.support.appliance import (
    ApplianceProcess,
    dovecot_config,
    send_and_half_close,
)
from tests.support.certs import TestPKI
from tests.support.dovecot import LARGE_MESSAGE_INDEX, DovecotServer
from tests.support.scripted_server import (
    LineClient,
    Step,
    converse,
    imap_login_exchanges,
    imap_quoted,
)

HOST = "127.0.0.1"
TLS_MODES = ("none", "implicit", "starttls")
MATRIX = [f"{client}-{upstream}" for client in TLS_MODES for upstream in TLS_MODES]
TIMEOUT = 30.0
LOG_TIMEOUT = 15.0
APPEND_SIZE = 2 * 1024 * 1024
RAW_LISTENER = "none-starttls"


@pytest.fixture(scope="module")
def mail_server(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="both", fresh=True)


@pytest.fixture(scope="module")
def proxy(mail_server, pki: TestPKI, tmp_path_factory) -> Iterator[ApplianceProcess]:
    cert = pki.issue_server_cert("imap-proxy-module")
    listeners = {name: ("imap", *name.split("-")) for name in MATRIX}
    config = dovecot_config(mail_server, listeners, cert)
    with ApplianceProcess(config, tmp_path_factory.mktemp("imap-proxy")) as process:
        yield process


def client_context(pki: TestPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


@contextmanager
def imap_session(
    proxy: ApplianceProcess, pki: TestPKI, listener: str
) -> Iterator[imaplib.IMAP4]:
    """Connect to a listener with imaplib, with STARTTLS first where the listener needs it."""
    client_mode = proxy.config["listeners"][listener]["tls"]
    port = proxy.port(listener)
    if client_mode == "implicit":
        client = imaplib.IMAP4_SSL(
            HOST, port, ssl_context=client_context(pki), timeout=TIMEOUT
        )
    else:
        client = imaplib.IMAP4(HOST, port, timeout=TIMEOUT)
        if client_mode == "starttls":
            client.starttls(ssl_context=client_context(pki))
    try:
        yield client
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.abort, OSError):
            pass


def raw_client(proxy: ApplianceProcess, listener: str = RAW_LISTENER) -> LineClient:
    """Connect to a plain-text listener and read its greeting."""
    client = LineClient(HOST, proxy.port(listener), timeout=TIMEOUT)
    greeting = client.read_line()
    assert greeting.startswith(b"* OK"), greeting
    return client


def count_summaries(proxy: ApplianceProcess, listener: str, outcome: str) -> int:
    marker = f"listener={listener}] session ended: {outcome} "
    return sum(marker in line for line in proxy.log_text().splitlines())


def wait_for_summary(
    proxy: ApplianceProcess, listener: str, outcome: str, count: int
) -> str:
    """Wait for the `count`-th summary line with `outcome` and return it."""
    marker = f"listener={listener}] session ended: {outcome} "
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        lines = [line for line in proxy.log_text().splitlines() if marker in line]
        if len(lines) >= count:
            return lines[count - 1]
        time.sleep(0.05)
    raise AssertionError(
        f"no '{outcome}' session summary for {listener}:\n{proxy.log_text()}"
    )


def fetch_body(client: imaplib.IMAP4, message_set: str, *, uid: bool = False) -> bytes:
    if uid:
        status, data = client.uid("FETCH", message_set, "(BODY.PEEK[])")
    else:
        status, data = client.fetch(message_set, "(BODY.PEEK[])")
    assert status == "OK", data
    return data[0][1]


# TLS matrix


@pytest.mark.parametrize("listener", MATRIX)
def test_tls_matrix_fetches_large_message(proxy, mail_server, pki, listener):
    password = mail_server.users["alice"]
    with imap_session(proxy, pki, listener) as client:
        status, _ = client.login("alice", password)
        assert status == "OK"

        status, mailboxes = client.list()
        assert status == "OK"
        assert any(entry.endswith(b"INBOX") for entry in mailboxes), mailboxes

        status, _ = client.select("INBOX", readonly=True)
        assert status == "OK"

        body = fetch_body(client, str(LARGE_MESSAGE_INDEX + 1))
        assert body == mail_server.message_bytes("alice", LARGE_MESSAGE_INDEX)


@pytest.mark.parametrize("listener", MATRIX)
def test_tls_matrix_logs_both_tls_sides(proxy, mail_server, pki, listener):
    client_mode, upstream_mode = listener.split("-")
    # imaplib closes right after the LOGOUT reply, racing the server's close.
    summaries_before = count_summaries(proxy, listener, "closed by")
    with imap_session(proxy, pki, listener) as client:
        client.login("alice", mail_server.users["alice"])
    summary = wait_for_summary(proxy, listener, "closed by", summaries_before + 1)
    assert ("client tls TLSv1." in summary) == (client_mode != "none"), summary
    assert ("upstream tls TLSv1." in summary) == (upstream_mode != "none"), summary


# none-none is relayed by splice(2), the others through the TLS transports.
END_LISTENERS = ["none-none", "none-implicit", "implicit-none"]


def end_session(client: imaplib.IMAP4, ending: str) -> None:
    """Drop the connection, or send LOGOUT and close only after the server closed."""
    if ending == "logout":
        client.send(b"Z1 LOGOUT\r\n")
        while client.sock.recv(4096):
            pass
    client.shutdown()


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [("drop", "closed by client"), ("logout", "closed by upstream")],
)
@pytest.mark.parametrize("listener", END_LISTENERS)
def test_summary_names_side_that_ended(
    proxy, mail_server, pki, listener, ending, outcome
):
    before = count_summaries(proxy, listener, outcome)
    with imap_session(proxy, pki, listener) as client:
        client.login("alice", mail_server.users["alice"])
        end_session(client, ending)
    summary = wait_for_summary(proxy, listener, outcome, before + 1)
    assert f"session ended: {outcome} after " in summary


# Plain-text clients that half-close after their last command. none-none is relayed by
# splice(2), none-implicit through the transports to a TLS upstream, which cannot be
# sent a half-close.
HALF_CLOSE_LISTENERS = ["none-none", "none-implicit"]


def login_line(mail_server: DovecotServer) -> bytes:
    password = imap_quoted(mail_server.users["alice"].encode())
    return b"a LOGIN alice " + password + b"\r\n"


@pytest.mark.parametrize("listener", HALF_CLOSE_LISTENERS)
def test_half_close_keeps_replies(proxy, mail_server, listener):
    commands = login_line(mail_server) + b"b SELECT INBOX\r\nc LOGOUT\r\n"
    replies = send_and_half_close(proxy.port(listener), commands)
    assert b"\r\na OK " in replies, replies
    assert b"\r\nb OK [READ-WRITE]" in replies, replies
    assert b"\r\n* BYE " in replies, replies
    assert b"\r\nc OK " in replies, replies


def test_half_close_before_login_answered(proxy):
    replies = send_and_half_close(proxy.port("none-none"), b"a CAPABILITY\r\n")
    assert replies.startswith(b"* OK "), replies
    assert b"\r\n* CAPABILITY " in replies, replies
    assert replies.endswith(b"\r\na OK CAPABILITY completed\r\n"), replies


@pytest.mark.parametrize("listener", HALF_CLOSE_LISTENERS)
def test_half_close_without_logout_ends(proxy, mail_server, listener):
    """End the session without LOGOUT.

    A plain upstream receives the end of stream and closes. A TLS upstream is closed
    after a short silence.
    """
    before = count_summaries(proxy, listener, "closed by client")
    replies = send_and_half_close(
        proxy.port(listener), login_line(mail_server) + b"b SELECT INBOX\r\n"
    )
    assert b"\r\nb OK [READ-WRITE]" in replies, replies
    summary = wait_for_summary(proxy, listener, "closed by client", before + 1)
    assert "session ended: closed by client after " in summary


# curl as a second, independent client


CURL_CASES = {
    "plain": ("none-starttls", "imap", []),
    "implicit-tls": ("implicit-implicit", "imaps", []),
    "starttls": ("starttls-none", "imap", ["--ssl-reqd"]),
}


@pytest.mark.parametrize("case", sorted(CURL_CASES))
@pytest.mark.parametrize(
    ("uid", "index"), [(1, 0), (LARGE_MESSAGE_INDEX + 1, LARGE_MESSAGE_INDEX)]
)
def test_curl_fetches_exact_bytes(proxy, mail_server, pki, case, uid, index):
    listener, scheme, options = CURL_CASES[case]
    url = f"{scheme}://127.0.0.1:{proxy.port(listener)}/INBOX;UID={uid}"
    command = [
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        str(TIMEOUT),
        "--cacert",
        str(pki.ca_file),
        "--user",
        f"alice:{mail_server.users['alice']}",
        *options,
        url,
    ]
    result = subprocess.run(
        command, check=False, capture_output=True, timeout=TIMEOUT + 10
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == mail_server.message_bytes("alice", index)


# Login forms


@pytest.mark.parametrize("user", ["alice", "bob"])
@pytest.mark.parametrize("exchange", sorted(imap_login_exchanges(b"u", b"p")))
def test_login_form_reaches_mailbox(proxy, mail_server, user, exchange):
    password = mail_server.users[user].encode()
    steps = imap_login_exchanges(user.encode(), password)[exchange]
    with raw_client(proxy) as client:
        converse(client, steps)
        replies = converse(client, [Step(b"a2 SELECT INBOX\r\n", b"a2 OK")])
        assert any(re.match(rb"\* \d+ EXISTS", reply) for reply in replies), replies


def test_command_pipelined_after_login_runs(proxy, mail_server):
    password = imap_quoted(mail_server.users["alice"].encode())
    with raw_client(proxy) as client:
        client.send(b"a1 LOGIN alice " + password + b"\r\na2 SELECT INBOX\r\n")
        login_replies = client.read_until_tagged(b"a1")
        assert login_replies[-1].startswith(b"a1 OK"), login_replies
        select_replies = client.read_until_tagged(b"a2")
        assert select_replies[-1].startswith(b"a2 OK"), select_replies


def test_bob_password_through_imaplib(proxy, mail_server, pki):
    password = mail_server.users["bob"]
    assert set(' "\\') <= set(password)
    with imap_session(proxy, pki, "implicit-starttls") as client:
        status, _ = client.login("bob", password)
        assert status == "OK"
        client.select("INBOX", readonly=True)
        assert fetch_body(client, "1") == mail_server.message_bytes("bob", 0)


@pytest.mark.parametrize(
    "steps",
    [
        [Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"), Step(b"*\r\n", b"a1 BAD")],
        [Step(b"a1 AUTHENTICATE LOGIN\r\n", b"+"), Step(b"*\r\n", b"a1 BAD")],
        [
            Step(b"a1 AUTHENTICATE LOGIN\r\n", b"+"),
            Step(b"YWxpY2U=\r\n", b"+"),
            Step(b"*\r\n", b"a1 BAD"),
        ],
    ],
    ids=["plain", "login-user-step", "login-password-step"],
)
def test_authenticate_cancel_then_login(proxy, mail_server, steps):
    password = mail_server.users["alice"].encode()
    with raw_client(proxy) as client:
        converse(client, steps)
        converse(
            client, imap_login_exchanges(b"alice", password)["plain-initial-response"]
        )


# After login: IDLE and APPEND through the relay


def test_idle_reports_delivered_message(proxy, mail_server):
    password = mail_server.users["alice"].encode()
    with raw_client(proxy) as client:
        converse(client, imap_login_exchanges(b"alice", password)["login-quoted"])
        replies = converse(client, [Step(b"a2 SELECT INBOX\r\n", b"a2 OK")])
        matches = [re.fullmatch(rb"\* (\d+) EXISTS\r\n", reply) for reply in replies]
        exists = [int(match.group(1)) for match in matches if match]
        assert len(exists) == 1, replies
        converse(client, [Step(b"a3 IDLE\r\n", b"+")])

        message = b"Subject: delivered during IDLE\r\n\r\nHello.\r\n"
        mail_server.deliver("alice", message)
        expected = b"* %d EXISTS\r\n" % (exists[0] + 1)
        seen = []
        # Each read waits up to TIMEOUT seconds; Dovecot sends few untagged lines.
        for _ in range(20):
            seen.append(client.read_line())
            if seen[-1] in (expected, b""):
                break
        assert seen[-1] == expected, seen

        replies = converse(client, [Step(b"DONE\r\n", b"a3 OK")])
        assert replies[-1].startswith(b"a3 OK")


def large_append_message() -> bytes:
    rng = random.Random(3501)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,-"
    lines = [b"Subject: large APPEND through the proxy\r\n", b"\r\n"]
    size = sum(len(line) for line in lines)
    while size < APPEND_SIZE:
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        encoded = line.encode() + b"\r\n"
        lines.append(encoded)
        size += len(encoded)
    return b"".join(lines)


def test_append_large_literal_round_trip(proxy, mail_server, pki):
    message = large_append_message()
    with imap_session(proxy, pki, "starttls-implicit") as client:
        client.login("alice", mail_server.users["alice"])
        status, data = client.append("INBOX", None, None, message)
        assert status == "OK", data
        match = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0])
        assert match is not None, data

        client.select("INBOX", readonly=True)
        assert fetch_body(client, match.group(1).decode(), uid=True) == message


# Literal limits before login


@pytest.mark.parametrize("size", [b"4000000000", b"18446744073709551617"])
def test_oversize_literal_rejected_without_continuation(proxy, mail_server, size):
    password = mail_server.users["alice"].encode()
    with raw_client(proxy) as client:
        client.send(b"a1 LOGIN {" + size + b"}\r\n")
        reply = client.read_line()
        assert reply.startswith(b"a1 BAD"), reply
        # The literal may follow unasked, so the session closes instead of reading on.
        rest = client.read_until_closed()
        assert rest.startswith(b"* BYE"), rest

    with raw_client(proxy) as client:
        converse(
            client,
            [Step(b"a3 LOGIN alice " + imap_quoted(password) + b"\r\n", b"a3 OK")],
        )


def test_overlong_line_with_literal_closes(proxy, mail_server):
    # The client sends the password literal without waiting for "+".
    password = mail_server.users["alice"].encode()
    line = b"a1 LOGIN " + b"u" * 9000 + b" {%d}\r\n" % len(password)
    with raw_client(proxy) as client:
        client.send(line + password + b"\r\n")
        reply = client.read_until_closed()
    first, _, rest = reply.partition(b"\r\n")
    assert first == b"a1 BAD command line too long (limit 8192 bytes)", reply
    assert rest.startswith(b"* BYE"), reply
    assert password not in reply


# Literals that LOGIN and AUTHENTICATE cannot use, and the BAD that each gets instead of
# "+". The session then closes, because a client that does not wait may send them.
UNUSABLE_LOGIN_LITERALS = {
    "login-third": (b"a1 LOGIN alice pw {5}\r\n", b"LOGIN takes at most 2 arguments"),
    "login-in-list": (b"a1 LOGIN (alice {5}\r\n", b"LOGIN takes no parenthesized list"),
    "mechanism": (
        b"a1 AUTHENTICATE {5}\r\n",
        b"argument 1 of AUTHENTICATE cannot be a literal",
    ),
}


@pytest.mark.parametrize("case", UNUSABLE_LOGIN_LITERALS, ids=list(UNUSABLE_LOGIN_LITERALS))
def test_unusable_login_literal_gets_bad(proxy, mail_server, case):
    announcement, message = UNUSABLE_LOGIN_LITERALS[case]
    password = mail_server.users["alice"].encode()
    with raw_client(proxy) as client:
        client.send(announcement)
        reply = client.read_line()
        rest = client.read_until_closed()
    assert reply == b"a1 BAD " + message + b"\r\n", reply
    assert rest.startswith(b"* BYE"), rest

    with raw_client(proxy) as client:
        step = Step(b"a2 LOGIN alice " + imap_quoted(password) + b"\r\n", b"a2 OK")
        converse(client, [step])


# Credential size limits before login


def oversized_logins() -> dict[str, list[Step]]:
    """Return login exchanges over the size limits, each tagged a1 and ending in NO.

    The first announces a 65536-byte user name, the default max_literal_size, which made
    Dovecot close the upstream connection when the proxy forwarded it. Literals over the
    limits get their NO in place of the "+" continuation request.
    """
    user = b"u" * (MAX_LOGIN_USER_SIZE + 1)
    password = b"p" * (MAX_LOGIN_PASSWORD_SIZE + 1)
    plain = base64.b64encode(b"\0alice\0" + password)
    rejected_reply = b"a1 NO [LIMIT]"
    return {
        "login-64k-user": [Step(b"a1 LOGIN {65536}\r\n", rejected_reply)],
        "login-password": [
            Step(b"a1 LOGIN alice {%d}\r\n" % len(password), rejected_reply),
        ],
        "login-quoted-password": [
            Step(b"a1 LOGIN alice " + imap_quoted(password) + b"\r\n", rejected_reply),
        ],
        "plain-initial-response": [
            Step(b"a1 AUTHENTICATE PLAIN " + plain + b"\r\n", rejected_reply),
        ],
        "plain-continuation": [
            Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"),
            Step(plain + b"\r\n", rejected_reply),
        ],
        "login-mechanism": [
            Step(b"a1 AUTHENTICATE LOGIN\r\n", b"+"),
            Step(base64.b64encode(user) + b"\r\n", b"+"),
            Step(base64.b64encode(b"secret") + b"\r\n", rejected_reply),
        ],
    }


# Exchanges whose user name is over the limit, so the log leaves it out.
OVERSIZED_USER_EXCHANGES = {"login-64k-user", "login-mechanism"}
# Exchanges that announce a literal, after which the session closes, because a client
# that does not wait for "+" may send the literal anyway.
OVERSIZED_LITERAL_EXCHANGES = {"login-64k-user", "login-password"}


@pytest.mark.parametrize("exchange", sorted(oversized_logins()))
def test_oversized_login_rejected_locally(proxy, mail_server, exchange):
    password = imap_quoted(mail_server.users["alice"].encode())
    with raw_client(proxy) as client:
        port = client.sock.getsockname()[1]
        replies = converse(client, oversized_logins()[exchange])
        if exchange in OVERSIZED_LITERAL_EXCHANGES:
            rest = client.read_until_closed()
            assert rest.startswith(b"* BYE"), rest
        else:
            # The upstream connection of the session still works.
            step = Step(b"a2 LOGIN alice " + password + b"\r\n", b"a2 OK")
            converse(client, [step])
    assert LOGIN_SIZE_ERROR.encode() in replies[-1], replies
    rejected = proxy.wait_for_log(f"login rejected: client {HOST} port {port} ")
    names_user = exchange not in OVERSIZED_USER_EXCHANGES
    assert rejected.endswith('user "alice"' if names_user else 'user ""'), rejected
    session_lines = [line for line in proxy.log_text().splitlines() if f":{port}]" in line]
    assert not any("unusable" in line for line in session_lines), session_lines
