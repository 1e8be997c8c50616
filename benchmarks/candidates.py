"""The backend Dovecot and the candidates measured in front of it.

A candidate is whatever a mail client talks to: Dovecot itself (`direct`), the appliance
on the standard asyncio loop or on uvloop, nginx's mail proxy, or Dovecot in proxy mode.
Each one offers an endpoint per protocol and path, and the path names the TLS sides:
`plain` (client plain, upstream plain), `client_tls` (client TLS, upstream plain) or
`upstream_tls` (client plain, upstream TLS).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from appliance.config.models import Limits
from tests.support.appliance import REPO_ROOT, free_port, wait_for_port
from tests.support.certs import CertFiles, TestPKI
from tests.support.dovecot import DovecotServer, numbered_users

PATHS = ("plain", "client_tls", "upstream_tls")
HOST = "127.0.0.1"
MESSAGE_SIZE = 1024 * 1024
# Messages 1 to 4 of every INBOX are the fixture's seeded ones. The delivered 1 MiB
# messages follow, so the bulk range starts here (IMAP sequence and POP3 number).
FIRST_BULK_MESSAGE = 5


@dataclass(frozen=True)
class Endpoint:
    """Address and port for a client, and whether it uses TLS from the first byte."""

    host: str
    port: int
    protocol: str
    tls: bool


def bulk_message(number: int) -> bytes:
    """Build a 1 MiB message with CRLF lines, none of which starts with a dot.

    Without dot-led lines the POP3 terminator CRLF.CRLF appears only at the end of a
    RETR response, so the load generator can find it with one search per read.
    """
    head = (
        "From: Bench <bench@example.invalid>\r\n"
        "To: Bench <bench@example.invalid>\r\n"
        f"Subject: Bulk message {number}\r\n"
        f"Message-ID: <bulk-{number}@example.invalid>\r\n"
        "\r\n"
    ).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+/abcdefghij\r\n"
    body_size = MESSAGE_SIZE - len(head)
    count, rest = divmod(body_size, len(line))
    # A longer last line absorbs the remainder, so the size is exactly MESSAGE_SIZE.
    last_line = b"z" * (len(line) + rest - 2) + b"\r\n"
    return head + line * (count - 1) + last_line


class Backend:
    """The Dovecot that every candidate reaches, with many users and bulk mailboxes."""

    def __init__(
        self,
        pki: TestPKI,
        *,
        users: int,
        bulk_users: int,
        bulk_messages: int,
        connection_limit: int,
    ) -> None:
        self.users = numbered_users(users)
        self.user_names = list(self.users)
        self.bulk_users = self.user_names[:bulk_users]
        self.bulk_messages = bulk_messages
        self.server = DovecotServer(
            tls="both",
            pki=pki,
            extra_users=self.users,
            connection_limit=connection_limit,
            # Dovecot 2.3's performance tuning guide: services with client_limit > 1
            # and process_limit > 1 keep process_min_avail at the number of cores. With
            # one login process, one process encrypted every client's TLS.
            login_processes=os.cpu_count() or 1,
            # The fixture checks IDLE mailboxes every second, which would wake 1,000
            # idle mail processes each second during the memory workload.
            extra_config="mailbox_idle_check_interval = 30 secs\n",
        )

    def start(self) -> None:
        self.server.start()
        for user in self.bulk_users:
            for number in range(self.bulk_messages):
                self.server.deliver(user, bulk_message(number))

    def stop(self) -> None:
        self.server.stop()

    def port(self, name: str) -> int:
        port = self.server.ports[name]
        assert port is not None
        return port

    @property
    def ca_file(self) -> Path:
        assert self.server.ca_file is not None
        return self.server.ca_file

    def password(self, user: str) -> str:
        return self.users[user]


class Candidate:
    """Something a mail client can talk to, measured by its own processes only."""

    name = "candidate"
    supports_reload = False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def endpoint(self, protocol: str, path: str) -> Endpoint | None:
        """Return where to connect for `protocol` over `path`, None if unsupported."""
        raise NotImplementedError

    def memory_roots(self) -> list[int]:
        """Return the PIDs whose process trees count toward this candidate's memory."""
        raise NotImplementedError

    def cpu_roots(self) -> list[int]:
        """Return the PIDs whose process trees count toward this candidate's CPU use."""
        return self.memory_roots()

    def reload(self) -> None:
        raise NotImplementedError(f"{self.name} has no reload")

    def applied_reloads(self) -> int:
        """Return how many reloads the candidate reports as applied so far."""
        return 0


class Direct(Candidate):
    """Clients talk to the backend Dovecot itself: the physical limit."""

    name = "direct"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def endpoint(self, protocol: str, path: str) -> Endpoint | None:
        if path == "upstream_tls":
            # No proxy sits between, so the plain path is the reference for this row.
            path = "plain"
        tls = path == "client_tls"
        port = self.backend.port(protocol + ("s" if tls else ""))
        return Endpoint(HOST, port, protocol, tls)

    def memory_roots(self) -> list[int]:
        pid = self.backend.server.pid
        assert pid is not None
        return [pid]


class Appliance(Candidate):
    """The appliance as a subprocess, on the standard asyncio loop or on uvloop.

    A reload rewrites the config file with one changed limit, which the appliance's
    file watcher picks up, like an operator's edit.
    """

    def __init__(
        self,
        backend: Backend,
        workdir: Path,
        listener_cert: CertFiles,
        *,
        event_loop: str,
        upstream_options: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        """`upstream_options` are set on every upstream, for A/B runs of a setting."""
        default_name = (
            "appliance" if event_loop == "asyncio" else f"appliance-{event_loop}"
        )
        self.name = name or default_name
        self.upstream_options = dict(upstream_options or {})
        self.backend = backend
        self.workdir = workdir
        self.event_loop = event_loop
        self.listener_cert = listener_cert
        self.config_file = workdir / "appliance.yaml"
        self.log_file = workdir / "appliance.log"
        self.ports = {
            (protocol, path): free_port()
            for protocol in ("imap", "pop3")
            for path in PATHS
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.reload_count = 0
        self.supports_reload = importlib.util.find_spec("appliance.reload") is not None
        self.reload_unsupported = "this appliance version has no hot reload"

    def config(self) -> dict:
        """Return the appliance config: one listener per protocol and path."""
        backend = self.backend
        upstreams = {}
        listeners = {}
        for protocol in ("imap", "pop3"):
            upstreams[f"{protocol}_plain"] = {
                "host": HOST,
                "port": backend.port(protocol),
                "tls": "none",
            }
            upstreams[f"{protocol}_tls"] = {
                # An address, as in the peers' configs, so no session waits for DNS;
                # the certificate is still checked against server_name.
                "host": HOST,
                "server_name": "localhost",
                "port": backend.port(protocol + "s"),
                "tls": "implicit",
                "ca_file": str(backend.ca_file),
            }
            for upstream in (f"{protocol}_plain", f"{protocol}_tls"):
                upstreams[upstream].update(self.upstream_options)
            for path in PATHS:
                listener = {
                    "protocol": protocol,
                    "bind": HOST,
                    "port": self.ports[(protocol, path)],
                    "upstream": f"{protocol}_tls"
                    if path == "upstream_tls"
                    else f"{protocol}_plain",
                }
                if path == "client_tls":
                    listener["tls"] = "implicit"
                    listener["cert_file"] = str(self.listener_cert.cert_file)
                    listener["key_file"] = str(self.listener_cert.key_file)
                listeners[f"{protocol}_{path}"] = listener
        limits = {
            "max_connections": 5000,
            # Alternates between reloads, so each one applies a change.
            "max_protocol_errors": 10 + self.reload_count % 2,
        }
        # Every benchmark client connects from 127.0.0.1.
        if "max_connections_per_address" in Limits.model_fields:
            limits["max_connections_per_address"] = 5000
        return {
            "listeners": listeners,
            "upstreams": upstreams,
            "limits": limits,
            "logging": {"level": "INFO"},
            "state_dir": str(self.workdir / "state"),
        }

    def write_config(self, config: dict) -> None:
        temporary = self.config_file.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(config, sort_keys=False))
        temporary.replace(self.config_file)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config(self.config())
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env["APPLIANCE_EVENT_LOOP"] = self.event_loop
        env["PYTHONUNBUFFERED"] = "1"
        command = [
            sys.executable,
            "-m",
            "appliance.cli",
            "run",
            "--config",
            str(self.config_file),
        ]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            for port in self.ports.values():
                wait_for_port(HOST, port)
        except TimeoutError:
            self.stop()
            log_text = self.log_file.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} did not start; log:\n{log_text}") from None
        if f"event loop: {self.event_loop}" not in self.log_file.read_text(
            errors="replace"
        ):
            self.stop()
            raise RuntimeError(
                f"{self.name}: the appliance did not log `event loop: {self.event_loop}`, "
                f"so it ignores APPLIANCE_EVENT_LOOP; see {self.log_file}"
            )

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.process = None

    def endpoint(self, protocol: str, path: str) -> Endpoint | None:
        return Endpoint(
            HOST, self.ports[(protocol, path)], protocol, path == "client_tls"
        )

    def reload(self) -> None:
        self.reload_count += 1
        self.write_config(self.config())

    def applied_reloads(self) -> int:
        """Return how many reloads the appliance's log reports as applied."""
        text = self.log_file.read_text(errors="replace")
        lines = text.splitlines()
        return sum(
            1 for line in lines if "config reload (" in line and " applied " in line
        )

    def memory_roots(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid]
