"""`make demo`: examples/demo.py runs the quick start in front of a demo Dovecot.

The README gives this as a newcomer's first command. The test runs the script as a
process and moves its listeners to free ports and other loopback addresses with the
APPLIANCE_* variables that an operator would set. The IMAP listener is set whole as JSON
on 127.0.0.2, beside its port variable set to the empty string, which counts as unset.
The POP3 listener gets its port and bind variables, for ::1. The test logs in through
both listeners with the demo account, and stops the demo the way a service manager does.
Wildcard binds are checked on the printed text only, so that no test exposes the demo
account on every interface.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from examples.demo import ListenerAddress, format_instructions
from tests.support.appliance import REPO_ROOT, free_port, wait_for_port

IMAP_HOST = "127.0.0.2"
POP3_HOST = "::1"
USER = "demo"
PASSWORD = "demo"
# Generous, because the demo first starts a Dovecot and then the appliance.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class Demo:
    """The running demo script, its listener ports and the file of its output."""

    def __init__(
        self, process: subprocess.Popen[bytes], imap_port: int, pop3_port: int, log: Path
    ) -> None:
        self.process = process
        self.imap_port = imap_port
        self.pop3_port = pop3_port
        self.log = log


@pytest.fixture(scope="module")
def demo(
    dovecot_backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Demo]:
    if dovecot_backend != "local":
        pytest.skip("the demo script starts the local dovecot binary")
    imap_port, pop3_port = free_port(IMAP_HOST), free_port(POP3_HOST)
    env = demo_environment()
    imap_listener = {
        "protocol": "imap",
        "bind": IMAP_HOST,
        "port": imap_port,
        "upstream": "mail",
    }
    env["APPLIANCE_LISTENERS__IMAP"] = json.dumps(imap_listener)
    env["APPLIANCE_LISTENERS__IMAP__PORT"] = ""
    env["APPLIANCE_LISTENERS__POP3__PORT"] = str(pop3_port)
    env["APPLIANCE_LISTENERS__POP3__BIND"] = POP3_HOST
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.demo"],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port(IMAP_HOST, imap_port, START_TIMEOUT)
        wait_for_port(POP3_HOST, pop3_port, START_TIMEOUT)
        yield Demo(process, imap_port, pop3_port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def demo_environment() -> dict[str, str]:
    """Return this process's environment without its APPLIANCE_* variables."""
    return {
        key: value for key, value in os.environ.items() if not key.startswith("APPLIANCE_")
    }


def test_demo_imap_login(demo: Demo) -> None:
    with imaplib.IMAP4(IMAP_HOST, demo.imap_port, timeout=30) as client:
        status, _ = client.login(USER, PASSWORD)
        selected, _ = client.select("INBOX")
        client.logout()

    assert status == "OK"
    assert selected == "OK"


def test_demo_pop3_login(demo: Demo) -> None:
    client = poplib.POP3(POP3_HOST, demo.pop3_port, timeout=30)
    try:
        client.user(USER)
        reply = client.pass_(PASSWORD)
        count, _ = client.stat()
    finally:
        client.quit()

    assert reply.startswith(b"+OK")
    assert count >= 0


def test_demo_check_config_command_shows_demo_upstream(demo: Demo) -> None:
    output = demo.log.read_text(errors="replace")
    lines = [line.strip() for line in output.splitlines() if "check-config" in line]
    assert len(lines) == 1, output
    # The shell runs the printed command as a reader copies it.
    result = subprocess.run(
        ["/bin/sh", "-c", lines[0]],
        cwd=REPO_ROOT,
        env=demo_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "# env APPLIANCE_UPSTREAMS__MAIL__PORT" in result.stdout
    assert 'host: "localhost"  # env APPLIANCE_UPSTREAMS__MAIL__HOST' in result.stdout
    # The variables of the caller, which moved both listeners, apply too.
    assert f"port: {demo.pop3_port}  # env APPLIANCE_LISTENERS__POP3__PORT" in result.stdout
    assert f'bind: "{IMAP_HOST}"  # env APPLIANCE_LISTENERS__IMAP' in result.stdout


def test_demo_stops_on_sigterm(demo: Demo) -> None:
    demo.process.send_signal(signal.SIGTERM)
    code = demo.process.wait(STOP_TIMEOUT)
    output = demo.log.read_text(errors="replace")

    assert code == 0, output
    # The instructions name the addresses and ports that the variables set.
    assert f"  imap: 127.0.0.2:{demo.imap_port}\n" in output
    assert f"  pop3: [::1]:{demo.pop3_port}\n" in output
    assert f"'imap://127.0.0.2:{demo.imap_port}/INBOX;UID=1'" in output
    assert f"'pop3://[::1]:{demo.pop3_port}/1'" in output
    assert f"imaplib.IMAP4('127.0.0.2', {demo.imap_port})" in output
    assert "imap://127.0.0.1:" not in output
    assert "pop3://127.0.0.1:" not in output
    assert "IMAP4('127.0.0.1'" not in output
    deadline = time.monotonic() + STOP_TIMEOUT
    while port_open(IMAP_HOST, demo.imap_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open(IMAP_HOST, demo.imap_port)


def port_open(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def test_demo_invalid_config_left_to_appliance(dovecot_backend: str) -> None:
    if dovecot_backend != "local":
        pytest.skip("the demo script starts the local dovecot binary")
    env = demo_environment()
    env["APPLIANCE_LISTENERS__IMAP__PORT"] = "not-a-port"

    result = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=START_TIMEOUT + STOP_TIMEOUT,
    )

    # The demo prints no instructions, because it has no ports to give.
    assert result.returncode == 2, result.stdout + result.stderr
    assert "imap://" not in result.stdout
    assert "listeners.imap.port" in result.stderr, result.stderr


# Printed addresses of wildcard binds, checked without binding them


def fake_dovecot() -> SimpleNamespace:
    """Return the attributes of a DovecotServer that the instructions print."""
    return SimpleNamespace(
        enabled_ports={"imaps": 10993, "pop3s": 10995},
        ports={"imaps": 10993, "pop3s": 10995},
        ca_file=Path("/tmp/demo-ca.pem"),
    )


@pytest.mark.parametrize(
    ("bind", "family", "connect_host", "url_host"),
    [("0.0.0.0", "IPv4", "127.0.0.1", "127.0.0.1"), ("::", "IPv6", "::1", "[::1]")],
    ids=["ipv4", "ipv6"],
)
def test_wildcard_bind_prints_loopback(
    bind: str, family: str, connect_host: str, url_host: str
) -> None:
    addresses = {
        "imap": ListenerAddress(bind, 1143),
        "pop3": ListenerAddress(bind, 1110),
    }

    text = format_instructions(fake_dovecot(), "/tmp/state", addresses)

    assert (
        f"  imap: all {family} addresses ({bind}) on port 1143; "
        f"from this machine, connect to {url_host}:1143\n"
    ) in text
    assert f"'imap://{url_host}:1143/INBOX;UID=1'" in text
    assert f"'pop3://{url_host}:1110/1'" in text
    assert f"imaplib.IMAP4('{connect_host}', 1143)" in text
    assert f"://{bind}:" not in text
    assert f"://[{bind}]:" not in text


def test_specific_bind_printed_as_is() -> None:
    addresses = {
        "imap": ListenerAddress("192.0.2.10", 1143),
        "pop3": ListenerAddress("2001:db8::10", 1110),
    }

    text = format_instructions(fake_dovecot(), "/tmp/state", addresses)

    assert "  imap: 192.0.2.10:1143\n" in text
    assert "  pop3: [2001:db8::10]:1110\n" in text
    assert "'imap://192.0.2.10:1143/INBOX;UID=1'" in text
    assert "'pop3://[2001:db8::10]:1110/1'" in text
    assert "all IPv" not in text


@pytest.mark.parametrize(
    ("tls", "curl_imap", "curl_pop3", "imaplib_line"),
    [
        (
            "implicit",
            "curl -u demo:demo 'imaps://127.0.0.1:1993/INBOX;UID=1'",
            "curl -u demo:demo 'pop3s://127.0.0.1:1995/1'",
            "c = imaplib.IMAP4_SSL('127.0.0.1', 1993)",
        ),
        (
            "starttls",
            "curl --ssl-reqd -u demo:demo 'imap://127.0.0.1:1993/INBOX;UID=1'",
            "curl --ssl-reqd -u demo:demo 'pop3://127.0.0.1:1995/1'",
            "c = imaplib.IMAP4('127.0.0.1', 1993); c.starttls()",
        ),
    ],
)
def test_tls_listeners_get_tls_examples(
    tls: str, curl_imap: str, curl_pop3: str, imaplib_line: str
) -> None:
    addresses = {
        "imap": ListenerAddress("127.0.0.1", 1993, tls),
        "pop3": ListenerAddress("127.0.0.1", 1995, tls),
    }

    text = format_instructions(fake_dovecot(), "/tmp/state", addresses)

    assert f"  imap: 127.0.0.1:1993 (TLS: {tls})\n" in text
    assert f"  {curl_imap}\n" in text
    assert f"  {curl_pop3}\n" in text
    assert imaplib_line in text
    assert "The TLS listeners present their cert_file." in text
    assert "--cacert with its CA file" in text


def test_plain_listeners_get_no_tls_note() -> None:
    addresses = {
        "imap": ListenerAddress("127.0.0.1", 1143),
        "pop3": ListenerAddress("127.0.0.1", 1110),
    }

    text = format_instructions(fake_dovecot(), "/tmp/state", addresses)

    assert "(TLS:" not in text
    assert "cert_file" not in text
    assert "--ssl-reqd" not in text
