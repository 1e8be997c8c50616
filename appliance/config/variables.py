"""Names of the APPLIANCE_* environment variables, and checks that pydantic-settings lacks.

pydantic-settings reads a name or value that is not UTF-8 as text with lone surrogates,
and it drops a variable that sets a list item or a key inside a section that another
variable sets to null. The checks here describe each such variable, so that the loader
rejects it instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from appliance.config.json_values import (
    JsonField,
    is_secret_path,
    is_single_value_field,
    json_field,
    list_field_depth,
    shorten,
)

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


def encoding_problems(
    variables: Mapping[str, str], top_level_keys: Collection[str]
) -> list[str]:
    """Describe each variable whose name, or value for a config field, is not UTF-8.

    A name that is not UTF-8 matches no field, and a value that is not UTF-8 is no text
    that a field accepts. Such a variable is rejected rather than ignored, because the
    prefix shows that it was meant for the appliance, and a start that drops it would
    run with a config other than the one intended. The value of a name whose last part
    is not UTF-8 is not shown, because that part could be the name of a secret field.
    A UTF-8 name whose first part is not in `top_level_keys` (lower case) sets no field,
    so its value is not checked, and the loader only warns about it.
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
        if path[0] not in top_level_keys:
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


def nesting_problems(model: type[BaseModel], variables: Mapping[str, str]) -> list[str]:
    """Describe each variable that pydantic-settings would drop beside another one.

    pydantic-settings 2.16 drops a variable that sets a list item, such as
    APPLIANCE_KNOWN_SERVERS__0__PORT, when the list's own variable is set, and rejects
    it as "not a valid list" under the list's name when not. When a variable sets a key
    inside a section or entry that another variable sets to JSON null, it also drops
    one of the two values. That holds for a variable whose whole value is null and for
    a null inside a variable's JSON object, as in APPLIANCE_UPSTREAMS='{"mail": null}'.
    A top-level field set to null is rejected on its own (see
    `top_level_null_problems`), so the variables of its keys are not named here.
    """
    by_upper_name = {name.upper(): name for name in variables}
    null_paths = _null_paths(model, variables)
    problems = []
    for name, value in sorted(variables.items()):
        path = field_path(name)
        depth = list_field_depth(model, path)
        if depth is not None:
            problem = _list_item_problem(model, name, value, path, depth, by_upper_name)
            problems.append(problem)
            continue
        for parent_depth in range(1, len(path)):
            null_variable = null_paths.get(tuple(path[:parent_depth]))
            if null_variable is not None:
                parent = path[:parent_depth]
                problems.append(
                    _key_under_null_problem(name, value, path, parent, null_variable)
                )
                break
    return problems


def _null_paths(
    model: type[BaseModel], variables: Mapping[str, str]
) -> dict[tuple[str, ...], str]:
    """Return each path below the top level that a variable sets to null, with its name.

    A null inside a variable's JSON object counts too, unless a longer variable sets
    that path or a section on the way to it, because the longer variable's value then
    replaces the null.
    """
    paths = {tuple(field_path(name)) for name in variables}
    null_paths: dict[tuple[str, ...], str] = {}
    for name, value in sorted(variables.items()):
        path = tuple(field_path(name))
        if json_field(model, path) is None:
            continue
        try:
            decoded = json.loads(value)
        except ValueError:
            # UniqueKeyEnvSource's JSON checks reject such a value.
            continue
        for inner in _json_null_keys(decoded):
            null_path = path + inner
            replaced = any(
                null_path[:depth] in paths
                for depth in range(len(path) + 1, len(null_path) + 1)
            )
            if len(null_path) > 1 and not replaced:
                null_paths.setdefault(null_path, name)
    return null_paths


def _json_null_keys(value: object) -> list[tuple[str, ...]]:
    """Return the key path of each null in nested JSON objects, in lower case.

    Lower case matches variable names, which ignore case. The empty path means that
    `value` itself is null. Lists are not searched, because list items have no
    variables of their own.
    """
    if value is None:
        return [()]
    if not isinstance(value, dict):
        return []
    return [
        (str(key).lower(), *inner)
        for key, item in value.items()
        for inner in _json_null_keys(item)
    ]


def _key_under_null_problem(
    name: str, value: str, path: list[str], parent: list[str], null_variable: str
) -> str:
    """Describe a variable for a key inside a section that another variable sets to null."""
    start = f"{_where(name, value, path)} sets a key inside {'.'.join(parent)}, but env"
    if len(parent) == len(field_path(null_variable)):
        return (
            f"{start} {null_variable} sets that to null, so the value would be ignored; "
            "unset one of the two"
        )
    return (
        f"{start} {null_variable} sets that to null inside its JSON value, so one of the "
        f"two would be ignored; unset {name}, or replace that null in {null_variable} "
        "with a JSON object"
    )


def top_level_null_problems(
    model: type[BaseModel], variables: Mapping[str, str]
) -> list[str]:
    """Describe each variable that sets a whole top-level list or section to JSON null.

    pydantic-settings 2.16 drops such a value, so the config file's values or the
    defaults would apply unchanged. Null is rejected rather than read as "use the
    defaults", because sources merge key by key, so no other source can replace a
    section of a lower source as a whole either.
    """
    problems = []
    for name, value in sorted(variables.items()):
        path = field_path(name)
        field = json_field(model, path)
        if len(path) != 1 or field is None or not _is_json_null(value):
            continue
        problems.append(
            f"{_where(name, value, path)} is invalid, because null cannot replace a whole "
            "top-level field and the variable would otherwise be ignored; unset "
            f"{name}, or {null_alternative(name, field, 'variables')}"
        )
    return problems


def single_value_null_problems(
    model: type[BaseModel], variables: Mapping[str, str]
) -> list[str]:
    """Describe each variable that sets a port, host name or other single value to null.

    pydantic-settings 2.16 passes such a value on as the text 'null', so a host name
    would become "null" and a port would fail with a parser message. Secret fields such
    as a password take any text, so their values are not checked.
    """
    problems = []
    for name, value in sorted(variables.items()):
        path = field_path(name)
        if value.strip().lower() != "null" or is_secret_path(path):
            continue
        if not is_single_value_field(model, path):
            continue
        problems.append(
            f"{'.'.join(path)}: value null (from env {name}) is invalid, because a "
            f"variable cannot set a single value to null; unset {name}, so that a "
            "secret file, the config file or the default sets it"
        )
    return problems


def null_alternative(
    name: str, field: JsonField, kind: Literal["variables", "secret files"]
) -> str:
    """Describe what to do instead of setting a whole top-level field to null.

    `name` is the variable or secret file that does so, and `kind` names what sets
    single keys.
    """
    if field.kind == "list":
        return "set it to [] for an empty list"
    model = field.item
    first_key = "KEY"
    if isinstance(model, type) and issubclass(model, BaseModel) and model.model_fields:
        first_key = next(iter(model.model_fields)).upper()
    if field.kind == "section":
        example = NESTING_DELIMITER.join([name.upper(), first_key])
        return f"change single keys with their own {kind}, such as {example}"
    example = NESTING_DELIMITER.join([name.upper(), "NAME", first_key])
    return f"change single entries with their own {kind}, such as {example}"


def _is_json_null(value: str) -> bool:
    try:
        return json.loads(value) is None
    except ValueError:
        return False


def _where(name: str, value: str, path: Sequence[str]) -> str:
    """Start a problem line with the field path, the value unless secret, and the name."""
    value_text = " the value" if is_secret_path(path) else f" value {_quote(value)}"
    return f"{'.'.join(path)}:{value_text} (from env {name})"


def _list_item_problem(
    model: type[BaseModel],
    name: str,
    value: str,
    path: list[str],
    depth: int,
    by_upper_name: Mapping[str, str],
) -> str:
    """Describe a variable that sets a value inside a list field."""
    list_path = path[:depth]
    list_variable = ENV_PREFIX + NESTING_DELIMITER.join(list_path).upper()
    set_list_variable = by_upper_name.get(list_variable)
    start = (
        f"{_where(name, value, path)} sets a value inside the list {'.'.join(list_path)}, "
        "but list items have no variables of their own"
    )
    if set_list_variable is not None:
        return (
            f"{start}, and {set_list_variable} sets the whole list, so the value would be "
            f"ignored; put it into the JSON list of {set_list_variable} and unset {name}"
        )
    field = json_field(model, list_path)
    examples = field.examples if field is not None else ()
    such_as = f", such as {json.dumps(examples[0])!r}" if examples else ""
    return f"{start}; set the whole list as JSON in {list_variable} instead{such_as}"


def null_overlap_problems(
    model: type[BaseModel],
    variables: Mapping[str, str],
    secret_values: Mapping[str, Any],
    secret_files: Mapping[tuple[str, ...], Path],
) -> list[str]:
    """Describe each variable or secret file for a key inside a null of the other source.

    Sources merge key by key, so a variable's null replaces a whole section that secret
    files fill, and a variable for a key turns a secret file's null into a section with
    only that key. Either way one of the two values would be lost without a message, so
    this is rejected as it is within one source (see `nesting_problems`). A variable
    that sets the section itself, as a JSON object, replaces a secret file's null and is
    accepted. `secret_values` contains what the secret files set, and `secret_files`
    names the file that set each path, by lower-case path. Variables with a name or
    value that is not UTF-8 must be left out, because `encoding_problems` names them.
    """
    problems = []
    file_paths = sorted(secret_files)
    for null_path, null_variable in sorted(_null_paths(model, variables).items()):
        for path in file_paths:
            if len(path) > len(null_path) and path[: len(null_path)] == null_path:
                problems.append(
                    _file_under_null_variable(
                        secret_files[path], path, null_path, null_variable
                    )
                )
    for null_path in _json_null_keys(dict(secret_values)):
        if len(null_path) < 2:
            # NestedSecretsSource rejects a whole top-level field set to null.
            continue
        null_file = secret_file_of(secret_files, null_path)
        if null_file is None or _variable_sets_object(model, variables, null_path):
            continue
        for name, value in sorted(variables.items()):
            path = tuple(field_path(name))
            if len(path) > len(null_path) and path[: len(null_path)] == null_path:
                problems.append(
                    _variable_under_null_file(name, value, path, null_path, null_file)
                )
    return problems


def secret_file_of(
    files: Mapping[tuple[str, ...], Path], path: Sequence[str]
) -> Path | None:
    """Return the secret file that set `path`, itself or inside its JSON value.

    `files` maps each lower-case path that a file set to that file.
    """
    lower_path = tuple(part.lower() for part in path)
    for depth in range(len(lower_path), 0, -1):
        found = files.get(lower_path[:depth])
        if found is not None:
            return found
    return None


def _variable_sets_object(
    model: type[BaseModel], variables: Mapping[str, str], path: tuple[str, ...]
) -> bool:
    """Return whether a variable for `path` or a section above it gives `path` an object.

    Such a variable replaces a lower source's null as a whole, and the variables of
    single keys then change its object.
    """
    for name, value in variables.items():
        own_path = tuple(field_path(name))
        if own_path != path[: len(own_path)] or json_field(model, own_path) is None:
            continue
        try:
            current = json.loads(value)
        except ValueError:
            continue
        for key in path[len(own_path) :]:
            if not isinstance(current, dict):
                break
            matches = [item for k, item in current.items() if str(k).lower() == key]
            current = matches[-1] if matches else None
        if isinstance(current, dict):
            return True
    return False


def _file_under_null_variable(
    file: Path, path: tuple[str, ...], parent: tuple[str, ...], null_variable: str
) -> str:
    """Describe a secret file for a key inside a section that a variable sets to null."""
    start = (
        f"{'.'.join(path)}: secret file {str(file)!r} sets a key inside "
        f"{'.'.join(parent)}, but env {null_variable} sets that to null"
    )
    if len(parent) == len(field_path(null_variable)):
        return (
            f"{start}, so the file would be ignored; remove {file.name} or unset "
            f"{null_variable}"
        )
    return (
        f"{start} inside its JSON value, so the file would be ignored; remove "
        f"{file.name}, or replace that null in {null_variable} with a JSON object"
    )


def _variable_under_null_file(
    name: str, value: str, path: tuple[str, ...], parent: tuple[str, ...], null_file: Path
) -> str:
    """Describe a variable for a key inside a section that a secret file sets to null."""
    start = (
        f"{_where(name, value, path)} sets a key inside {'.'.join(parent)}, but the "
        f"secret file {str(null_file)!r} sets that to null"
    )
    if len(parent) == len(field_path(null_file.name)):
        return (
            f"{start}, so the null would be ignored; unset {name} or remove "
            f"{null_file.name}"
        )
    return (
        f"{start} inside its JSON value, so the null would be ignored; unset {name}, "
        f"or replace that null in {null_file.name} with a JSON object"
    )
