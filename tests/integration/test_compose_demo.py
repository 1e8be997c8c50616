"""The compose demo's Dovecot files and appliance config, run here without Docker.

compose.yaml builds its demo Dovecot from examples/compose/dovecot/. No Docker engine runs
here, so this test runs the same entrypoint script, dovecot.conf, users file and welcome
message with Debian's local Dovecot. Only what the container provides is replaced: paths,
ports on loopback, and the unprivileged mail user. The appliance runs with the compose
config, its addresses moved to loopback.
"""

from __future__ import annotations

import imaplib
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.appliance import (
    REPO_ROOT,
    ApplianceProcess,
    free_port,
    wait_for_port,
)

DEMO = REPO_ROOT / "examples" / "compose"
HOST = "127.0.0.1"
TIMEOUT = 15.0
USER = "alice"
PASSWORD = "alice-demo-password"


@pytest.fixture(scope="module")
def demo_root(dovecot_backend: str) -> Iterator[Path]:
    if dovecot_backend != "local":
        pytest.skip("needs the local dovecot binary to run the demo's dovecot.conf")
    # Not under pytest's tmp_path, whose 0700 parents the unprivileged mail and login
    # processes cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="appliance-compose-demo-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_entrypoint(root: Path) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEMO_TLS_DIR": str(root / "tls"),
        "DEMO_CA_DIR": str(root / "ca"),
        "DEMO_SERVER_NAME": "localhost",
    }
    subprocess.run(
        ["sh", str(DEMO / "dovecot" / "entrypoint.sh"), "true"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )


def seed_mailboxes(root: Path) -> None:
    """Do what the demo's Dockerfile does: one welcome message per user."""
    welcome = (DEMO / "dovecot" / "welcome.eml").read_text()
    users = (DEMO / "dovecot" / "users").read_text().splitlines()
    shutil.copy(DEMO / "dovecot" / "users", root / "users")
    for user in (line.split(":")[0] for line in users if line):
        maildir = root / "mail" / user / "Maildir"
        for folder in ("cur", "new", "tmp"):
            (maildir / folder).mkdir(parents=True)
        message = welcome.replace("@USER@", user)
        (maildir / "new" / "1704103200.welcome.demo").write_text(message)
    subprocess.run(["chown", "-R", "nobody:", str(root / "mail")], check=True)


def local_dovecot_conf(root: Path, ports: dict[str, int]) -> str:
    """Return the demo's dovecot.conf with the container's paths and ports replaced."""
    text = (DEMO / "dovecot" / "dovecot.conf").read_text()
    replacements = {
        "/etc/dovecot/tls": str(root / "tls"),
        "/etc/dovecot/users": str(root / "users"),
        "/srv/mail": str(root / "mail"),
        "listen = *": f"listen = {HOST}",
        "/dev/stderr": str(root / "dovecot.log"),
        "/dev/stdout": str(root / "dovecot.log"),
        "uid=vmail gid=vmail": "uid=nobody gid=nogroup",
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the demo's dovecot.conf"
        text = text.replace(old, new)
    listeners = "\n".join(
        f"service {protocol}-login {{\n"
        f"  inet_listener {protocol} {{\n    port = {ports[protocol]}\n  }}\n"
        f"  inet_listener {protocol}s {{\n    port = {ports[protocol + 's']}\n  }}\n"
        "}"
        for protocol in ("imap", "pop3")
    )
    # The container runs Dovecot's internal processes as the dovecot user; here
    # everything runs as root, which Dovecot accepts only with these settings.
    return f"""{text}
instance_name = compose-demo-{root.name}
base_dir = {root}/run
state_dir = {root}/state
default_internal_user = root
default_internal_group = root
first_valid_uid = 0
{listeners}
"""


@pytest.fixture(scope="module")
def demo_dovecot(demo_root: Path) -> Iterator[dict[str, int]]:
    run_entrypoint(demo_root)
    seed_mailboxes(demo_root)
    ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s")}
    config = demo_root / "dovecot.conf"
    config.write_text(local_dovecot_conf(demo_root, ports))
    process = subprocess.Popen(
        ["dovecot", "-F", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        for port in ports.values():
            wait_for_port(HOST, port)
        yield ports
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def compose_appliance_config(
    root: Path, dovecot_ports: dict[str, int]
) -> dict[str, Any]:
    config = yaml.safe_load((DEMO / "appliance" / "appliance.yaml").read_text())
    for listener in config["listeners"].values():
        listener["bind"] = HOST
        listener["port"] = free_port()
    config["admin"].update(bind=HOST, port=free_port())
    upstream = config["upstreams"]["mail"]
    upstream.update(host="localhost", port=dovecot_ports["imaps"])
    upstream["ca_file"] = str(root / "ca" / "ca.pem")
    config["state_dir"] = str(root / "appliance-state")
    return config


def test_entrypoint_certificate_verifies(demo_root: Path, demo_dovecot) -> None:
    context = ssl.create_default_context(cafile=str(demo_root / "ca" / "ca.pem"))
    client = imaplib.IMAP4_SSL(
        "localhost", demo_dovecot["imaps"], ssl_context=context, timeout=TIMEOUT
    )
    client.logout()


def test_compose_healthcheck_command_passes(demo_root: Path, demo_dovecot) -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    command = compose["services"]["dovecot"]["healthcheck"]["test"]
    shell = command[1].replace("/run/demo-ca", str(demo_root / "ca"))
    shell = shell.replace("127.0.0.1:993", f"127.0.0.1:{demo_dovecot['imaps']}")
    result = subprocess.run(["sh", "-c", shell], check=False, timeout=30)
    assert command[0] == "CMD-SHELL"
    assert result.returncode == 0


def test_demo_login_through_appliance(demo_root: Path, demo_dovecot) -> None:
    config = compose_appliance_config(demo_root, demo_dovecot)
    with ApplianceProcess(config, demo_root / "appliance") as appliance:
        client = imaplib.IMAP4(HOST, appliance.port("imap"), timeout=TIMEOUT)
        client.login(USER, PASSWORD)
        client.select("INBOX")
        _, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        client.logout()
        health = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "healthcheck"]
            + ["--config", str(appliance.config_file)],
            cwd=REPO_ROOT,
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
        )
    assert data[0][1].strip() == f"Subject: Welcome, {USER}".encode()
    assert health.returncode == 0, health.stdout
