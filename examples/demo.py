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

import yaml

from tests.support.dovecot import DovecotServer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
# The console script installed next to this interpreter, as in .venv/bin/appliance.
APPLIANCE_COMMAND = str(Path(sys.executable).parent / "appliance")
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"


def demo_environment(dovecot: DovecotServer, state_dir: str) -> dict[str, str]:
    """Return env overrides that aim the quick start's listeners at the demo Dovecot.

    The quick start has one upstream for both protocols on their standard ports; the demo
    Dovecot uses free ports instead, so POP3 gets a second upstream defined only in env.
    The caller's own APPLIANCE_* variables are kept, such as
    APPLIANCE_LISTENERS__IMAP__PORT for a busy port, except those that the demo sets.
    """
    env = dict(os.environ)
    env.update(
        {
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
    )
    return env


def listener_port(name: str, env: dict[str, str]) -> str:
    """Return the port of a quick-start listener, after an APPLIANCE_* override."""
    variable = f"APPLIANCE_LISTENERS__{name.upper()}__PORT"
    overrides = [value for key, value in env.items() if key.upper() == variable]
    if overrides:
        return overrides[0]
    config = yaml.safe_load(QUICKSTART.read_text())
    return str(config["listeners"][name]["port"])


def print_instructions(
    dovecot: DovecotServer, state_dir: str, env: dict[str, str]
) -> None:
    ports = ", ".join(f"{name} {port}" for name, port in dovecot.enabled_ports.items())
    imap_port = listener_port("imap", env)
    pop3_port = listener_port("pop3", env)
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
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as state_dir:
        with DovecotServer(tls="both", extra_users={DEMO_USER: DEMO_PASSWORD}) as dovecot:
            env = demo_environment(dovecot, state_dir)
            command = [sys.executable, "-m", "appliance.cli", "run", "--config", str(QUICKSTART)]
            print_instructions(dovecot, state_dir, env)
            appliance = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
            try:
                return appliance.wait()
            except KeyboardInterrupt:
                appliance.send_signal(signal.SIGINT)
                return appliance.wait(30)


if __name__ == "__main__":
    sys.exit(main())
