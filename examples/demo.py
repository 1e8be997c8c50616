"""Run the appliance with examples/quickstart.yaml in front of a throwaway demo Dovecot.

Usage: `make demo` (or `python3 -m examples.demo` from the repository root, as root, with
Debian's dovecot-imapd and dovecot-pop3d installed). The demo Dovecot listens on free
loopback ports with TLS, so the quick start's `tls: auto` finds implicit TLS by itself.
Environment variables point the quick start's upstream at it, the way an operator overrides
a mounted config in an orchestrator. Ctrl-C stops both.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.config import ConfigError, load_config
from tests.support.dovecot import DovecotServer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
# The console script installed next to this interpreter, as in .venv/bin/appliance.
APPLIANCE_COMMAND = str(Path(sys.executable).parent / "appliance")
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
WILDCARD_FAMILIES = {"0.0.0.0": "IPv4", "::": "IPv6"}
# curl's URL scheme for each protocol on a listener with implicit TLS.
IMPLICIT_TLS_SCHEMES = {"imap": "imaps", "pop3": "pop3s"}


def demo_variables(dovecot: DovecotServer, state_dir: str) -> dict[str, str]:
    """Return the env overrides that aim the quick start's listeners at the demo Dovecot.

    The quick start has one upstream for both protocols on their standard ports; the demo
    Dovecot uses free ports instead, so POP3 gets a second upstream defined only in env.
    The caller's own APPLIANCE_* variables stay in effect, such as
    APPLIANCE_LISTENERS__IMAP__PORT for a busy port, except those that the demo sets.
    """
    return {
        "APPLIANCE_UPSTREAMS__MAIL__HOST": "localhost",
        "APPLIANCE_UPSTREAMS__MAIL__PORT": str(dovecot.ports["imaps"]),
        "APPLIANCE_UPSTREAMS__MAIL__CA_FILE": str(dovecot.ca_file),
        "APPLIANCE_UPSTREAMS__MAILPOP__HOST": "localhost",
        "APPLIANCE_UPSTREAMS__MAILPOP__PORT": str(dovecot.ports["pop3s"]),
        "APPLIANCE_UPSTREAMS__MAILPOP__TLS": "auto",
        "APPLIANCE_UPSTREAMS__MAILPOP__CA_FILE": str(dovecot.ca_file),
        "APPLIANCE_LISTENERS__POP3__UPSTREAM": "mailpop",
        "APPLIANCE_STATE_DIR": state_dir,
    }


@dataclass(frozen=True)
class ListenerAddress:
    """The address, port and client-side TLS mode of a listener of the effective config."""

    bind: str
    port: int
    tls: str = "none"

    @property
    def connect_host(self) -> str:
        """Address that a client on this machine connects to.

        A listener bound to 0.0.0.0 or :: accepts on every address of that family, so the
        loopback address of the family reaches it. asyncio and uvloop both set IPV6_V6ONLY,
        so a listener on :: takes no IPv4 connections.
        """
        return WILDCARD_TO_LOOPBACK.get(self.bind, self.bind)

    @property
    def url_host(self) -> str:
        """`connect_host` as the host of a URL, with an IPv6 address in brackets."""
        host = self.connect_host
        return f"[{host}]" if ":" in host else host

    def describe(self) -> str:
        """Return where the listener accepts, such as `127.0.0.1:1143`, and its TLS mode."""
        address = f"{self.url_host}:{self.port}"
        tls = "" if self.tls == "none" else f" (TLS: {self.tls})"
        family = WILDCARD_FAMILIES.get(self.bind)
        if family is None:
            return address + tls
        return (
            f"all {family} addresses ({self.bind}) on port {self.port}{tls}; "
            f"from this machine, connect to {address}"
        )

    def curl(self, protocol: str, path: str) -> str:
        """Return a curl command that fetches `path` through this listener as the demo user.

        Implicit TLS takes the imaps or pop3s scheme. With STARTTLS, --ssl-reqd makes curl
        upgrade before it logs in, and fail rather than log in without TLS.
        """
        scheme = IMPLICIT_TLS_SCHEMES[protocol] if self.tls == "implicit" else protocol
        option = "--ssl-reqd " if self.tls == "starttls" else ""
        url = f"{scheme}://{self.url_host}:{self.port}/{path}"
        return f"curl {option}-u {DEMO_USER}:{DEMO_PASSWORD} '{url}'"

    def imaplib_connect(self) -> str:
        """Return the Python statements that open an imaplib client on this listener."""
        host = self.connect_host
        if self.tls == "implicit":
            return f"c = imaplib.IMAP4_SSL('{host}', {self.port})"
        if self.tls == "starttls":
            return f"c = imaplib.IMAP4('{host}', {self.port}); c.starttls()"
        return f"c = imaplib.IMAP4('{host}', {self.port})"


def listener_addresses() -> dict[str, ListenerAddress] | None:
    """Return each listener's address, port and TLS mode in the effective config, by name.

    The config is the quick start under this process's environment, as the appliance
    loads it. Returns None when it does not load, because the appliance then reports
    the error itself.
    """
    try:
        loaded = load_config(QUICKSTART)
    except ConfigError:
        return None
    return {
        name: ListenerAddress(listener.bind, listener.port, listener.tls)
        for name, listener in loaded.config.listeners.items()
    }


def format_instructions(
    dovecot: DovecotServer, state_dir: str, addresses: dict[str, ListenerAddress]
) -> str:
    """Return how to reach the demo through the listeners at `addresses`."""
    ports = ", ".join(f"{name} {port}" for name, port in dovecot.enabled_ports.items())
    listeners = "\n".join(
        f"  {name}: {address.describe()}" for name, address in addresses.items()
    )
    imap = addresses["imap"]
    pop3 = addresses["pop3"]
    tls_listeners = [address for address in (imap, pop3) if address.tls != "none"]
    tls_note = ""
    if tls_listeners:
        subject = (
            "The TLS listener presents its cert_file"
            if len(tls_listeners) == 1
            else "The TLS listeners present their cert_file"
        )
        tls_note = (
            f"\n{subject}. Unless a CA in the system store issued it, add\n"
            "--cacert with its CA file to curl, and an ssl_context to imaplib.\n"
        )
    return f"""
Demo Dovecot is running on localhost ({ports}); its CA file is {dovecot.ca_file}.
The appliance keeps its state in {state_dir} and listens on
{listeners}
It reloads when {QUICKSTART} changes; the upstream host, port and CA file come from
APPLIANCE_UPSTREAMS__* variables, which override that file.
Ctrl-C stops both. User {DEMO_USER!r}, password {DEMO_PASSWORD!r}. Try:

  {imap.curl("imap", "INBOX;UID=1")}
  {pop3.curl("pop3", "1")}
  python3 -c "import imaplib; {imap.imaplib_connect()}; \\
print(c.login('{DEMO_USER}', '{DEMO_PASSWORD}')); print(c.select('INBOX'))"
  (set -a; . {env_file(state_dir)}; {APPLIANCE_COMMAND} check-config --config {QUICKSTART})
  {APPLIANCE_COMMAND} known-servers list --state-dir {state_dir}
  {APPLIANCE_COMMAND} probe localhost --port {dovecot.ports["imaps"]} --ca-file {dovecot.ca_file}
{tls_note}"""


def env_file(state_dir: str) -> Path:
    """Return the file with the appliance's variables, one shell assignment per line."""
    return Path(state_dir) / "demo.env"


def write_env_file(state_dir: str, environment: Mapping[str, str]) -> None:
    """Write every APPLIANCE_* variable of `environment` for a shell to source.

    These are the demo's variables and the caller's own, such as a moved port. The values
    are quoted, because a variable may hold JSON with spaces.
    """
    lines = "".join(
        f"{name}={shlex.quote(value)}\n"
        for name, value in sorted(environment.items())
        if name.startswith("APPLIANCE_")
    )
    env_file(state_dir).write_text(lines)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # So the appliance and listener_addresses resolve relative paths in the config alike.
    os.chdir(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as state_dir:
        with DovecotServer(tls="both", extra_users={DEMO_USER: DEMO_PASSWORD}) as dovecot:
            # Set before listener_addresses loads the config that the appliance runs.
            os.environ.update(demo_variables(dovecot, state_dir))
            write_env_file(state_dir, os.environ)
            command = [sys.executable, "-m", "appliance.cli", "run", "--config", str(QUICKSTART)]
            addresses = listener_addresses()
            if addresses is not None:
                print(format_instructions(dovecot, state_dir, addresses), flush=True)
            appliance = subprocess.Popen(command)
            try:
                return appliance.wait()
            except KeyboardInterrupt:
                appliance.send_signal(signal.SIGINT)
                return appliance.wait(30)


if __name__ == "__main__":
    sys.exit(main())
