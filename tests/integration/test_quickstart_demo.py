"""`make demo`: examples/demo.py runs the quick start in front of a demo Dovecot.

The README gives this as a newcomer's first command. The test runs the script as a
process and moves its listeners to free ports with the APPLIANCE_* variables that an
operator would set for a busy port. The IMAP listener is set whole as JSON, beside its
port variable set to the empty string, which counts as unset. The POP3 listener gets
its port variable alone. The test logs in through both listeners with the demo account,
and stops the demo the way a service manager does.
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

import pytest

from tests.support.appliance import REPO_ROOT, free_port, wait_for_port

HOST = "127.0.0.1"
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
    imap_port, pop3_port = free_port(), free_port()
    env = demo_environment()
    imap_listener = {
        "protocol": "imap",
        "bind": HOST,
        "port": imap_port,
        "upstream": "mail",
    }
    env["APPLIANCE_LISTENERS__IMAP"] = json.dumps(imap_listener)
    env["APPLIANCE_LISTENERS__IMAP__PORT"] = ""
    env["APPLIANCE_LISTENERS__POP3__PORT"] = str(pop3_port)
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
        wait_for_port(HOST, imap_port, START_TIMEOUT)
        wait_for_port(HOST, pop3_port, START_TIMEOUT)
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
    with imaplib.IMAP4(HOST, demo.imap_port, timeout=30) as client:
        status, _ = client.login(USER, PASSWORD)
        selected, _ = client.select("INBOX")
        client.logout()

    assert status == "OK"
    assert selected == "OK"


def test_demo_pop3_login(demo: Demo) -> None:
    client = poplib.POP3(HOST, demo.pop3_port, timeout=30)
    try:
        client.user(USER)
        reply = client.pass_(PASSWORD)
        count, _ = client.stat()
    finally:
        client.quit()

    assert reply.startswith(b"+OK")
    assert count >= 0


def test_demo_stops_on_sigterm(demo: Demo) -> None:
    demo.process.send_signal(signal.SIGTERM)
    code = demo.process.wait(STOP_TIMEOUT)
    output = demo.log.read_text(errors="replace")

    assert code == 0, output
    # The instructions name the ports that the variables set, not the file's.
    assert f"imap://127.0.0.1:{demo.imap_port}/" in output
    assert f"pop3://127.0.0.1:{demo.pop3_port}/" in output
    deadline = time.monotonic() + STOP_TIMEOUT
    while port_open(demo.imap_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open(demo.imap_port)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((HOST, port)) == 0


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
    assert "imap://127.0.0.1:" not in result.stdout
    assert "listeners.imap.port" in result.stderr, result.stderr
