"""The appliance's log, read from a real process after real sessions.

Each format (text and JSON, both at level TRACE) gets one appliance run. It logs in
over POP3 with USER/PASS, AUTH PLAIN (initial response and continuation) and AUTH LOGIN,
logs in over IMAP and fails one login, all with known passwords. The tests then parse
the whole log.
"""

from __future__ import annotations

import imaplib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.test_pop3_proxy import (
    HOST,
    TIMEOUT,
    Pop3Wire,
    b64,
    client_context,
    plain_response,
)
from tests.support.appliance import ApplianceProcess, dovecot_config, free_port
from tests.support.certs import CertFiles, TestPKI
from tests.support.dovecot import DovecotServer

TRACE_USER = "tracer"
TRACE_PASSWORD = "Tr4ce-Passw0rd-6170"
WRONG_PASSWORD = "Wr0ng-Passw0rd-8841"
SECRETS = [
    form
    for password in (TRACE_PASSWORD, WRONG_PASSWORD)
    for form in (
        password,
        b64(password).decode(),
        plain_response(TRACE_USER, password).decode(),
    )
]
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +"
    r"(?:\[session=(?P<session>[0-9a-f]+) listener=[\w-]+\] )?(?P<message>.*)$"
)


@dataclass
class Flow:
    """One client session as the test saw it, to find in the log."""

    name: str
    address: str
    client_tls: bool
    upstream_tls: bool
    bytes_sent: int | None = None
    bytes_received: int | None = None


@dataclass
class LogLine:
    session: str | None
    message: str
    client: str | None = None


@dataclass
class LogRun:
    format: str
    text: str
    lines: list[LogLine]
    unparsed: list[str]
    flows: list[Flow]


def appliance_config(
    server: DovecotServer, cert: CertFiles, json_output: bool
) -> dict[str, Any]:
    listeners = {
        "pop3_implicit": ("pop3", "implicit", "implicit"),
        "pop3_plain": ("pop3", "none", "starttls"),
        "pop3_stls": ("pop3", "starttls", "none"),
        "imap_plain": ("imap", "none", "starttls"),
    }
    log_settings = {"level": "TRACE", "json": json_output}
    return dovecot_config(server, listeners, cert, logging=log_settings)


# Client sessions


def expect_ok(reply: bytes) -> None:
    assert reply.startswith(b"+OK"), reply


def user_pass(wire: Pop3Wire) -> None:
    expect_ok(wire.command(f"USER {TRACE_USER}".encode()))
    expect_ok(wire.command(f"PASS {TRACE_PASSWORD}".encode()))


def plain_initial_response(wire: Pop3Wire) -> None:
    expect_ok(wire.command(b"AUTH PLAIN " + plain_response(TRACE_USER, TRACE_PASSWORD)))


def plain_continuation(wire: Pop3Wire) -> None:
    assert wire.command(b"AUTH PLAIN") == b"+ \r\n"
    expect_ok(wire.command(plain_response(TRACE_USER, TRACE_PASSWORD)))


def login_challenges(wire: Pop3Wire) -> None:
    assert wire.command(b"AUTH LOGIN").startswith(b"+ ")
    assert wire.command(b64(TRACE_USER)).startswith(b"+ ")
    expect_ok(wire.command(b64(TRACE_PASSWORD)))


def login_initial_response(wire: Pop3Wire) -> None:
    assert wire.command(b"AUTH LOGIN " + b64(TRACE_USER)).startswith(b"+ ")
    expect_ok(wire.command(b64(TRACE_PASSWORD)))


def wrong_password(wire: Pop3Wire) -> None:
    expect_ok(wire.command(f"USER {TRACE_USER}".encode()))
    assert wire.command(f"PASS {WRONG_PASSWORD}".encode()).startswith(b"-ERR")


def run_pop3(
    appliance: ApplianceProcess,
    pki: TestPKI,
    listener: str,
    steps: Callable[[Pop3Wire], None],
) -> Flow:
    """Run `steps` after the greeting (and STLS) on `listener`, then QUIT."""
    config = appliance.config["listeners"][listener]
    context = client_context(pki)
    implicit = config["tls"] == "implicit"
    wire = Pop3Wire.connect(appliance.port(listener), context if implicit else None)
    try:
        expect_ok(wire.line())
        if config["tls"] == "starttls":
            expect_ok(wire.command(b"STLS"))
            wire.start_tls(context)
        steps(wire)
        expect_ok(wire.command(b"QUIT"))
        assert wire.read_to_end() == b""
        address = wire.local_address
    finally:
        wire.close()
    upstream = appliance.config["upstreams"][config["upstream"]]
    return Flow(
        name=f"{listener} {steps.__name__}",
        address=address,
        client_tls=config["tls"] != "none",
        upstream_tls=upstream["tls"] != "none",
        bytes_sent=wire.bytes_sent,
        bytes_received=wire.bytes_received,
    )


def run_imap(appliance: ApplianceProcess) -> Flow:
    client = imaplib.IMAP4(HOST, appliance.port("imap_plain"), timeout=TIMEOUT)
    host, port = client.sock.getsockname()[:2]
    try:
        client.login(TRACE_USER, TRACE_PASSWORD)
    finally:
        client.logout()
    return Flow(
        name="imap LOGIN", address=f"{host}:{port}", client_tls=False, upstream_tls=True
    )


def run_flows(appliance: ApplianceProcess, pki: TestPKI) -> list[Flow]:
    pop3_runs = [
        ("pop3_implicit", user_pass),
        ("pop3_plain", plain_initial_response),
        ("pop3_plain", plain_continuation),
        ("pop3_plain", login_challenges),
        ("pop3_stls", login_initial_response),
    ]
    flows = [run_pop3(appliance, pki, listener, steps) for listener, steps in pop3_runs]
    flows.append(run_imap(appliance))
    # Last, because Dovecot 2.3.19 delayed the first successful login after a failed
    # one by about 4 s in local runs.
    flows.append(run_pop3(appliance, pki, "pop3_stls", wrong_password))
    return flows


# Log parsing


def parse_text(text: str) -> tuple[list[LogLine], list[str]]:
    lines, unparsed = [], []
    for raw in text.splitlines():
        match = TEXT_LINE.match(raw)
        if match is None:
            unparsed.append(raw)
            continue
        lines.append(LogLine(match["session"], match["message"]))
    return lines, unparsed


def parse_json(text: str) -> tuple[list[LogLine], list[str]]:
    lines, unparsed = [], []
    for raw in text.splitlines():
        try:
            record = json.loads(raw)["record"]
        except (ValueError, KeyError, TypeError):
            unparsed.append(raw)
            continue
        extra = record["extra"]
        lines.append(
            LogLine(extra.get("session"), record["message"], extra.get("client"))
        )
    return lines, unparsed


@pytest.fixture(scope="module", params=["text", "json"])
def log_run(
    request: pytest.FixtureRequest,
    dovecot_factory: Any,
    pki: TestPKI,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LogRun]:
    json_output = request.param == "json"
    # A private server per run, because the failed login delays later logins.
    server = dovecot_factory(fresh=True, extra_users={TRACE_USER: TRACE_PASSWORD})
    cert = pki.issue_server_cert(f"logging-{request.param}")
    workdir = tmp_path_factory.mktemp(f"logging-{request.param}")
    appliance = ApplianceProcess(appliance_config(server, cert, json_output), workdir)
    with appliance:
        flows = run_flows(appliance, pki)
    # Leaving the block stopped the process, so every session's end line is written.
    text = appliance.log_text()
    lines, unparsed = parse_json(text) if json_output else parse_text(text)
    yield LogRun(
        format=request.param, text=text, lines=lines, unparsed=unparsed, flows=flows
    )


def session_lines(run: LogRun, flow: Flow) -> list[LogLine]:
    """Return the lines of the session that `flow` opened, found by client address."""
    # The start line is at DEBUG, which these runs log because they run at TRACE.
    starts = [
        line
        for line in run.lines
        if line.message == f"session started: client {flow.address}"
    ]
    assert len(starts) == 1, f"{flow.name}: expected one start line for {flow.address}"
    return [line for line in run.lines if line.session == starts[0].session]


def end_message(run: LogRun, flow: Flow) -> str:
    ends = [
        line.message
        for line in session_lines(run, flow)
        if line.message.startswith("session ended: ")
    ]
    assert len(ends) == 1, f"{flow.name}: expected one end line"
    return ends[0]


# Tests


def test_every_line_parses(log_run):
    assert log_run.unparsed == []


def test_session_details_only_in_session_lines(log_run):
    # Lines of the appliance itself (startup, probes, reloads, shutdown) carry no
    # session id, but none of them may name a session's client or user.
    details = [flow.address for flow in log_run.flows] + [TRACE_USER]
    orphans = [
        line.message
        for line in log_run.lines
        if line.session is None and any(detail in line.message for detail in details)
    ]
    assert orphans == []


def test_login_lines_carry_session_id(log_run):
    logins = [line for line in log_run.lines if line.message.startswith("login ")]
    assert len(logins) == len(log_run.flows)
    assert all(line.session is not None for line in logins)


def test_start_line_names_client(log_run):
    for flow in log_run.flows:
        lines = session_lines(log_run, flow)
        assert lines[0].message == f"session started: client {flow.address}", flow.name


def test_end_line_names_client(log_run):
    for flow in log_run.flows:
        message = end_message(log_run, flow)
        assert f"; client {flow.address}; " in message, flow.name


def test_json_records_carry_client(log_run):
    if log_run.format != "json":
        pytest.skip("text lines carry the client address in the start and end lines")
    for flow in log_run.flows:
        clients = {line.client for line in session_lines(log_run, flow)}
        assert clients == {flow.address}, flow.name


def test_end_line_names_upstream(log_run):
    for flow in log_run.flows:
        assert re.search(
            r"; upstream \w+ \(localhost:\d+, \w+\);", end_message(log_run, flow)
        )


def test_end_line_reports_tls_versions(log_run):
    for flow in log_run.flows:
        message = end_message(log_run, flow)
        client_tls = re.search(r"; client tls (\S+)", message)
        upstream_tls = re.search(r"; upstream tls (\S+)", message)
        assert client_tls is not None, flow.name
        assert upstream_tls is not None, flow.name
        assert client_tls[1].startswith("TLSv1.") == flow.client_tls, flow.name
        assert upstream_tls[1].startswith("TLSv1.") == flow.upstream_tls, flow.name


def test_end_line_reports_byte_counts(log_run):
    for flow in log_run.flows:
        if flow.bytes_sent is None:
            continue
        counts = f"bytes from client {flow.bytes_sent}, to client {flow.bytes_received}"
        assert end_message(log_run, flow).endswith(counts), flow.name


def test_ready_line_counts_listeners(log_run):
    ready = [
        line.message
        for line in log_run.lines
        if line.message.startswith("appliance ready")
    ]
    assert ready == ["appliance ready with 4 listeners"]


def test_ready_line_counts_one_listener(tmp_path):
    config = {
        "listeners": {
            "imap": {"protocol": "imap", "port": free_port(), "upstream": "mail"}
        },
        "upstreams": {"mail": {"host": "127.0.0.1", "tls": "none"}},
    }
    with ApplianceProcess(config, tmp_path) as process:
        line = process.wait_for_log("appliance ready")
    assert line.endswith("appliance ready with 1 listener"), line


def test_failed_login_logged_in_session(log_run):
    failed = [
        line
        for line in log_run.lines
        if line.message.startswith("login failed: client ")
        and line.message.endswith(f'user "{TRACE_USER}"')
    ]
    assert len(failed) == 1
    assert failed[0].session is not None


@pytest.mark.parametrize("secret", SECRETS)
def test_password_never_logged(log_run, secret):
    assert secret not in log_run.text


def test_config_warning_logged_once(tmp_path):
    config = {
        "listeners": {
            "imap": {"protocol": "imap", "port": free_port(), "upstream": "mail"}
        },
        "upstreams": {
            "mail": {"host": "127.0.0.1", "tls": "none", "allow_plaintext": True}
        },
    }
    # A misspelt variable gets a warning, which run logs once and does not print.
    env = {"APPLIANCE_LISTNERS__IMAP__PORT": "1143"}
    with ApplianceProcess(config, tmp_path, env=env) as process:
        deadline = time.monotonic() + 15
        while "appliance ready" not in process.log_text():
            assert time.monotonic() < deadline, process.log_text()
            time.sleep(0.05)
    warning = "environment variable APPLIANCE_LISTNERS__IMAP__PORT matches no config field"
    assert process.log_text().count(warning) == 1
