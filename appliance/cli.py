"""Command line: `appliance run | check-config | schema`."""

from __future__ import annotations

import argparse
import json
import sys

from appliance.config import AppConfig, ConfigError, LoadedConfig, load_config
from appliance.config.render import render_effective_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 2


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
    return parser


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file, .yaml/.yml/.toml/.json (default: $APPLIANCE_CONFIG or "
        "/etc/appliance/appliance.yaml)",
    )
    parser.add_argument(
        "--secrets-dir",
        metavar="DIR",
        help="folder of one-value secret files (default: $APPLIANCE_SECRETS_DIR or /run/secrets)",
    )


def config_schema() -> dict:
    """Return the JSON Schema of the config file."""
    schema = AppConfig.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Mail proxy appliance config"
    return schema


def _load(args: argparse.Namespace) -> LoadedConfig | None:
    try:
        loaded = load_config(args.config, secrets_dir=args.secrets_dir)
    except ConfigError as exc:
        print("config is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return loaded


def command_check_config(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG_ERROR
    from appliance.tls.contexts import TlsContextError, build_all_contexts

    try:
        build_all_contexts(loaded.config)
    except TlsContextError as exc:
        print("config is invalid:", file=sys.stderr)
        print(f"  - {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.write(render_effective_config(loaded))
    return EXIT_OK


def command_schema(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        from appliance.config.reference import render_reference

        sys.stdout.write(render_reference())
    else:
        sys.stdout.write(json.dumps(config_schema(), indent=2, sort_keys=False) + "\n")
    return EXIT_OK


def command_run(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG_ERROR
    from appliance.proxy.runtime import serve

    return serve(loaded, config_arg=args.config, secrets_dir_arg=args.secrets_dir)


COMMANDS = {
    "run": command_run,
    "check-config": command_check_config,
    "schema": command_schema,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
