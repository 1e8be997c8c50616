"""Unit tests of config source precedence: init > env > secrets > file > defaults."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from appliance.config import ConfigError, LoadedConfig, load_config, loader
from appliance.config.loader import unknown_variable_warnings
from tests.support.sources import isolate_config_sources

LEVEL_PATH = ("logging", "level")
LEVEL_VARIABLE = "APPLIANCE_LOGGING__LEVEL"

# A distinct logging.level per source, so the winner shows in the loaded value.
LEVEL_BY_SOURCE = {
    "init": "TRACE",
    "env": "DEBUG",
    "secret": "ERROR",
    "file": "WARNING",
    "default": "INFO",
}
SOURCE_PAIRS = list(itertools.combinations(LEVEL_BY_SOURCE, 2))

LISTENER_YAML = """\
listeners:
  imap:
    protocol: imap
    port: 143
    upstream: mail
upstreams:
  mail:
    host: mail.example.org
    port: 993
"""

FORMAT_FILES = {
    "appliance.yaml": LISTENER_YAML + "logging:\n  json: true\n",
    "appliance.yml": LISTENER_YAML + "logging:\n  json: true\n",
    "APPLIANCE.YAML": LISTENER_YAML + "logging:\n  json: true\n",
    "appliance.toml": """\
[listeners.imap]
protocol = "imap"
port = 143
upstream = "mail"

[upstreams.mail]
host = "mail.example.org"
port = 993

[logging]
json = true
""",
    "appliance.json": json.dumps(
        {
            "listeners": {
                "imap": {"protocol": "imap", "port": 143, "upstream": "mail"}
            },
            "upstreams": {"mail": {"host": "mail.example.org", "port": 993}},
            "logging": {"json": True},
        }
    ),
}


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_config_sources(monkeypatch, tmp_path)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir()
    return folder


def write_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def secret_label(folder: Path, name: str) -> str:
    """Return the source label of a value that the secret file `name` set."""
    return f"secret file {str(folder / name)!r}"


def load(path: Path | None, secrets_dir: Path, **kwargs: object) -> LoadedConfig:
    """Load the config without requiring a listener, because most cases here set none."""
    kwargs.setdefault("require_listeners", False)
    return load_config(path, secrets_dir=secrets_dir, **kwargs)


# Precedence between every pair of sources


@pytest.mark.parametrize(
    ("higher", "lower"),
    SOURCE_PAIRS,
    ids=[f"{higher}-beats-{lower}" for higher, lower in SOURCE_PAIRS],
)
def test_higher_source_wins(
    higher: str,
    lower: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    active = {higher, lower}
    overrides = None
    config_path = None
    if "init" in active:
        overrides = {"logging": {"level": LEVEL_BY_SOURCE["init"]}}
    if "env" in active:
        monkeypatch.setenv(LEVEL_VARIABLE, LEVEL_BY_SOURCE["env"].lower())
    if "secret" in active:
        write_file(secrets_dir, LEVEL_VARIABLE, LEVEL_BY_SOURCE["secret"] + "\n")
    if "file" in active:
        text = f"logging:\n  level: {LEVEL_BY_SOURCE['file']}\n"
        config_path = write_file(tmp_path, "appliance.yaml", text)
    labels = {
        "init": "init",
        "env": f"env {LEVEL_VARIABLE}",
        "secret": secret_label(secrets_dir, LEVEL_VARIABLE),
        "file": f"file {config_path}",
    }

    loaded = load(config_path, secrets_dir, overrides=overrides)

    assert loaded.config.logging.level == LEVEL_BY_SOURCE[higher]
    assert loaded.sources.get(LEVEL_PATH) == labels[higher]


def test_init_merges_with_env_fields(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LOGGING__JSON", "true")

    loaded = load(None, secrets_dir, overrides={"logging": {"level": "TRACE"}})

    assert loaded.config.logging.level == "TRACE"
    assert loaded.config.logging.json_output is True
    assert loaded.sources[("logging", "json")] == "env APPLIANCE_LOGGING__JSON"


def test_defaults_carry_no_source_label(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)

    loaded = load(path, secrets_dir)

    assert loaded.config.limits.connect_timeout == 10.0
    assert ("limits", "connect_timeout") not in loaded.sources
    assert ("listeners", "imap", "bind") not in loaded.sources


# File formats


@pytest.mark.parametrize("name", list(FORMAT_FILES))
def test_file_format_chosen_by_extension(
    name: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, name, FORMAT_FILES[name])

    loaded = load(path, secrets_dir)

    assert loaded.path == path
    assert loaded.config.listeners["imap"].port == 143
    assert loaded.config.upstreams["mail"].host == "mail.example.org"
    assert loaded.config.logging.json_output is True
    assert loaded.sources[("listeners", "imap", "port")] == f"file {path}"


@pytest.mark.parametrize("name", ["appliance.yaml", "appliance.toml", "appliance.json"])
def test_file_byte_order_mark_skipped(
    name: str, tmp_path: Path, secrets_dir: Path
) -> None:
    # Windows PowerShell 5.1 (`Set-Content -Encoding UTF8`) and older Notepad versions
    # start UTF-8 files with a byte order mark.
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + FORMAT_FILES[name].encode("utf-8"))

    loaded = load(path, secrets_dir)

    assert loaded.config.listeners["imap"].port == 143
    assert loaded.config.logging.json_output is True


def test_empty_yaml_file_gives_defaults(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_file(tmp_path, "appliance.yaml", "# nothing set yet\n")

    loaded = load(path, secrets_dir)

    assert loaded.config.listeners == {}
    assert loaded.sources == {}


# Nesting with `__`


def test_env_overrides_one_listener_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PORT", "1143")

    loaded = load(path, secrets_dir)

    imap = loaded.config.listeners["imap"]
    assert imap.port == 1143
    assert imap.protocol == "imap"
    assert imap.upstream == "mail"
    assert loaded.sources[("listeners", "imap", "port")] == (
        "env APPLIANCE_LISTENERS__IMAP__PORT"
    )
    assert loaded.sources[("listeners", "imap", "protocol")] == f"file {path}"


def test_env_overrides_entry_in_other_case(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    text = LISTENER_YAML.replace("  imap:", "  Imap:").replace("  mail:", "  Mail:")
    text = text.replace("upstream: mail", "upstream: Mail")
    path = write_file(tmp_path, "appliance.yaml", text)
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PORT", "2222")
    write_file(secrets_dir, "APPLIANCE_UPSTREAMS__MAIL__PORT", "995")

    loaded = load(path, secrets_dir)

    assert list(loaded.config.listeners) == ["Imap"]
    assert loaded.config.listeners["Imap"].port == 2222
    assert loaded.config.listeners["Imap"].protocol == "imap"
    assert list(loaded.config.upstreams) == ["Mail"]
    assert loaded.config.upstreams["Mail"].port == 995
    assert loaded.sources[("listeners", "Imap", "port")] == (
        "env APPLIANCE_LISTENERS__IMAP__PORT"
    )
    assert loaded.sources[("upstreams", "Mail", "port")] == (
        secret_label(secrets_dir, "APPLIANCE_UPSTREAMS__MAIL__PORT")
    )


def test_file_reference_reaches_env_upstream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # A variable names its upstream in lower case, and the file refers to it as `Mail`.
    text = "listeners:\n  imap:\n    protocol: imap\n    port: 143\n    upstream: Mail\n"
    path = write_file(tmp_path, "appliance.yaml", text)
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__HOST", "mail.example.org")

    loaded = load(path, secrets_dir)

    assert list(loaded.config.upstreams) == ["mail"]
    assert loaded.config.listeners["imap"].upstream == "mail"
    assert loaded.sources[("listeners", "imap", "upstream")] == f"file {path}"


def test_env_adds_listener_beside_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    monkeypatch.setenv("APPLIANCE_LISTENERS__POP3__PROTOCOL", "pop3")
    monkeypatch.setenv("APPLIANCE_LISTENERS__POP3__PORT", "1110")
    monkeypatch.setenv("APPLIANCE_LISTENERS__POP3__UPSTREAM", "mail")

    loaded = load(path, secrets_dir)

    assert sorted(loaded.config.listeners) == ["imap", "pop3"]
    assert loaded.config.listeners["pop3"].port == 1110


def test_env_json_sets_nested_model(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LIMITS", '{"max_connections": 5}')

    loaded = load(None, secrets_dir)

    assert loaded.config.limits.max_connections == 5
    assert loaded.config.limits.connect_timeout == 10.0


@pytest.mark.parametrize("key_first", [True, False], ids=["key-first", "entry-first"])
def test_key_variable_beats_entry_json(
    key_first: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    # pydantic-settings reads variables in environment order, so without sorting, the
    # entry's JSON would replace a key variable that came before it.
    path = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    variables = [
        ("APPLIANCE_UPSTREAMS__MAIL__PORT", "995"),
        ("APPLIANCE_UPSTREAMS__MAIL", '{"host": "json.example.org", "port": 993}'),
    ]
    if not key_first:
        variables.reverse()
    for name, value in variables:
        monkeypatch.setenv(name, value)

    loaded = load(path, secrets_dir)

    mail = loaded.config.upstreams["mail"]
    assert mail.port == 995
    assert mail.host == "json.example.org"
    assert loaded.sources[("upstreams", "mail", "port")] == (
        "env APPLIANCE_UPSTREAMS__MAIL__PORT"
    )
    assert loaded.sources[("upstreams", "mail", "host")] == "env APPLIANCE_UPSTREAMS__MAIL"


def test_env_json_label_names_set_variable(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LIMITS", '{"max_connections": 5}')

    loaded = load(None, secrets_dir)

    assert loaded.sources[("limits", "max_connections")] == "env APPLIANCE_LIMITS"


def test_env_field_name_json_output_rejected(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LOGGING__JSON_OUTPUT", "true")

    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir)

    assert "logging.json_output: unknown key" in caught.value.problems[0]


def test_known_server_default_port_unlabelled(
    tmp_path: Path, secrets_dir: Path
) -> None:
    text = "known_servers:\n  - host: mail.example.org\n    mode: implicit\n"
    path = write_file(tmp_path, "appliance.yaml", text)

    loaded = load(path, secrets_dir)

    assert loaded.sources[("known_servers", "0", "host")] == f"file {path}"
    assert ("known_servers", "0", "port") not in loaded.sources


# Secrets folder


def test_secret_overrides_one_upstream_field(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    write_file(secrets_dir, "APPLIANCE_UPSTREAMS__MAIL__HOST", "secret.example.org\n")

    loaded = load(path, secrets_dir)

    assert loaded.config.upstreams["mail"].host == "secret.example.org"
    assert loaded.config.upstreams["mail"].port == 993
    assert loaded.sources[("upstreams", "mail", "host")] == (
        secret_label(secrets_dir, "APPLIANCE_UPSTREAMS__MAIL__HOST")
    )


NETWORKS_SECRET = "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS"


@pytest.mark.parametrize(
    "text", ['["10.0.0.0/8", "192.0.2.0/24"]', ' [ "10.0.0.0/8",\n "192.0.2.0/24" ]\n']
)
def test_secret_sets_list_as_json(
    text: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    write_file(secrets_dir, NETWORKS_SECRET, text)
    write_file(secrets_dir, "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT", "true")

    loaded = load(path, secrets_dir)

    proxy_protocol = loaded.config.listeners["imap"].proxy_protocol
    assert proxy_protocol.accept is True
    assert [str(n) for n in proxy_protocol.trusted_networks] == [
        "10.0.0.0/8",
        "192.0.2.0/24",
    ]
    networks_path = ("listeners", "imap", "proxy_protocol", "trusted_networks", "0")
    assert loaded.sources[networks_path] == secret_label(secrets_dir, NETWORKS_SECRET)


def test_secret_sets_empty_list(tmp_path: Path, secrets_dir: Path) -> None:
    text = LISTENER_YAML.replace(
        "    upstream: mail\n",
        "    upstream: mail\n    proxy_protocol: {trusted_networks: [10.0.0.0/8]}\n",
        1,
    )
    path = write_file(tmp_path, "appliance.yaml", text)
    write_file(secrets_dir, NETWORKS_SECRET, "[]")

    loaded = load(path, secrets_dir)

    assert loaded.config.listeners["imap"].proxy_protocol.trusted_networks == []


def test_secret_sets_section_as_json(secrets_dir: Path) -> None:
    write_file(secrets_dir, "APPLIANCE_LIMITS", '{"max_connections": 5}')

    loaded = load(None, secrets_dir)

    assert loaded.config.limits.max_connections == 5
    assert loaded.config.limits.connect_timeout == 10.0
    assert loaded.sources[("limits", "max_connections")] == (
        secret_label(secrets_dir, "APPLIANCE_LIMITS")
    )


def test_secret_key_file_changes_section_file(secrets_dir: Path) -> None:
    # The key's file name sorts before the section's in a case-sensitive order.
    write_file(secrets_dir, "appliance_limits__max_connections", "5")
    limits = '{"max_connections": 6, "connect_timeout": 3}'
    write_file(secrets_dir, "APPLIANCE_LIMITS", limits)

    loaded = load(None, secrets_dir)

    assert loaded.config.limits.max_connections == 5
    assert loaded.config.limits.connect_timeout == 3.0
    assert loaded.sources[("limits", "max_connections")] == (
        secret_label(secrets_dir, "appliance_limits__max_connections")
    )
    assert loaded.sources[("limits", "connect_timeout")] == (
        secret_label(secrets_dir, "APPLIANCE_LIMITS")
    )


def test_secret_key_under_null_rejected(secrets_dir: Path) -> None:
    write_file(secrets_dir, "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN", "null")
    write_file(secrets_dir, "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR", "#")

    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir)

    [problem] = caught.value.problems
    assert problem.startswith("listeners.imap.route_by_login.separator: secret file ")
    assert (
        "sets a key inside listeners.imap.route_by_login, but the secret file "
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN sets that to null; remove one of the "
        "two"
    ) in problem


# Variable that sets a section to null, its value, a secret file for a key inside that
# section with its text, and the end of the problem.
SECRET_KEYS_UNDER_NULL_VARIABLE = {
    "optional section": (
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN",
        "null",
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR",
        "bogus",
        "sets that to null, so the file would be ignored; remove "
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR or unset "
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN",
    ),
    "list in optional section": (
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN",
        "null",
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__ALLOW",
        '[{"upstream": "mail"}]',
        "sets that to null, so the file would be ignored; remove "
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__ALLOW or unset "
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN",
    ),
    "null in json": (
        "APPLIANCE_LISTENERS",
        '{"imap": {"route_by_login": null}}',
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR",
        "bogus",
        "sets that to null inside its JSON value, so the file would be ignored; "
        "remove APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR, or replace that "
        "null in APPLIANCE_LISTENERS with a JSON object",
    ),
}


@pytest.mark.parametrize(
    ("variable", "value", "name", "text", "end"),
    SECRET_KEYS_UNDER_NULL_VARIABLE.values(),
    ids=SECRET_KEYS_UNDER_NULL_VARIABLE.keys(),
)
def test_secret_key_under_null_variable_rejected(
    variable: str,
    value: str,
    name: str,
    text: str,
    end: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    monkeypatch.setenv(variable, value)
    key_file = write_file(secrets_dir, name, text)

    with pytest.raises(ConfigError) as caught:
        load(config, secrets_dir)

    [problem] = caught.value.problems
    path = name.removeprefix("APPLIANCE_").lower().replace("__", ".")
    assert problem.startswith(f"{path}: secret file {str(key_file)!r} sets a key")
    assert f"inside listeners.imap.route_by_login, but env {variable} {end}" in problem
    assert text not in problem


# Secret file that sets a section to null, its text, and the end of the problem about
# the variable APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT.
VARIABLES_UNDER_NULL_SECRET = {
    "section": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL",
        "null",
        "sets that to null, so the null would be ignored; unset "
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT or remove "
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL",
    ),
    "null in json": (
        "APPLIANCE_LISTENERS__IMAP",
        '{"proxy_protocol": null}',
        "sets that to null inside its JSON value, so the null would be ignored; unset "
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT, or replace that null in "
        "APPLIANCE_LISTENERS__IMAP with a JSON object",
    ),
}


@pytest.mark.parametrize(
    ("name", "text", "end"),
    VARIABLES_UNDER_NULL_SECRET.values(),
    ids=VARIABLES_UNDER_NULL_SECRET.keys(),
)
def test_variable_key_under_null_secret_rejected(
    name: str,
    text: str,
    end: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    null_file = write_file(secrets_dir, name, text)
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT", "true")

    with pytest.raises(ConfigError) as caught:
        load(config, secrets_dir)

    [problem] = caught.value.problems
    assert problem.startswith(
        "listeners.imap.proxy_protocol.accept: value 'true' (from env "
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT) sets a key inside "
        "listeners.imap.proxy_protocol, but the secret file "
        f"{str(null_file)!r} {end}"
    )


def test_variable_object_replaces_null_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # The section's own variable replaces the null, and its key variable changes that.
    config = write_file(tmp_path, "appliance.yaml", LISTENER_YAML)
    write_file(secrets_dir, "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL", "null")
    monkeypatch.setenv(
        "APPLIANCE_LISTENERS__IMAP",
        '{"proxy_protocol": {"accept": true, "trusted_networks": ["10.0.0.0/8"]}}',
    )
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__REQUIRED", "false")

    loaded = load(config, secrets_dir)

    proxy_protocol = loaded.config.listeners["imap"].proxy_protocol
    assert proxy_protocol.accept is True
    assert proxy_protocol.required is False


# JSON of the secret file APPLIANCE_UPSTREAMS, and what it sets upstreams.mail to.
NON_OBJECTS_IN_JSON = {
    "null": ('{"mail": null}', "null"),
    "number": ('{"mail": 5}', "a value that is not a JSON object"),
}


@pytest.mark.parametrize(
    ("text", "what"), NON_OBJECTS_IN_JSON.values(), ids=NON_OBJECTS_IN_JSON.keys()
)
def test_secret_key_under_json_non_object_rejected(
    text: str, what: str, secrets_dir: Path
) -> None:
    write_file(secrets_dir, "APPLIANCE_UPSTREAMS", text)
    key_file = write_file(secrets_dir, "APPLIANCE_UPSTREAMS__MAIL__PORT", "1143")

    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir)

    [problem] = caught.value.problems
    assert problem.startswith(f"upstreams.mail.port: secret file {str(key_file)!r}")
    # The file named is the one that exists, not APPLIANCE_UPSTREAMS__MAIL.
    assert (
        "sets a key inside upstreams.mail, but the JSON value of the secret file "
        f"APPLIANCE_UPSTREAMS sets that to {what}; remove "
        "APPLIANCE_UPSTREAMS__MAIL__PORT, or replace that value in APPLIANCE_UPSTREAMS "
        "with a JSON object"
    ) in problem


def test_secret_names_differing_in_case_rejected(secrets_dir: Path) -> None:
    write_file(secrets_dir, "appliance_limits__max_connections", "5")
    write_file(secrets_dir, "APPLIANCE_LIMITS__MAX_CONNECTIONS", "6")

    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir)

    [problem] = caught.value.problems
    assert problem.startswith(
        "limits.max_connections: secret files APPLIANCE_LIMITS__MAX_CONNECTIONS and "
        "appliance_limits__max_connections differ only in letter case"
    )


def test_secret_file_name_ignores_case(secrets_dir: Path) -> None:
    write_file(secrets_dir, "appliance_logging__level", "error")

    loaded = load(None, secrets_dir)

    assert loaded.config.logging.level == "ERROR"


def test_secret_without_prefix_ignored(secrets_dir: Path) -> None:
    write_file(secrets_dir, "db_password", "not: a config value")
    write_file(secrets_dir, "LOGGING__LEVEL", "error")

    loaded = load(None, secrets_dir)

    assert loaded.config.logging.level == "INFO"
    assert loaded.sources == {}


def test_secret_byte_order_mark_stripped(secrets_dir: Path) -> None:
    # Windows PowerShell 5.1 (`Set-Content -Encoding UTF8`) and older Notepad versions
    # start UTF-8 files with a byte order mark.
    (secrets_dir / LEVEL_VARIABLE).write_bytes(b"\xef\xbb\xbferror\r\n")

    loaded = load(None, secrets_dir)

    assert loaded.config.logging.level == "ERROR"


def test_secret_json_byte_order_mark_stripped(secrets_dir: Path) -> None:
    limits = b'{"max_connections": 5}'
    (secrets_dir / "APPLIANCE_LIMITS").write_bytes(b"\xef\xbb\xbf" + limits)

    loaded = load(None, secrets_dir)

    assert loaded.config.limits.max_connections == 5


def test_missing_secrets_folder_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "no-such-folder"

    loaded = load(None, folder)

    assert loaded.sources == {}
    [warning] = loaded.warnings
    assert warning.startswith(f"secrets folder {str(folder)!r} does not exist")


def test_secrets_path_to_file_warned(tmp_path: Path) -> None:
    path = write_file(tmp_path, "appliance.yaml", "{}\n")

    loaded = load(None, path)

    [warning] = loaded.warnings
    assert warning.startswith(f"secrets folder {str(path)!r} is not a folder")
    assert "does not exist" not in warning
    assert "--secrets-dir or APPLIANCE_SECRETS_DIR" in warning


@pytest.mark.parametrize("content", ["", "\n", "  \n\t"])
def test_empty_secret_counts_as_unset(
    content: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "appliance.yaml", "logging:\n  level: warning\n")
    write_file(secrets_dir, LEVEL_VARIABLE, content)

    loaded = load(path, secrets_dir)

    assert loaded.config.logging.level == "WARNING"
    assert loaded.sources[LEVEL_PATH] == f"file {path}"


# Empty variables


def test_empty_variable_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "appliance.yaml", "logging:\n  level: warning\n")
    monkeypatch.setenv(LEVEL_VARIABLE, "")

    loaded = load(path, secrets_dir)

    assert loaded.config.logging.level == "WARNING"
    assert loaded.sources[LEVEL_PATH] == f"file {path}"


def test_empty_variable_leaves_secret_visible(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    write_file(secrets_dir, LEVEL_VARIABLE, "error")
    monkeypatch.setenv(LEVEL_VARIABLE, "")

    loaded = load(None, secrets_dir)

    assert loaded.config.logging.level == "ERROR"


def test_empty_required_variable_named_in_error(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__PORT", "993")
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__HOST", "")

    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir)

    [problem] = caught.value.problems
    assert problem.startswith("upstreams.mail.host:")
    assert "APPLIANCE_UPSTREAMS__MAIL__HOST is set but empty" in problem


def test_unset_required_variable_named_in_error(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__PORT", "993")

    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir)

    [problem] = caught.value.problems
    assert problem.startswith("upstreams.mail.host:")
    assert "set it in the config file or as APPLIANCE_UPSTREAMS__MAIL__HOST" in problem


# Finding the file and the secrets folder


def test_config_variable_selects_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "chosen.yaml", "logging:\n  level: error\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))

    loaded = load(None, secrets_dir)

    assert loaded.path == path
    assert loaded.config.logging.level == "ERROR"


def test_explicit_path_beats_config_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    chosen = write_file(tmp_path, "chosen.yaml", "logging:\n  level: error\n")
    ignored = write_file(tmp_path, "ignored.yaml", "logging:\n  level: debug\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(ignored))

    loaded = load(chosen, secrets_dir)

    assert loaded.path == chosen
    assert loaded.config.logging.level == "ERROR"


def test_empty_config_variable_uses_default(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", "")

    loaded = load(None, secrets_dir)

    assert loaded.path is None


def test_absent_default_file_is_optional(secrets_dir: Path) -> None:
    loaded = load(None, secrets_dir)

    assert loaded.path is None
    assert loaded.config.listeners == {}


def test_present_default_file_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "default.yaml", "logging:\n  level: error\n")
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", path)

    loaded = load(None, secrets_dir)

    assert loaded.path == path
    assert loaded.config.logging.level == "ERROR"


def test_named_missing_file_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    missing = tmp_path / "missing.yaml"

    with pytest.raises(ConfigError) as caught:
        load(missing, secrets_dir)

    assert str(missing) in str(caught.value)


def test_secrets_variable_selects_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "mounted"
    folder.mkdir()
    write_file(folder, LEVEL_VARIABLE, "error")
    monkeypatch.setenv("APPLIANCE_SECRETS_DIR", str(folder))

    loaded = load_config(None, require_listeners=False)

    assert loaded.config.logging.level == "ERROR"
    assert loaded.sources[LEVEL_PATH] == secret_label(folder, LEVEL_VARIABLE)


# Warnings for variables that match no field


def test_unknown_variable_warned(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LISTNERS__IMAP__PORT", "1143")

    loaded = load(None, secrets_dir)

    [warning] = [w for w in loaded.warnings if "environment variable" in w]
    assert "APPLIANCE_LISTNERS__IMAP__PORT" in warning
    assert "listeners" in warning


def test_known_and_control_variables_not_warned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_file(tmp_path, "appliance.yaml", "{}\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))
    monkeypatch.setenv("APPLIANCE_SECRETS_DIR", str(secrets_dir))
    monkeypatch.setenv(LEVEL_VARIABLE, "debug")

    loaded = load_config(None, require_listeners=False)

    assert [w for w in loaded.warnings if "environment variable" in w] == []


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_unknown_secret_file_warned(kind: str, secrets_dir: Path) -> None:
    secret = secrets_dir / "APPLIANCE_BOGUS"
    if kind == "file":
        secret.write_text("x")
    else:
        secret.mkdir()

    loaded = load(None, secrets_dir)

    [warning] = [w for w in loaded.warnings if "secret file" in w]
    assert warning.startswith(f"secret file {str(secret)!r} matches no config field")
    assert "is ignored" in warning
    assert "listeners" in warning


def test_known_secret_file_not_warned(secrets_dir: Path) -> None:
    (secrets_dir / "appliance_logging__level").write_text("debug")

    loaded = load(None, secrets_dir)

    assert loaded.config.logging.level == "DEBUG"
    assert [w for w in loaded.warnings if "secret file" in w] == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is empty"),
        ("{}\n", "is empty"),
        ("listeners: {}\nlogging: {level: debug}\n", "names no listener"),
    ],
)
def test_no_listeners_rejected(
    tmp_path: Path, secrets_dir: Path, text: str, reason: str
) -> None:
    path = write_file(tmp_path, "appliance.yaml", text)

    with pytest.raises(ConfigError) as caught:
        load(path, secrets_dir, require_listeners=True)

    [problem] = caught.value.problems
    assert problem.startswith("listeners: no listener is configured")
    assert f"config file {str(path)!r} {reason}" in problem
    assert "add at least one entry under listeners:" in problem


def test_no_listeners_without_file_rejected(secrets_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, secrets_dir, require_listeners=True)

    [problem] = caught.value.problems
    assert "no config file was found" in problem


@pytest.mark.parametrize(
    ("variable", "warned"),
    [
        ("APPLIANCE_STATE_DIR", False),
        ("APPLIANCE_KNOWN_SERVERS", False),
        ("appliance_logging__level", False),
        ("APPLIANCE_LOGIN", True),
        ("appliance_colour", True),
        ("APPLIANCE_", True),
        ("OTHER_LISTENERS", False),
    ],
)
def test_unknown_variable_warnings_by_top_key(variable: str, warned: bool) -> None:
    warnings = unknown_variable_warnings({variable: "x"})

    assert bool(warnings) is warned
