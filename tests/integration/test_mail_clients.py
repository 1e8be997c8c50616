"""Real mail clients through the appliance: Debian's curl and fetchmail over POP3.

curl covers plain text (`pop3://`) and implicit TLS (`pop3s://`), fetchmail covers STLS
with certificate checks. Each test skips when its client binary is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_pop3_proxy import HOST
from tests.support.appliance import ApplianceProcess, dovecot_config
from tests.support.certs import TestPKI
from tests.support.dovecot import LARGE_MESSAGE_INDEX, DovecotServer

USER = "alice"
CLIENT_TIMEOUT = 60
# Message 2 has lines that need dot-stuffing, and the last one is multi-megabyte.
MESSAGE_NUMBERS = [2, LARGE_MESSAGE_INDEX + 1]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; install Debian's {name} package")
    return path


@pytest.fixture(scope="module")
def server(dovecot_factory: Any) -> DovecotServer:
    # Private, because POP3 RETR sets the \Seen flag on the retrieved messages.
    return dovecot_factory(fresh=True)


@pytest.fixture(scope="module")
def proxy(
    server: DovecotServer, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApplianceProcess]:
    cert = pki.issue_server_cert("mail-clients")
    listeners = {
        "plain": ("pop3", "none", "starttls"),
        "implicit": ("pop3", "implicit", "implicit"),
        "stls": ("pop3", "starttls", "none"),
    }
    config = dovecot_config(server, listeners, cert)
    with ApplianceProcess(config, tmp_path_factory.mktemp("mail-clients")) as appliance:
        yield appliance


def run_client(
    arguments: list[str], **options: Any
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        arguments,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
        **options,
    )


def curl(url: str, server: DovecotServer, *options: str) -> subprocess.CompletedProcess:
    binary = require_binary("curl")
    credentials = f"{USER}:{server.users[USER]}"
    return run_client(
        [binary, "--silent", "--show-error", "-u", credentials, *options, url]
    )


# curl


@pytest.mark.parametrize("number", MESSAGE_NUMBERS)
def test_curl_pop3_retrieves_message(proxy, server, number):
    result = curl(f"pop3://{HOST}:{proxy.port('plain')}/{number}", server)

    assert result.returncode == 0, result.stderr
    assert result.stdout == server.message_bytes(USER, number - 1)


@pytest.mark.parametrize("number", MESSAGE_NUMBERS)
def test_curl_pop3s_retrieves_message(proxy, server, pki, number):
    url = f"pop3s://{HOST}:{proxy.port('implicit')}/{number}"
    result = curl(url, server, "--cacert", str(pki.ca_file))

    assert result.returncode == 0, result.stderr
    assert result.stdout == server.message_bytes(USER, number - 1)


def test_curl_pop3s_lists_messages(proxy, server, pki):
    url = f"pop3s://{HOST}:{proxy.port('implicit')}/"
    result = curl(url, server, "--cacert", str(pki.ca_file))

    messages = [
        server.message_bytes(USER, i) for i in range(server.message_count(USER))
    ]
    expected = b"".join(
        f"{i + 1} {len(m)}\r\n".encode() for i, m in enumerate(messages)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_curl_pop3s_rejects_untrusted_proxy(proxy, server, pki):
    # The proxy's certificate chains to the test CA only, so the system store fails.
    url = f"pop3s://{HOST}:{proxy.port('implicit')}/1"
    result = curl(url, server, "--cacert", str(pki.untrusted_ca_file))

    assert result.returncode != 0
    assert result.stdout == b""


# fetchmail


def write_fetchmail_files(
    home: Path, port: int, server: DovecotServer, pki: TestPKI
) -> tuple[Path, Path]:
    """Write an rc file and an MDA script that stores each message in its own file.

    Returns the rc file and the folder that receives the messages.
    """
    inbox = home / "inbox"
    inbox.mkdir()
    mda = home / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {inbox}/message.XXXXXX)"\n')
    mda.chmod(0o700)
    # `no stripcr` keeps the CRLF line ends that fetchmail removes for an MDA by
    # default, `invisible` adds no Received header and `no rewrite` leaves addresses
    # alone, so each delivered message must equal the stored bytes.
    rc_file = home / "fetchmailrc"
    rc_file.write_text(
        "set no syslog\n"
        "set invisible\n"
        f"poll {HOST} port {port} protocol POP3 auth password\n"
        f'  user "{USER}" there with password "{server.users[USER]}" is "root" here\n'
        f"  sslproto 'TLS1.2+' sslcertck sslcommonname localhost\n"
        f'  sslcertfile "{pki.ca_file}"\n'
        "  keep fetchall no rewrite no stripcr\n"
        f'  mda "{mda}"\n'
    )
    # fetchmail refuses an rc file that others can read, because it holds passwords.
    rc_file.chmod(0o600)
    return rc_file, inbox


def test_fetchmail_stls_delivers_every_message(proxy, server, pki, tmp_path):
    binary = require_binary("fetchmail")
    rc_file, inbox = write_fetchmail_files(tmp_path, proxy.port("stls"), server, pki)
    environment = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = run_client(
        [binary, "--nosyslog", "-f", str(rc_file)], env=environment, cwd=tmp_path
    )

    delivered = sorted(path.read_bytes() for path in inbox.iterdir())
    count = server.message_count(USER)
    expected = sorted(server.message_bytes(USER, i) for i in range(count))
    assert result.returncode == 0, result.stderr
    assert len(delivered) == len(expected)
    assert delivered == expected


def test_fetchmail_session_used_tls(proxy, server, pki, tmp_path):
    binary = require_binary("fetchmail")
    rc_file, _ = write_fetchmail_files(tmp_path, proxy.port("stls"), server, pki)
    environment = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = run_client(
        [binary, "--nosyslog", "--check", "-f", str(rc_file)], env=environment
    )

    ends = [
        line
        for line in proxy.log_text().splitlines()
        if "listener=stls]" in line and "session ended: closed by " in line
    ]
    assert result.returncode == 0, result.stderr
    assert ends
    assert all("client tls TLSv1." in line for line in ends)
