"""`appliance healthcheck`."""

from __future__ import annotations

import argparse

from appliance.cli.common import EXIT_FAILURE, EXIT_OK
from appliance.config import ConfigError, load_config


def command_healthcheck(args: argparse.Namespace) -> int:
    """Print one line and return 0 when the appliance is healthy, else 1."""
    try:
        loaded = load_config(args.config, secrets_dir=args.secrets_dir)
    except ConfigError as exc:
        print(f"unhealthy: config is invalid: {exc.problems[0]}")
        return EXIT_FAILURE
    from appliance.admin import check_health

    healthy, reason = check_health(loaded.config, timeout=args.timeout)
    print(reason)
    return EXIT_OK if healthy else EXIT_FAILURE
