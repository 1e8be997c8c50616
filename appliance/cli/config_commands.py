"""`appliance check-config` and `appliance schema`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

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

    problems: list[str] = []
    try:
        build_all_contexts(loaded.config)
    except TlsContextError as exc:
        problems.extend(exc.problems)
    state_dir = state_dir_problem(loaded.config)
    if state_dir is not None:
        problems.append(state_dir)
    if problems:
        print("config is invalid:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.write(render_effective_config(loaded))
    return EXIT_OK


def state_dir_problem(config: AppConfig) -> str | None:
    """Return why `run` could not use state_dir, without creating anything."""
    if not config.tls_auto.persist_known_servers:
        return None
    folder = Path(config.state_dir).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"state_dir: {str(existing)!r} is not a folder, so {str(folder)!r} cannot be used"
    # A temporary file detects more than os.access, which returns True for root even in /proc.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        action = "written" if existing == folder else "created"
        return (
            f"state_dir: {str(folder)!r} cannot be {action} by this process "
            f"({exc.strerror or exc}); choose a writable folder or set "
            "tls_auto.persist_known_servers: false"
        )
    return None


def command_schema(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        from appliance.config.reference import render_reference

        sys.stdout.write(render_reference())
    else:
        sys.stdout.write(json.dumps(config_schema(), indent=2, sort_keys=False) + "\n")
    return EXIT_OK
