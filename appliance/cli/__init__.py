"""Command line: `appliance run`, `check-config`, `schema`, `healthcheck`, `probe` and
`known-servers`."""

from __future__ import annotations

import argparse
import sys

from appliance.cli.common import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILURE,
    EXIT_OK,
    _add_config_options,
)
from appliance.cli.config_commands import (
    command_check_config,
    command_schema,
    config_schema,
)
from appliance.cli.health import command_healthcheck
from appliance.cli.run import (
    EVENT_LOOP_CHOICES,
    EVENT_LOOP_VARIABLE,
    command_run,
    event_loop_factory,
)
from appliance.cli.tls_commands import (
    _add_known_servers_command,
    _add_probe_command,
    command_known_servers,
    command_probe,
)

__all__ = [
    "COMMANDS",
    "EVENT_LOOP_CHOICES",
    "EVENT_LOOP_VARIABLE",
    "EXIT_CONFIG_ERROR",
    "EXIT_FAILURE",
    "EXIT_OK",
    "build_parser",
    "command_check_config",
    "command_healthcheck",
    "command_known_servers",
    "command_probe",
    "command_run",
    "command_schema",
    "config_schema",
    "event_loop_factory",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="IMAP and POP3 proxy that adds TLS toward mail servers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve the configured listeners until stopped")
    _add_config_options(run)

    check = commands.add_parser(
        "check-config", help="validate the config and print the effective values"
    )
    _add_config_options(check)

    schema = commands.add_parser("schema", help="print the JSON Schema of the config file")
    schema.add_argument(
        "--format",
        choices=("json", "markdown"),
        default="json",
        help="json: the JSON Schema; markdown: the config reference page",
    )

    healthcheck = commands.add_parser(
        "healthcheck",
        help="ask the running appliance whether it is healthy; exit 0 if so, else 1",
    )
    _add_config_options(healthcheck)
    healthcheck.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="seconds to wait for each connection (default: 3)",
    )
    _add_probe_command(commands)
    _add_known_servers_command(commands)
    return parser


COMMANDS = {
    "run": command_run,
    "check-config": command_check_config,
    "schema": command_schema,
    "probe": command_probe,
    "known-servers": command_known_servers,
    "healthcheck": command_healthcheck,
}


# Exit code after Ctrl-C, 128 plus the number of SIGINT, as shells report it.
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        # Ctrl-C during a command such as `probe` is a request to stop, not a crash.
        print(f"{args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
