"""The top-level config and the order of its sources.

Precedence, highest first: init arguments, environment variables (`APPLIANCE_` prefix, `__`
between nesting levels), the secrets folder (one file per value, named like the variable),
the config file (YAML, TOML or JSON), then the models' defaults.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import stat
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from appliance.config.json_values import (
    JsonOrigin,
    decode_json_value,
    is_secret_path,
    is_single_value_field,
    json_field,
    list_field_depth,
)
from appliance.config.models import (
    AdminConfig,
    KnownServer,
    Limits,
    ListenerConfig,
    LoggingConfig,
    TlsAutoConfig,
    UpstreamConfig,
)
from appliance.config.variables import (
    ENV_PREFIX,
    NESTING_DELIMITER,
    config_variables,
    encoding_problems,
    escape_non_utf8,
    field_path,
    first_invalid_byte,
    is_utf8,
    nesting_problems,
    null_alternative,
    secret_file_of,
    single_value_null_problems,
    top_level_null_problems,
)
from appliance.files import MAX_SECRET_FILE_SIZE, read_regular, special_file_kind

DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.yaml")
DEFAULT_SECRETS_DIR = Path("/run/secrets")

# The parsed config file and the secrets folder of the load in progress;
# settings_customise_sources reads them, so the file is parsed once per load.
_config_document: ContextVar[dict[str, Any] | None] = ContextVar(
    "config_document", default=None
)
_secrets_dir: ContextVar[Path | None] = ContextVar("secrets_dir", default=None)


class AppConfig(BaseSettings):
    """Config of the whole appliance."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTING_DELIMITER,
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    listeners: dict[str, ListenerConfig] = Field(default_factory=dict)
    """Local listeners by name; the name appears in logs and env variable names. At
    least one is required. Names that differ only in letter case are rejected, because
    env variables match names ignoring case."""

    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    """Mail servers by name; listeners and routing rules refer to them by this name,
    ignoring letter case. Names that differ only in letter case are rejected, as for
    listeners."""

    known_servers: list[KnownServer] = Field(
        default_factory=list,
        examples=[[{"host": "mail.example.org", "protocol": "imap", "mode": "implicit"}]],
    )
    """TLS modes fixed by the operator; they win over modes learned by probing. Two
    entries that fix different modes for one host, protocol and port are rejected."""

    tls_auto: TlsAutoConfig = Field(default_factory=TlsAutoConfig)
    """Probe timeout, re-probe age and persistence of the modes learned for `tls: auto`."""

    limits: Limits = Field(default_factory=Limits)
    """Timeouts and size limits."""

    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Log level and format."""

    admin: AdminConfig = Field(default_factory=AdminConfig)
    """Optional HTTP listener for health checks and Prometheus metrics."""

    state_dir: Path = Path("/var/lib/appliance")
    """Folder for state that outlives a restart, such as the learned known-servers list.
    A relative path is resolved against the working folder of the process."""

    @field_validator("listeners", "upstreams")
    @classmethod
    def _validate_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, str] = {}
        for name in value:
            if not name or not name.replace("-", "_").replace("_", "a").isalnum():
                raise ValueError(
                    f"name {name!r} is invalid; expected letters, digits, '-' and '_' only"
                )
            if NESTING_DELIMITER in name:
                raise ValueError(
                    f"name {name!r} is invalid: '{NESTING_DELIMITER}' separates the levels "
                    "of APPLIANCE_* variables, so no variable could reach it; use one '_'"
                )
            # Variables and secret files match names ignoring case, so they could not
            # select one of two names that differ only in case.
            other = seen.setdefault(name.lower(), name)
            if other != name:
                raise ValueError(
                    f"names {other!r} and {name!r} differ only in letter case; "
                    "rename one, because APPLIANCE_* variables match names ignoring case"
                )
        return value

    @field_validator("known_servers")
    @classmethod
    def _validate_known_servers(cls, value: list[KnownServer]) -> list[KnownServer]:
        for index, entry in enumerate(value):
            for other_index, other in enumerate(value[:index]):
                if _pins_conflict(other, entry):
                    raise ValueError(
                        f"entries {other_index} and {index} both fix the TLS mode of "
                        f"{entry.host}, as {other.mode} and {entry.mode}, for the same "
                        "protocol and port; keep one of them"
                    )
        return value

    @model_validator(mode="after")
    def _validate_references(self) -> AppConfig:
        upstream_names = {name.lower(): name for name in self.upstreams}
        for name, listener in self.listeners.items():
            listener = _spell_upstream_references(listener, upstream_names)
            # The dict is this model's own copy, so replacing an entry changes no input.
            self.listeners[name] = listener
            _check_listener_upstreams(name, listener, self.upstreams)
        _check_address_conflicts(self.listeners)
        _check_admin_address(self.admin, self.listeners)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        document = _config_document.get()
        # Built here and not taken from `env_settings`, so that JSON values are checked.
        unique_env = UniqueKeyEnvSource(settings_cls)
        env_source = FileNameCaseSource(settings_cls, unique_env, document)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_source]
        secrets_dir = _secrets_dir.get()
        if secrets_dir is not None:
            secrets_source = NestedSecretsSource(settings_cls, secrets_dir)
            sources.append(FileNameCaseSource(settings_cls, secrets_source, document))
        if document is not None:
            # pydantic-settings' own YAML, TOML and JSON sources are this class too.
            sources.append(InitSettingsSource(settings_cls, init_kwargs=document))
        return tuple(sources)


def _choices(names: dict[str, Any]) -> str:
    return ", ".join(sorted(names)) or "none configured"


def _spell_upstream_references(
    listener: ListenerConfig, upstream_names: dict[str, str]
) -> ListenerConfig:
    """Spell each upstream reference of a listener as the upstream's key, in a copy.

    References match names ignoring case, as APPLIANCE_* variables do, so `upstream: Mail`
    reaches the upstream `mail`, and sessions, logs and metrics see one spelling. A
    reference to no upstream stays as written, for the error message.
    """

    def spell(reference: str) -> str:
        return upstream_names.get(reference.lower(), reference)

    changes: dict[str, Any] = {}
    if listener.upstream is not None and spell(listener.upstream) != listener.upstream:
        changes["upstream"] = spell(listener.upstream)
    routes = listener.route_by_login
    if routes is not None and any(spell(r.upstream) != r.upstream for r in routes.allow):
        allow = [
            route.model_copy(update={"upstream": spell(route.upstream)})
            for route in routes.allow
        ]
        changes["route_by_login"] = routes.model_copy(update={"allow": allow})
    return listener.model_copy(update=changes) if changes else listener


def _check_listener_upstreams(
    name: str, listener: ListenerConfig, upstreams: dict[str, UpstreamConfig]
) -> None:
    """Check that a listener has one upstream, or routes by login to known upstreams."""
    where = f"listeners.{name}"
    routes = listener.route_by_login
    if listener.upstream is None and routes is None:
        raise ValueError(
            f"{where}.upstream is missing; expected the name of an upstream "
            f"({_choices(upstreams)}) or a route_by_login section"
        )
    if listener.upstream is not None and routes is not None:
        raise ValueError(
            f"{where} sets both upstream and route_by_login; expected only one of them"
        )
    if routes is None:
        references = [(f"{where}.upstream", listener.upstream, None)]
    else:
        references = [
            (f"{where}.route_by_login.allow[{index}].upstream", route.upstream, route)
            for index, route in enumerate(routes.allow)
        ]
    for field, upstream_name, route in references:
        upstream = upstreams.get(upstream_name or "")
        if upstream is None:
            raise ValueError(
                f"{field} is {upstream_name!r}, which is not a configured upstream; "
                f"expected one of: {_choices(upstreams)}"
            )
        if route is not None and route.host is not None and upstream.server_name:
            raise ValueError(
                f"{field} names {upstream_name!r} as the template for host "
                f"{route.host!r}, but that upstream sets server_name; a routed server "
                "is checked against its own name, so remove server_name or use "
                "another upstream"
            )
        if listener.protocol == "pop3" and upstream.send_client_address == "imap_id":
            raise ValueError(
                f"{field} is {upstream_name!r}, whose send_client_address is "
                f"'imap_id', but {where} speaks POP3, which has no ID command; use "
                "'proxy_v2' or 'none', or a separate upstream entry for POP3"
            )


def _check_address_conflicts(listeners: dict[str, ListenerConfig]) -> None:
    seen: dict[int, list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]]] = {}
    for name, listener in listeners.items():
        address = ipaddress.ip_address(listener.bind)
        for other_name, other in seen.get(listener.port, []):
            overlap = address == other or address.is_unspecified or other.is_unspecified
            if overlap and address.version == other.version:
                raise ValueError(
                    f"listeners.{name} (bind {address}) and listeners.{other_name} "
                    f"(bind {other}) both use port {listener.port}; expected a different "
                    "port or address for one of them"
                )
        seen.setdefault(listener.port, []).append((name, address))


def _pins_conflict(first: KnownServer, second: KnownServer) -> bool:
    """Return whether two `known_servers` entries fix different modes for one server.

    They do when they name the same host and protocol (unset means both) and the same
    port, or when either has no port. `pinned_mode` takes the first entry that matches,
    and an entry without a port matches the upstreams on standard ports.
    """
    if first.host != second.host or first.mode == second.mode:
        return False
    protocols = (first.protocol, second.protocol)
    if None not in protocols and first.protocol != second.protocol:
        return False
    return first.port is None or second.port is None or first.port == second.port


def _check_admin_address(
    admin: AdminConfig, listeners: dict[str, ListenerConfig]
) -> None:
    if not admin.enabled:
        return
    address = ipaddress.ip_address(admin.bind)
    for name, listener in listeners.items():
        other = ipaddress.ip_address(listener.bind)
        overlap = address == other or address.is_unspecified or other.is_unspecified
        if listener.port == admin.port and overlap and address.version == other.version:
            raise ValueError(
                f"admin (bind {address}) and listeners.{name} (bind {other}) both use "
                f"port {admin.port}; expected a different admin.port"
            )


class NestedSecretsSource(PydanticBaseSettingsSource):
    """Values from files in a secrets folder, one value per file.

    A file is named like the environment variable that it stands for
    (`APPLIANCE_UPSTREAMS__MAIL__HOST`, any case), as Docker and Kubernetes mount secrets.
    Files without the prefix are ignored, because the folder is shared with other programs,
    and so are files whose first part matches no top-level key, as variables are.
    The loader warns about those (see `unknown_secret_warnings`).
    """

    def __init__(self, settings_cls: type[BaseSettings], folder: Path) -> None:
        super().__init__(settings_cls)
        self.folder = folder
        self.files: dict[tuple[str, ...], Path] = {}
        """File that set each path in the last call, by lower-case path."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """Read every secret file; raise ConfigSourceError naming each unusable one.

        A file for a list or mapping field contains JSON, as the variable would.
        """
        values: dict[str, Any] = {}
        self.files = {}
        if not self.folder.is_dir():
            return values
        try:
            # Sorted ignoring case, so a file for a whole section comes before the files
            # for its keys, which then change single keys of it.
            entries = sorted(self.folder.iterdir(), key=_name_ignoring_case)
        except OSError as exc:
            raise ConfigSourceError([_unlistable_folder(self.folder, exc)]) from None
        names = {entry.name.upper() for entry in entries}
        problems: list[str] = []
        seen: dict[str, Path] = {}
        for entry in entries:
            name = entry.name.upper()
            if not name.startswith(ENV_PREFIX):
                continue
            invalid_byte = first_invalid_byte(entry.name)
            if invalid_byte is not None:
                problems.append(_non_utf8_file_name(entry, *invalid_byte))
                continue
            if not entry.exists() and not entry.is_symlink():
                # Removed since the listing.
                continue
            path = field_path(entry.name)
            if path[0] not in top_level_keys(self.settings_cls):
                continue
            other = seen.setdefault(name, entry)
            if other != entry:
                problems.append(_case_clash(path, other, entry))
                continue
            problem = _entry_type_problem(entry, path) or _list_item_file_problem(
                self.settings_cls, entry, path, names
            )
            if problem is not None:
                problems.append(problem)
                continue
            text, problem = _read_secret_file(entry, path)
            if problem is None and not text:
                continue
            if problem is None and text.lower() == "null":
                problem = self._single_value_null_problem(entry, path)
            value: Any = text
            if problem is None:
                value, problem = self._decode(entry, path, text)
            if problem is None and value is None and len(path) == 1:
                problem = self._top_level_null_problem(entry, path)
            if problem is not None:
                problems.append(problem)
                continue
            depth = _set_nested(values, path, value)
            if depth is not None:
                parent = path[: depth + 1]
                problems.append(
                    _inside_non_object(path, parent, entry, self._file_of(parent), values)
                )
                continue
            self.files[tuple(path)] = entry
        if problems:
            raise ConfigSourceError(problems)
        return values

    def _file_of(self, path: list[str]) -> Path:
        """Return the file read so far that set `path`, itself or inside its JSON value."""
        entry = secret_file_of(self.files, path)
        if entry is not None:
            return entry
        # Not reached, because every value that is not a mapping came from a file.
        return self.folder / (ENV_PREFIX + NESTING_DELIMITER.join(path).upper())

    def _top_level_null_problem(self, entry: Path, path: list[str]) -> str | None:
        """Describe a file that sets a whole top-level list or section to JSON null.

        Validation would reject the value and call it None, so this message writes null,
        as the file does, and gives the same alternatives as for the variable.
        """
        field = json_field(self.settings_cls, path)
        if field is None:
            return None
        return (
            f"{path[0]}: value null (from secret file {str(entry)!r}) is invalid, "
            "because null cannot replace a whole top-level field; remove "
            f"{entry.name}, or {null_alternative(entry.name, field, 'secret files')}"
        )

    def _single_value_null_problem(self, entry: Path, path: list[str]) -> str | None:
        """Describe a file that sets a port, host name or other single value to null.

        The file would set the text 'null', as the variable would (see
        `single_value_null_problems`). Secret fields take any text, so they are not
        checked, and null is the only value that this message shows.
        """
        if is_secret_path(path) or not is_single_value_field(self.settings_cls, path):
            return None
        return (
            f"{'.'.join(path)}: secret file {str(entry)!r} contains null, which is "
            "invalid, because a secret file cannot set a single value to null; remove "
            f"{entry.name}, so that the config file or the default sets it"
        )

    def _decode(self, entry: Path, path: list[str], text: str) -> tuple[Any, str | None]:
        """Decode the JSON of a file for a list or mapping field; keep other text."""
        field = json_field(self.settings_cls, path)
        if field is None:
            return text, None
        origin = JsonOrigin(
            "secret file", entry.name, f"secret file {str(entry)!r}", show_value=False
        )
        decoded, problem = decode_json_value(text, field, path, origin)
        if problem is None:
            problem = _repeated_keys_problem(text, path, origin)
        if problem is not None:
            return text, problem
        return decoded, None


def top_level_keys(model: type[BaseSettings]) -> set[str]:
    """Return the config's top-level keys in lower case, as variable and file names
    match them ignoring case."""
    return {name.lower() for name in model.model_fields}


def _name_ignoring_case(entry: Path) -> tuple[str, str]:
    return entry.name.upper(), entry.name


def _case_clash(path: list[str], first: Path, second: Path) -> str:
    return (
        f"{'.'.join(path)}: secret files {first.name} and {second.name} differ only in "
        "letter case, and file names are matched ignoring case, so one of them would be "
        "ignored; remove one of them"
    )


def _inside_non_object(
    path: list[str],
    parent: list[str],
    entry: Path,
    parent_file: Path,
    values: dict[str, Any],
) -> str:
    """Describe a file for a key inside a value that another file sets, not to an object.

    `parent_file` set the value at `parent`, either as its whole content or inside its
    JSON object, and `values` contains what the files read so far set.
    """
    value: Any = values
    for key in parent:
        value = value[key]
    value_text = "null" if value is None else "a value that is not a JSON object"
    start = (
        f"{'.'.join(path)}: secret file {str(entry)!r} sets a key inside "
        f"{'.'.join(parent)}, but"
    )
    parent_name = parent_file.name
    if len(field_path(parent_name)) == len(parent):
        return (
            f"{start} the secret file {parent_name} sets that to {value_text}; remove "
            "one of the two"
        )
    return (
        f"{start} the JSON value of the secret file {parent_name} sets that to "
        f"{value_text}; remove {entry.name}, or replace that value in {parent_name} "
        "with a JSON object"
    )


def _non_utf8_file_name(entry: Path, byte: int, offset: int) -> str:
    """Describe a secret file whose name is not UTF-8, so it matches no config field."""
    return (
        f"secret file '{escape_non_utf8(str(entry))}': the name is not UTF-8 (byte "
        f"0x{byte:02x} at offset {offset}), so it matches no config field; rename it "
        "to a UTF-8 name, as docs/configuration.md lists the variables"
    )


def _unlistable_folder(folder: Path, exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return (
        f"secrets folder {str(folder)!r} could not be listed ({reason}); make it "
        "readable by this process, or name another folder with --secrets-dir or "
        "APPLIANCE_SECRETS_DIR"
    )


def _entry_type_problem(entry: Path, path: list[str]) -> str | None:
    """Describe why an entry of the secrets folder is no usable file, or return None.

    Its name shows that it was meant to set a value, so it is not skipped. A FIFO would
    also block the load, which reads each file to its end.

    NOTE: while Kubernetes removes a key from a secret volume, the key's link points
    nowhere for a moment, so a reload then is rejected. Removing the link is a change in
    the folder, which starts the next reload.
    """
    where = f"{'.'.join(path)}: secret file {str(entry)!r}"
    link_fix = "point the link at a file that contains the value, or remove it"
    try:
        mode = entry.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{where} is a symbolic link loop; {link_fix}"
        if exc.errno == errno.ENOENT and entry.is_symlink():
            target = os.readlink(entry)
            missing = f"is a symbolic link to {target!r}, which does not exist"
            return f"{where} {missing}; {link_fix}"
        # Reading the file reports other errors, such as a target that is not readable.
        return None
    if stat.S_ISDIR(mode):
        return (
            f"{where} is a directory, not a file; put the value into a file of that "
            "name, or remove it"
        )
    if not stat.S_ISREG(mode):
        return (
            f"{where} is not a regular file but {special_file_kind(mode)}; put the "
            "value into a regular file of that name, or remove it"
        )
    return None


def _list_item_file_problem(
    model: type[BaseSettings], entry: Path, path: list[str], names: set[str]
) -> str | None:
    """Describe a secret file that sets a value inside a list field, if it does.

    Lists are set as a whole JSON list, and `names` contains the folder's file names in
    upper case, to tell whether a file does so for this list.
    """
    depth = list_field_depth(model, path)
    if depth is None:
        return None
    list_path = path[:depth]
    list_file = ENV_PREFIX + NESTING_DELIMITER.join(list_path).upper()
    start = (
        f"{'.'.join(path)}: secret file {str(entry)!r} sets a value inside the list "
        f"{'.'.join(list_path)}, but list items have no secret files of their own"
    )
    if list_file in names:
        return (
            f"{start}, and the secret file {list_file} sets the whole list, so the value "
            f"would be ignored; put it into the JSON list of {list_file} and remove "
            f"{entry.name}"
        )
    return f"{start}; set the whole list as JSON in {list_file} instead"


def _read_secret_file(entry: Path, path: list[str]) -> tuple[str, str | None]:
    """Return a secret file's text without surrounding white space, or a problem.

    A leading byte order mark is removed too, because Windows PowerShell 5.1 and older
    Notepad versions start UTF-8 files with one, and it is no part of the value.
    """
    where = ".".join(path)
    try:
        # A FIFO swapped in after `_entry_type_problem` must not block the load.
        data = read_regular(entry, MAX_SECRET_FILE_SIZE)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return "", (
            f"{where}: secret file {str(entry)!r} could not be read ({reason}); make it "
            "readable by this process or remove it"
        )
    try:
        return data.decode("utf-8").removeprefix("\ufeff").strip(), None
    except UnicodeDecodeError as exc:
        return "", (
            f"{where}: secret file {str(entry)!r} is not UTF-8 text (byte "
            f"0x{data[exc.start]:02x} at offset {exc.start}); save the value as UTF-8 "
            "text"
        )


class FileNameCaseSource(PydanticBaseSettingsSource):
    """Another source's values, with listener and upstream names spelt as in the file.

    Environment variables and secret file names arrive in lower case, so without this
    `APPLIANCE_LISTENERS__IMAP__PORT` would add a listener `imap` beside the file's
    `Imap` instead of changing its port.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        inner: PydanticBaseSettingsSource,
        document: dict[str, Any] | None,
    ) -> None:
        super().__init__(settings_cls)
        self.inner = inner
        self.document = document or {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = self.inner()
        for section in ("listeners", "upstreams"):
            entries = values.get(section)
            file_entries = self.document.get(section)
            if isinstance(entries, dict) and isinstance(file_entries, dict):
                values[section] = _spell_as_in_file(entries, file_entries)
        return values


def _spell_as_in_file(
    entries: dict[str, Any], file_entries: dict[Any, Any]
) -> dict[str, Any]:
    """Rename each entry to the file's name that equals it ignoring case, if any."""
    file_names = {str(name).lower(): name for name in file_entries}
    renamed = {}
    for name, entry in entries.items():
        key = name if name in file_entries else file_names.get(name.lower(), name)
        renamed[key] = entry
    return renamed


def _set_nested(target: dict[str, Any], path: list[str], value: Any) -> int | None:
    """Set `value` at `path`, creating mappings on the way.

    Returns None, or the index in `path` of a value on the way that is not a mapping,
    in which case nothing is set.
    """
    for depth, key in enumerate(path[:-1]):
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            return depth
    target[path[-1]] = value
    return None


class ConfigSourceError(ValueError):
    """Environment variables or secret files that cannot be used, one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UniqueKeyEnvSource(EnvSettingsSource):
    """The environment source, checking every APPLIANCE_* variable first.

    A value that is not JSON of the field's shape, or that gives a key twice in one
    object, is rejected with the variable's name. The json module keeps the last of two
    equal keys, so one value would be lost silently, while config files reject repeated
    keys. Only fields that take JSON are checked, so a text value that merely looks like
    JSON, such as a host name, is not. Names that are not UTF-8, values that are not
    UTF-8 for a top-level field, and variables that pydantic-settings would drop are
    rejected too (see appliance.config.variables).
    """

    def __call__(self) -> dict[str, Any]:
        variables = config_variables(os.environ)
        problems = encoding_problems(variables, top_level_keys(self.settings_cls))
        # The other checks would quote the lone surrogates of such names and values.
        text_variables = {
            name: value
            for name, value in variables.items()
            if is_utf8(name) and is_utf8(value)
        }
        problems += self._json_problems(text_variables)
        problems += nesting_problems(self.settings_cls, text_variables)
        problems += top_level_null_problems(self.settings_cls, text_variables)
        problems += single_value_null_problems(self.settings_cls, text_variables)
        if problems:
            # pydantic-settings would raise its own error for the first bad value, naming
            # only the top-level field.
            raise ConfigSourceError(problems)
        return super().__call__()

    def explode_env_vars(
        self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]
    ) -> dict[str, Any]:
        """Build a field's nested values from its variables, in the order of their names.

        pydantic-settings 2.16 reads them in environment order, so the JSON of
        APPLIANCE_UPSTREAMS__MAIL would replace an APPLIANCE_UPSTREAMS__MAIL__PORT set
        before it. A name sorts before every longer name that starts with it, so each
        key's own variable changes the section or entry that a shorter name sets.
        """
        return super().explode_env_vars(field_name, field, dict(sorted(env_vars.items())))

    def _json_problems(self, variables: Mapping[str, str]) -> list[str]:
        """Describe each list or mapping variable whose JSON is invalid or repeats a key."""
        problems = []
        for variable, value in sorted(variables.items(), key=lambda item: item[0].upper()):
            path = field_path(variable)
            field = json_field(self.settings_cls, path)
            if field is None:
                continue
            origin = JsonOrigin(
                "variable", variable, f"env {variable}", not is_secret_path(path)
            )
            _, problem = decode_json_value(value, field, path, origin)
            if problem is None:
                problem = _repeated_keys_problem(value, path, origin)
            if problem is not None:
                problems.append(problem)
        return problems


def _repeated_json_keys(text: str) -> list[str]:
    """Return the keys that some object of a JSON text gives more than once.

    Keys that differ only in letter case count as repeated, because names in variables
    and secret files match ignoring case, so one of the two entries would be lost.
    """
    repeated: list[str] = []

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        seen: set[str] = set()
        for key, value in pairs:
            folded = key.lower()
            if folded in seen and key not in repeated:
                repeated.append(key)
            seen.add(folded)
            document[key] = value
        return document

    json.loads(text, object_pairs_hook=build)
    return repeated


def _repeated_keys_problem(
    text: str, path: list[str], origin: JsonOrigin
) -> str | None:
    """Describe the keys that the valid JSON `text` repeats within one object, if any."""
    repeated = _repeated_json_keys(text)
    if not repeated:
        return None
    keys = ", ".join(repr(key) for key in repeated)
    if len(repeated) == 1:
        repeats = f"key {keys} repeats an earlier key"
    else:
        repeats = f"keys {keys} repeat earlier keys"
    return (
        f"{'.'.join(path)}: {repeats} in the same JSON object (from {origin.label}), so "
        "one of two values would be lost; merge the two entries or rename one"
    )


def make_env_source() -> EnvSettingsSource:
    """Return the environment source exactly as AppConfig builds it."""
    return UniqueKeyEnvSource(
        AppConfig,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTING_DELIMITER,
        env_ignore_empty=True,
    )
