"""The appliance's DEBUG log after every login form of both protocols.

One appliance logs at DEBUG while clients log in to Dovecot in every way that IMAP and
POP3 allow, with and without STARTTLS/STLS, fetch a message, fail a login, cancel,
send invalid base64 and try to log in before TLS. The log must contain no password in
any form, no base64 credential and no message text. User names that contain CR, LF,
quotes or a fake log line go to a fake upstream, and must stay inside one escaped log
line, so that neither a reader nor fail2ban reads a forged line. The fail2ban filter in
examples/fail2ban/ must find exactly the failed logins, with the real client address.
"""

from __future__ import annotations

import base64
import configparser
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_hostile_input import (
    PasswordServer,
    SourceClient,
    next_source,
)
from tests.support.appliance import (
    REPO_ROOT,
    ApplianceProcess,
    ListenerSpec,
    dovecot_config,
    listener_config,
)
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer
from tests.support.scripted_server import (
    LineClient,
    Step,
    converse,
    imap_login_exchanges,
    imap_quoted,
)

USER = "hygiene"
PASSWORD = 'Hyg1ene "Pa55" w0rd\\4242'
WRONG_PASSWORD = "Wr0ng-Hyg1ene-9090"
BODY_MARKER = "Body-Marker-7f3a9c51"
SUBJECT_MARKER = "Subject-Marker-0b6e2d84"
FORGED_HOST = "192.0.2.66"
FORGED_LINE = (
    "2026-01-01 00:00:00.000 INFO    [session=deadbeef listener=imap] "
    f'login failed: client {FORGED_HOST} port 1 user "x"'
)
FILTER_FILE = REPO_ROOT / "examples" / "fail2ban" / "appliance.conf"
LOG_TIMEOUT = 15.0
LOG_DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+")
# What fail2ban's <HOST> matches in these lines: an IPv4 or IPv6 address.
HOST_PATTERN = r"(?P<host>[0-9A-Fa-f.:]+)"


def plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


def b64(value: bytes) -> bytes:
    return base64.b64encode(value)


def secret_forms(password: str) -> list[bytes]:
    """Return every form in which a password could leak into the log."""
    raw = password.encode()
    return [
        raw,
        imap_quoted(raw),
        b64(raw),
        plain(USER.encode(), raw),
    ]


# Appliance


@pytest.fixture(scope="module")
def mail_server(dovecot_factory) -> DovecotServer:
    server = dovecot_factory(tls="both", fresh=True, extra_users={USER: PASSWORD})
    message = (
        f"From: sender@example.invalid\r\nTo: {USER}@example.invalid\r\n"
        f"Subject: {SUBJECT_MARKER}\r\n\r\n{BODY_MARKER}\r\n"
    ).encode()
    server.deliver(USER, message)
    return server


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, PasswordServer]]:
    with PasswordServer("imap") as imap, PasswordServer("pop3") as pop3:
        yield {"imap": imap, "pop3": pop3}


@pytest.fixture(scope="module")
def proxy(
    mail_server, fakes, pki: TestPKI, tmp_path_factory
) -> Iterator[ApplianceProcess]:
    cert = pki.issue_server_cert("log-hygiene")
    listeners: dict[str, ListenerSpec] = {}
    for protocol in ("imap", "pop3"):
        listeners[f"{protocol}_plain"] = (protocol, "none", "starttls")
        listeners[f"{protocol}_starttls"] = (protocol, "starttls", "starttls")
    config = dovecot_config(mail_server, listeners, cert, logging={"level": "DEBUG"})
    for protocol, server in fakes.items():
        fake = f"{protocol}_fake"
        config["listeners"][fake] = listener_config(protocol, fake)
        config["upstreams"][fake] = {
            "host": "127.0.0.1",
            "port": server.port,
            "tls": "none",
        }
    with ApplianceProcess(config, tmp_path_factory.mktemp("log-hygiene")) as process:
        yield process


@pytest.fixture(scope="module")
def tls_context(pki: TestPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


# Clients


def open_session(
    proxy: ApplianceProcess, listener: str, context: ssl.SSLContext
) -> LineClient:
    """Connect from a fresh source address and upgrade a starttls listener to TLS."""
    client = SourceClient(proxy.port(listener), next_source())
    greeting = client.read_line()
    assert greeting.startswith((b"* OK", b"+OK")), greeting
    if listener == "imap_starttls":
        converse(client, [Step(b"s1 STARTTLS\r\n", b"s1 OK")])
        client.start_tls(context)
    elif listener == "pop3_starttls":
        client.send(b"STLS\r\n")
        assert client.read_line().startswith(b"+OK")
        client.start_tls(context)
    return client


def pop3_exchange(client: LineClient, lines: list[bytes]) -> bytes:
    """Send each line, read one reply line each, and return the last reply."""
    reply = b""
    for line in lines:
        client.send(line + b"\r\n")
        reply = client.read_line()
    return reply


def pop3_login_forms(user: bytes, password: bytes) -> dict[str, list[bytes]]:
    """Return every POP3 way to log in: USER/PASS, AUTH PLAIN and AUTH LOGIN."""
    return {
        "user-pass": [b"USER " + user, b"PASS " + password],
        "plain-initial-response": [b"AUTH PLAIN " + plain(user, password)],
        "plain-continuation": [b"AUTH PLAIN", plain(user, password)],
        "login-mechanism": [b"AUTH LOGIN", b64(user), b64(password)],
        "login-mechanism-initial-response": [b"AUTH LOGIN " + b64(user), b64(password)],
    }


def run_imap_logins(proxy, context) -> int:
    count = 0
    for listener in ("imap_plain", "imap_starttls"):
        for steps in imap_login_exchanges(USER.encode(), PASSWORD.encode()).values():
            with open_session(proxy, listener, context) as client:
                converse(client, steps)
                converse(client, [Step(b"z1 LOGOUT\r\n", b"z1 OK")])
            count += 1
    return count


def run_pop3_logins(proxy, context) -> int:
    count = 0
    for listener in ("pop3_plain", "pop3_starttls"):
        for lines in pop3_login_forms(USER.encode(), PASSWORD.encode()).values():
            with open_session(proxy, listener, context) as client:
                reply = pop3_exchange(client, lines)
                assert reply.startswith(b"+OK"), reply
                pop3_exchange(client, [b"QUIT"])
            count += 1
    return count


def fetch_marker_message(proxy, mail_server, context) -> None:
    number = mail_server.message_count(USER)
    with open_session(proxy, "imap_plain", context) as client:
        converse(
            client,
            imap_login_exchanges(USER.encode(), PASSWORD.encode())["login-quoted"],
        )
        converse(client, [Step(b"f1 SELECT INBOX\r\n", b"f1 OK")])
        replies = converse(client, [Step(b"f2 FETCH %d BODY[]\r\n" % number, b"f2 OK")])
    assert any(BODY_MARKER.encode() in reply for reply in replies)
    with open_session(proxy, "pop3_plain", context) as client:
        pop3_exchange(
            client, pop3_login_forms(USER.encode(), PASSWORD.encode())["user-pass"]
        )
        client.send(b"RETR %d\r\n" % number)
        body = b""
        while (line := client.read_line()) != b".\r\n":
            body += line
    assert BODY_MARKER.encode() in body


def run_refused_logins(proxy, context) -> None:
    """Send the password in ways that never reach the upstream."""
    password = PASSWORD.encode()
    with open_session(proxy, "imap_plain", context) as client:
        steps = [
            Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"),
            Step(password + b"\r\n", b"a1 BAD"),
        ]
        converse(client, steps)
        steps = [
            Step(b"a2 AUTHENTICATE LOGIN\r\n", b"+"),
            Step(b64(USER.encode()) + b"\r\n", b"+"),
        ]
        converse(client, [*steps, Step(b"*\r\n", b"a2 BAD")])
    with SourceClient(proxy.port("imap_starttls")) as client:
        client.read_line()
        refused = b"a1 LOGIN " + USER.encode() + b" " + imap_quoted(password) + b"\r\n"
        converse(client, [Step(refused, b"a1 NO [PRIVACYREQUIRED]")])
    with open_session(proxy, "pop3_plain", context) as client:
        assert pop3_exchange(client, [b"AUTH PLAIN", password]).startswith(b"-ERR")
        assert pop3_exchange(
            client, [b"AUTH LOGIN", b64(USER.encode()), b"*"]
        ).startswith(b"-ERR")
    with SourceClient(proxy.port("pop3_starttls")) as client:
        client.read_line()
        # USER and PASS are one attempt, so they log one `login rejected` line.
        assert pop3_exchange(client, [b"USER " + USER.encode()]).startswith(b"-ERR")
        assert pop3_exchange(client, [b"PASS " + password]).startswith(b"-ERR")
        initial = b"AUTH PLAIN " + plain(USER.encode(), password)
        assert pop3_exchange(client, [initial]).startswith(b"-ERR")


def run_wrong_passwords(proxy, context) -> list[str]:
    """Fail one login per protocol at Dovecot and return the client addresses."""
    wrong = WRONG_PASSWORD.encode()
    sources = []
    with open_session(proxy, "imap_plain", context) as client:
        sources.append(client.source)
        quoted = b"w1 LOGIN " + USER.encode() + b" " + imap_quoted(wrong) + b"\r\n"
        converse(client, [Step(quoted, b"w1 NO")])
    with open_session(proxy, "pop3_starttls", context) as client:
        sources.append(client.source)
        reply = pop3_exchange(client, [b"USER " + USER.encode(), b"PASS " + wrong])
        assert reply.startswith(b"-ERR"), reply
    return sources


FORGED_USERS = {
    "crlf": f"x\r\n{FORGED_LINE}".encode(),
    "lf": f"x\n{FORGED_LINE}".encode(),
    "cr": f"x\r{FORGED_LINE}".encode(),
    "quote": f'x" client {FORGED_HOST} port 1 user "'.encode(),
}


def forge_with_imap_literal(client: LineClient, user: bytes) -> None:
    steps = [
        Step(b"a1 LOGIN {%d}\r\n" % len(user), b"+"),
        Step(user + b" wrong\r\n", b"a1 NO"),
    ]
    converse(client, steps)


def forge_with_imap_plain(client: LineClient, user: bytes) -> None:
    command = b"a1 AUTHENTICATE PLAIN " + plain(user, b"wrong") + b"\r\n"
    converse(client, [Step(command, b"a1 NO")])


def forge_with_pop3_plain(client: LineClient, user: bytes) -> None:
    assert pop3_exchange(client, [b"AUTH PLAIN " + plain(user, b"wrong")]).startswith(
        b"-ERR"
    )


FORGERS: dict[str, tuple[str, Callable[[LineClient, bytes], None]]] = {
    "imap-literal": ("imap_fake", forge_with_imap_literal),
    "imap-plain": ("imap_fake", forge_with_imap_plain),
    "pop3-plain": ("pop3_fake", forge_with_pop3_plain),
}


def run_forgeries(proxy, context) -> list[str]:
    """Fail logins with user names that forge log lines, and return the sources."""
    sources = []
    for listener, forge in FORGERS.values():
        for user in FORGED_USERS.values():
            with open_session(proxy, listener, context) as client:
                forge(client, user)
                sources.append(client.source)
    return sources


# The run


class HygieneRun:
    """The log of one appliance after all the sessions above."""

    def __init__(self, text: str, logins: int, failed_sources: list[str]) -> None:
        self.text = text
        self.lines = text.splitlines()
        self.logins = logins
        self.failed_sources = failed_sources


def outcome_count(lines: list[str], result: str, user: str = '[^"]*') -> int:
    """Count the outcome lines of `result`, for `user` (a regex) or any user."""
    pattern = re.compile(rf'login {result}: client \S+ port \d+ user "{user}"$')
    return sum(pattern.search(line) is not None for line in lines)


@pytest.fixture(scope="module")
def run(proxy, mail_server, tls_context) -> HygieneRun:
    logins = run_imap_logins(proxy, tls_context) + run_pop3_logins(proxy, tls_context)
    fetch_marker_message(proxy, mail_server, tls_context)
    run_refused_logins(proxy, tls_context)
    failed_sources = run_forgeries(proxy, tls_context)
    failed_sources += run_wrong_passwords(proxy, tls_context)
    expected_failures = len(failed_sources)
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        text = proxy.log_text()
        if text.count("login failed: client") >= expected_failures:
            break
        time.sleep(0.1)
    return HygieneRun(proxy.log_text(), logins + 2, failed_sources)


# Secrets and message text


@pytest.mark.parametrize(
    "secret",
    [*secret_forms(PASSWORD), *secret_forms(WRONG_PASSWORD)],
    ids=lambda secret: repr(secret)[:24],
)
def test_log_has_no_credential(run, secret):
    assert secret.decode() not in run.text


def test_log_has_no_message_text(run):
    assert BODY_MARKER not in run.text
    assert SUBJECT_MARKER not in run.text


def test_log_runs_at_debug(run):
    assert any(" DEBUG " in line for line in run.lines)


def test_every_login_logged(run):
    assert outcome_count(run.lines, "succeeded", USER) >= run.logins


def test_refused_logins_logged(run):
    assert outcome_count(run.lines, "rejected") >= 3
    assert outcome_count(run.lines, "invalid") >= 2
    assert outcome_count(run.lines, "cancelled") >= 2


# Forged log lines


def test_forged_line_never_starts_a_line(run):
    assert not any(line.startswith(FORGED_LINE[:23]) for line in run.lines)


def test_every_log_line_has_a_timestamp(run):
    assert all(LOG_DATE.match(line) for line in run.lines), [
        line for line in run.lines if not LOG_DATE.match(line)
    ]


def test_forged_user_escaped_in_one_line(run):
    escaped = 'user "x\\x0d\\x0a2026-01-01 00:00:00.000 INFO'
    assert any(escaped in line for line in run.lines)


def test_quote_in_user_escaped(run):
    assert any(
        f'user "x\\x22 client {FORGED_HOST} port 1 user \\x22"' in line
        for line in run.lines
    )


# fail2ban


def failregex() -> str:
    parser = configparser.ConfigParser()
    parser.read(FILTER_FILE)
    return parser["Definition"]["failregex"]


def fail2ban_hosts(lines: list[str]) -> list[str]:
    """Return the host that the filter finds in each line, as fail2ban reads it.

    fail2ban removes the time stamp that its datepattern matched and applies the
    failregex to the rest of the line.
    """
    pattern = re.compile(failregex().replace("<HOST>", HOST_PATTERN))
    hosts = []
    for line in lines:
        date = LOG_DATE.match(line)
        if date is None:
            continue
        match = pattern.search(line[date.end() :])
        if match is not None:
            hosts.append(match["host"])
    return hosts


def test_fail2ban_matches_failed_logins(run):
    assert sorted(fail2ban_hosts(run.lines)) == sorted(run.failed_sources)


def test_fail2ban_ignores_forged_host(run):
    assert FORGED_HOST not in fail2ban_hosts(run.lines)


def test_fail2ban_ignores_other_results(run):
    others = [line for line in run.lines if "login failed:" not in line]
    assert fail2ban_hosts(others) == []


def test_fail2ban_regex_tool_agrees(run, tmp_path: Path):
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        pytest.skip("fail2ban-regex is not installed")
    log_file = tmp_path / "appliance.log"
    log_file.write_text(run.text)
    result = subprocess.run(
        [tool, "--print-all-matched", str(log_file), str(FILTER_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    matched = re.search(r"Lines: \d+ lines, \d+ ignored, (\d+) matched", result.stdout)
    assert matched is not None, result.stdout + result.stderr
    assert int(matched[1]) == len(run.failed_sources), result.stdout
