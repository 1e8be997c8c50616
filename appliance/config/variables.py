"""Names of the APPLIANCE_* environment variables, and checks that pydantic-settings lacks.

pydantic-settings reads a name or value that is not UTF-8 as text with lone surrogates.
The checks here describe each such variable, so that the loader rejects it instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from appliance.config.json_values import is_secret_path, shorten

ENV_PREFIX = "APPLIANCE_"
NESTING_DELIMITER = "__"

# Variables with the prefix that the command line reads (where the config is, which
# event loop runs it); they are not config fields.
CONTROL_VARIABLES = frozenset(
    {"APPLIANCE_CONFIG", "APPLIANCE_SECRETS_DIR", "APPLIANCE_EVENT_LOOP"}
)


def config_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the non-empty APPLIANCE_* variables that set config fields, by name."""
    variables = {}
    for name, value in environ.items():
        upper = name.upper()
        if value and upper.startswith(ENV_PREFIX) and upper not in CONTROL_VARIABLES:
            variables[name] = value
    return variables


def field_path(variable: str) -> list[str]:
    """Return the config path that a variable name sets, in lower case."""
    return variable[len(ENV_PREFIX) :].lower().split(NESTING_DELIMITER)


def escape_non_utf8(text: str) -> str:
    """Return `text` with each byte that is not UTF-8 written as an escape, such as \\xff.

    os.environ stores such bytes as lone surrogates, which cannot be printed.
    """
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def first_invalid_byte(text: str) -> tuple[int, int] | None:
    """Return the value and offset of the first byte of `text` that is not UTF-8."""
    data = os.fsencode(text)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data[exc.start], exc.start
    return None


def is_utf8(text: str) -> bool:
    """Return whether `text`, taken from os.environ, was UTF-8 in the environment."""
    return first_invalid_byte(text) is None


def encoding_problems(variables: Mapping[str, str]) -> list[str]:
    """Describe each variable whose name or value is not UTF-8.

    A name that is not UTF-8 matches no field, and a value that is not UTF-8 is no text
    that a field accepts. Such a variable is rejected rather than ignored, because the
    prefix shows that it was meant for the appliance, and a start that drops it would
    run with a config other than the one intended. The value of a name whose last part
    is not UTF-8 is not shown, because that part could be the name of a secret field.
    """
    problems = []
    for name, value in sorted(variables.items()):
        path = field_path(name)
        invalid_name = first_invalid_byte(name)
        if invalid_name is not None:
            byte, offset = invalid_name
            hidden = is_secret_path(path) or first_invalid_byte(path[-1]) is not None
            lost_value = "" if hidden else f", and its value {_quote(value)} would be lost"
            problems.append(
                f"environment variable {escape_non_utf8(name)}: the name is not UTF-8 "
                f"(byte 0x{byte:02x} at offset {offset}), so it matches no config "
                f"field{lost_value}; unset it, and set the variable again with a UTF-8 name, "
                "as docs/configuration.md lists them"
            )
            continue
        invalid_value = first_invalid_byte(value)
        if invalid_value is not None:
            byte, offset = invalid_value
            problems.append(
                f"{_where(name, value, path)} is not UTF-8 text (byte 0x{byte:02x} at "
                f"offset {offset}); set the variable again as UTF-8 text"
            )
    return problems


def _quote(value: str) -> str:
    """Quote a value for a message, with bytes that are not UTF-8 escaped."""
    if first_invalid_byte(value) is None:
        return repr(shorten(value))
    # repr would double the backslash of each escape.
    return f"'{shorten(escape_non_utf8(value))}'"


def _where(name: str, value: str, path: Sequence[str]) -> str:
    """Start a problem line with the field path, the value unless secret, and the name."""
    value_text = " the value" if is_secret_path(path) else f" value {_quote(value)}"
    return f"{'.'.join(path)}:{value_text} (from env {name})"
