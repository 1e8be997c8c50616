"""Exit codes and the config options that several commands share."""

from __future__ import annotations

import argparse
import sys

from appliance.config import ConfigError, LoadedConfig, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 2


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


def _load(
    args: argparse.Namespace,
    *,
    print_warnings: bool = True,
    require_listeners: bool = True,
) -> LoadedConfig | None:
    """Load the config named by the arguments, or print its problems and return None."""
    try:
        loaded = load_config(
            args.config,
            secrets_dir=args.secrets_dir,
            require_listeners=require_listeners,
        )
    except ConfigError as exc:
        print("config is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None
    if print_warnings:
        for warning in loaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return loaded
