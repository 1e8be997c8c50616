"""Routing by login through the real appliance process to a real Dovecot.

Listeners route `user@server` (and `user#server`) to the upstream that the server part
names. A scripted server is behind one allowed name and records every connection,
and rejected logins name servers (with ports and IP literals) that would lead to it if
the appliance ever connected to a server part, so "no outbound connection" is checked
where a connection would land.
"""

from __future__ import annotations

import base64
import imaplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.proxy.connection import UNFORWARDED_END_TIMEOUT
from tests.support.appliance import ApplianceProcess, free_port, upstream_config
from tests.support.dovecot import DovecotServer
from tests.support.scripted_server import (
    LineClient,
    Script,
    ScriptedServer,
    Step,
    converse,
    imap_login_exchanges,
    imap_quoted,
)

HOST = "127.0.0.1"
TIMEOUT = 20.0
LOG_TIMEOUT = 15.0
USER = "alice"
PASSWORD = "alice-secret"
AUTH_FAILED = b"a1 NO [AUTHENTICATIONFAILED] Authentication failed."
POP3_AUTH_FAILED = b"-ERR [AUTH] Authentication failed."


@pytest.fixture(scope="module")
def mail_server(dovecot_factory: Any) -> DovecotServer:
    return dovecot_factory(tls="both", fresh=True)


@pytest.fixture(scope="module")
def recorder() -> Iterator[ScriptedServer]:
    """IMAP server behind the allowed name `recorder`, which logs every connection."""
    with ScriptedServer(Script(protocol="imap", offer_starttls=False)) as server:
        yield server


@pytest.fixture(scope="module")
def pop3_recorder() -> Iterator[ScriptedServer]:
    with ScriptedServer(Script(protocol="pop3", offer_starttls=False)) as server:
        yield server


def routing(separator: str, *allow: dict[str, str]) -> dict[str, Any]:
    return {"separator": separator, "allow": list(allow)}


@pytest.fixture(scope="module")
def proxy(
    mail_server: DovecotServer,
    recorder: ScriptedServer,
    pop3_recorder: ScriptedServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApplianceProcess]:
    imaps = mail_server.ports["imaps"]
    upstreams = {
        "mail": upstream_config(mail_server, "starttls", "imap"),
        "mail_pop3": upstream_config(mail_server, "starttls", "pop3"),
        "recorder": {"host": HOST, "port": recorder.port, "tls": "none"},
        "recorder_pop3": {"host": HOST, "port": pop3_recorder.port, "tls": "none"},
        # Templates: their host is never used, a routed server part replaces it.
        "implicit_template": {
            "host": "template.invalid",
            "port": imaps,
            "tls": "implicit",
            "ca_file": str(mail_server.ca_file),
        },
        "auto_template": {
            "host": "template.invalid",
            "port": imaps,
            "tls": "auto",
            "ca_file": str(mail_server.ca_file),
        },
        # The system store does not know the test CA, so TLS must fail.
        "untrusted": {"host": "localhost", "port": imaps, "tls": "implicit"},
    }
    listeners = {
        "at": {
            "protocol": "imap",
            "port": free_port(),
            "route_by_login": routing(
                "@",
                {"upstream": "mail"},
                {"upstream": "recorder"},
                {"upstream": "untrusted"},
                {"upstream": "implicit_template", "host": "localhost"},
                {"upstream": "recorder", "host": "*.example.test"},
            ),
        },
        "hash": {
            "protocol": "imap",
            "port": free_port(),
            "route_by_login": routing(
                "#",
                {"upstream": "mail"},
                {"upstream": "auto_template", "host": "localhost"},
            ),
        },
        "pop3": {
            "protocol": "pop3",
            "port": free_port(),
            "route_by_login": routing(
                "@", {"upstream": "mail_pop3"}, {"upstream": "recorder_pop3"}
            ),
        },
        "static": {"protocol": "imap", "port": free_port(), "upstream": "mail"},
        "static_pop3": {
            "protocol": "pop3",
            "port": free_port(),
            "upstream": "mail_pop3",
        },
    }
    config = {
        "listeners": listeners,
        "upstreams": upstreams,
        # tls: auto for a routed host follows the operator's entry for that host.
        "known_servers": [
            {"host": "localhost", "port": imaps, "protocol": "imap", "mode": "implicit"}
        ],
        # Rejected logins count as failures, so the delay is kept short for the tests.
        "limits": {
            "max_protocol_errors": 50,
            "auth_failure_delay": 0.01,
            "auth_failure_delay_max": 0.02,
        },
    }
    with ApplianceProcess(config, tmp_path_factory.mktemp("routing")) as process:
        yield process


def connect(proxy: ApplianceProcess, listener: str) -> LineClient:
    client = LineClient(HOST, proxy.port(listener), timeout=TIMEOUT)
    greeting = client.read_line()
    assert greeting.startswith((b"* OK", b"+OK")), greeting
    return client


def dovecot_logins(server: DovecotServer, user: str) -> int:
    assert server.log_file is not None
    text = server.log_file.read_text(errors="replace")
    return text.count(f"Login: user=<{user}>")


def wait_for_dovecot_logins(server: DovecotServer, user: str, count: int) -> None:
    deadline = time.monotonic() + LOG_TIMEOUT
    while dovecot_logins(server, user) < count:
        assert time.monotonic() < deadline, f"no Dovecot login {count} for {user}"
        time.sleep(0.05)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# Routed logins


def test_greeting_comes_from_proxy(proxy: ApplianceProcess) -> None:
    with LineClient(HOST, proxy.port("at"), timeout=TIMEOUT) as client:
        greeting = client.read_line()

    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"AUTH=PLAIN" in greeting
    assert b"IMAP proxy ready" in greeting


def test_capability_is_proxy_list(proxy: ApplianceProcess) -> None:
    with connect(proxy, "at") as client:
        replies = converse(client, [Step(b"c1 CAPABILITY\r\n", b"c1 OK")])

    assert (
        replies[0]
        == b"* CAPABILITY IMAP4rev1 SASL-IR ID LITERAL+ AUTH=PLAIN AUTH=LOGIN\r\n"
    )


def test_at_login_reaches_named_upstream(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    before = dovecot_logins(mail_server, USER)
    client = imaplib.IMAP4(HOST, proxy.port("at"), timeout=TIMEOUT)
    try:
        status, _ = client.login(f"{USER}@mail", PASSWORD)
        assert status == "OK"
        status, data = client.select("INBOX", readonly=True)
        assert status == "OK"
        assert int(data[0]) >= 3
    finally:
        client.logout()

    wait_for_dovecot_logins(mail_server, USER, before + 1)


def test_hash_login_reaches_named_upstream(proxy: ApplianceProcess) -> None:
    client = imaplib.IMAP4(HOST, proxy.port("hash"), timeout=TIMEOUT)
    try:
        status, _ = client.login(f"{USER}#MAIL.", PASSWORD)
    finally:
        client.logout()

    assert status == "OK"


def test_upstream_receives_user_part_only(
    proxy: ApplianceProcess, recorder: ScriptedServer
) -> None:
    start = len(recorder.records)
    with connect(proxy, "at") as client:
        converse(
            client, [Step(b'a1 LOGIN "bob@example.org@recorder" "pw"\r\n', b"a1 OK")]
        )
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])
    assert recorder.wait_for_connections(start + 1)
    received = bytes(recorder.records[start].received)

    assert b"\0bob@example.org\0pw" in base64_payloads(received)
    assert b"recorder" not in base64_payloads(received)


def base64_payloads(received: bytes) -> bytes:
    """Decode the base64 words of what a server received, for SASL PLAIN checks."""
    decoded = []
    for word in received.split():
        try:
            decoded.append(base64.b64decode(word, validate=True))
        except ValueError:
            continue
    return b" ".join(decoded)


@pytest.mark.parametrize("form", list(imap_login_exchanges(b"x", b"y")))
def test_every_imap_login_form_routes(
    proxy: ApplianceProcess, mail_server: DovecotServer, form: str
) -> None:
    before = dovecot_logins(mail_server, USER)
    steps = imap_login_exchanges(b"alice@mail", PASSWORD.encode())[form]
    with connect(proxy, "at") as client:
        converse(client, steps)
        converse(client, [Step(b"a2 SELECT INBOX\r\n", b"a2 OK")])

    wait_for_dovecot_logins(mail_server, USER, before + 1)


POP3_FORMS = {
    "user-pass": [(b"USER alice@mail_pop3", b"+OK"), (b"PASS alice-secret", b"+OK")],
    "plain-initial-response": [
        (b"AUTH PLAIN " + b64(b"\0alice@mail_pop3\0alice-secret"), b"+OK")
    ],
    "plain-continuation": [
        (b"AUTH PLAIN", b"+ "),
        (b64(b"\0alice@mail_pop3\0alice-secret"), b"+OK"),
    ],
    "login-mechanism": [
        (b"AUTH LOGIN", b"+ "),
        (b64(b"alice@mail_pop3"), b"+ "),
        (b64(b"alice-secret"), b"+OK"),
    ],
    "login-mechanism-initial-response": [
        (b"AUTH LOGIN " + b64(b"alice@mail_pop3"), b"+ "),
        (b64(b"alice-secret"), b"+OK"),
    ],
}


def pop3_exchange(client: LineClient, steps: list[tuple[bytes, bytes]]) -> bytes:
    """Send each line and check the reply's start; return the last reply."""
    reply = b""
    for line, expected in steps:
        client.send(line + b"\r\n")
        reply = client.read_line()
        assert reply.startswith(expected), reply
    return reply


@pytest.mark.parametrize("form", POP3_FORMS)
def test_every_pop3_login_form_routes(
    proxy: ApplianceProcess, mail_server: DovecotServer, form: str
) -> None:
    before = dovecot_logins(mail_server, USER)
    with connect(proxy, "pop3") as client:
        pop3_exchange(client, POP3_FORMS[form])
        pop3_exchange(client, [(b"STAT", b"+OK")])

    wait_for_dovecot_logins(mail_server, USER, before + 1)


def test_pop3_greeting_and_capa_from_proxy(proxy: ApplianceProcess) -> None:
    with LineClient(HOST, proxy.port("pop3"), timeout=TIMEOUT) as client:
        greeting = client.read_line()
        client.send(b"CAPA\r\n")
        lines = [client.read_line()]
        while lines[-1] != b".\r\n":
            lines.append(client.read_line())

    assert greeting == b"+OK POP3 proxy ready\r\n"
    assert lines[1:] == [
        b"RESP-CODES\r\n",
        b"AUTH-RESP-CODE\r\n",
        b"USER\r\n",
        b"SASL PLAIN LOGIN\r\n",
        b".\r\n",
    ]


def test_pop3_apop_is_unavailable(proxy: ApplianceProcess) -> None:
    with connect(proxy, "pop3") as client:
        port = client_port(client)
        reply = pop3_exchange(client, [(b"APOP alice@mail_pop3 " + b"0" * 32, b"-ERR")])

    line = wait_for_log(proxy, f"login rejected: client {HOST} port {port} ")
    assert b"APOP is not available" in reply
    assert line.endswith(' user "alice@mail_pop3"'), line


# Rejected logins


def rejected_logins(recorder_port: int) -> dict[str, bytes]:
    """Return logins that must fail, several aimed at the recorder if misrouted."""
    return {
        "unknown server": b"alice@elsewhere",
        "host with port": b"alice@localhost:%d" % recorder_port,
        "ip literal": b"alice@127.0.0.1",
        "ip literal with port": b"alice@127.0.0.1:%d" % recorder_port,
        "bracketed ip literal": b"alice@[127.0.0.1]",
        "empty user": b"@recorder",
        "empty server": b"alice@",
        "doubled separator": b"alice@@recorder",
        "trailing separator": b"alice@recorder@",
        "pattern base domain": b"alice@example.test",
        "two labels under pattern": b"alice@a.b.example.test",
        "upstream name with port": b"alice@recorder:143",
    }


REJECTED_KINDS = list(rejected_logins(0))


def imap_reject_steps(login: bytes) -> dict[str, list[Step]]:
    plain = b64(b"\0" + login + b"\0pw")
    return {
        "login": [Step(b"a1 LOGIN " + imap_quoted(login) + b" pw\r\n", AUTH_FAILED)],
        "plain": [Step(b"a1 AUTHENTICATE PLAIN " + plain + b"\r\n", AUTH_FAILED)],
        "login-mechanism": [
            Step(b"a1 AUTHENTICATE LOGIN " + b64(login) + b"\r\n", b"+"),
            Step(b64(b"pw") + b"\r\n", AUTH_FAILED),
        ],
    }


@pytest.mark.parametrize("form", ["login", "plain", "login-mechanism"])
@pytest.mark.parametrize("kind", REJECTED_KINDS)
def test_imap_rejected_login_opens_nothing(
    proxy: ApplianceProcess, recorder: ScriptedServer, kind: str, form: str
) -> None:
    login = rejected_logins(recorder.port)[kind]
    start = len(recorder.records)
    with connect(proxy, "at") as client:
        converse(client, imap_reject_steps(login)[form])
        # The session goes on, and a routed login still works after the failure.
        converse(client, [Step(b"a2 LOGIN alice@recorder pw\r\n", b"a2 OK")])

    assert recorder.wait_for_connections(start + 1)
    assert len(recorder.records) == start + 1


@pytest.mark.parametrize("kind", REJECTED_KINDS)
def test_pop3_rejected_login_opens_nothing(
    proxy: ApplianceProcess, pop3_recorder: ScriptedServer, kind: str
) -> None:
    login = rejected_logins(pop3_recorder.port)[kind]
    start = len(pop3_recorder.records)
    with connect(proxy, "pop3") as client:
        reply = pop3_exchange(
            client, [(b"USER " + login, b"+OK"), (b"PASS pw", b"-ERR")]
        )
        assert reply == POP3_AUTH_FAILED + b"\r\n"
        plain = b64(b"\0" + login + b"\0pw")
        reply = pop3_exchange(client, [(b"AUTH PLAIN " + plain, b"-ERR")])
        assert reply == POP3_AUTH_FAILED + b"\r\n"
        pop3_exchange(
            client, [(b"USER alice@recorder_pop3", b"+OK"), (b"PASS pw", b"+OK")]
        )

    assert pop3_recorder.wait_for_connections(start + 1)
    assert len(pop3_recorder.records) == start + 1


def settled_log(
    path: Path, quiet: float = UNFORWARDED_END_TIMEOUT + 0.5, limit: float = 10.0
) -> str:
    """Return a log's text once it has not changed for `quiet` seconds.

    Dovecot logs the end of the fixture's own readiness connections a little later, so
    a module that starts with this test would otherwise see those lines appear. The
    sessions of earlier tests reach a TLS upstream, which the relay closes only
    UNFORWARDED_END_TIMEOUT seconds after the client left, and Dovecot then logs it.
    """
    deadline = time.monotonic() + limit
    text = path.read_text(errors="replace")
    while time.monotonic() < deadline:
        time.sleep(quiet)
        newer = path.read_text(errors="replace")
        if newer == text:
            break
        text = newer
    return text


def test_rejected_login_leaves_no_upstream_trace(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    assert mail_server.log_file is not None
    dovecot_before = settled_log(mail_server.log_file)
    with connect(proxy, "at") as client:
        converse(
            client, [Step(b"a1 LOGIN alice@mail:143 alice-secret\r\n", AUTH_FAILED)]
        )
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])
    time.sleep(0.5)

    assert mail_server.log_file.read_text(errors="replace") == dovecot_before


def test_wrong_password_reply_matches_rejection(proxy: ApplianceProcess) -> None:
    with connect(proxy, "at") as client:
        replies = converse(
            client, [Step(b"a1 LOGIN alice@mail wrong-password\r\n", b"a1 NO")]
        )
        # After the upstream refused, another routed login starts a new connection.
        converse(client, [Step(b"a2 LOGIN alice@mail alice-secret\r\n", b"a2 OK")])

    assert replies[-1].startswith(AUTH_FAILED)


# Session end lines of failed logins


def client_port(client: LineClient) -> int:
    return client.sock.getsockname()[1]


def end_line(proxy: ApplianceProcess, port: int) -> str:
    """Return the session end line of the client at `port`."""
    return wait_for_log(proxy, f"; client {HOST}:{port}; upstream ")


def test_failed_routed_login_end_line(proxy: ApplianceProcess) -> None:
    with connect(proxy, "at") as client:
        port = client_port(client)
        converse(client, [Step(b"a1 LOGIN alice@mail wrong-password\r\n", b"a1 NO")])
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])

    line = end_line(proxy, port)
    assert "session ended: logged out before login" in line, line
    assert "; upstream mail (localhost:" in line, line


def test_failed_host_rule_login_end_line(proxy: ApplianceProcess) -> None:
    with connect(proxy, "at") as client:
        port = client_port(client)
        converse(client, [Step(b"a1 LOGIN alice@LocalHost. wrong\r\n", b"a1 NO")])
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])

    line = end_line(proxy, port)
    assert "; upstream implicit_template (localhost:" in line, line


def test_unrouted_login_end_line(proxy: ApplianceProcess) -> None:
    with connect(proxy, "at") as client:
        port = client_port(client)
        converse(client, [Step(b"a1 LOGIN alice@elsewhere pw\r\n", AUTH_FAILED)])
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])

    line = end_line(proxy, port)
    assert "; upstream none (no login was routed);" in line, line


# Login lines of failed logins


# Each case: listener, the exchange of one failed login (IMAP steps, or POP3 lines with
# their expected reply), and the login as the client sent it.
FAILED_LOGINS = {
    "imap-routed": (
        "at",
        [Step(b"a1 LOGIN alice@mail wrong-password\r\n", b"a1 NO")],
        "alice@mail",
    ),
    "imap-host-rule": (
        "at",
        [Step(b"a1 LOGIN alice@LocalHost. wrong-password\r\n", b"a1 NO")],
        "alice@LocalHost.",
    ),
    "imap-allow-list": (
        "at",
        [Step(b"a1 LOGIN alice@elsewhere wrong-password\r\n", b"a1 NO")],
        "alice@elsewhere",
    ),
    "imap-plain-routed": (
        "at",
        [
            Step(
                b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice@mail\0wrong") + b"\r\n",
                b"a1 NO",
            )
        ],
        "alice@mail",
    ),
    "pop3-routed": (
        "pop3",
        [(b"USER alice@mail_pop3", b"+OK"), (b"PASS wrong", b"-ERR")],
        "alice@mail_pop3",
    ),
    "pop3-allow-list": (
        "pop3",
        [(b"USER alice@elsewhere", b"+OK"), (b"PASS wrong", b"-ERR")],
        "alice@elsewhere",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILED_LOGINS))
def test_failed_login_line_names_sent_login(proxy: ApplianceProcess, case: str) -> None:
    listener, steps, login = FAILED_LOGINS[case]
    with connect(proxy, listener) as client:
        port = client_port(client)
        if listener == "pop3":
            pop3_exchange(client, steps)
        else:
            converse(client, steps)

    line = wait_for_log(proxy, f"login failed: client {HOST} port {port} ")
    assert line.endswith(f'user "{login}"'), line
    assert "wrong" not in line


# Host rules and the upstream's TLS policy


def test_exact_host_rule_uses_template(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    before = dovecot_logins(mail_server, USER)
    with connect(proxy, "at") as client:
        converse(
            client, [Step(b"a1 LOGIN alice@LocalHost. alice-secret\r\n", b"a1 OK")]
        )
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])

    wait_for_dovecot_logins(mail_server, USER, before + 1)
    assert "upstream implicit_template (localhost:" in wait_for_log(
        proxy, "upstream implicit_template (localhost:"
    )


def test_tls_auto_route_follows_known_server(proxy: ApplianceProcess) -> None:
    with connect(proxy, "hash") as client:
        converse(client, [Step(b"a1 LOGIN alice#localhost alice-secret\r\n", b"a1 OK")])
        converse(client, [Step(b"a2 LOGOUT\r\n", b"a2 OK")])

    line = wait_for_log(proxy, "upstream auto_template (localhost:")
    assert "implicit" in line


def test_untrusted_certificate_fails_closed(
    proxy: ApplianceProcess, mail_server: DovecotServer
) -> None:
    before = dovecot_logins(mail_server, USER)
    with connect(proxy, "at") as client:
        client.send(b"a1 LOGIN alice@untrusted alice-secret\r\n")
        reply = client.read_line()
        rest = client.read_until_closed()

    assert reply.startswith(b"* BYE [UNAVAILABLE]")
    assert rest == b""
    assert dovecot_logins(mail_server, USER) == before


def wait_for_log(proxy: ApplianceProcess, text: str) -> str:
    """Return the first log line that contains `text`, waiting for it."""
    return proxy.wait_for_log(text, LOG_TIMEOUT)


# SASL PLAIN authorization identities


@pytest.mark.parametrize(
    "listener, authcid", [("at", b"alice@mail"), ("static", b"alice")]
)
def test_imap_foreign_authzid_rejected(
    proxy: ApplianceProcess, mail_server: DovecotServer, listener: str, authcid: bytes
) -> None:
    before = dovecot_logins(mail_server, "bob")
    plain = b64(b"bob\0" + authcid + b"\0" + PASSWORD.encode())
    with connect(proxy, listener) as client:
        port = client_port(client)
        converse(
            client, [Step(b"a1 AUTHENTICATE PLAIN " + plain + b"\r\n", AUTH_FAILED)]
        )

    line = wait_for_log(proxy, f"login rejected: client {HOST} port {port} ")
    assert line.endswith(f'user "{authcid.decode()}"'), line
    assert dovecot_logins(mail_server, "bob") == before


@pytest.mark.parametrize(
    "listener, authcid", [("at", b"alice@mail"), ("static", b"alice")]
)
def test_imap_matching_authzid_logs_in(
    proxy: ApplianceProcess, listener: str, authcid: bytes
) -> None:
    plain = b64(authcid + b"\0" + authcid + b"\0" + PASSWORD.encode())
    with connect(proxy, listener) as client:
        converse(client, [Step(b"a1 AUTHENTICATE PLAIN " + plain + b"\r\n", b"a1 OK")])


@pytest.mark.parametrize(
    "listener, authcid", [("pop3", b"alice@mail_pop3"), ("static_pop3", b"alice")]
)
def test_pop3_foreign_authzid_rejected(
    proxy: ApplianceProcess, listener: str, authcid: bytes
) -> None:
    plain = b64(b"bob\0" + authcid + b"\0" + PASSWORD.encode())
    with connect(proxy, listener) as client:
        port = client_port(client)
        reply = pop3_exchange(client, [(b"AUTH PLAIN " + plain, b"-ERR")])

    line = wait_for_log(proxy, f"login rejected: client {HOST} port {port} ")
    assert reply == POP3_AUTH_FAILED + b"\r\n"
    assert line.endswith(f'user "{authcid.decode()}"'), line
