"""Hot reload of a running `appliance run` process, with real Dovecot behind it.

Each test changes the config or certificate files the way an operator or Kubernetes
does, then polls with a generous timeout until a new client sees the change, while
sessions opened before the change run on and finish normally.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import yaml

from tests.support.appliance import (
    REPO_ROOT,
    ApplianceProcess,
    free_port,
    upstream_config,
)
from tests.support.certs import CertFiles, TestPKI
from tests.support.dovecot import LARGE_MESSAGE_INDEX, DovecotServer

# Seconds to wait for a change to show. It stops hung runs and checks no speed.
TIMEOUT = 20.0
POLL_INTERVAL = 0.05
SOCKET_TIMEOUT = 10.0
RELOAD_COUNT = 50


# Clients that stay connected across reloads


class LineClient:
    """A CRLF line client on a plain loopback socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=SOCKET_TIMEOUT
        )
        self.buffer = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_some(self, size: int) -> bytes:
        if not self.buffer:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def command(self, tag: str, text: str) -> bytes:
        """Send an IMAP command and return its tagged response line."""
        self.send(f"{tag} {text}")
        return self.read_tagged(tag)

    def read_tagged(self, tag: str) -> bytes:
        while True:
            line = self.read_line()
            if line.startswith(tag.encode() + b" "):
                return line

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the appliance")
        self.buffer += data


def imap_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_login(port: int, user: str, password: str) -> LineClient:
    client = LineClient(port)
    assert client.read_line().startswith(b"* OK")
    reply = client.command("L1", f"LOGIN {user} {imap_quote(password)}")
    assert reply.startswith(b"L1 OK"), reply
    return client


def imap_logout(client: LineClient) -> None:
    reply = client.command("Z9", "LOGOUT")
    client.close()
    assert reply.startswith(b"Z9 OK"), reply


def pop3_login(port: int, user: str, password: str) -> LineClient:
    client = LineClient(port)
    assert client.read_line().startswith(b"+OK")
    client.send(f"USER {user}")
    assert client.read_line().startswith(b"+OK")
    client.send(f"PASS {password}")
    reply = client.read_line()
    assert reply.startswith(b"+OK"), reply
    return client


def read_pop3_body(client: LineClient, received: bytes) -> bytes:
    """Read a multi-line response to its end and undo the dot-stuffing (RFC 1939)."""
    while not received.endswith(b"\r\n.\r\n"):
        received += client.read_some(1 << 20)
    lines = received[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        return sock.recv(256)


def is_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


def peer_certificate(port: int, ca_file: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    address = ("127.0.0.1", port)
    with (
        socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return tls.getpeercert(binary_form=True)


def leaf_der(cert_file: Path) -> bytes:
    pem = cert_file.read_text()
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(pem.split(end)[0] + end + "\n")


# Waiting for the appliance


def wait_until(
    predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def log_lines(appliance: ApplianceProcess, pattern: str) -> list[str]:
    return re.findall(pattern, appliance.log_text())


def wait_for_version(appliance: ApplianceProcess, version: int) -> str:
    """Wait for the summary line of the reload that applies config `version`."""
    pattern = rf"config reload \([^)]*\) applied version {version}: .*"
    lines = wait_until(
        lambda: log_lines(appliance, pattern),
        f"config version {version}; log:\n{appliance.log_text()[-3000:]}",
    )
    return lines[0]


def wait_for_rejection(appliance: ApplianceProcess, count: int) -> str:
    """Wait for the `count`th rejected reload; return its summary and problem lines.

    Each problem follows the summary on a log line of its own, as `  - problem`. The
    DEBUG line after the problems shows that all of them are in the log.
    """
    pattern = (
        r"config reload \([^)]*\) rejected: .*(?:\n.* ERROR +- .*)*"
        r"(?=\n.* DEBUG +after reload: )"
    )
    lines = wait_until(
        lambda: (
            len(log_lines(appliance, pattern)) >= count
            and log_lines(appliance, pattern)
        ),
        f"rejected reload {count}; log:\n{appliance.log_text()[-3000:]}",
    )
    return lines[count - 1]


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def copy_atomically(source: Path, target: Path) -> None:
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    temporary.replace(target)


# Fixtures and configs


@pytest.fixture
def tls_folder(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Path:
    """A folder with listener.crt and listener.key, a copy of a fresh certificate."""
    folder = tmp_path / "tls"
    folder.mkdir()
    first = pki.issue_server_cert(f"{request.node.name}-first")
    shutil.copyfile(first.cert_file, folder / "listener.crt")
    shutil.copyfile(first.key_file, folder / "listener.key")
    return folder


def plain_listener(protocol: str, port: int, upstream: str) -> dict[str, Any]:
    return {"protocol": protocol, "port": port, "upstream": upstream}


def base_config(dovecot: DovecotServer) -> dict[str, Any]:
    return {
        "listeners": {
            "imap": plain_listener("imap", free_port(), "imap-mail"),
            "pop3": plain_listener("pop3", free_port(), "pop3-mail"),
        },
        "upstreams": {
            "imap-mail": upstream_config(dovecot, "starttls", "imap"),
            "pop3-mail": upstream_config(dovecot, "starttls", "pop3"),
        },
        "logging": {"level": "DEBUG"},
    }


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[Callable[..., ApplianceProcess]]:
    started: list[ApplianceProcess] = []

    def start(config: dict[str, Any], cls: type = ApplianceProcess, **extra: Any):
        appliance = cls(config, tmp_path / f"appliance{len(started)}", **extra)
        started.append(appliance)
        appliance.start()
        # The check when the file watch starts would also apply an edit made while
        # it runs, so the tests edit only after it, and each edit gets one reload.
        appliance.wait_for_log("files unchanged since start-up", timeout=TIMEOUT)
        return appliance

    yield start
    for appliance in started:
        appliance.stop()


# Running sessions survive every kind of change


def test_changes_keep_running_sessions(
    dovecot: DovecotServer,
    dovecot_factory: Callable[..., DovecotServer],
    pki: TestPKI,
    tls_folder: Path,
    appliance_factory: Callable[..., ApplianceProcess],
) -> None:
    other_dovecot = dovecot_factory(tls="both", extra_users={"dave": "dave-secret"})
    config = base_config(dovecot)
    listeners = config["listeners"]
    listeners["imaps"] = {
        **plain_listener("imap", free_port(), "imap-mail"),
        "tls": "implicit",
        "cert_file": str(tls_folder / "listener.crt"),
        "key_file": str(tls_folder / "listener.key"),
    }
    listeners["legacy"] = plain_listener("imap", free_port(), "imap-mail")
    appliance = appliance_factory(config)
    large = dovecot.message_bytes("carol", LARGE_MESSAGE_INDEX)

    idle = imap_login(appliance.port("imap"), "alice", dovecot.users["alice"])
    assert idle.command("S1", "SELECT INBOX").startswith(b"S1 OK")
    idle.send("I1 IDLE")
    assert idle.read_line().startswith(b"+ ")
    on_legacy = imap_login(appliance.port("legacy"), "bob", dovecot.users["bob"])
    retr = pop3_login(appliance.port("pop3"), "carol", dovecot.users["carol"])
    retr.send(f"RETR {LARGE_MESSAGE_INDEX + 1}")
    assert retr.read_line().startswith(b"+OK")
    body = retr.read_some(32768)

    # Add a listener.
    extra_port = free_port()
    listeners["extra"] = plain_listener("pop3", extra_port, "pop3-mail")
    appliance.write_config()
    assert "listeners.extra added" in wait_for_version(appliance, 2)
    assert wait_until(lambda: greeting(extra_port).startswith(b"+OK"), "new listener")
    body += retr.read_some(32768)

    # Remove another.
    legacy_port = listeners.pop("legacy")["port"]
    appliance.write_config()
    assert "listeners.legacy removed" in wait_for_version(appliance, 3)
    assert wait_until(lambda: is_refused(legacy_port), "removed listener to close")
    body += retr.read_some(32768)

    # Change the port of the listener that carries the POP3 download.
    old_pop3_port, new_pop3_port = listeners["pop3"]["port"], free_port()
    listeners["pop3"]["port"] = new_pop3_port
    appliance.write_config()
    assert "listeners.pop3 rebound" in wait_for_version(appliance, 4)
    assert wait_until(lambda: greeting(new_pop3_port).startswith(b"+OK"), "new port")
    assert wait_until(lambda: is_refused(old_pop3_port), "old port to close")
    body += retr.read_some(32768)

    # Rotate the certificate of the TLS listener in place.
    second = pki.issue_server_cert("changes-keep-running-sessions-second")
    assert peer_certificate(appliance.port("imaps"), pki.ca_file) != leaf_der(
        second.cert_file
    )
    copy_atomically(second.key_file, tls_folder / "listener.key")
    copy_atomically(second.cert_file, tls_folder / "listener.crt")
    assert "listeners.imaps certificate files changed" in wait_for_version(appliance, 5)
    assert peer_certificate(appliance.port("imaps"), pki.ca_file) == leaf_der(
        second.cert_file
    )
    body += retr.read_some(32768)

    # Point the IMAP upstream at another server, where only dave exists.
    config["upstreams"]["imap-mail"] = upstream_config(
        other_dovecot, "starttls", "imap"
    )
    appliance.write_config()
    assert "upstreams.imap-mail changed" in wait_for_version(appliance, 6)
    imap_logout(imap_login(appliance.port("imap"), "dave", "dave-secret"))

    # Every session opened before the changes finishes normally.
    idle.send("DONE")
    assert idle.read_tagged("I1").startswith(b"I1 OK")
    imap_logout(idle)
    assert on_legacy.command("N1", "NOOP").startswith(b"N1 OK")
    imap_logout(on_legacy)
    assert read_pop3_body(retr, body) == large
    retr.send("QUIT")
    assert retr.read_line().startswith(b"+OK")
    retr.close()
    assert "shut down" not in appliance.log_text()
    assert "internal error" not in appliance.log_text()


# Rejected edits change nothing


def invalid_yaml(appliance: ApplianceProcess, **_: Any) -> str:
    write_text_atomically(appliance.config_file, "listeners: [unclosed\n")
    return f"config file '{appliance.config_file}' could not be parsed"


def schema_error(appliance: ApplianceProcess, **_: Any) -> str:
    config = yaml.safe_load(yaml.safe_dump(appliance.config))
    config["listeners"]["imap"]["port"] = "not-a-port"
    write_text_atomically(appliance.config_file, yaml.safe_dump(config))
    return "listeners.imap.port"


def missing_certificate(appliance: ApplianceProcess, tls_folder: Path, **_: Any) -> str:
    config = yaml.safe_load(yaml.safe_dump(appliance.config))
    missing = tls_folder / "missing.crt"
    config["listeners"]["imaps"] = {
        **plain_listener("imap", free_port(), "imap-mail"),
        "tls": "implicit",
        "cert_file": str(missing),
        "key_file": str(tls_folder / "listener.key"),
    }
    write_text_atomically(appliance.config_file, yaml.safe_dump(config))
    return f"listeners.imaps.cert_file: file '{missing}' does not exist"


def mismatched_key(
    appliance: ApplianceProcess, tls_folder: Path, pki: TestPKI, **_: Any
) -> str:
    other = pki.issue_server_cert("rejected-mismatched-key-other")
    config = yaml.safe_load(yaml.safe_dump(appliance.config))
    config["listeners"]["imaps"] = {
        **plain_listener("imap", free_port(), "imap-mail"),
        "tls": "implicit",
        "cert_file": str(tls_folder / "listener.crt"),
        "key_file": str(other.key_file),
    }
    write_text_atomically(appliance.config_file, yaml.safe_dump(config))
    return (
        f"listeners.imaps.cert_file: '{tls_folder / 'listener.crt'}' starts with a "
        "certificate that does not belong to the private key in key_file"
    )


def truncated_key(appliance: ApplianceProcess, tls_folder: Path, **_: Any) -> str:
    truncated = tls_folder / "truncated.key"
    intact = (tls_folder / "listener.key").read_bytes()
    truncated.write_bytes(intact.split(b"-----END")[0])
    config = yaml.safe_load(yaml.safe_dump(appliance.config))
    config["listeners"]["imaps"] = {
        **plain_listener("imap", free_port(), "imap-mail"),
        "tls": "implicit",
        "cert_file": str(tls_folder / "listener.crt"),
        "key_file": str(truncated),
    }
    write_text_atomically(appliance.config_file, yaml.safe_dump(config))
    return f"listeners.imaps.key_file: '{truncated}' is truncated"


def port_in_use(appliance: ApplianceProcess, held: socket.socket, **_: Any) -> str:
    port = held.getsockname()[1]
    config = yaml.safe_load(yaml.safe_dump(appliance.config))
    config["listeners"]["taken"] = plain_listener("imap", port, "imap-mail")
    write_text_atomically(appliance.config_file, yaml.safe_dump(config))
    return f"listeners.taken: cannot listen on 127.0.0.1:{port}"


@pytest.mark.parametrize(
    "bad_edit",
    [
        invalid_yaml,
        schema_error,
        missing_certificate,
        mismatched_key,
        truncated_key,
        port_in_use,
    ],
    ids=lambda edit: edit.__name__,
)
def test_bad_edit_is_rejected(
    bad_edit: Callable[..., str],
    dovecot: DovecotServer,
    pki: TestPKI,
    tls_folder: Path,
    appliance_factory: Callable[..., ApplianceProcess],
) -> None:
    appliance = appliance_factory(base_config(dovecot))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()

        expected = bad_edit(appliance, tls_folder=tls_folder, pki=pki, held=held)
        line = wait_for_rejection(appliance, 1)

        assert expected in line
        assert "version 1 stays active" in line
        assert greeting(appliance.port("imap")).startswith(b"* OK")
        assert greeting(appliance.port("pop3")).startswith(b"+OK")

    late_port = free_port()
    appliance.config["listeners"]["late"] = plain_listener(
        "pop3", late_port, "pop3-mail"
    )
    appliance.write_config()
    assert "listeners.late added" in wait_for_version(appliance, 2)
    assert greeting(late_port).startswith(b"+OK")


def test_drain_deadline_closes_removed_sessions(
    dovecot: DovecotServer, appliance_factory: Callable[..., ApplianceProcess]
) -> None:
    config = base_config(dovecot)
    config["limits"] = {"drain_removed_listeners_after": 1.0}
    appliance = appliance_factory(config)
    kept = imap_login(appliance.port("imap"), "alice", dovecot.users["alice"])
    removed = pop3_login(appliance.port("pop3"), "carol", dovecot.users["carol"])

    config["listeners"].pop("pop3")
    appliance.write_config()
    wait_for_version(appliance, 2)

    with pytest.raises(ConnectionError):
        removed.read_line()
    removed.close()
    assert kept.command("N1", "NOOP").startswith(b"N1 OK")
    imap_logout(kept)
    assert "closed 1 sessions of removed listeners pop3" in appliance.log_text()


# Kubernetes volume


class ProjectedVolumeAppliance(ApplianceProcess):
    """An appliance whose config and TLS files live in a Kubernetes-style volume.

    Like a ConfigMap or Secret volume, the folder holds `..data`, a symlink to the
    current timestamped folder, and one symlink per file that goes through `..data`. An
    update writes a new timestamped folder, renames a new `..data` symlink over the old
    one, then deletes the old folder.
    """

    def __init__(
        self, config: dict[str, Any], workdir: Path, *, tls: CertFiles
    ) -> None:
        super().__init__(config, workdir)
        self.volume = self.workdir / "volume"
        self.config_file = self.volume / "appliance.yaml"
        self.tls = tls
        self.generation = 0

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config.setdefault("state_dir", str(self.workdir / "state"))
        self.volume.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        folder = self.volume / f"..2026_12_04_10_00_{self.generation:02d}.{os.getpid()}"
        folder.mkdir()
        (folder / "appliance.yaml").write_text(yaml.safe_dump(self.config))
        shutil.copyfile(self.tls.cert_file, folder / "tls.crt")
        shutil.copyfile(self.tls.key_file, folder / "tls.key")

        data = self.volume / "..data"
        previous = data.resolve() if data.is_symlink() else None
        temporary = self.volume / "..data_tmp"
        temporary.symlink_to(folder.name)
        temporary.replace(data)
        for name in ("appliance.yaml", "tls.crt", "tls.key"):
            link = self.volume / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if previous is not None:
            shutil.rmtree(previous)


def test_kubernetes_volume_swap_reloads(
    dovecot: DovecotServer,
    pki: TestPKI,
    tmp_path: Path,
    appliance_factory: Callable[..., ApplianceProcess],
) -> None:
    first = pki.issue_server_cert("kubernetes-first")
    second = pki.issue_server_cert("kubernetes-second")
    volume = tmp_path / "appliance0" / "volume"
    config = base_config(dovecot)
    config["listeners"]["imaps"] = {
        **plain_listener("imap", free_port(), "imap-mail"),
        "tls": "implicit",
        "cert_file": str(volume / "tls.crt"),
        "key_file": str(volume / "tls.key"),
    }
    appliance = appliance_factory(config, ProjectedVolumeAppliance, tls=first)
    assert appliance.config_file.is_symlink()
    assert peer_certificate(appliance.port("imaps"), pki.ca_file) == leaf_der(
        first.cert_file
    )

    late_port = free_port()
    config["listeners"]["late"] = plain_listener("pop3", late_port, "pop3-mail")
    appliance.tls = second
    appliance.write_config()

    line = wait_for_version(appliance, 2)
    assert "listeners.late added" in line
    assert "listeners.imaps certificate files changed" in line
    assert greeting(late_port).startswith(b"+OK")
    assert peer_certificate(appliance.port("imaps"), pki.ca_file) == leaf_der(
        second.cert_file
    )


# SIGHUP


def test_sighup_triggers_reload(
    dovecot: DovecotServer, appliance_factory: Callable[..., ApplianceProcess]
) -> None:
    appliance = appliance_factory(base_config(dovecot))

    appliance.send_signal(signal.SIGHUP)

    pattern = r"config reload \(SIGHUP\) found no changes; version 1 stays active"
    wait_until(lambda: log_lines(appliance, pattern), "a reload after SIGHUP")
    assert appliance.process is not None
    assert appliance.process.poll() is None
    assert greeting(appliance.port("imap")).startswith(b"* OK")


# Many reloads under load


class LightLoad:
    """Short IMAP sessions one after another in a thread, counting the failures."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.port, self.user, self.password = port, user, password
        self.completed = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(SOCKET_TIMEOUT * 3)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                client = imap_login(self.port, self.user, self.password)
                assert client.command("N1", "NOOP").startswith(b"N1 OK")
                imap_logout(client)
                self.completed += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            self.stopping.wait(0.02)


def resource_counts(appliance: ApplianceProcess) -> tuple[int, int]:
    """Return (asyncio tasks, open file descriptors) of the appliance process.

    The task count comes from the DEBUG line that follows each reload summary, so this
    sends SIGHUP and reads the line of that reload.
    """
    assert appliance.process is not None
    pattern = r"config reload \(SIGHUP\).*\n.*after reload: (\d+) asyncio tasks"
    seen = len(log_lines(appliance, pattern))
    appliance.send_signal(signal.SIGHUP)
    counts = wait_until(
        lambda: (
            len(log_lines(appliance, pattern)) > seen and log_lines(appliance, pattern)
        ),
        "the task count after SIGHUP",
    )
    fds = len(os.listdir(f"/proc/{appliance.process.pid}/fd"))
    return int(counts[-1]), fds


def test_fifty_reloads_leak_nothing(
    dovecot: DovecotServer, appliance_factory: Callable[..., ApplianceProcess]
) -> None:
    config = base_config(dovecot)
    appliance = appliance_factory(config)
    idle = imap_login(appliance.port("imap"), "bob", dovecot.users["bob"])
    assert idle.command("S1", "SELECT INBOX").startswith(b"S1 OK")
    idle.send("I1 IDLE")
    assert idle.read_line().startswith(b"+ ")
    pop3 = pop3_login(appliance.port("pop3"), "carol", dovecot.users["carol"])
    tasks_before, fds_before = resource_counts(appliance)
    extra = plain_listener("pop3", free_port(), "pop3-mail")

    with LightLoad(appliance.port("imap"), "alice", dovecot.users["alice"]) as load:
        for number in range(RELOAD_COUNT):
            if number % 2 == 0:
                config["listeners"]["extra"] = extra
            else:
                config["listeners"].pop("extra")
            config["limits"] = {"max_protocol_errors": 10 + number}
            appliance.write_config()
            wait_for_version(appliance, number + 2)

    assert load.failures == []
    assert load.completed > 0
    # Sessions of the load may still be closing, so the counts get a while to settle.
    deadline = time.monotonic() + TIMEOUT
    tasks_after, fds_after = resource_counts(appliance)
    while (tasks_after, fds_after) != (tasks_before, fds_before):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        tasks_after, fds_after = resource_counts(appliance)
    assert tasks_after == tasks_before
    assert fds_after == fds_before
    idle.send("DONE")
    assert idle.read_tagged("I1").startswith(b"I1 OK")
    imap_logout(idle)
    pop3.send("STAT")
    assert pop3.read_line().startswith(b"+OK")
    pop3.send("QUIT")
    assert pop3.read_line().startswith(b"+OK")
    pop3.close()


# Shutdown while a reload is stuck

# Runs the appliance with a reload that never returns, as one stuck in a system call
# such as open() of a FIFO would. The first reload runs when the file watch starts.
STUCK_RELOAD_SCRIPT = """
import sys
import threading

from appliance.reload import reloader

reloader.Reloader._load = lambda self: threading.Event().wait()

from appliance.cli import main

sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_sigterm_ends_process_with_stuck_reload(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "listeners": {"imap": plain_listener("imap", port, "mail")},
        "upstreams": {"mail": {"host": "127.0.0.1", "port": free_port()}},
        "logging": {"level": "DEBUG"},
        "limits": {"shutdown_grace_period": 1},
        "state_dir": str(tmp_path / "state"),
    }
    config_file = tmp_path / "appliance.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log_file = tmp_path / "appliance.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", STUCK_RELOAD_SCRIPT, str(config_file)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(
            lambda: "watching" in log_file.read_text(errors="replace"),
            "the file watch to start",
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        exited = process.poll() is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)

    log_text = log_file.read_text(errors="replace")
    assert "shutdown complete" in log_text, log_text[-3000:]
    assert exited, "the process outlived SIGTERM:\n" + log_text[-3000:]
