"""`appliance check-config` and `appliance schema`."""

from __future__ import annotations

import argparse
import json
import sys

from appliance.cli.common import EXIT_CONFIG_ERROR, EXIT_OK, _load
from appliance.config import AppConfig
from appliance.config.render import render_effective_config


def config_schema() -> dict:
    """Return the JSON Schema of the config file."""
    schema = AppConfig.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Mail proxy appliance config"
    return schema


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
