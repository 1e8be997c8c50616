"""Run the real `appliance run` command in a subprocess for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.certs import CertFiles
from tests.support.dovecot import DovecotServer
from tests.support.ports import pick_free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# A listener as (protocol, client-side TLS mode, upstream TLS mode).
ListenerSpec = tuple[str, str, str]


def free_port(host: str = "127.0.0.1") -> int:
    return pick_free_port(host)


def send_and_half_close(port: int, data: bytes, timeout: float = 30.0) -> bytes:
    """Send `data` to a plain-text listener, shut down the write side, read to the end.

    This is what `printf ... | nc -N` and other scripts do. The end of stream means that
    no more commands follow, not that the replies are unwanted.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            received += chunk
    return received


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class ApplianceProcess:
    """`python -m appliance.cli run` with a generated config file and a captured log.

    `config` is the config as a dict; it is written as YAML into `workdir`. The log (standard
    error of the process) goes to `log_file`, which `log_text()` returns.
    """

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        wait_ports: bool = True,
    ) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.config_file = self.workdir / "appliance.yaml"
        self.log_file = self.workdir / "appliance.log"
        self.extra_env = env or {}
        self.wait_ports = wait_ports
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config.setdefault("state_dir", str(self.workdir / "state"))
        temporary = self.config_file.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(self.config, sort_keys=False))
        temporary.replace(self.config_file)

    def start(self) -> ApplianceProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        # APPLIANCE_TEST_EVENT_LOOP runs every appliance of a test run on one loop.
        loop = os.environ.get("APPLIANCE_TEST_EVENT_LOOP")
        if loop:
            env["APPLIANCE_EVENT_LOOP"] = loop
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "run", "--config", str(self.config_file)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if self.wait_ports:
            try:
                for listener in self.config.get("listeners", {}).values():
                    host = listener.get("bind", "127.0.0.1")
                    # A wildcard bind is reached through the loopback address of its family.
                    host = WILDCARD_TO_LOOPBACK.get(host, host)
                    wait_for_port(host, listener["port"])
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"appliance did not start; log:\n{self.log_text()}") from None
        return self

    def port(self, listener: str) -> int:
        return self.config["listeners"][listener]["port"]

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """Return the first log line that contains `text`, waiting for it.

        Raises AssertionError after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {text!r} in the log:\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Send SIGTERM and wait; kill after `timeout`. Return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def __enter__(self) -> ApplianceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def upstream_config(dovecot: Any, mode: str, protocol: str, **extra: Any) -> dict[str, Any]:
    """Return an upstream entry that reaches the fixture's Dovecot with the given TLS mode."""
    port_name = {
        ("imap", "implicit"): "imaps",
        ("pop3", "implicit"): "pop3s",
    }.get((protocol, mode), protocol)
    entry: dict[str, Any] = {
        "host": "localhost",
        "port": dovecot.ports[port_name],
        "tls": mode,
        "ca_file": str(dovecot.ca_file),
    }
    entry.update(extra)
    return entry


def listener_config(
    protocol: str,
    upstream: str,
    *,
    tls: str = "none",
    cert: CertFiles | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Return a listener entry on a free port of 127.0.0.1.

    The entry names the files of `cert` whenever `cert` is given. Only `tls: none`
    works without `cert`.
    """
    entry: dict[str, Any] = {
        "protocol": protocol,
        "port": free_port(),
        "tls": tls,
        "upstream": upstream,
    }
    if cert is not None:
        entry["cert_file"] = str(cert.cert_file)
        entry["key_file"] = str(cert.key_file)
    elif tls != "none":
        raise ValueError(f"cert is missing, but a listener with tls {tls!r} needs one")
    entry.update(settings)
    return entry


def dovecot_config(
    dovecot: DovecotServer,
    listeners: Mapping[str, ListenerSpec],
    cert: CertFiles | None = None,
    *,
    cert_on_plain: bool = False,
    **sections: Any,
) -> dict[str, Any]:
    """Build a config whose listeners all reach `dovecot`.

    Each listener goes to the upstream `<protocol>_<upstream TLS mode>`, and each such
    upstream is defined once. Listeners with client-side TLS name the files of `cert`,
    and `tls: none` listeners too when `cert_on_plain` is set. `sections` become
    further top-level keys, such as `limits` or `logging`.
    """
    config: dict[str, Any] = {"listeners": {}, "upstreams": {}}
    for name, (protocol, client_tls, upstream_tls) in listeners.items():
        upstream = f"{protocol}_{upstream_tls}"
        with_cert = client_tls != "none" or cert_on_plain
        config["listeners"][name] = listener_config(
            protocol, upstream, tls=client_tls, cert=cert if with_cert else None
        )
        config["upstreams"][upstream] = upstream_config(dovecot, upstream_tls, protocol)
    config.update(sections)
    return config
