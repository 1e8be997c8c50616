"""A throwaway Dovecot 2.3 IMAP/POP3 server for tests and demos.

`DovecotServer` writes a complete dovecot.conf, TLS files, a passwd-file and
seeded maildirs into a fresh temporary folder, starts Dovecot on free loopback
ports and removes everything again on `stop()`. The `local` backend runs
Debian's `dovecot` binary as root; the `docker` backend runs the same files in
a container.

Without a shared `pki`, each start creates its own test CA inside the folder,
so `ca_file` is gone after `stop()`. Set APPLIANCE_TEST_KEEP_DOVECOT=1 to keep
the folder, logs included, for debugging.

Run `.venv/bin/python -m tests.support.dovecot --help` for the command-line interface.
"""

from __future__ import annotations

import argparse
import base64
import functools
import itertools
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.certs import SERVER_CERT_KINDS, TestPKI
from tests.support.ports import pick_free_port

TLS_MODES = ("both", "starttls", "implicit", "none")
BACKENDS = ("local", "docker")
# Networks of the docker backend. "publish" gives the container its own network and
# publishes each port on the host's loopback. "host" runs it in the host's network with
# Dovecot bound to loopback, so nothing is published; only Linux engines support it.
DOCKER_NETWORKS = ("publish", "host")
PORT_NAMES = ("imap", "imaps", "pop3", "pop3s")
DEFAULT_USERS = {
    "alice": "alice-secret",
    "bob": 's3cr et"\\x',
    "carol": "carol-secret",
}
DEFAULT_DOCKER_IMAGE = "dovecot/dovecot:2.3.21.1"

SMALL_MESSAGE_COUNT = 3
LARGE_MESSAGE_INDEX = 3
LARGE_MESSAGE_MIN_SIZE = 3 * 1024 * 1024

# Dovecot's default auth_username_chars; other names are rejected at login.
USERNAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"
)
# Seeded maildir file names start with this Unix time, one second apart, because
# Dovecot assigns UIDs to new maildir files in file-name order.
SEED_TIMESTAMP = 1_700_000_000
LOG_TAIL_LINES = 40
# Login processes per protocol in high-performance mode, each serving up to
# connection_limit clients.
LOGIN_PROCESS_LIMIT = 4


class DovecotError(RuntimeError):
    """Dovecot failed to start or stop."""


def numbered_users(count: int, prefix: str = "load") -> dict[str, str]:
    """Return `count` users named `<prefix>0000`... with password `<name>-secret`."""
    return {f"{prefix}{i:04d}": f"{prefix}{i:04d}-secret" for i in range(count)}


def find_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return `count` distinct TCP ports that were free on `host` a moment ago."""
    return [pick_free_port(host) for _ in range(count)]


def small_message(user: str, index: int) -> bytes:
    """Build seeded message `index` (0 to 2) of `user`, with CRLF line endings.

    Index 1 contains lines that break naive POP3 dot-stuffing and lines that
    look like IMAP or POP3 responses. Index 2 contains 8-bit bytes, a bare CR
    inside a line and a CR directly before the CRLF.
    """
    headers = [
        "Return-Path: <sender@example.invalid>",
        "From: Test Sender <sender@example.invalid>",
        f"To: {user} <{user}@example.invalid>",
        f"Subject: Seeded message {index + 1} for {user}",
        f"Date: Mon, 01 Jan 2024 10:0{index}:00 +0000",
        f"Message-ID: <seed-{index + 1}.{user}@example.invalid>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    head = "".join(f"{line}\r\n" for line in headers).encode("ascii")
    bodies = [
        f"Hello {user},\r\n\r\nthis is a short seeded message.\r\n".encode(),
        (
            b"Lines for dot-stuffing and response framing:\r\n"
            b".\r\n"
            b"..\r\n"
            b".leading dot\r\n"
            b"* BYE not a server response\r\n"
            b"+OK not a server response\r\n"
            b"A001 OK not a tagged response\r\n"
            b"a line that ends like a literal {12}\r\n"
            b"\r\n"
            b"end\r\n"
        ),
        "Gr\u00fc\u00dfe, \u65e5\u672c\u8a9e, \u00e9t\u00e9\r\n".encode()
        + b"bare CR\rinside a line\r\n"
        + b"CR before the line break\r\r\n"
        + b"trailing spaces and tab \t \r\n",
    ]
    return head + b"\r\n" + bodies[index]


@functools.cache
def large_message() -> bytes:
    """Build the seeded multi-megabyte message, identical for every user.

    The body mixes empty lines, short lines, 76-octet lines and 998-octet lines
    (the RFC 5322 maximum), lines that start with a dot, 8-bit bytes, a bare CR
    inside a line and a CR directly before the CRLF. Its content is
    deterministic.
    """
    rng = random.Random(1939)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 +/=-"
    pool = bytes(rng.choice(alphabet) for _ in range(65536))
    special_lines = [
        b"",
        b".",
        b"..",
        b".starts with a dot",
        b"bare CR\rinside a line",
        b"CR before the line break\r",
        "8-bit: \u00e4\u00f6\u00fc \u20ac".encode(),
    ]
    head = (
        b"From: Test Sender <sender@example.invalid>\r\n"
        b"To: undisclosed-recipients:;\r\n"
        b"Subject: Seeded large message\r\n"
        b"Date: Mon, 01 Jan 2024 11:00:00 +0000\r\n"
        b"Message-ID: <seed-large@example.invalid>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
    )
    lines = [head]
    size = len(head)
    for number in itertools.count():
        if size >= LARGE_MESSAGE_MIN_SIZE:
            break
        if number % 50 == 0:
            line = special_lines[(number // 50) % len(special_lines)]
        else:
            length = rng.choice((1, 7, 40, 76, 76, 76, 998))
            start = rng.randrange(len(pool) - length)
            line = pool[start : start + length].strip(b" ") or b"x"
        lines.append(line + b"\r\n")
        size += len(line) + 2
    lines.append(b"end of the large message\r\n")
    return b"".join(lines)


def check_message(message: bytes) -> None:
    """Raise ValueError unless every LF in `message` is part of a CRLF.

    Dovecot serves a maildir file with bare LFs as CRLF, so such a message would
    no longer match its stored bytes.
    """
    if not message.endswith(b"\r\n"):
        raise ValueError("invalid message: it must end with CRLF")
    if message.count(b"\n") != message.count(b"\r\n"):
        raise ValueError("invalid message: it contains a bare LF, use CRLF")


class DovecotServer:
    """A Dovecot instance with seeded mailboxes, for one test session or demo.

    Attributes: `host`, `ports` (`imap`, `imaps`, `pop3`, `pop3s`, None when
    disabled), `ca_file` (the CA that issued the `valid`, `wrong_host` and
    `expired` certificates), `users` (name to password), `log_file`, `root`.
    """

    def __init__(
        self,
        *,
        tls: str = "both",
        cert: str = "valid",
        backend: str = "local",
        extra_users: Mapping[str, str] | None = None,
        extra_config: str = "",
        login_trusted_networks: Sequence[str] = (),
        auth_failure_delay: int = 0,
        connection_limit: int = 1000,
        login_processes: int = 1,
        pki: TestPKI | None = None,
        docker_image: str | None = None,
        docker_network: str | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"invalid tls {tls!r}: expected one of {TLS_MODES}")
        if cert not in SERVER_CERT_KINDS:
            raise ValueError(f"invalid cert {cert!r}: expected {SERVER_CERT_KINDS}")
        if backend not in BACKENDS:
            raise ValueError(f"invalid backend {backend!r}: expected {BACKENDS}")
        docker_network = docker_network or os.environ.get(
            "APPLIANCE_TEST_DOVECOT_NETWORK", "publish"
        )
        if docker_network not in DOCKER_NETWORKS:
            raise ValueError(
                f"invalid docker network {docker_network!r}: expected one of "
                f"{DOCKER_NETWORKS} (APPLIANCE_TEST_DOVECOT_NETWORK)"
            )

        self.tls = tls
        self.cert = cert
        self.backend = backend
        self.users = dict(DEFAULT_USERS)
        self.users.update(extra_users or {})
        for name, password in self.users.items():
            _check_user(name, password)

        self.extra_config = extra_config
        self.login_trusted_networks = tuple(login_trusted_networks)
        self.auth_failure_delay = auth_failure_delay
        self.connection_limit = connection_limit
        self.login_processes = login_processes
        self.docker_image = docker_image or os.environ.get(
            "APPLIANCE_TEST_DOVECOT_IMAGE", DEFAULT_DOCKER_IMAGE
        )
        self.docker_network = docker_network
        self.start_timeout = start_timeout

        self.host = "127.0.0.1"
        self.ports: dict[str, int | None] = dict.fromkeys(PORT_NAMES)
        self.root: Path | None = None
        self.log_file: Path | None = None
        self.ca_file: Path | None = None
        self._given_pki = pki
        self._mailboxes: dict[str, list[bytes]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._container: Any = None
        self._delivery_lock = threading.Lock()
        self._delivery_counter = itertools.count(1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def enabled_ports(self) -> dict[str, int]:
        """Ports that accept connections, by name."""
        return {name: port for name, port in self.ports.items() if port is not None}

    @property
    def listen_address(self) -> str:
        """Address in Dovecot's `listen` setting.

        A container with its own network needs every address, so that the published
        ports reach Dovecot. The local backend and a container in the host's network
        share the host's addresses and bind loopback only.
        """
        if self.backend == "docker" and self.docker_network == "publish":
            return "*"
        return self.host

    @property
    def pid(self) -> int | None:
        """PID of the Dovecot master process of the local backend."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Write all files, start Dovecot and wait until every port greets.

        Raises DovecotError with the tail of Dovecot's log when it does not
        become ready within `start_timeout` seconds.
        """
        if self.root is not None:
            raise DovecotError("Dovecot server already started")
        self.root = Path(tempfile.mkdtemp(prefix="appliance-dovecot-"))
        # Login processes run as an unprivileged user and must reach base_dir.
        self.root.chmod(0o755)
        self.log_file = self.root / "dovecot.log"
        try:
            self._prepare_files()
            if self.backend == "local":
                self._start_local()
            else:
                self._start_docker()
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Dovecot and remove the temporary folder. Safe to call twice."""
        try:
            if self._process is not None:
                self._stop_local()
            if self._container is not None:
                self._stop_docker()
        finally:
            if self.root is not None and not os.environ.get(
                "APPLIANCE_TEST_KEEP_DOVECOT"
            ):
                shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def message_bytes(self, user: str, index: int) -> bytes:
        """Return the stored bytes of message `index` in `user`'s INBOX.

        `index` counts from 0 in INBOX order, so it is the IMAP sequence number
        and POP3 message number minus one. Indexes 0 to 2 are the small seeded
        messages, LARGE_MESSAGE_INDEX (3) is the large one, and messages added
        by `deliver` follow.
        """
        return self._mailboxes[user][index]

    def message_count(self, user: str) -> int:
        """Return the number of messages in `user`'s INBOX, delivered ones included."""
        return len(self._mailboxes[user])

    def deliver(self, user: str, message: bytes) -> int:
        """Add `message` to `user`'s INBOX while the server runs.

        The file is written to the maildir's tmp/ and renamed into new/, the way
        a mail delivery agent does it. Returns the message's index for
        `message_bytes`.
        """
        if self.root is None:
            raise DovecotError("Dovecot server is not running")
        check_message(message)
        with self._delivery_lock:
            number = next(self._delivery_counter)
            file_name = f"{int(time.time())}.M{number}P{os.getpid()}.appliance-test"
            maildir = self._maildir(user)
            self._write_mail_file(maildir / "tmp" / file_name, message)
            os.rename(maildir / "tmp" / file_name, maildir / "new" / file_name)
            self._mailboxes[user].append(message)
            return len(self._mailboxes[user]) - 1

    def environment(self) -> dict[str, str]:
        """Return the server's address, ports, CA and users as variables."""
        env = {"DOVECOT_HOST": self.host}
        for name, port in self.ports.items():
            env[f"DOVECOT_{name.upper()}_PORT"] = "" if port is None else str(port)
        env["DOVECOT_CA_FILE"] = str(self.ca_file)
        env["DOVECOT_LOG_FILE"] = str(self.log_file)
        env["DOVECOT_ROOT"] = str(self.root)
        env["DOVECOT_USERS"] = " ".join(self.users)
        for name, password in self.users.items():
            variable = re.sub(r"[^A-Z0-9]", "_", name.upper())
            env[f"DOVECOT_PASSWORD_{variable}"] = password
        return env

    def is_running(self) -> bool:
        """Return whether the Dovecot process or container is still up."""
        if self._process is not None:
            return self._process.poll() is None
        if self._container is not None:
            wrapped = self._container.get_wrapped_container()
            wrapped.reload()
            return wrapped.status == "running"
        return False

    def _prepare_files(self) -> None:
        assert self.root is not None
        self._mail_uid, self._mail_gid = _unprivileged_ids()
        self._choose_ports()
        self._write_tls_files()
        self._write_passwd_file()
        self._seed_mailboxes()
        config = self._render_config()
        (self.root / "dovecot.conf").write_text(config)
        for name in ("run", "state"):
            (self.root / name).mkdir(mode=0o755)

    def _choose_ports(self) -> None:
        free = iter(find_free_ports(4, self.host))
        plain = self.tls != "implicit"
        implicit = self.tls in ("both", "implicit")
        self.ports = {
            "imap": next(free) if plain else None,
            "imaps": next(free) if implicit else None,
            "pop3": next(free) if plain else None,
            "pop3s": next(free) if implicit else None,
        }

    def _write_tls_files(self) -> None:
        # Dovecot reads copies inside root, so a container that mounts only root
        # can read them too.
        assert self.root is not None
        tls_dir = self.root / "tls"
        pki = self._given_pki or TestPKI(tls_dir / "pki")
        tls_dir.mkdir(exist_ok=True)
        cert_files = pki.server_cert(self.cert)
        shutil.copyfile(cert_files.cert_file, tls_dir / "server.pem")
        shutil.copyfile(cert_files.key_file, tls_dir / "server.key")
        (tls_dir / "server.key").chmod(0o600)
        self.ca_file = pki.ca_file

    def _write_passwd_file(self) -> None:
        # PLAIN.B64 lets the passwd-file store any password, even one that
        # contains its field separator ':'.
        assert self.root is not None
        lines = []
        for name, password in self.users.items():
            encoded = base64.b64encode(password.encode()).decode("ascii")
            lines.append(f"{name}:{{PLAIN.B64}}{encoded}::::::\n")
        passwd_file = self.root / "passwd"
        passwd_file.write_text("".join(lines))
        passwd_file.chmod(0o600)

    def _seed_mailboxes(self) -> None:
        assert self.root is not None
        mail_root = self.root / "mail"
        mail_root.mkdir(mode=0o755)
        # Every INBOX gets a hard link to one copy of the large message, which
        # keeps hundreds of users cheap on disk.
        large_file = mail_root / "large-message"
        self._write_mail_file(large_file, large_message())
        for user in self.users:
            maildir = self._maildir(user)
            for sub in (maildir.parent, maildir, *self._maildir_subdirs(maildir)):
                sub.mkdir(mode=0o700)
                os.chown(sub, self._mail_uid, self._mail_gid)
            messages = [small_message(user, i) for i in range(SMALL_MESSAGE_COUNT)]
            for index, message in enumerate(messages):
                self._write_mail_file(self._seed_path(maildir, index), message)
            os.link(large_file, self._seed_path(maildir, LARGE_MESSAGE_INDEX))
            self._mailboxes[user] = [*messages, large_message()]

    def _maildir(self, user: str) -> Path:
        if user not in self.users:
            raise KeyError(f"unknown user {user!r}")
        assert self.root is not None
        return self.root / "mail" / user / "Maildir"

    @staticmethod
    def _maildir_subdirs(maildir: Path) -> list[Path]:
        return [maildir / "cur", maildir / "new", maildir / "tmp"]

    @staticmethod
    def _seed_path(maildir: Path, index: int) -> Path:
        file_name = f"{SEED_TIMESTAMP + index}.M{index}P1.appliance-seed:2,"
        return maildir / "cur" / file_name

    def _write_mail_file(self, path: Path, message: bytes) -> None:
        path.write_bytes(message)
        path.chmod(0o600)
        os.chown(path, self._mail_uid, self._mail_gid)

    def _render_config(self) -> str:
        assert self.root is not None
        return render_config(
            root=self.root,
            listen=self.listen_address,
            ports=self.ports,
            ssl_enabled=self.tls != "none",
            mail_uid=self._mail_uid,
            mail_gid=self._mail_gid,
            login_user=_login_user(self.backend),
            login_trusted_networks=self.login_trusted_networks,
            auth_failure_delay=self.auth_failure_delay,
            connection_limit=self.connection_limit,
            login_processes=self.login_processes,
            extra_config=self.extra_config,
        )

    def _start_local(self) -> None:
        assert self.root is not None
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        command = [binary, "-F", "-c", str(self.root / "dovecot.conf")]
        with open(self.root / "dovecot.stderr", "wb") as stderr:
            # A new session keeps a Ctrl-C meant for the test runner or demo
            # away from Dovecot, so stop() alone decides when it ends.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _stop_local(self) -> None:
        process = self._process
        assert process is not None
        children = _child_pids(process.pid)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        # Dovecot's master signals its children on SIGTERM. Children left over
        # from a killed master are waited for, then killed by PID.
        _wait_for_exit(children, timeout=5.0)
        for pid in children:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._process = None

    def _start_docker(self) -> None:
        # NOTE: this backend ran only against Podman 4.3's Docker-compatible API, with
        # a Debian 12 Dovecot image and docker_network "host". The default image tag,
        # its dovenull user and the "publish" mode's loopback port publishing are
        # unverified. Root is mounted at the same path, so dovecot.conf stays valid.
        from testcontainers.core.container import DockerContainer

        assert self.root is not None
        container = DockerContainer(self.docker_image)
        container.with_command(
            ["/usr/sbin/dovecot", "-F", "-c", str(self.root / "dovecot.conf")]
        )
        container.with_volume_mapping(str(self.root), str(self.root), mode="rw")
        if self.docker_network == "host":
            container.with_kwargs(network_mode="host")
        else:
            for port in self.enabled_ports.values():
                # with_bind_ports cannot name a host address, and docker-py takes an
                # (address, port) tuple to publish on loopback only.
                container.ports[f"{port}/tcp"] = (self.host, port)
        self._container = container
        container.start()

    def _stop_docker(self) -> None:
        container, self._container = self._container, None
        container.stop()

    def _wait_until_ready(self) -> None:
        assert self.root is not None
        deadline = time.monotonic() + self.start_timeout
        pending = dict(self.enabled_ports)
        while pending:
            self._check_still_running()
            for name, port in list(pending.items()):
                if _port_greets(self.host, port, tls=name.endswith("s")):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise DovecotError(
                    f"Dovecot did not greet on {sorted(pending)} within "
                    f"{self.start_timeout} s\n{self.log_tail()}"
                )
            if pending:
                time.sleep(0.05)
        if self.backend == "local" and not (self.root / "run/master.pid").exists():
            raise DovecotError(f"Dovecot wrote no master.pid\n{self.log_tail()}")

    def _check_still_running(self) -> None:
        if not self.is_running():
            status = self._process.returncode if self._process else "unknown"
            raise DovecotError(
                f"Dovecot exited with status {status}\n{self.log_tail()}"
            )

    def log_tail(self) -> str:
        """Return the last lines of Dovecot's log files, for error messages."""
        if self.root is None:
            return "(Dovecot server is not running)"
        parts = []
        for name in ("dovecot.stderr", "dovecot.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                tail = "\n".join(lines[-LOG_TAIL_LINES:])
                parts.append(f"--- {name} (last {LOG_TAIL_LINES} lines) ---\n{tail}")
        if self._container is not None:
            stdout, stderr = self._container.get_logs()
            logs = (stdout + stderr).decode(errors="replace").splitlines()
            parts.append("--- container log ---\n" + "\n".join(logs[-LOG_TAIL_LINES:]))
        return "\n".join(parts) or "(Dovecot wrote no log)"


def render_config(
    *,
    root: Path,
    listen: str,
    ports: Mapping[str, int | None],
    ssl_enabled: bool,
    mail_uid: int,
    mail_gid: int,
    login_user: str,
    login_trusted_networks: Sequence[str],
    auth_failure_delay: int,
    connection_limit: int,
    extra_config: str,
    login_processes: int = 1,
) -> str:
    """Render a self-contained dovecot.conf for Dovecot 2.3."""
    ssl_lines = (
        f"ssl = yes\nssl_cert = <{root}/tls/server.pem\n"
        f"ssl_key = <{root}/tls/server.key\n"
        if ssl_enabled
        else "ssl = no\n"
    )
    return f"""\
# Generated for one test run; removed when the server stops.
instance_name = appliance-test-{root.name}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap pop3
listen = {listen}

# Everything runs as root here, but Dovecot rejects root for login and mail
# processes.
default_internal_user = root
default_internal_group = root
default_login_user = {login_user}
first_valid_uid = 0
mail_uid = {mail_uid}
mail_gid = {mail_gid}

{ssl_lines}disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = {auth_failure_delay} secs
auth_verbose = yes
login_trusted_networks = {" ".join(login_trusted_networks)}
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/mail/%u
}}
mail_location = maildir:~/Maildir
mailbox_idle_check_interval = 1 secs
mail_max_userip_connections = {connection_limit}

default_client_limit = {connection_limit + 100}
{_login_service("imap", ports, connection_limit, login_processes)}
{_login_service("pop3", ports, connection_limit, login_processes)}
{extra_config}
"""


def _login_service(
    protocol: str,
    ports: Mapping[str, int | None],
    connection_limit: int,
    login_processes: int,
) -> str:
    # service_count = 0 lets one login process serve many clients, which
    # Dovecot calls high-performance mode. Port 0 disables a listener; leaving
    # one out would enable Dovecot's built-in default port.
    return f"""\
service {protocol}-login {{
  inet_listener {protocol} {{
    port = {ports[protocol] or 0}
  }}
  inet_listener {protocol}s {{
    port = {ports[protocol + "s"] or 0}
    ssl = yes
  }}
  service_count = 0
  client_limit = {connection_limit}
  process_min_avail = {login_processes}
  process_limit = {max(LOGIN_PROCESS_LIMIT, login_processes)}
}}
service {protocol} {{
  process_limit = {connection_limit}
}}"""


def _check_user(name: str, password: str) -> None:
    if not name or not set(name) <= USERNAME_CHARS:
        raise ValueError(
            f"invalid user name {name!r}: use letters, digits and . - _ @ only"
        )
    if any(char in password for char in "\r\n\0"):
        raise ValueError(f"invalid password for {name!r}: it contains CR, LF or NUL")


def _unprivileged_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def _login_user(backend: str) -> str:
    if backend == "docker":
        return "dovenull"  # created by the image's dovecot-core package
    try:
        pwd.getpwnam("dovenull")
    except KeyError:
        return "nobody"
    return "dovenull"


def _port_greets(host: str, port: int, *, tls: bool) -> bool:
    """Return whether a login process on `port` sends its greeting."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            if not tls:
                return sock.recv(64).startswith((b"* OK", b"+OK"))
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with context.wrap_socket(sock) as tls_sock:
                return tls_sock.recv(64).startswith((b"* OK", b"+OK"))
    except OSError:
        return False


def _child_pids(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so fields are
        # counted after its closing bracket.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for_exit(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of `python3 -m tests.support.dovecot`."""
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.support.dovecot",
        description="Start a throwaway Dovecot with seeded mailboxes and wait "
        "for SIGINT or SIGTERM.",
    )
    parser.add_argument(
        "--tls",
        choices=TLS_MODES,
        default="both",
        help="ports to open: both (IMAP and POP3 ports with STARTTLS/STLS, and "
        "implicit TLS ports), starttls (only the ports with STARTTLS/STLS), implicit "
        "(only the implicit TLS ports) or none (IMAP and POP3 ports without TLS); "
        "default both",
    )
    parser.add_argument(
        "--cert",
        choices=SERVER_CERT_KINDS,
        default="valid",
        help="server certificate: valid (for localhost, 127.0.0.1 and ::1), "
        "wrong_host (for wrong.invalid only), expired, or untrusted (not issued by "
        "the CA in DOVECOT_CA_FILE); default valid",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local runs the dovecot binary of the host as root; docker runs it in "
        "a container of the image in APPLIANCE_TEST_DOVECOT_IMAGE (default "
        f"{DEFAULT_DOCKER_IMAGE}, never pulled here) through testcontainers, in the "
        "network that APPLIANCE_TEST_DOVECOT_NETWORK names (publish, the default, or "
        "host); default local",
    )
    parser.add_argument(
        "--extra-users",
        type=int,
        default=0,
        metavar="COUNT",
        help="add COUNT users named load0000... with password <name>-secret",
    )
    parser.add_argument(
        "--print-env",
        action="store_true",
        help="print ports, users and files as shell variable assignments",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="stop after SECONDS (default 3600); 0 runs until a signal",
    )
    return parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one server in the foreground until SIGINT, SIGTERM or the timeout."""
    args = _parse_args(argv)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server = DovecotServer(
        tls=args.tls,
        cert=args.cert,
        backend=args.backend,
        extra_users=numbered_users(args.extra_users),
    )
    with server:
        environment = server.environment()
        if args.print_env:
            for key, value in environment.items():
                print(f"{key}={shlex.quote(value)}")
            # A reader of this output can stop at this line.
            print("DOVECOT_READY=1")
        else:
            for key, value in environment.items():
                print(f"{key}: {value}")
        sys.stdout.flush()
        print("Dovecot is running; press Ctrl-C to stop it.", file=sys.stderr)
        deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
        while not stop_requested.wait(0.5):
            if not server.is_running():
                print(
                    f"Dovecot exited unexpectedly\n{server.log_tail()}", file=sys.stderr
                )
                return 1
            if deadline is not None and time.monotonic() > deadline:
                print(f"Stopping after {args.timeout} s.", file=sys.stderr)
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
