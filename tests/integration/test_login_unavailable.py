"""Logins that end without a verdict because the upstream failed: `login unavailable`.

Scripted servers on loopback close the connection, or stay silent, once a login's
credentials arrive. Routed logins name an upstream on a loopback port where nothing
listens. Each case checks the reply to the client, the INFO line, the count in
`appliance_logins_total{result="unavailable"}`, that the fail2ban filter ignores the
line, and that the password is not in the log. Further tests check the failed-login delay:
an upstream that fails during a login leaves it as it is, and a routed server that
cannot be reached makes it grow. The last ones check the edges of the outcome: a refusal
that comes after the pre-auth timeout is still `failed`, a refusal whose code blames
the server is `unavailable`, and a timeout during the delay logs `cancelled`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from appliance.proxy.session import GOODBYE_TEXTS
from tests.integration.test_admin import metric, wait_for_metric
from tests.integration.test_hostile_input import SourceClient, next_source
from tests.integration.test_log_hygiene import fail2ban_hosts
from tests.support.appliance import ApplianceProcess, free_port, listener_config
from tests.support.certs import TestPKI
from tests.support.scripted_server import Script, ScriptedServer

HOST = "127.0.0.1"
USER = b"alice"
PASSWORD = b"Unavail-Secret-4711"
LOG_TIMEOUT = 15.0
# Short, so that a silent upstream ends a login within a few seconds.
PRE_AUTH_TIMEOUT = 3
# How long past the pre-auth timeout a forwarded login may wait for the server's reply.
LOGIN_REPLY_TIMEOUT = 4
# The scripted servers that refuse a login slowly wait this long before the reply, as
# Dovecot does by its auth_failure_delay.
REFUSAL_DELAY = 2.5
DELAY_LIMITS = {"auth_failure_delay": 1, "auth_failure_delay_max": 4}
IMAP_UNAVAILABLE = b"* BYE [UNAVAILABLE] " + GOODBYE_TEXTS["unavailable"].encode()
POP3_UNAVAILABLE = b"-ERR [SYS/TEMP] " + GOODBYE_TEXTS["unavailable"].encode()
IMAP_TIMED_OUT = b"* BYE [UNAVAILABLE] " + GOODBYE_TEXTS["timeout"].encode()
POP3_TIMED_OUT = b"-ERR [SYS/TEMP] " + GOODBYE_TEXTS["timeout"].encode()


def b64(value: bytes) -> bytes:
    return base64.b64encode(value)


def plain(user: bytes, password: bytes) -> bytes:
    return b64(b"\0" + user + b"\0" + password)


@dataclass(frozen=True)
class Turn:
    """One line that the client sends, and the expected start of the proxy's reply.

    `expect` is None when the client reads no reply before its next line.
    """

    send: bytes
    expect: bytes | None = None


def login_turns(protocol: str, form: str, user: bytes) -> list[Turn]:
    """Return the client's turns of one login form, up to the line that completes it."""
    forms = {
        ("imap", "login"): [Turn(b"a1 LOGIN " + user + b" " + PASSWORD + b"\r\n")],
        ("imap", "authenticate-plain"): [
            Turn(b"a1 AUTHENTICATE PLAIN " + plain(user, PASSWORD) + b"\r\n")
        ],
        ("imap", "authenticate-login"): [
            Turn(b"a1 AUTHENTICATE LOGIN\r\n", b"+ "),
            Turn(b64(user) + b"\r\n", b"+ "),
            Turn(b64(PASSWORD) + b"\r\n"),
        ],
        ("pop3", "user-pass"): [
            Turn(b"USER " + user + b"\r\n", b"+OK"),
            Turn(b"PASS " + PASSWORD + b"\r\n"),
        ],
        ("pop3", "auth-plain"): [
            Turn(b"AUTH PLAIN " + plain(user, PASSWORD) + b"\r\n")
        ],
        ("pop3", "auth-login"): [
            Turn(b"AUTH LOGIN\r\n", b"+ "),
            Turn(b64(user) + b"\r\n", b"+ "),
            Turn(b64(PASSWORD) + b"\r\n"),
        ],
        ("pop3", "apop"): [Turn(b"APOP " + user + b" " + b"0" * 32 + b"\r\n")],
    }
    return forms[protocol, form]


# Scripted upstreams by name. The POP3 server without SASL PLAIN makes the proxy log in
# with USER and PASS, and it closes at PASS. The servers that offer STARTTLS or STLS are
# reached with TLS, and they close the TCP connection without a TLS close_notify alert.
SCRIPTS = {
    "imap_closing": Script(protocol="imap", offer_starttls=False, login_reply="close"),
    "pop3_closing": Script(protocol="pop3", offer_starttls=False, login_reply="close"),
    "imap_closing_tls": Script(protocol="imap", login_reply="close"),
    "pop3_closing_tls": Script(protocol="pop3", login_reply="close"),
    "pop3_closing_user_pass": Script(
        protocol="pop3",
        offer_starttls=False,
        offer_sasl_plain=False,
        login_reply="close",
    ),
    "imap_silent": Script(protocol="imap", offer_starttls=False, login_reply="none"),
    "pop3_silent": Script(protocol="pop3", offer_starttls=False, login_reply="none"),
    "imap_slow_refusal": Script(
        protocol="imap",
        offer_starttls=False,
        login_refusal=b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
        login_reply_delay=REFUSAL_DELAY,
    ),
    "pop3_slow_refusal": Script(
        protocol="pop3",
        offer_starttls=False,
        login_refusal=b"-ERR [AUTH] Authentication failed.\r\n",
        login_reply_delay=REFUSAL_DELAY,
    ),
    "imap_temporary": Script(
        protocol="imap",
        offer_starttls=False,
        login_refusal=b" NO [UNAVAILABLE] Temporary authentication failure.\r\n",
    ),
    "pop3_temporary": Script(
        protocol="pop3",
        offer_starttls=False,
        login_refusal=b"-ERR [SYS/TEMP] Temporary authentication failure.\r\n",
    ),
}


@pytest.fixture(scope="module")
def scripted(pki: TestPKI) -> Iterator[dict[str, ScriptedServer]]:
    cert = pki.issue_server_cert("login-unavailable-upstream")
    servers = {
        name: ScriptedServer(script, cert=cert if script.offer_starttls else None)
        for name, script in SCRIPTS.items()
    }
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def proxy(
    scripted: dict[str, ScriptedServer],
    pki: TestPKI,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApplianceProcess]:
    upstreams = {}
    for name, server in scripted.items():
        upstreams[name] = {"host": HOST, "port": server.port, "tls": "none"}
        if SCRIPTS[name].offer_starttls:
            upstreams[name].update(tls="starttls", ca_file=str(pki.ca_file))
    # Nothing listens there: the port was free when picked and is never bound.
    upstreams["unreachable"] = {"host": HOST, "port": free_port(), "tls": "none"}
    listeners = {
        name: listener_config(SCRIPTS[name].protocol, name) for name in scripted
    }
    for protocol in ("imap", "pop3"):
        listeners[f"{protocol}_routed"] = {
            "protocol": protocol,
            "port": free_port(),
            "route_by_login": {
                "separator": "@",
                "allow": [{"upstream": "unreachable"}],
            },
        }
    config = {
        "listeners": listeners,
        "upstreams": upstreams,
        "limits": {
            "pre_auth_timeout": PRE_AUTH_TIMEOUT,
            "login_reply_timeout": LOGIN_REPLY_TIMEOUT,
            **DELAY_LIMITS,
        },
        "admin": {"enabled": True, "port": free_port()},
    }
    workdir = tmp_path_factory.mktemp("login-unavailable")
    with ApplianceProcess(config, workdir) as process:
        yield process


def connect(proxy: ApplianceProcess, listener: str, source: str) -> SourceClient:
    """Connect from `source` to `listener` and read an OK greeting."""
    client = SourceClient(proxy.port(listener), source)
    greeting = client.read_line()
    assert greeting.startswith((b"* OK", b"+OK")), greeting
    return client


def attempt_login(
    proxy: ApplianceProcess, listener: str, turns: list[Turn], source: str
) -> tuple[bytes, int, float]:
    """Run a login on a new connection until the proxy closes it.

    Returns what the proxy sent after the last turn, the client's port, and the seconds
    from the first turn to the end of the connection.
    """
    with connect(proxy, listener, source) as client:
        port = client.sock.getsockname()[1]
        started = time.monotonic()
        for turn in turns:
            client.send(turn.send)
            if turn.expect is not None:
                reply = client.read_line()
                assert reply.startswith(turn.expect), reply
        rest = client.read_until_closed()
        return rest, port, time.monotonic() - started


def login_line(proxy: ApplianceProcess, result: str, source: str, port: int) -> str:
    return proxy.wait_for_log(
        f"login {result}: client {source} port {port} ", LOG_TIMEOUT
    )


def unavailable_count(proxy: ApplianceProcess, listener: str, upstream: str) -> float:
    labels = {"listener": listener, "upstream": upstream, "result": "unavailable"}
    return metric(proxy, "appliance_logins_total", **labels)


def wait_for_unavailable_count(
    proxy: ApplianceProcess, listener: str, upstream: str, minimum: float
) -> float:
    labels = {"listener": listener, "upstream": upstream, "result": "unavailable"}
    return wait_for_metric(proxy, "appliance_logins_total", minimum, **labels)


# Each case: listener, protocol, login form, the user that the client sends, and the
# upstream that the metric names.
UNAVAILABLE_CASES = {
    "imap-login": ("imap_closing", "imap", "login", USER, "imap_closing"),
    "imap-authenticate-plain": (
        "imap_closing",
        "imap",
        "authenticate-plain",
        USER,
        "imap_closing",
    ),
    "imap-authenticate-login": (
        "imap_closing",
        "imap",
        "authenticate-login",
        USER,
        "imap_closing",
    ),
    "pop3-user-pass": ("pop3_closing", "pop3", "user-pass", USER, "pop3_closing"),
    "pop3-auth-plain": ("pop3_closing", "pop3", "auth-plain", USER, "pop3_closing"),
    "pop3-auth-login": ("pop3_closing", "pop3", "auth-login", USER, "pop3_closing"),
    "pop3-apop": ("pop3_closing", "pop3", "apop", USER, "pop3_closing"),
    "pop3-upstream-user-pass": (
        "pop3_closing_user_pass",
        "pop3",
        "auth-plain",
        USER,
        "pop3_closing_user_pass",
    ),
    "imap-tls-upstream": (
        "imap_closing_tls",
        "imap",
        "login",
        USER,
        "imap_closing_tls",
    ),
    "pop3-tls-upstream": (
        "pop3_closing_tls",
        "pop3",
        "auth-plain",
        USER,
        "pop3_closing_tls",
    ),
    "imap-routed-login": (
        "imap_routed",
        "imap",
        "login",
        USER + b"@unreachable",
        "unreachable",
    ),
    "imap-routed-authenticate-plain": (
        "imap_routed",
        "imap",
        "authenticate-plain",
        USER + b"@unreachable",
        "unreachable",
    ),
    "pop3-routed-user-pass": (
        "pop3_routed",
        "pop3",
        "user-pass",
        USER + b"@unreachable",
        "unreachable",
    ),
    "pop3-routed-auth-plain": (
        "pop3_routed",
        "pop3",
        "auth-plain",
        USER + b"@unreachable",
        "unreachable",
    ),
}


@pytest.mark.parametrize("case", UNAVAILABLE_CASES, ids=list(UNAVAILABLE_CASES))
def test_upstream_failure_logs_unavailable(proxy: ApplianceProcess, case: str) -> None:
    listener, protocol, form, user, upstream = UNAVAILABLE_CASES[case]
    source = next_source()
    before = unavailable_count(proxy, listener, upstream)

    rest, port, _ = attempt_login(
        proxy, listener, login_turns(protocol, form, user), source
    )
    line = login_line(proxy, "unavailable", source, port)
    counted = wait_for_unavailable_count(proxy, listener, upstream, before + 1)

    expected = IMAP_UNAVAILABLE if protocol == "imap" else POP3_UNAVAILABLE
    assert rest == expected + b"\r\n"
    assert line.endswith(f'user "{user.decode()}"'), line
    assert " INFO " in line, line
    assert counted == before + 1
    assert fail2ban_hosts([line]) == []
    assert PASSWORD.decode() not in proxy.log_text()
    assert b64(PASSWORD).decode() not in proxy.log_text()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_silent_upstream_logs_unavailable(
    proxy: ApplianceProcess, protocol: str
) -> None:
    listener = f"{protocol}_silent"
    source = next_source()
    before = unavailable_count(proxy, listener, listener)

    turns = login_turns(protocol, "auth-plain" if protocol == "pop3" else "login", USER)
    rest, port, seconds = attempt_login(proxy, listener, turns, source)
    line = login_line(proxy, "unavailable", source, port)
    counted = wait_for_unavailable_count(proxy, listener, listener, before + 1)

    expected = IMAP_TIMED_OUT if protocol == "imap" else POP3_TIMED_OUT
    assert rest == expected + b"\r\n"
    assert line.endswith(f'user "{USER.decode()}"'), line
    assert counted == before + 1
    # The login went out at once, so its reply may wait past the pre-auth timeout.
    assert seconds < PRE_AUTH_TIMEOUT + LOGIN_REPLY_TIMEOUT


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_unavailable_login_keeps_delay(proxy: ApplianceProcess, protocol: str) -> None:
    """An upstream that fails during a login neither grows nor resets the delay."""
    source = next_source()
    routed = f"{protocol}_routed"
    closing = f"{protocol}_closing"
    form = "login" if protocol == "imap" else "user-pass"
    # A server part outside the allow-list fails like a wrong password.
    unknown = login_turns(protocol, form, USER + b"@unknown")
    with connect(proxy, routed, source) as client:
        for turn in unknown:
            client.send(turn.send)
            reply = client.read_line()
        port = client.sock.getsockname()[1]
    failed = login_line(proxy, "failed", source, port)

    turns = login_turns(protocol, form, USER)
    first, _, first_seconds = attempt_login(proxy, closing, turns, source)
    second, _, second_seconds = attempt_login(proxy, closing, turns, source)

    expected = IMAP_UNAVAILABLE if protocol == "imap" else POP3_UNAVAILABLE
    assert reply.startswith((b"a1 NO [AUTHENTICATIONFAILED]", b"-ERR [AUTH]")), reply
    assert failed.endswith(f'user "{USER.decode()}@unknown"'), failed
    assert first == expected + b"\r\n"
    assert second == expected + b"\r\n"
    # One failure earns 1 s, and the unavailable login did not reset it.
    assert first_seconds >= 0.9
    # Still 1 s, not 2 s: the unavailable login did not count as a failure.
    assert 0.9 <= second_seconds < 1.9


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_unreachable_route_grows_delay(proxy: ApplianceProcess, protocol: str) -> None:
    """A routed server that cannot be reached counts as a failure for the delay."""
    source = next_source()
    listener = f"{protocol}_routed"
    form = "login" if protocol == "imap" else "user-pass"
    turns = login_turns(protocol, form, USER + b"@unreachable")

    first, _, first_seconds = attempt_login(proxy, listener, turns, source)
    second, _, second_seconds = attempt_login(proxy, listener, turns, source)

    expected = IMAP_UNAVAILABLE if protocol == "imap" else POP3_UNAVAILABLE
    assert first == expected + b"\r\n"
    assert second == expected + b"\r\n"
    assert first_seconds < 0.9
    assert second_seconds >= 0.9


def logins_received(server: ScriptedServer) -> int:
    """Count the server's connections on which credentials arrived."""
    return sum(record.credentials_received for record in list(server.records))


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_shutdown_during_login_logs_unavailable(
    scripted: dict[str, ScriptedServer],
    tmp_path_factory: pytest.TempPathFactory,
    protocol: str,
) -> None:
    """A shutdown before the upstream replies to a login logs the login as unavailable."""
    listener = f"{protocol}_silent"
    server = scripted[listener]
    config = {
        "listeners": {listener: listener_config(protocol, listener)},
        "upstreams": {listener: {"host": HOST, "port": server.port, "tls": "none"}},
        "limits": {"shutdown_grace_period": 1},
    }
    workdir = tmp_path_factory.mktemp(f"shutdown-{protocol}")
    form = "auth-plain" if protocol == "pop3" else "login"
    with ApplianceProcess(config, workdir) as process:
        with connect(process, listener, HOST) as client:
            port = client.sock.getsockname()[1]
            forwarded = logins_received(server)
            for turn in login_turns(protocol, form, USER):
                client.send(turn.send)
            deadline = time.monotonic() + LOG_TIMEOUT
            while logins_received(server) == forwarded:
                assert time.monotonic() < deadline, "the login never reached the upstream"
                time.sleep(0.05)
            process.stop()
            rest = client.read_until_closed()
        line = login_line(process, "unavailable", HOST, port)

    assert rest.startswith((b"* BYE [UNAVAILABLE]", b"-ERR [SYS/TEMP]")), rest
    assert line.endswith(f'user "{USER.decode()}"'), line
    assert PASSWORD.decode() not in process.log_text()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_refusal_after_deadline_logs_failed(
    proxy: ApplianceProcess, protocol: str
) -> None:
    """A guess sent just before the pre-auth timeout still ends as a failed login."""
    listener = f"{protocol}_slow_refusal"
    source = next_source()
    form = "auth-plain" if protocol == "pop3" else "login"
    [turn] = login_turns(protocol, form, USER)
    with connect(proxy, listener, source) as client:
        port = client.sock.getsockname()[1]
        # The server replies REFUSAL_DELAY seconds after the login, past the timeout.
        time.sleep(PRE_AUTH_TIMEOUT - 1.5)
        client.send(turn.send)
        reply = client.read_line()
    line = login_line(proxy, "failed", source, port)

    assert reply.startswith((b"a1 NO [AUTHENTICATIONFAILED]", b"-ERR [AUTH]")), reply
    assert line.endswith(f'user "{USER.decode()}"'), line
    assert fail2ban_hosts([line]) == [source]


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_temporary_refusal_logs_unavailable(
    proxy: ApplianceProcess, protocol: str
) -> None:
    """A refusal that blames the server is logged as unavailable, not failed."""
    listener = f"{protocol}_temporary"
    source = next_source()
    form = "auth-plain" if protocol == "pop3" else "login"
    [turn] = login_turns(protocol, form, USER)
    failed_labels = {"listener": listener, "upstream": listener, "result": "failed"}
    failed_before = metric(proxy, "appliance_logins_total", **failed_labels)
    before = unavailable_count(proxy, listener, listener)
    with connect(proxy, listener, source) as client:
        port = client.sock.getsockname()[1]
        client.send(turn.send)
        reply = client.read_line()
    line = login_line(proxy, "unavailable", source, port)
    counted = wait_for_unavailable_count(proxy, listener, listener, before + 1)

    assert reply.startswith((b"a1 NO [UNAVAILABLE]", b"-ERR [SYS/TEMP]")), reply
    assert fail2ban_hosts([line]) == []
    assert counted == before + 1
    assert metric(proxy, "appliance_logins_total", **failed_labels) == failed_before


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_timeout_during_delay_logs_cancelled(
    proxy: ApplianceProcess, protocol: str
) -> None:
    """A login that the pre-auth timeout cuts off during the delay is logged."""
    source = next_source()
    routed = f"{protocol}_routed"
    form = "login" if protocol == "imap" else "user-pass"
    turns = login_turns(protocol, form, USER + b"@unknown")
    # Three logins outside the allow-list fail, so the next one waits 4 s, 1 s longer
    # than the whole pre-auth timeout.
    for _ in range(3):
        attempt_login_until_reply(proxy, routed, turns, source)
    with connect(proxy, routed, source) as client:
        port = client.sock.getsockname()[1]
        for turn in turns:
            client.send(turn.send)
            if turn.expect is not None:
                client.read_line()
        rest = client.read_until_closed()
    line = login_line(proxy, "cancelled", source, port)

    expected = IMAP_TIMED_OUT if protocol == "imap" else POP3_TIMED_OUT
    assert rest == expected + b"\r\n"
    assert line.endswith(f'user "{USER.decode()}@unknown"'), line


def attempt_login_until_reply(
    proxy: ApplianceProcess, listener: str, turns: list[Turn], source: str
) -> bytes:
    """Run a login on a new connection and return the reply to its last turn."""
    with connect(proxy, listener, source) as client:
        for turn in turns:
            client.send(turn.send)
            reply = client.read_line()
    return reply


def test_repeated_logins_cannot_extend_session(
    scripted: dict[str, ScriptedServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each forwarded login extends the pre-auth timeout, but only up to one grace.

    Without the failed-login delay, nothing else would end a session whose client sends
    one wrong password after another.
    """
    server = scripted["imap_slow_refusal"]
    config = {
        "listeners": {"imap": listener_config("imap", "slow")},
        "upstreams": {"slow": {"host": HOST, "port": server.port, "tls": "none"}},
        "limits": {
            "pre_auth_timeout": PRE_AUTH_TIMEOUT,
            "login_reply_timeout": LOGIN_REPLY_TIMEOUT,
            "auth_failure_delay": 0,
        },
    }
    [turn] = login_turns("imap", "login", USER)
    replies = []
    with ApplianceProcess(config, tmp_path_factory.mktemp("no-delay")) as process:
        with connect(process, "imap", HOST) as client:
            started = time.monotonic()
            while len(replies) < 20:
                client.send(turn.send)
                reply = client.read_line()
                replies.append(reply)
                if not reply.startswith(b"a1 NO"):
                    break
            seconds = time.monotonic() - started

    assert replies[-1] == IMAP_TIMED_OUT + b"\r\n", replies
    assert seconds < PRE_AUTH_TIMEOUT + LOGIN_REPLY_TIMEOUT + 1.5, replies
