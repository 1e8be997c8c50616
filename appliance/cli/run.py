"""`appliance run` and the choice of its event loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from appliance.cli.common import EXIT_CONFIG_ERROR, _load

EVENT_LOOP_VARIABLE = "APPLIANCE_EVENT_LOOP"
EVENT_LOOP_CHOICES = ("auto", "asyncio", "uvloop")


def event_loop_factory(
    choice: str | None,
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return the event loop factory for an APPLIANCE_EVENT_LOOP value.

    None means asyncio's default loop. `auto` (also an unset or empty value) picks
    uvloop when it is installed. Raises ValueError for an unknown value, or for `uvloop`
    when uvloop is missing.
    """
    name = (choice or "auto").strip().lower() or "auto"
    if name not in EVENT_LOOP_CHOICES:
        raise ValueError(
            f"{EVENT_LOOP_VARIABLE}={choice!r} is invalid; expected one of: "
            f"{', '.join(EVENT_LOOP_CHOICES)}"
        )
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ValueError(
                f"{EVENT_LOOP_VARIABLE}=uvloop, but uvloop is not installed; install it "
                "(pip install 'appliance[fast]') or set "
                f"{EVENT_LOOP_VARIABLE}=asyncio"
            ) from None
        return None
    return uvloop.new_event_loop


def command_run(args: argparse.Namespace) -> int:
    try:
        loop_factory = event_loop_factory(os.environ.get(EVENT_LOOP_VARIABLE))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # serve() logs the config's warnings, so they are not printed here as well.
    loaded = _load(args, print_warnings=False)
    if loaded is None:
        return EXIT_CONFIG_ERROR
    from appliance.proxy.runtime import serve

    return serve(
        loaded,
        config_arg=args.config,
        secrets_dir_arg=args.secrets_dir,
        loop_factory=loop_factory,
    )
