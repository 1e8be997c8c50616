"""Run the appliance with examples/quickstart.yaml in front of a throwaway demo Dovecot.

Usage: `make demo` (or `python3 -m examples.demo` from the repository root, as root, with
Debian's dovecot-imapd and dovecot-pop3d installed). The demo Dovecot listens on free
loopback ports with TLS, so the quick start's `tls: auto` finds implicit TLS by itself.
Environment variables point the quick start's upstream at it, the way an operator overrides
a mounted config in an orchestrator. Ctrl-C stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from appliance.config import ConfigError, load_config
from tests.support.dovecot import DovecotServer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
# The console script installed next to this interpreter, as in .venv/bin/appliance.
APPLIANCE_COMMAND = str(Path(sys.executable).parent / "appliance")
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"


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


def listener_ports() -> dict[str, int] | None:
    """Return the port of each listener in the effective config, by listener name.

    The config is the quick start under this process's environment, as the appliance
    loads it. Returns None when it does not load, because the appliance then reports
    the error itself.
    """
    try:
        loaded = load_config(QUICKSTART)
    except ConfigError:
        return None
    return {name: listener.port for name, listener in loaded.config.listeners.items()}


def print_instructions(
    dovecot: DovecotServer, state_dir: str, ports_by_listener: dict[str, int]
) -> None:
    ports = ", ".join(f"{name} {port}" for name, port in dovecot.enabled_ports.items())
    imap_port = ports_by_listener["imap"]
    pop3_port = ports_by_listener["pop3"]
    print(
        f"""
Demo Dovecot is running on localhost ({ports}); its CA file is {dovecot.ca_file}.
The appliance listens on 127.0.0.1 and keeps its state in {state_dir}.
It reloads when {QUICKSTART} changes; the upstream host, port and CA file come from
APPLIANCE_UPSTREAMS__* variables, which override that file.
Ctrl-C stops both. User {DEMO_USER!r}, password {DEMO_PASSWORD!r}. Try:

  curl -u {DEMO_USER}:{DEMO_PASSWORD} 'imap://127.0.0.1:{imap_port}/INBOX;UID=1'
  curl -u {DEMO_USER}:{DEMO_PASSWORD} pop3://127.0.0.1:{pop3_port}/1
  python3 -c "import imaplib; c = imaplib.IMAP4('127.0.0.1', {imap_port}); \\
print(c.login('{DEMO_USER}', '{DEMO_PASSWORD}')); print(c.select('INBOX'))"
  {APPLIANCE_COMMAND} known-servers list --state-dir {state_dir}
  {APPLIANCE_COMMAND} probe localhost --port {dovecot.ports["imaps"]} --ca-file {dovecot.ca_file}
""",
        flush=True,
    )


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # The appliance and listener_ports then resolve relative paths in the config alike.
    os.chdir(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as state_dir:
        with DovecotServer(tls="both", extra_users={DEMO_USER: DEMO_PASSWORD}) as dovecot:
            # Set here, so that listener_ports loads the config that the appliance runs.
            os.environ.update(demo_variables(dovecot, state_dir))
            command = [sys.executable, "-m", "appliance.cli", "run", "--config", str(QUICKSTART)]
            ports_by_listener = listener_ports()
            if ports_by_listener is not None:
                print_instructions(dovecot, state_dir, ports_by_listener)
            appliance = subprocess.Popen(command)
            try:
                return appliance.wait()
            except KeyboardInterrupt:
                appliance.send_signal(signal.SIGINT)
                return appliance.wait(30)


if __name__ == "__main__":
    sys.exit(main())
