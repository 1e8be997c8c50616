"""Load the config from all sources, and explain where each value came from.

`load_config` either returns a validated `LoadedConfig` or raises `ConfigError` holding one
line per problem; each line names the field path, the rejected value when it is safe to show,
the source that set it, and what was expected.
"""

from __future__ import annotations

import ast
import codecs
import io
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from appliance.config.json_values import is_secret_path, json_field
from appliance.config.settings import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SECRETS_DIR,
    AppConfig,
    ConfigSourceError,
    NestedSecretsSource,
    _config_document,
    _secrets_dir,
    make_env_source,
    top_level_keys,
)
from appliance.config.toml_keys import describe_toml_error
from appliance.config.variables import (
    CONTROL_VARIABLES,
    ENV_PREFIX,
    NESTING_DELIMITER,
    config_variables,
    field_path,
    first_invalid_byte,
    null_overlap_problems,
    secret_file_of,
)
from appliance.files import (
    MAX_CONFIG_FILE_SIZE,
    FileTooLargeError,
    NotRegularFileError,
    read_regular,
)


class ConfigError(Exception):
    """The config could not be loaded; `problems` has one readable line per cause."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class _Layer:
    """Raw values of one config source, searched to label where each value came from."""

    label: str
    values: dict[str, Any]
    files: dict[tuple[str, ...], Path] = field(default_factory=dict)
    """Secret file that set each path, by lower-case path; empty for other sources."""


@dataclass(frozen=True)
class LoadedConfig:
    config: AppConfig
    path: Path | None
    """Config file that was read, or None when no file was used."""
    sources: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Source label of every value that some source set, by field path."""
    warnings: list[str] = field(default_factory=list)


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Return the config path and whether the operator named it (so it must exist)."""
    if explicit:
        return Path(explicit), True
    from_env = os.environ.get("APPLIANCE_CONFIG", "")
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    *,
    secrets_dir: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require_listeners: bool = True,
) -> LoadedConfig:
    """Load and validate the config from init `overrides`, env, secrets and file.

    A config without listeners is rejected unless `require_listeners` is false, because
    the appliance would accept nothing. Commands that read only other fields, such as
    `known-servers` reading `state_dir`, turn it off.
    """
    path, required = resolve_config_path(config_path)
    secrets = Path(secrets_dir or os.environ.get("APPLIANCE_SECRETS_DIR") or DEFAULT_SECRETS_DIR)
    if not path.exists():
        if required:
            raise ConfigError(
                [f"config file {str(path)!r} does not exist; check --config or APPLIANCE_CONFIG"]
            )
        path = None

    clashes = variable_case_clashes()
    if clashes:
        raise ConfigError(clashes)
    layers, document = _read_layers(path, secrets, dict(overrides or {}))
    document_token = _config_document.set(document)
    secrets_token = _secrets_dir.set(secrets)
    try:
        config = AppConfig(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, layers)) from None
    except (OSError, ValueError) as exc:
        # The file is parsed already, so only the environment and secrets remain.
        raise ConfigError(
            [
                f"environment or secrets could not be read: {exc}; check the "
                "APPLIANCE_* variables and the files in the secrets folder"
            ]
        ) from None
    finally:
        _config_document.reset(document_token)
        _secrets_dir.reset(secrets_token)

    if require_listeners and not config.listeners:
        raise ConfigError([_no_listeners(path, document)])
    sources = _collect_sources(config.model_dump(by_alias=True), layers)
    warnings = (
        unknown_variable_warnings()
        + unknown_secret_warnings(secrets)
        + exposure_warnings(config)
    )
    named_secrets = secrets_dir or os.environ.get("APPLIANCE_SECRETS_DIR")
    if named_secrets and not secrets.is_dir():
        state = "is not a folder" if secrets.exists() else "does not exist"
        warnings.append(
            f"secrets folder {str(secrets)!r} {state} and is ignored; name the folder "
            "that contains the secret files with --secrets-dir or APPLIANCE_SECRETS_DIR"
        )
    return LoadedConfig(config, path, sources, warnings)


def _no_listeners(path: Path | None, document: dict[str, Any] | None) -> str:
    """Describe a config without listeners, which would accept no connections.

    A half-written file during a reload is the usual cause, so the message distinguishes
    an empty file from a file that only lacks listeners.
    """
    if path is None:
        where = "no config file was found and no APPLIANCE_LISTENERS variable is set"
    elif not document:
        where = f"config file {str(path)!r} is empty"
    else:
        where = f"config file {str(path)!r} names no listener"
    return (
        f"listeners: no listener is configured ({where}), so the appliance would accept "
        "no connections; add at least one entry under listeners:, such as "
        "'imap: {protocol: imap, port: 1143, upstream: mail}'"
    )


def _read_layers(
    path: Path | None, secrets: Path, overrides: dict[str, Any]
) -> tuple[list[_Layer], dict[str, Any] | None]:
    """Return each source's raw values, highest precedence first, with a label.

    The second value is the parsed config file, or None without one.
    """
    layers = [_Layer("init", overrides)]
    try:
        layers.append(_Layer("env", make_env_source()()))
    except ConfigSourceError as exc:
        raise ConfigError(exc.problems) from None
    except ValueError as exc:
        # pydantic-settings' own errors, for values that UniqueKeyEnvSource's JSON
        # checks let through.
        raise ConfigError(
            [
                f"environment variables could not be read: {_short(exc)}; check the "
                "APPLIANCE_* variables against docs/configuration.md"
            ]
        ) from None
    secrets_source = NestedSecretsSource(AppConfig, secrets)
    try:
        secret_values = secrets_source()
    except ConfigSourceError as exc:
        raise ConfigError(exc.problems) from None
    layers.append(_Layer(f"secret {secrets}", secret_values, secrets_source.files))
    # The env source rejected names and values that are not UTF-8 already.
    variables = config_variables(os.environ)
    overlaps = null_overlap_problems(
        AppConfig, variables, secret_values, secrets_source.files
    )
    if overlaps:
        raise ConfigError(overlaps)
    if path is None:
        return layers, None
    document = _read_config_file(path)
    layers.append(_Layer(f"file {path}", document))
    return layers, document


# Deepest nesting of mappings and lists accepted in a config file; real configs nest
# about five levels. The limit exists because libyaml builds nodes recursively in C, so
# a file nested some 25,000 levels deep would crash the process.
MAX_NESTING = 64
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(_YAML_LOADER):  # type: ignore[misc,valid-type]
    """A safe YAML loader that rejects a key given twice in one mapping.

    PyYAML keeps the last of duplicate keys, so a listener written twice would silently
    lose its first definition. libyaml's parser, where PyYAML has it, parsed the
    benchmark's config about seven times faster than the pure-Python one here, which
    matters on every reload.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _YAML_MERGE_TAG:
                # `<<: *anchor` merges another mapping; its keys may be overridden here.
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} on line {line} repeats the key on line {seen[key]}; "
                    "merge the two entries or rename one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_config_file(path: Path) -> dict[str, Any]:
    """Parse the config file once; reject a non-mapping top level or a repeated key.

    An empty YAML file gives an empty mapping, so every field keeps its default.
    """
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(
            [
                f"config file {str(path)!r} has an unknown extension; expected .yaml, "
                ".yml, .toml or .json"
            ]
        )
    try:
        # One non-blocking read: a FIFO or device at the path must not hang a reload.
        data = read_regular(path, MAX_CONFIG_FILE_SIZE)
        _check_utf8_signature(path, data)
        if suffix == ".toml":
            # TOML documents are always tables, and TOML rejects repeated keys.
            text = _decode_utf8(data)
            try:
                return tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                reason = describe_toml_error(text, exc)
                problem = f"config file {str(path)!r} could not be parsed: {reason}"
                raise ConfigError([problem]) from None
        if suffix == ".json":
            document = json.loads(_decode_utf8(data), object_pairs_hook=_unique_key_object)
        else:
            # PyYAML skips a leading byte order mark itself.
            _check_yaml_nesting(path, data)
            document = yaml.load(_named_text(path, data), Loader=_UniqueKeyLoader)  # noqa: S506
    except OSError as exc:
        raise ConfigError([_unreadable_config(path, exc)]) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            [f"config file {str(path)!r} could not be parsed: {_short(exc)}"]
        ) from None
    except RecursionError:
        raise ConfigError(
            [
                f"config file {str(path)!r} nests mappings or lists too deeply to parse; "
                "expected the shallow layout of docs/configuration.md"
            ]
        ) from None
    if suffix != ".json" and document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(
            [
                f"config file {str(path)!r} must contain a mapping at the top level "
                f"(keys such as listeners: and upstreams:), not a {type(document).__name__}"
            ]
        )
    return document


def _decode_utf8(data: bytes) -> str:
    """Return a config file's UTF-8 text without a leading byte order mark.

    Windows PowerShell 5.1 and older Notepad versions start UTF-8 files with one, which
    tomllib rejects as an invalid statement and json rejects too, while PyYAML skips it.
    """
    return data.decode("utf-8").removeprefix("\ufeff")


def _named_text(path: Path, data: bytes) -> io.StringIO:
    """Return the file's text as a stream named like the file, for YAML error marks."""
    stream = io.StringIO(data.decode("utf-8"))
    stream.name = str(path)  # type: ignore[misc]
    return stream


def _check_utf8_signature(path: Path, data: bytes) -> None:
    """Reject a config file that starts with a UTF-16 or UTF-32 byte order mark.

    Windows PowerShell 5.1 writes UTF-16 with `>` and `Out-File`, which the UTF-8 decoder
    would report only as an invalid byte 0xff at position 0.
    """
    start = data[:4]
    if start.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding = "UTF-32"
    elif start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "UTF-16"
    else:
        return
    problem = (
        f"config file {str(path)!r} is {encoding} text (it starts with a {encoding} "
        "byte order mark); save it as UTF-8, such as with 'Set-Content -Encoding UTF8' "
        "in PowerShell"
    )
    raise ConfigError([problem])


def _unique_key_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, rejecting a key given twice, as the YAML loader does.

    The json module keeps the last of duplicate keys, and its hook gets no line numbers.
    """
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(
                f"key {key!r} repeats an earlier key in the same object; merge the two "
                "entries or rename one"
            )
        document[key] = value
    return document


def _check_yaml_nesting(path: Path, data: bytes) -> None:
    """Reject a YAML file nested deeper than MAX_NESTING, before building its nodes.

    The event stream is flat, so reading it needs no recursion at any depth.
    """
    depth = 0
    with _named_text(path, data) as stream:
        for event in yaml.parse(stream, Loader=_YAML_LOADER):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    raise ConfigError([_too_deep(path, event.start_mark.line + 1)])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1


def _too_deep(path: Path, line: int) -> str:
    return (
        f"config file {str(path)!r} nests mappings or lists more than {MAX_NESTING} "
        f"levels deep on line {line}; expected the shallow layout of docs/configuration.md"
    )


def _unreadable_config(path: Path, exc: OSError) -> str:
    """Describe a config file that exists but cannot be read, with the fix."""
    reason = (exc.strerror or _short(exc)).lower()
    if isinstance(exc, PermissionError):
        fix = (
            f"give the user that runs the appliance (uid {os.getuid()}) read access to "
            "it, such as with chmod o+r, or a group it belongs to"
        )
    elif isinstance(exc, IsADirectoryError):
        fix = "set --config or APPLIANCE_CONFIG to the file inside it"
    elif isinstance(exc, FileTooLargeError):
        reason = f"{exc.size} bytes, more than the limit of {exc.limit} bytes"
        fix = "check that --config or APPLIANCE_CONFIG names the config file"
    elif isinstance(exc, NotRegularFileError):
        reason = f"not a regular file but {exc.kind}"
        fix = "set --config or APPLIANCE_CONFIG to a regular file"
    else:
        fix = "check the file and the disk or mount it is on"
    return f"config file {str(path)!r} could not be read ({reason}); {fix}"


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _lookup(values: Any, path: tuple[str, ...]) -> int | None:
    """Return how many parts of `path` a source's raw values matched, or None if absent.

    A JSON string on the way (an env variable holding a whole section) covers the rest of
    the path, so the match is shorter than the path.
    """
    current = values
    for depth, key in enumerate(path):
        if isinstance(current, str) and depth > 0:
            return depth
        if isinstance(current, list):
            if not key.isdigit() or int(key) >= len(current):
                return None
            current = current[int(key)]
            continue
        if not isinstance(current, dict):
            return None
        if key in current:
            # An exact key is the usual case and needs no scan of the mapping.
            current = current[key]
            continue
        matches = [k for k in current if str(k).lower() == key.lower()]
        if not matches:
            return None
        current = current[matches[0]]
    return len(path)


# Maximum number of variables or secret files that a source label names. A label for a
# section that more of them set ends with a count of the others.
MAX_LABEL_NAMES = 3


def _label(layer: _Layer, path: tuple[str, ...]) -> str:
    """Name the variables or secret files of `layer` that set `path` or keys inside it.

    A variable or file may set the field itself or a section that contains it as JSON.
    When neither exists, as for an error about a whole listener, the ones that set keys
    inside `path` are named.
    """
    lower_path = tuple(part.lower() for part in path)
    if layer.files:
        secret_file = secret_file_of(layer.files, path)
        if secret_file is not None:
            return f"secret file {str(secret_file)!r}"
        inside = [
            repr(str(secret_file))
            for file_path, secret_file in sorted(layer.files.items())
            if file_path[: len(path)] == lower_path
        ]
        return f"secret file {_join_names(inside)}" if inside else layer.label
    if layer.label != "env":
        return layer.label
    for depth in range(len(path), 0, -1):
        variable = ENV_PREFIX + NESTING_DELIMITER.join(path[:depth]).upper()
        if os.environ.get(variable):
            return f"env {variable}"
    inside = [
        name
        for name in sorted(config_variables(os.environ))
        if tuple(field_path(name)[: len(path)]) == lower_path
    ]
    return f"env {_join_names(inside)}" if inside else "env"


def _join_names(names: list[str]) -> str:
    """Join names for a source label, with at most MAX_LABEL_NAMES written out."""
    if len(names) > MAX_LABEL_NAMES:
        others = len(names) - MAX_LABEL_NAMES
        return f"{', '.join(names[:MAX_LABEL_NAMES])} and {others} more"
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def _source_of(path: tuple[str, ...], layers: list[_Layer]) -> str | None:
    for layer in layers:
        depth = _lookup(layer.values, path)
        if depth is not None:
            return _label(layer, path[:depth])
    return None


def _collect_sources(
    dumped: dict[str, Any], layers: list[_Layer]
) -> dict[tuple[str, ...], str]:
    sources: dict[tuple[str, ...], str] = {}

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, (*path, str(key)))
            return
        if isinstance(value, list) and value:
            for index, item in enumerate(value):
                walk(item, (*path, str(index)))
            return
        label = _source_of(path, layers)
        if label is not None:
            sources[path] = label

    walk(dumped, ())
    return sources


def _describe_errors(exc: ValidationError, layers: list[_Layer]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        path = tuple(str(part) for part in error["loc"])
        problems.append(_describe_error(error, path, layers))
    return problems


def _describe_error(
    error: Any, path: tuple[str, ...], layers: list[_Layer]
) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(path) if path else "config"
    if error["type"] == "missing":
        variable = ENV_PREFIX + NESTING_DELIMITER.join(path).upper()
        hint = f"; set it in the config file or as {variable}"
        if os.environ.get(variable) == "":
            hint = f"; {variable} is set but empty, and an empty variable counts as unset"
        return f"{where}: required value is missing{hint}"
    if error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        source = _source_of(path, layers)
        origin = f" (from {source})" if source else ""
        value = _value_text(error.get("input"))
        from_secret = source is not None and source.startswith("secret ")
        # A secret file's value stays out of the output, except null, which no field
        # takes as a secret.
        hidden = from_secret and error.get("input") is not None
        shown = "" if is_secret_path(path) or hidden else f" value {value}:"
        if source is not None and source.startswith(("env ", "secret file ")):
            return (
                f"{where}:{shown} expected a JSON object of keys to values here"
                f"{origin}; {_object_fix(path, source)}"
            )
        return (
            f"{where}:{shown} expected a mapping of keys to values here, such as "
            f"'key: value' lines in YAML{origin}; see the config reference"
        )
    if error["type"] == "extra_forbidden":
        source = _source_of(path, layers)
        origin = f" (from {source})" if source else ""
        return f"{where}: unknown key{origin}; check the spelling against the config reference"
    # Checks across sections report at the top level and name the field in the message.
    named = path or _field_named_in(message)
    source = _source_of(named, layers) if named else None
    origin = f" (from {source})" if source else ""
    from_secret = source is not None and source.startswith("secret ")
    if from_secret and "input" in error:
        # A secret file's value stays out of the output, as in the effective config.
        message = _hide_value(message, error["input"])
    shown = ""
    # Our own value errors already quote the value; pydantic's built-in ones do not.
    if (
        path
        and error["type"] != "value_error"
        and "input" in error
        and not is_secret_path(path)
        and not from_secret
        and not isinstance(error["input"], dict)
    ):
        shown = f" value {_value_text(error['input'])}:"
    return f"{where}:{shown} {message}{origin}{_boolean_hint(error, path)}"


def _object_fix(path: tuple[str, ...], source: str) -> str:
    """Describe how a variable or secret file gives the section at `path` an object.

    `source` is the label of the variable or file that set the wrong value, either as
    its whole value or inside its JSON object.
    """
    if source.startswith("env "):
        kind, name = "variable", source.removeprefix("env ")
    else:
        kind = "secret file"
        try:
            name = Path(ast.literal_eval(source.removeprefix("secret file "))).name
        except (ValueError, SyntaxError):
            # A label that names several files; the value is set by one file only.
            return "see the config reference"
    key_name = ENV_PREFIX + NESTING_DELIMITER.join(path).upper()
    field = json_field(AppConfig, path)
    if field is not None and field.kind == "section" and field.item.model_fields:
        key_name += NESTING_DELIMITER + next(iter(field.item.model_fields)).upper()
    else:
        key_name += NESTING_DELIMITER + "KEY"
    if field_path(name) != [part.lower() for part in path]:
        return f"replace that value in the JSON of {name} with a JSON object"
    if kind == "variable":
        return (
            f"set {name} to a JSON object, or unset it and set each key with its own "
            f"variable, such as {key_name}"
        )
    return (
        f"put a JSON object into {name}, or remove it and set each key with its own "
        f"secret file, such as {key_name}"
    )


def _value_text(value: Any) -> str:
    """Return a rejected value as messages show it, with None written as null.

    A null in a YAML or JSON config file, or in the JSON of a variable or secret file,
    arrives as None, and the operator wrote null (or nothing, in YAML).
    """
    return "null" if value is None else repr(value)


def _hide_value(message: str, value: Any) -> str:
    """Return `message` with every spelling of `value` replaced by a placeholder."""
    text = str(value)
    if not text:
        return message
    for spelling in (repr(value), repr(text), text):
        message = message.replace(spelling, "(value hidden)")
    return message


# Text that YAML 1.1, which PyYAML follows, reads as a boolean when it is not quoted.
_YAML_BOOLEAN_WORDS = "yes, no, on, off, true and false"


def _boolean_hint(error: Any, path: tuple[str, ...]) -> str:
    """Explain a boolean in a text or choice field, which unquoted YAML words cause.

    `tls: no` arrives as False, so pydantic's message would list the allowed values
    without saying why the value is a boolean.
    """
    if not path or not isinstance(error.get("input"), bool):
        return ""
    key = path[-1]
    if error["type"] == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", ""))
        # `no`, `off` and `false` most likely mean the choice that turns a thing off.
        turned_off = error["input"] is False and "'none'" in expected
        example = f", such as {key}: none" if turned_off else ""
        return (
            f"; YAML reads unquoted {_YAML_BOOLEAN_WORDS} as booleans, so quote the "
            f"value or spell it as one of the allowed values{example}"
        )
    if error["type"] == "string_type":
        return (
            f"; YAML reads unquoted {_YAML_BOOLEAN_WORDS} as booleans, so put the "
            f"value of {key} in quotes"
        )
    return ""


_FIELD_IN_MESSAGE = re.compile(r"^((?:listeners|upstreams)\.[\w-]+\.\w+)\b")


def _field_named_in(message: str) -> tuple[str, ...]:
    """Return the field path that a top-level validation message starts with, if any."""
    match = _FIELD_IN_MESSAGE.match(message)
    return tuple(match.group(1).split(".")) if match else ()


def variable_case_clashes(environ: Mapping[str, str] | None = None) -> list[str]:
    """Name the APPLIANCE_ variables that differ only in letter case.

    The settings read variable names ignoring case, so of two such variables one would
    win silently, by its place in the environment.
    """
    environ = os.environ if environ is None else environ
    seen: dict[str, str] = {}
    problems = []
    for variable in sorted(environ):
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        other = seen.setdefault(variable.upper(), variable)
        if other != variable:
            problems.append(
                f"environment variables {other} and {variable} differ only in letter "
                "case, so it is undefined which one applies; unset one of them"
            )
    return problems


def unknown_variable_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Name the APPLIANCE_ variables whose top-level key matches no config field."""
    environ = os.environ if environ is None else environ
    fields = {name.lower() for name in AppConfig.model_fields}
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in CONTROL_VARIABLES:
            continue
        top = upper[len(ENV_PREFIX) :].split(NESTING_DELIMITER)[0].lower()
        if top not in fields:
            warnings.append(
                f"environment variable {variable} matches no config field and is ignored; "
                f"top-level keys are: {', '.join(sorted(fields))}"
            )
    return warnings


def unknown_secret_warnings(folder: Path) -> list[str]:
    """Name the APPLIANCE_ files of the secrets folder whose top-level key matches no field.

    They are ignored, as such variables are, because an orchestrator may mount secrets
    for other programs into the same folder.
    """
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        # Only a race gets here, because the load rejects a folder that cannot be listed.
        return []
    fields = top_level_keys(AppConfig)
    warnings = []
    for entry in entries:
        if not entry.name.upper().startswith(ENV_PREFIX):
            continue
        if first_invalid_byte(entry.name) is not None:
            # NestedSecretsSource rejects such a name, so the load never gets here.
            continue
        if field_path(entry.name)[0] not in fields:
            warnings.append(
                f"secret file {str(entry)!r} matches no config field and is ignored; "
                f"top-level keys are: {', '.join(sorted(fields))}"
            )
    return warnings


def exposure_warnings(config: AppConfig) -> list[str]:
    """Name the settings that send logins where an attacker in the path could read them.

    `tls: none`, `verify: false`, `allow_plaintext: true` and a pinned mode `none` are
    valid choices for a trusted network, so they are warnings, not errors. Hosts on a
    loopback address or named `localhost` are not named. A template upstream of a
    `route_by_login` host rule is named whatever its own host, because its settings go
    to every server that the rule's pattern matches.
    """
    templates = {
        route.upstream
        for listener in config.listeners.values()
        if listener.route_by_login is not None
        for route in listener.route_by_login.allow
        if route.host is not None
    }
    warnings = []
    for name, upstream in config.upstreams.items():
        if name in templates:
            where = "the servers that route_by_login host rules reach through it"
        elif _is_loopback_host(upstream.host):
            continue
        else:
            where = upstream.host
        if upstream.tls == "none":
            warnings.append(
                f"upstreams.{name}: tls: none sends every login to {where} in plain "
                "text; use implicit, starttls or auto unless the network to it is trusted"
            )
        elif not upstream.verify:
            warnings.append(
                f"upstreams.{name}: verify: false accepts any certificate from {where}, "
                "so an attacker in the path can read every login; set ca_file to trust a "
                "private CA instead"
            )
        elif upstream.tls == "auto" and upstream.allow_plaintext:
            warnings.append(
                f"upstreams.{name}: allow_plaintext: true sends logins to {where} in "
                "plain text when it offers no TLS; remove it unless the network to it "
                "is trusted"
            )
    for index, entry in enumerate(config.known_servers):
        if entry.mode == "none" and not _is_loopback_host(entry.host):
            warnings.append(
                f"known_servers[{index}]: mode none sends logins to {entry.host} in plain "
                "text under tls: auto, also without allow_plaintext; use starttls or "
                "implicit unless the network to it is trusted"
            )
    return warnings


def _is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
