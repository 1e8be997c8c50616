"""The admin listener and `appliance healthcheck`, on the real appliance and a real Dovecot.

One appliance process per event loop (asyncio and uvloop) serves the module: an IMAP and
a POP3 listener in front of Dovecot, and a listener whose upstream is a closed port. The
Dovecot server is private to this module, because one test fails a login on purpose.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_hostile_input import client_hello
from tests.support.appliance import (
    REPO_ROOT,
    ApplianceProcess,
    dovecot_config,
    free_port,
    upstream_config,
    wait_for_port,
)
from tests.support.dovecot import DovecotServer

HOST = "127.0.0.1"
TIMEOUT = 15.0
USER = "alice"
# Polling for a counter that a session moves when it ends, shortly after the client left.
POLL_INTERVAL = 0.05
POLL_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def mail_server(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="both", fresh=True)


def admin_config(mail_server: DovecotServer) -> dict[str, Any]:
    return {
        "listeners": {
            "imap": {"protocol": "imap", "port": free_port(), "upstream": "mail-imap"},
            "pop3": {"protocol": "pop3", "port": free_port(), "upstream": "mail-pop3"},
            "broken": {"protocol": "imap", "port": free_port(), "upstream": "closed"},
        },
        "upstreams": {
            "mail-imap": upstream_config(mail_server, "starttls", "imap"),
            "mail-pop3": upstream_config(
                mail_server, "implicit", "pop3", session_resumption=True
            ),
            # Nothing listens on this port, so every session there fails to connect.
            "closed": {"host": HOST, "port": free_port(), "tls": "implicit"},
        },
        "admin": {"enabled": True, "port": free_port()},
    }


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def appliance(request, mail_server, tmp_path_factory) -> Iterator[ApplianceProcess]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    config = admin_config(mail_server)
    workdir = tmp_path_factory.mktemp(f"admin-{request.param}")
    env = {"APPLIANCE_EVENT_LOOP": request.param}
    with ApplianceProcess(config, workdir, env=env) as process:
        wait_for_port(HOST, config["admin"]["port"])
        yield process


def admin_url(appliance: ApplianceProcess, path: str) -> str:
    return f"http://{HOST}:{appliance.config['admin']['port']}{path}"


def http_get(url: str) -> tuple[int, str, str]:
    """Return (status, content type, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(
    appliance: ApplianceProcess,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of /metrics by (name, sorted labels)."""
    _, _, body = http_get(admin_url(appliance, "/metrics"))
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(appliance: ApplianceProcess, name: str, **labels: str) -> float:
    return scrape(appliance).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_metric(
    appliance: ApplianceProcess, name: str, minimum: float, **labels: str
) -> float:
    deadline = time.monotonic() + POLL_TIMEOUT
    value = metric(appliance, name, **labels)
    while value < minimum and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        value = metric(appliance, name, **labels)
    return value


def imap_login(
    appliance: ApplianceProcess,
    password: str,
    listener: str = "imap",
    *,
    logout: bool = True,
) -> bool:
    """Log in and select INBOX; then log out, or just close when `logout` is false."""
    client = imaplib.IMAP4(HOST, appliance.port(listener), timeout=TIMEOUT)
    try:
        client.login(USER, password)
    except imaplib.IMAP4.error:
        client.logout()
        return False
    client.select("INBOX")
    if logout:
        client.logout()
    else:
        client.shutdown()
    return True


def run_healthcheck(config_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "healthcheck",
            "--config",
            str(config_file),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


# Endpoints


def test_healthz_reports_listeners(appliance: ApplianceProcess) -> None:
    status, content_type, body = http_get(admin_url(appliance, "/healthz"))
    document = json.loads(body)
    assert status == 200
    assert content_type == "application/json"
    assert document["status"] == "ok"
    assert document["listeners"] == {
        "imap": "accepting",
        "pop3": "accepting",
        "broken": "accepting",
    }


def test_readyz_reports_config(appliance: ApplianceProcess) -> None:
    status, _, body = http_get(admin_url(appliance, "/readyz"))
    document = json.loads(body)
    assert status == 200
    assert document["status"] == "ready"
    assert document["config"]["version"] == 1
    assert set(document["upstreams"]) == {"mail-imap", "mail-pop3", "closed"}


def test_readyz_shows_upstream_tls_after_session(
    appliance: ApplianceProcess, mail_server: DovecotServer
) -> None:
    assert imap_login(appliance, mail_server.users[USER])
    _, _, body = http_get(admin_url(appliance, "/readyz"))
    upstream = json.loads(body)["upstreams"]["mail-imap"]
    assert upstream["reachable"] is True
    assert upstream["tls_mode"] == "starttls"
    assert upstream["tls_version"].startswith("TLSv1.")


def test_unknown_path_is_not_found(appliance: ApplianceProcess) -> None:
    status, _, _ = http_get(admin_url(appliance, "/admin"))
    assert status == 404


def test_metrics_in_prometheus_format(appliance: ApplianceProcess) -> None:
    status, content_type, _ = http_get(admin_url(appliance, "/metrics"))
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert metric(appliance, "appliance_listener_up", listener="imap") == 1.0
    assert metric(appliance, "appliance_config_version") == 1.0


def test_log_names_event_loop(appliance: ApplianceProcess) -> None:
    expected = appliance.extra_env["APPLIANCE_EVENT_LOOP"]
    assert f"event loop: {expected}" in appliance.log_text()


# Counters after sessions


def test_imap_session_moves_counters(
    appliance: ApplianceProcess, mail_server: DovecotServer
) -> None:
    labels = {"listener": "imap", "upstream": "mail-imap"}
    sessions_before = metric(
        appliance, "appliance_sessions_total", outcome="closed_by_client", **labels
    )
    logins_before = metric(
        appliance, "appliance_logins_total", result="succeeded", **labels
    )
    sent_before = metric(
        appliance, "appliance_client_bytes_total", direction="sent", **labels
    )

    # Without LOGOUT the client ends the session, so its outcome is certain.
    assert imap_login(appliance, mail_server.users[USER], logout=False)

    sessions = wait_for_metric(
        appliance,
        "appliance_sessions_total",
        sessions_before + 1,
        outcome="closed_by_client",
        **labels,
    )
    logins = metric(appliance, "appliance_logins_total", result="succeeded", **labels)
    sent = metric(appliance, "appliance_client_bytes_total", direction="sent", **labels)
    assert sessions == sessions_before + 1
    assert logins == logins_before + 1
    assert sent > sent_before


def test_pop3_session_moves_counters(
    appliance: ApplianceProcess, mail_server: DovecotServer
) -> None:
    labels = {"listener": "pop3", "upstream": "mail-pop3"}
    before = metric(appliance, "appliance_logins_total", result="succeeded", **labels)
    client = poplib.POP3(HOST, appliance.port("pop3"), timeout=TIMEOUT)
    client.user(USER)
    client.pass_(mail_server.users[USER])
    client.stat()
    client.quit()
    logins = wait_for_metric(
        appliance, "appliance_logins_total", before + 1, result="succeeded", **labels
    )
    tls_mode = metric(
        appliance, "appliance_upstream_tls_mode", upstream="mail-pop3", mode="implicit"
    )
    assert logins == before + 1
    assert tls_mode == 1.0


def test_upstream_tls_sessions_resumed(
    appliance: ApplianceProcess, mail_server: DovecotServer
) -> None:
    # The fixture's Dovecot has one login process, so its tickets resume every time.
    labels = {"upstream": "mail-pop3", "resumed": "yes"}
    before = metric(appliance, "appliance_upstream_tls_handshakes_total", **labels)
    for _ in range(3):
        client = poplib.POP3(HOST, appliance.port("pop3"), timeout=TIMEOUT)
        client.user(USER)
        client.pass_(mail_server.users[USER])
        client.quit()
    resumed = wait_for_metric(
        appliance, "appliance_upstream_tls_handshakes_total", before + 2, **labels
    )
    assert resumed >= before + 2


def test_failed_login_counted(appliance: ApplianceProcess) -> None:
    labels = {"listener": "imap", "upstream": "mail-imap", "result": "failed"}
    before = metric(appliance, "appliance_logins_total", **labels)
    assert not imap_login(appliance, "wrong-password-for-metrics")
    assert (
        wait_for_metric(appliance, "appliance_logins_total", before + 1, **labels)
        == before + 1
    )


# Logins that the appliance ends itself, each as the client sends it and by the result
# word of its log line.
REFUSED_LOGINS = {
    "rejected": [b"a1 AUTHENTICATE X-UNKNOWN\r\n"],
    "cancelled": [b"a1 AUTHENTICATE PLAIN\r\n", b"*\r\n"],
    "invalid": [b"a1 AUTHENTICATE PLAIN not*base64!\r\n"],
}


@pytest.mark.parametrize("result", REFUSED_LOGINS)
def test_refused_login_counted(appliance: ApplianceProcess, result: str) -> None:
    labels = {"listener": "imap", "upstream": "mail-imap", "result": result}
    before = metric(appliance, "appliance_logins_total", **labels)
    with socket.create_connection((HOST, appliance.port("imap")), timeout=TIMEOUT) as sock:
        replies = sock.makefile("rb")
        greeting = replies.readline()
        for line in REFUSED_LOGINS[result]:
            sock.sendall(line)
            reply = replies.readline()
        sock.sendall(b"a2 LOGOUT\r\n")
    counted = wait_for_metric(appliance, "appliance_logins_total", before + 1, **labels)
    assert greeting.startswith(b"* OK"), greeting
    assert reply.startswith((b"a1 NO", b"a1 BAD")), reply
    assert counted == before + 1
    assert f'login {result}: client 127.0.0.1 ' in appliance.log_text()


def test_tls_on_plaintext_port_counted(appliance: ApplianceProcess) -> None:
    labels = {
        "listener": "imap",
        "upstream": "mail-imap",
        "outcome": "rejected_tls_on_plaintext_port",
    }
    before = metric(appliance, "appliance_sessions_total", **labels)
    with socket.create_connection((HOST, appliance.port("imap")), timeout=TIMEOUT) as sock:
        greeting = sock.makefile("rb").readline()
        sock.sendall(client_hello())
    counted = wait_for_metric(appliance, "appliance_sessions_total", before + 1, **labels)
    assert greeting.startswith(b"* OK"), greeting
    assert counted == before + 1


def test_upstream_connect_error_counted(appliance: ApplianceProcess) -> None:
    labels = {"upstream": "closed", "reason": "connect"}
    before = metric(appliance, "appliance_upstream_errors_total", **labels)
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError)):
        imap_login(appliance, "unused", listener="broken")
    errors = wait_for_metric(
        appliance, "appliance_upstream_errors_total", before + 1, **labels
    )
    _, _, body = http_get(admin_url(appliance, "/readyz"))
    upstream = json.loads(body)["upstreams"]["closed"]
    assert errors == before + 1
    assert upstream["reachable"] is False
    assert upstream["error"] == "connect"


def test_labels_never_contain_credentials(
    appliance: ApplianceProcess, mail_server: DovecotServer
) -> None:
    password = mail_server.users[USER]
    assert imap_login(appliance, password)
    wait_for_metric(
        appliance,
        "appliance_logins_total",
        1,
        listener="imap",
        upstream="mail-imap",
        result="succeeded",
    )
    _, _, body = http_get(admin_url(appliance, "/metrics"))
    label_values = [
        value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        for value in sample.labels.values()
    ]
    assert label_values
    for value in label_values:
        assert USER not in value
        assert password not in value
    assert password not in body


# appliance healthcheck


def test_healthcheck_with_admin_passes(appliance: ApplianceProcess) -> None:
    result = run_healthcheck(appliance.config_file)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("healthy: listeners accepting")
    assert result.stdout.count("\n") == 1


def test_healthcheck_without_admin(mail_server: DovecotServer, tmp_path: Path) -> None:
    config = dovecot_config(mail_server, {"imap": ("imap", "none", "starttls")})
    with ApplianceProcess(config, tmp_path) as process:
        running = run_healthcheck(process.config_file)
    stopped = run_healthcheck(process.config_file)
    assert running.returncode == 0, running.stdout
    assert running.stdout.startswith("healthy: listeners accept connections: imap")
    assert stopped.returncode == 1
    assert stopped.stdout.startswith("unhealthy: listener imap")


def test_healthcheck_after_stop_fails(
    mail_server: DovecotServer, tmp_path: Path
) -> None:
    config = admin_config(mail_server)
    with ApplianceProcess(config, tmp_path) as process:
        wait_for_port(HOST, config["admin"]["port"])
        running = run_healthcheck(process.config_file)
    stopped = run_healthcheck(process.config_file)
    assert running.returncode == 0, running.stdout
    assert stopped.returncode == 1
    assert stopped.stdout.startswith("unhealthy:")
    assert "is unreachable" in stopped.stdout


# Reloads


def test_reloads_counted_by_outcome(mail_server: DovecotServer, tmp_path: Path) -> None:
    config = {**admin_config(mail_server), "logging": {"level": "DEBUG"}}
    with ApplianceProcess(config, tmp_path) as process:
        wait_for_port(HOST, config["admin"]["port"])
        # An edit during the check when the file watch starts would be applied twice,
        # by the check and by the file change, and the second finds no changes.
        process.wait_for_log("files unchanged since start-up")
        process.write_config({**config, "limits": {"max_connections": 999}})
        applied = wait_for_metric(
            process, "appliance_reloads_total", 1, outcome="applied"
        )
        _, _, body = http_get(admin_url(process, "/readyz"))
        after_applied = json.loads(body)["config"]

        process.write_config({**config, "limits": {"idle_timeout": 1}})
        rejected = wait_for_metric(
            process, "appliance_reloads_total", 1, outcome="rejected"
        )
        version = metric(process, "appliance_config_version")
    assert applied >= 1
    assert after_applied["version"] == 2
    assert after_applied["last_reload"] == "applied"
    assert after_applied["last_reload_at"] is not None
    assert rejected >= 1
    assert version == 2.0
