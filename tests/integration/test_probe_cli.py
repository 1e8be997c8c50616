"""`appliance probe` and `appliance known-servers` as an operator runs them.

The probe runs against real Dovecot servers, and the known-servers commands edit the
store of a running appliance, which must use the change from its next session.
"""

from __future__ import annotations

import imaplib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.appliance import REPO_ROOT, ApplianceProcess, free_port
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer

HOST = "127.0.0.1"
TIMEOUT = 15.0
PROBE_LINE = "probing imap://"


@pytest.fixture(scope="module")
def both(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="both")


@pytest.fixture(scope="module")
def starttls_only(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="starttls")


def appliance_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return appliance_cli("probe", HOST, "--timeout", "5", *args)


# probe


def test_probe_shows_implicit_tls_details(both: DovecotServer) -> None:
    result = probe("--port", str(both.ports["imaps"]), "--ca-file", str(both.ca_file))
    out = result.stdout

    assert result.returncode == 0
    assert "implicit  port" in out
    assert "offered, usable" in out
    assert "TLS version TLSv1." in out
    assert "cipher TLS_" in out
    assert "subject  CN=localhost" in out
    assert "issuer   " in out
    assert "Appliance test CA" in out
    assert "expires  " in out
    assert "SHA-256  " in out
    assert "verified yes" in out
    assert "  address  127.0.0.1\n" in out
    assert "tls: auto would record: implicit" in out


def test_probe_plain_port_shows_starttls_and_none(both: DovecotServer) -> None:
    result = probe("--port", str(both.ports["imap"]), "--ca-file", str(both.ca_file))
    lines = result.stdout.splitlines()

    assert result.returncode == 0
    assert any(line.startswith("implicit ") and "not offered" in line for line in lines)
    assert any(
        line.startswith("starttls ") and "offered, usable" in line for line in lines
    )
    assert any(line.startswith("none ") and "offered, usable" in line for line in lines)
    assert "tls: auto would record: starttls" in result.stdout


def test_probe_implicit_port_skips_plain_modes(both: DovecotServer) -> None:
    result = probe("--port", str(both.ports["imaps"]), "--ca-file", str(both.ca_file))
    lines = result.stdout.splitlines()

    assert result.returncode == 0
    for mode in ("starttls", "none"):
        line = next(line for line in lines if line.startswith(f"{mode} "))
        assert "not offered: the port speaks implicit TLS" in line


def test_probe_reports_failed_verification(both: DovecotServer) -> None:
    result = probe("--port", str(both.ports["imaps"]))

    assert result.returncode == 0
    assert "certificate verification failed" in result.stdout
    assert "verified no" in result.stdout
    assert "subject  CN=localhost" in result.stdout
    assert "  address  127.0.0.1\n" in result.stdout
    assert "tls: auto would record: implicit" in result.stdout
    assert "not usable now (certificate verification failed" in result.stdout


def test_probe_json_marks_unusable_choice(both: DovecotServer) -> None:
    result = probe("--port", str(both.ports["imaps"]), "--json")
    report = json.loads(result.stdout)

    assert result.returncode == 0
    assert report["chosen_mode"] == "implicit"
    assert report["chosen_mode_usable"] is False


def test_probe_without_verification(both: DovecotServer) -> None:
    result = probe("--port", str(both.ports["imaps"]), "--no-verify")

    assert result.returncode == 0
    assert "verified not checked" in result.stdout


def test_probe_pop3_stls(starttls_only: DovecotServer) -> None:
    dovecot = starttls_only
    result = probe(
        "--protocol",
        "pop3",
        "--port",
        str(dovecot.ports["pop3"]),
        "--ca-file",
        str(dovecot.ca_file),
    )

    assert result.returncode == 0
    assert result.stdout.startswith("POP3 server")
    assert "tls: auto would record: starttls" in result.stdout


def test_probe_json_output(both: DovecotServer) -> None:
    result = probe(
        "--port", str(both.ports["imaps"]), "--ca-file", str(both.ca_file), "--json"
    )
    report = json.loads(result.stdout)
    implicit = report["modes"][0]

    assert result.returncode == 0
    assert report["chosen_mode"] == "implicit"
    assert report["chosen_mode_usable"] is True
    assert implicit["mode"] == "implicit"
    assert implicit["verified"] is True
    assert len(implicit["certificate"]["sha256"]) == 64


def test_probe_closed_port_exits_one() -> None:
    result = probe("--port", str(free_port()))

    assert result.returncode == 1
    assert "could not probe 127.0.0.1" in result.stderr
    assert "not reached: connection refused" in result.stdout
    assert "not offered" not in result.stdout


def test_probe_rejects_invalid_host() -> None:
    result = appliance_cli("probe", "bad host!")

    assert result.returncode == 2
    assert "not a valid host name" in result.stderr


def test_probe_truncated_ca_file_explained(tmp_path: Path, pki: TestPKI) -> None:
    truncated = tmp_path / "ca.pem"
    truncated.write_bytes(pki.ca_file.read_bytes().split(b"-----END")[0])

    result = probe("--port", str(free_port()), "--ca-file", str(truncated))

    assert result.returncode == 2
    assert f"--ca-file {str(truncated)!r} is truncated" in result.stderr
    assert "copy the whole file again" in result.stderr
    assert "PEM lib" not in result.stderr
    assert PROBE_LINE not in result.stdout


def test_probe_fifo_ca_file_rejected(tmp_path: Path) -> None:
    # A plain open() of a FIFO waits for a writer, which never comes here.
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)

    result = probe("--port", str(free_port()), "--ca-file", str(fifo))

    assert result.returncode == 2
    assert (
        f"--ca-file {str(fifo)!r} is not a regular file but a FIFO" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert PROBE_LINE not in result.stdout


# known-servers on a folder


def known_servers(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    action, *rest = args
    return appliance_cli("known-servers", action, *rest, "--state-dir", str(state_dir))


def test_list_empty_store(tmp_path: Path) -> None:
    result = known_servers(tmp_path, "list")

    assert result.returncode == 0
    assert "no known servers" in result.stdout


def test_pin_list_forget_round_trip(tmp_path: Path) -> None:
    pinned = known_servers(
        tmp_path, "pin", "mail.example.org", "starttls", "--protocol", "imap"
    )
    listed = known_servers(tmp_path, "list")
    forgotten = known_servers(tmp_path, "forget", "mail.example.org")
    after = known_servers(tmp_path, "list")

    assert pinned.returncode == 0
    assert "pinned imap://mail.example.org to starttls (port 143)" in pinned.stdout
    assert (
        "imap://mail.example.org  starttls (port 143, pinned by an operator)"
        in listed.stdout
    )
    assert "  first seen " in listed.stdout
    assert "last probed" not in listed.stdout
    assert forgotten.returncode == 0
    assert "forgot imap://mail.example.org" in forgotten.stdout
    assert "no known servers" in after.stdout


def test_pin_without_protocol_pins_both(tmp_path: Path) -> None:
    known_servers(tmp_path, "pin", "mail.example.org", "implicit")
    result = known_servers(tmp_path, "list", "--json")
    records = json.loads(result.stdout)

    assert [record["protocol"] for record in records] == ["imap", "pop3"]
    assert [record["connect_port"] for record in records] == [993, 995]


def test_forget_unknown_host_exits_one(tmp_path: Path) -> None:
    result = known_servers(tmp_path, "forget", "nowhere.example.org")

    assert result.returncode == 1
    assert "no record matches nowhere.example.org" in result.stderr


@pytest.mark.parametrize(
    "action", [["list"], ["forget", "mail.example.org"]], ids=["list", "forget"]
)
def test_missing_state_dir_not_created(tmp_path: Path, action: list[str]) -> None:
    missing = tmp_path / "missing"

    result = known_servers(missing, *action)

    assert result.returncode == 1, result.stdout
    assert f"state_dir {str(missing)!r} does not exist" in result.stderr
    assert not missing.exists()


def test_state_dir_that_is_file_rejected(tmp_path: Path) -> None:
    not_folder = tmp_path / "state"
    not_folder.write_text("")

    result = known_servers(not_folder, "list")

    assert result.returncode == 1, result.stdout
    assert f"state_dir {str(not_folder)!r} is not a folder" in result.stderr


def test_list_corrupt_store_leaves_file(tmp_path: Path) -> None:
    path = tmp_path / "known_servers.json"
    path.write_text("not json")

    result = known_servers(tmp_path, "list")

    assert result.returncode == 1
    assert "unreadable or corrupt" in result.stderr
    assert path.read_text() == "not json"


def test_state_dir_from_config(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "from-config")}))

    result = appliance_cli(
        "known-servers", "pin", "mail.example.org", "none", "--config", str(config)
    )

    assert result.returncode == 0
    assert (tmp_path / "from-config" / "known_servers.json").is_file()


# known-servers against a running appliance


def start_appliance(config: dict[str, Any], workdir: Path) -> ApplianceProcess:
    appliance = ApplianceProcess(config, workdir, wait_ports=False).start()
    deadline = time.monotonic() + TIMEOUT
    while "appliance ready" not in appliance.log_text():
        if appliance.process.poll() is not None or time.monotonic() > deadline:
            appliance.stop()
            raise RuntimeError(f"appliance did not start:\n{appliance.log_text()}")
        time.sleep(0.05)
    return appliance


def login(port: int) -> str:
    client = imaplib.IMAP4(HOST, port, timeout=TIMEOUT)
    try:
        status, _ = client.login("alice", "alice-secret")
    finally:
        client.logout()
    return status


@pytest.fixture
def running(both: DovecotServer, tmp_path: Path):
    upstream = {
        "host": HOST,
        "port": both.ports["imaps"],
        "tls": "auto",
        "ca_file": str(both.ca_file),
    }
    config = {
        "listeners": {
            "imap": {"protocol": "imap", "port": free_port(), "upstream": "mail"}
        },
        "upstreams": {"mail": upstream},
        # A pinned mode that the port does not speak fails at this timeout.
        "limits": {"connect_timeout": 2},
    }
    appliance = start_appliance(config, tmp_path)
    yield appliance
    appliance.stop()


def test_forget_makes_running_appliance_probe(running: ApplianceProcess) -> None:
    state_dir = Path(running.config["state_dir"])
    login(running.port("imap"))

    result = known_servers(state_dir, "forget", HOST)
    status = login(running.port("imap"))

    assert result.returncode == 0
    assert status == "OK"
    assert running.log_text().count(PROBE_LINE) == 2


def test_pin_reaches_running_appliance(
    running: ApplianceProcess, both: DovecotServer
) -> None:
    state_dir = Path(running.config["state_dir"])
    port = str(both.ports["imaps"])
    login(running.port("imap"))

    known_servers(
        state_dir, "pin", HOST, "starttls", "--port", port, "--protocol", "imap"
    )
    with pytest.raises(imaplib.IMAP4.error):
        login(running.port("imap"))

    assert f"{HOST}:{port}, starttls" in running.log_text()
