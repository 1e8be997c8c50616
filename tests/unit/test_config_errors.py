"""Unit tests of config errors, whose messages name the field path, value and fix."""

from __future__ import annotations

import codecs
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import AppConfig, ConfigError, load_config
from appliance.config import loader as config_loader
from appliance.config import settings as config_settings
from appliance.files import MAX_CONFIG_FILE_SIZE, MAX_SECRET_FILE_SIZE
from tests.support.sources import isolate_config_sources

UPSTREAM_YAML = "upstreams:\n  mail:\n    host: mail.example.org\n"

FIELD_NAMES = [
    "listeners",
    "upstreams",
    "known_servers",
    "limits",
    "logging",
    "state_dir",
    "imap",
    "mail",
    "protocol",
    "port",
    "bind",
    "tls",
    "host",
    "upstream",
    "mode",
    "json",
    "level",
]


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_config_sources(monkeypatch, tmp_path)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir()
    return folder


@pytest.fixture
def pem_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Return readable placeholder files, because the models check no PEM content."""
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert_file.write_text("certificate\n")
    key_file.write_text("key\n")
    return cert_file, key_file


def write_config(folder: Path, text: str, name: str = "appliance.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_for(path: Path | None, secrets_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, secrets_dir=secrets_dir)
    return caught.value.problems


def only_problem(path: Path | None, secrets_dir: Path) -> str:
    problems = problems_for(path, secrets_dir)
    assert len(problems) == 1, problems
    return problems[0]


def listener_yaml(**fields: object) -> str:
    """Return a config with one listener `imap` on upstream `mail`, plus `fields`."""
    values: dict[str, object] = {"protocol": "imap", "port": 1143, "upstream": "mail"}
    values.update(fields)
    document = {
        "listeners": {"imap": values},
        "upstreams": {"mail": {"host": "mail.example.org"}},
    }
    return yaml.safe_dump(document)


# Unknown keys


def test_unknown_upstream_key_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML + "    colour: red\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.colour:")
    assert "unknown key" in problem
    assert f"file {path}" in problem


def test_unknown_top_level_key_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, "listners: {}\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listners:")
    assert "unknown key" in problem


def test_unknown_listener_key_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(protocl="imap"))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.protocl:")


def test_unknown_env_key_names_variable(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LOGGING__LEVLE", "debug")

    problem = only_problem(None, secrets_dir)

    assert problem.startswith("logging.levle:")
    assert "env APPLIANCE_LOGGING__LEVLE" in problem


# Variable name, JSON value with a repeated key, config path of the variable, that key.
REPEATED_JSON_KEYS = {
    "section": (
        "APPLIANCE_LIMITS",
        '{"max_connections": 5, "max_connections": 6}',
        "limits",
        "max_connections",
    ),
    "map of entries": (
        "APPLIANCE_UPSTREAMS",
        '{"mail": {"host": "a.example.org", "host": "b.example.org"}}',
        "upstreams",
        "host",
    ),
    "one entry": (
        "APPLIANCE_UPSTREAMS__MAIL",
        '{"host": "a.example.org", "host": "b.example.org"}',
        "upstreams.mail",
        "host",
    ),
    "section of an entry": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL",
        '{"accept": false, "accept": false}',
        "listeners.imap.proxy_protocol",
        "accept",
    ),
    "list": (
        "APPLIANCE_KNOWN_SERVERS",
        '[{"host": "a.example.org", "mode": "none", "mode": "implicit"}]',
        "known_servers",
        "mode",
    ),
}


@pytest.mark.parametrize(
    ("variable", "value", "path", "key"),
    REPEATED_JSON_KEYS.values(),
    ids=REPEATED_JSON_KEYS.keys(),
)
def test_repeated_key_in_env_json_named(
    variable: str,
    value: str,
    path: str,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, value)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"{path}: key {key!r} repeats an earlier key")
    assert f"(from env {variable})" in problem


def test_env_json_with_distinct_keys_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    # The same key in two different objects is no repeat.
    value = '{"mail": {"host": "a.example.org"}, "backup": {"host": "b.example.org"}}'
    monkeypatch.setenv("APPLIANCE_UPSTREAMS", value)

    loaded = load_config(config, secrets_dir=secrets_dir)

    assert loaded.config.upstreams["mail"].host == "a.example.org"
    assert loaded.config.upstreams["backup"].host == "b.example.org"


# Variables of list and mapping fields, which take JSON at every depth. Each case is the
# variable, its value, the field path, and a part of the fix that the message must give.
NON_JSON_VARIABLES = {
    "list in a section of an entry": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
        "10.0.0.0/8",
        "listeners.imap.proxy_protocol.trusted_networks",
        """this field is a list, so give a JSON list, such as '["10.0.0.0/8"]'""",
    ),
    "list with commas": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
        "10.0.0.0/8, 192.0.2.0/24",
        "listeners.imap.proxy_protocol.trusted_networks",
        """such as '["10.0.0.0/8", "192.0.2.0/24"]'""",
    ),
    "section of an entry": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL",
        "accept",
        "listeners.imap.proxy_protocol",
        (
            "give a JSON object of its keys, or set each key with its own variable, "
            "such as APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT"
        ),
    ),
    "optional section": (
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN",
        "mail",
        "listeners.imap.route_by_login",
        "this field is a section, so give a JSON object",
    ),
    "list of entries in a section": (
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__ALLOW",
        "mail",
        "listeners.imap.route_by_login.allow",
        """give a JSON list, such as '[{"upstream": "mail", "host": "*.example.org"}]'""",
    ),
    "entry": (
        "APPLIANCE_UPSTREAMS__MAIL",
        "mail.example.org",
        "upstreams.mail",
        "such as APPLIANCE_UPSTREAMS__MAIL__HOST",
    ),
    "map of entries": (
        "APPLIANCE_LISTENERS",
        "imap",
        "listeners",
        (
            "this field is a map of entries by name, so give a JSON object of entries, "
            "or set each key of an entry with its own variable, such as "
            "APPLIANCE_LISTENERS__NAME__PROTOCOL"
        ),
    ),
    "top-level list": (
        "APPLIANCE_KNOWN_SERVERS",
        '[{"host": "mail.example.org"',
        "known_servers",
        (
            "this field is a list, so give a JSON list, such as "
            """'[{"host": "mail.example.org", "protocol": "imap", "mode": "implicit"}]'"""
        ),
    ),
}


@pytest.mark.parametrize(
    ("variable", "value", "path", "fix"),
    NON_JSON_VARIABLES.values(),
    ids=NON_JSON_VARIABLES.keys(),
)
def test_non_json_variable_named(
    variable: str,
    value: str,
    path: str,
    fix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, value)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"{path}: value {value!r} (from env {variable})")
    assert "is not valid JSON" in problem
    assert fix in problem


def test_broken_json_list_reason_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_KNOWN_SERVERS", '[{"host": "x"')

    problem = only_problem(config, secrets_dir)

    assert "is not valid JSON (expecting ',' delimiter at character 13)" in problem
    assert "JSON object" not in problem


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("APPLIANCE_KNOWN_SERVERS", '{"host": "mail.example.org"}', "a JSON list"),
        ("APPLIANCE_LIMITS", "5", "a JSON object"),
        ("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL", '["accept"]', "a JSON object"),
        (
            "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
            '"10.0.0.0/8"',
            "a JSON list",
        ),
    ],
)
def test_json_of_wrong_shape_named(
    variable: str,
    value: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, value)

    problem = only_problem(config, secrets_dir)

    assert f"(from env {variable}) is JSON but not {expected};" in problem


def test_every_non_json_variable_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS", "x"
    )
    monkeypatch.setenv("APPLIANCE_LIMITS", "y")

    problems = problems_for(config, secrets_dir)

    assert len(problems) == 2
    assert problems[0].startswith("limits:")
    assert problems[1].startswith("listeners.imap.proxy_protocol.trusted_networks:")


def test_nested_json_variables_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT", "true")
    monkeypatch.setenv(
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
        '["10.0.0.0/8", "2001:db8::/48"]',
    )
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN", "null")

    loaded = load_config(config, secrets_dir=secrets_dir)

    proxy_protocol = loaded.config.listeners["imap"].proxy_protocol
    assert proxy_protocol.accept is True
    assert [str(n) for n in proxy_protocol.trusted_networks] == [
        "10.0.0.0/8",
        "2001:db8::/48",
    ]
    assert loaded.config.listeners["imap"].route_by_login is None


# Environment variables that are not UTF-8


def test_non_utf8_variable_name_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    # os.environ stores each byte that is not UTF-8 as a lone surrogate.
    monkeypatch.setenv("APPLIANCE_LISTENERS__IM\udcffAP__PORT", "2143")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        r"environment variable APPLIANCE_LISTENERS__IM\xffAP__PORT: the name is not "
        "UTF-8 (byte 0xff at offset 23)"
    )
    assert "value '2143'" in problem
    assert "unset it" in problem
    assert "\udcff" not in problem


@pytest.mark.parametrize(
    "variable",
    [
        "APPLIANCE_LIMITS__MAX_\udcffCONNECTIONS",
        "APPLIANCE_UPSTREAMS__M\udce4IL__PASSWORD",
    ],
)
def test_non_utf8_name_of_secret_hides_value(
    variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # A garbled last part could be the name of a secret field, so its value stays out.
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, "hunter2")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("environment variable APPLIANCE_")
    assert "the name is not UTF-8" in problem
    assert "hunter2" not in problem


def test_non_utf8_variable_value_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__HOST", "m\udce4il.example.org")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        r"upstreams.mail.host: value 'm\xe4il.example.org' (from env "
        "APPLIANCE_UPSTREAMS__MAIL__HOST) is not UTF-8 text (byte 0xe4 at offset 1)"
    )
    assert "\udce4" not in problem


def test_non_utf8_unknown_name_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # A garbled name may be a garbled known name, so it is rejected, not ignored.
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_F\udcffOO", "bar")

    problem = only_problem(config, secrets_dir)

    expected = r"environment variable APPLIANCE_F\xffOO: the name is not UTF-8"
    assert problem.startswith(expected), problem


def test_non_utf8_config_path_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # File names are bytes on Linux, so a path in a legacy encoding is valid.
    folder = tmp_path / "caf\udce9"
    folder.mkdir()
    config = write_config(folder, listener_yaml())
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))

    loaded = load_config(secrets_dir=secrets_dir)

    assert loaded.path == config


# Variables that pydantic-settings would ignore beside another variable

# Variable of a list item, its value, the config path, and the variable of the list.
LIST_ITEM_VARIABLES = {
    "known server": (
        "APPLIANCE_KNOWN_SERVERS__0__PORT",
        "993",
        "known_servers.0.port",
        "APPLIANCE_KNOWN_SERVERS",
    ),
    "network": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS__1",
        "192.0.2.0/24",
        "listeners.imap.proxy_protocol.trusted_networks.1",
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
    ),
    "route": (
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__ALLOW__0__UPSTREAM",
        "mail",
        "listeners.imap.route_by_login.allow.0.upstream",
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__ALLOW",
    ),
}

LIST_VALUES = {
    "APPLIANCE_KNOWN_SERVERS": '[{"host": "mail.example.org", "mode": "implicit"}]',
    "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS": '["10.0.0.0/8"]',
    "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__ALLOW": '[{"upstream": "mail"}]',
}


@pytest.mark.parametrize("item_first", [True, False], ids=["item-first", "list-first"])
@pytest.mark.parametrize(
    ("variable", "value", "path", "list_variable"),
    LIST_ITEM_VARIABLES.values(),
    ids=LIST_ITEM_VARIABLES.keys(),
)
def test_list_item_variable_beside_list_rejected(
    variable: str,
    value: str,
    path: str,
    list_variable: str,
    item_first: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    variables = [(variable, value), (list_variable, LIST_VALUES[list_variable])]
    if not item_first:
        variables.reverse()
    for name, text in variables:
        monkeypatch.setenv(name, text)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"{path}: value {value!r} (from env {variable})")
    assert "list items have no variables of their own" in problem
    assert f"{list_variable} sets the whole list" in problem
    assert f"unset {variable}" in problem


@pytest.mark.parametrize(
    ("variable", "value", "path", "list_variable"),
    LIST_ITEM_VARIABLES.values(),
    ids=LIST_ITEM_VARIABLES.keys(),
)
def test_list_item_variable_alone_rejected(
    variable: str,
    value: str,
    path: str,
    list_variable: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, value)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"{path}: value {value!r} (from env {variable})")
    assert "list items have no variables of their own" in problem
    assert f"set the whole list as JSON in {list_variable}" in problem


# Variable set to JSON null, a variable for a key inside it, and that key's path.
KEYS_UNDER_NULL = {
    "optional section": (
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN",
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR",
        "listeners.imap.route_by_login.separator",
    ),
    "section": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL",
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT",
        "listeners.imap.proxy_protocol.accept",
    ),
    "map entry": (
        "APPLIANCE_UPSTREAMS__MAIL",
        "APPLIANCE_UPSTREAMS__MAIL__PORT",
        "upstreams.mail.port",
    ),
}


@pytest.mark.parametrize("key_first", [True, False], ids=["key-first", "null-first"])
@pytest.mark.parametrize(
    ("null_variable", "variable", "path"),
    KEYS_UNDER_NULL.values(),
    ids=KEYS_UNDER_NULL.keys(),
)
def test_key_under_null_variable_rejected(
    null_variable: str,
    variable: str,
    path: str,
    key_first: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    variables = [(variable, "7"), (null_variable, "null")]
    if not key_first:
        variables.reverse()
    for name, text in variables:
        monkeypatch.setenv(name, text)

    problem = only_problem(config, secrets_dir)

    parent = null_variable.removeprefix("APPLIANCE_").lower().replace("__", ".")
    assert problem.startswith(f"{path}: value '7' (from env {variable}) sets a key")
    assert f"inside {parent}, but env {null_variable} sets that to null" in problem
    assert "unset one of the two" in problem


# Variable whose JSON value contains a null, that JSON, a variable for a key inside the
# null, and the paths of the key and of the null.
KEYS_UNDER_JSON_NULL = {
    "entry in top-level map": (
        "APPLIANCE_UPSTREAMS",
        '{"mail": null}',
        "APPLIANCE_UPSTREAMS__MAIL__PORT",
        "upstreams.mail.port",
        "upstreams.mail",
    ),
    "entry in other case": (
        "APPLIANCE_UPSTREAMS",
        '{"Mail": null}',
        "APPLIANCE_UPSTREAMS__MAIL__PORT",
        "upstreams.mail.port",
        "upstreams.mail",
    ),
    "section two levels down": (
        "APPLIANCE_LISTENERS",
        '{"imap": {"proxy_protocol": null}}',
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT",
        "listeners.imap.proxy_protocol.accept",
        "listeners.imap.proxy_protocol",
    ),
    "optional section in entry": (
        "APPLIANCE_LISTENERS__IMAP",
        '{"route_by_login": null}',
        "APPLIANCE_LISTENERS__IMAP__ROUTE_BY_LOGIN__SEPARATOR",
        "listeners.imap.route_by_login.separator",
        "listeners.imap.route_by_login",
    ),
}


@pytest.mark.parametrize(
    ("json_variable", "json_value", "variable", "path", "parent"),
    KEYS_UNDER_JSON_NULL.values(),
    ids=KEYS_UNDER_JSON_NULL.keys(),
)
def test_key_under_json_null_rejected(
    json_variable: str,
    json_value: str,
    variable: str,
    path: str,
    parent: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(json_variable, json_value)
    monkeypatch.setenv(variable, "7")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"{path}: value '7' (from env {variable}) sets a key")
    assert (
        f"inside {parent}, but env {json_variable} sets that to null inside its JSON "
        "value"
    ) in problem
    assert (
        f"unset {variable}, or replace that null in {json_variable} with a JSON object"
    ) in problem


def test_variable_replacing_json_null_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # The entry's own variable replaces the null, and its key variable changes that.
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_UPSTREAMS", '{"mail": null}')
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL", '{"host": "mail.example.net"}')
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__PORT", "1993")

    loaded = load_config(config, secrets_dir=secrets_dir)

    assert loaded.config.upstreams["mail"].host == "mail.example.net"
    assert loaded.config.upstreams["mail"].port == 1993


# Variable that sets a top-level field to JSON null, and the alternative its error gives.
TOP_LEVEL_NULLS = {
    "section": (
        "APPLIANCE_LIMITS",
        "change single keys with their own variables, such as "
        "APPLIANCE_LIMITS__CONNECT_TIMEOUT",
    ),
    "map": (
        "APPLIANCE_LISTENERS",
        "change single entries with their own variables, such as "
        "APPLIANCE_LISTENERS__NAME__PROTOCOL",
    ),
    "list": ("APPLIANCE_KNOWN_SERVERS", "set it to [] for an empty list"),
}


@pytest.mark.parametrize("with_key", [False, True], ids=["alone", "with-key"])
@pytest.mark.parametrize(
    ("variable", "alternative"), TOP_LEVEL_NULLS.values(), ids=TOP_LEVEL_NULLS.keys()
)
def test_top_level_null_variable_rejected(
    variable: str,
    alternative: str,
    with_key: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, "null")
    if with_key:
        # The problem names only the null variable, because unsetting it is the fix.
        monkeypatch.setenv("APPLIANCE_LIMITS__MAX_CONNECTIONS", "5")

    problem = only_problem(config, secrets_dir)

    path = variable.removeprefix("APPLIANCE_").lower()
    assert problem.startswith(f"{path}: value 'null' (from env {variable}) is invalid")
    assert "null cannot replace a whole top-level field" in problem
    assert f"unset {variable}, or {alternative}" in problem


@pytest.mark.parametrize("with_key", [False, True], ids=["alone", "with-key"])
@pytest.mark.parametrize(
    ("name", "alternative"), TOP_LEVEL_NULLS.values(), ids=TOP_LEVEL_NULLS.keys()
)
def test_top_level_null_secret_rejected(
    name: str, alternative: str, with_key: bool, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / name
    secret.write_text("null\n")
    if with_key:
        # The problem names only the null file, because removing it is the fix.
        (secrets_dir / "APPLIANCE_LIMITS__MAX_CONNECTIONS").write_text("5")

    problem = only_problem(config, secrets_dir)

    path = name.removeprefix("APPLIANCE_").lower()
    assert problem.startswith(
        f"{path}: value null (from secret file {str(secret)!r}) is invalid"
    )
    assert "None" not in problem
    assert "null cannot replace a whole top-level field" in problem
    secret_alternative = alternative.replace("variables", "secret files")
    assert f"remove {name}, or {secret_alternative}" in problem


# A null below the top level, where validation rejects it, and the problem's start.
NESTED_NULLS = {
    "yaml entry": ("upstreams:\n  mail:\n", None, "upstreams.mail: value null: expected"),
    "yaml key": (
        "upstreams:\n  mail:\n    host: ~\n",
        None,
        "upstreams.mail.host: value null: Input should be a valid string",
    ),
    "variable entry": (
        UPSTREAM_YAML,
        ("APPLIANCE_UPSTREAMS__MAIL", "null"),
        "upstreams.mail: value null: expected",
    ),
    "key in variable json": (
        UPSTREAM_YAML,
        ("APPLIANCE_LIMITS", '{"connect_timeout": null}'),
        "limits.connect_timeout: value null: Input should be a valid number",
    ),
}


@pytest.mark.parametrize(
    ("text", "variable", "start"), NESTED_NULLS.values(), ids=NESTED_NULLS.keys()
)
def test_nested_null_spelt_null(
    text: str,
    variable: tuple[str, str] | None,
    start: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    path = write_config(tmp_path, text)
    if variable is not None:
        monkeypatch.setenv(*variable)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(start)
    assert "None" not in problem


# Variable or secret file that sets upstreams.mail to null, its text, and the fix.
NULL_ENTRIES = {
    "variable": (
        "env",
        "APPLIANCE_UPSTREAMS__MAIL",
        "null",
        "set APPLIANCE_UPSTREAMS__MAIL to a JSON object, or unset it and set each key "
        "with its own variable, such as APPLIANCE_UPSTREAMS__MAIL__HOST",
    ),
    "null in variable json": (
        "env",
        "APPLIANCE_UPSTREAMS",
        '{"mail": null}',
        "replace that value in the JSON of APPLIANCE_UPSTREAMS with a JSON object",
    ),
    "secret file": (
        "secret",
        "APPLIANCE_UPSTREAMS__MAIL",
        "null",
        "put a JSON object into APPLIANCE_UPSTREAMS__MAIL, or remove it and set each "
        "key with its own secret file, such as APPLIANCE_UPSTREAMS__MAIL__HOST",
    ),
}


@pytest.mark.parametrize(
    ("kind", "name", "text", "fix"), NULL_ENTRIES.values(), ids=NULL_ENTRIES.keys()
)
def test_null_entry_fix_fits_source(
    kind: str,
    name: str,
    text: str,
    fix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    if kind == "env":
        monkeypatch.setenv(name, text)
    else:
        (secrets_dir / name).write_text(text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(
        "upstreams.mail: value null: expected a JSON object of keys to values here"
    )
    assert problem.endswith(f"; {fix}")
    assert "YAML" not in problem


def test_non_object_secret_entry_hidden(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    (secrets_dir / "APPLIANCE_UPSTREAMS").write_text('{"mail": 5317}')

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail: expected a JSON object")
    assert "5317" not in problem


# Single-value fields, and a valid value for each.
SINGLE_VALUE_FIELDS = {
    "port": ("APPLIANCE_UPSTREAMS__MAIL__PORT", "1993"),
    "host": ("APPLIANCE_UPSTREAMS__MAIL__HOST", "mail.example.net"),
}


@pytest.mark.parametrize(
    ("name", "valid"), SINGLE_VALUE_FIELDS.values(), ids=SINGLE_VALUE_FIELDS.keys()
)
def test_single_value_null_variable_rejected(
    name: str,
    valid: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    monkeypatch.setenv(name, "null")

    problem = only_problem(path, secrets_dir)

    field = name.removeprefix("APPLIANCE_").lower().replace("__", ".")
    assert problem == (
        f"{field}: value null (from env {name}) is invalid, because a variable cannot "
        f"set a single value to null; unset {name}, so that a secret file, the config "
        "file or the default sets it"
    )


@pytest.mark.parametrize("spelling", ["Null", "NULL"])
def test_null_variable_any_case_rejected(
    spelling: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__SERVER_NAME", spelling)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.server_name: value null (from env")
    assert "cannot set a single value to null" in problem


@pytest.mark.parametrize("spelling", ["Null", "NULL"])
def test_null_secret_any_case_rejected(
    spelling: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    (secrets_dir / "APPLIANCE_UPSTREAMS__MAIL__PORT").write_text(spelling)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.port: secret file")
    assert "cannot set a single value to null" in problem


@pytest.mark.parametrize(
    ("name", "valid"), SINGLE_VALUE_FIELDS.values(), ids=SINGLE_VALUE_FIELDS.keys()
)
def test_single_value_null_secret_rejected(
    name: str, valid: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    secret = secrets_dir / name
    secret.write_text("null\n")

    problem = only_problem(path, secrets_dir)

    field = name.removeprefix("APPLIANCE_").lower().replace("__", ".")
    assert problem == (
        f"{field}: secret file {str(secret)!r} contains null, which is invalid, "
        "because a secret file cannot set a single value to null; remove "
        f"{name}, so that the config file or the default sets it"
    )


@pytest.mark.parametrize(
    ("name", "valid"), SINGLE_VALUE_FIELDS.values(), ids=SINGLE_VALUE_FIELDS.keys()
)
def test_single_value_text_variable_loads(
    name: str,
    valid: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    # The check rejects only null, so valid values of the same fields still load.
    path = write_config(tmp_path, UPSTREAM_YAML)
    monkeypatch.setenv(name, valid)

    loaded = load_config(path, secrets_dir=secrets_dir, require_listeners=False)

    key = name.rsplit("__", 1)[1].lower()
    assert str(getattr(loaded.config.upstreams["mail"], key)) == valid


def test_unknown_secret_key_names_file(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML)
    secret = secrets_dir / "APPLIANCE_UPSTREAMS__MAIL__HOSTT"
    secret.write_text("mail.example.org")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.hostt: unknown key")
    assert f"(from secret file {str(secret)!r})" in problem


# Secret files that cannot be used


def test_non_utf8_secret_named(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / "APPLIANCE_LIMITS__MAX_CONNECTIONS"
    secret.write_bytes(b"\xff\xfe")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("limits.max_connections: secret file ")
    assert f"{str(secret)!r} is not UTF-8 text (byte 0xff at offset 0)" in problem
    assert "save the value as UTF-8 text" in problem


def test_unreadable_secret_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # Tests may run as root, who can read a file of mode 000, so the read fails here.
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / "APPLIANCE_LIMITS__MAX_CONNECTIONS"
    secret.write_text("5")
    real_read_regular = config_settings.read_regular

    def read_regular(path: Path, max_size: int | None = None) -> bytes:
        if path == secret:
            raise PermissionError(13, "Permission denied")
        return real_read_regular(path, max_size)

    monkeypatch.setattr(config_settings, "read_regular", read_regular)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        f"limits.max_connections: secret file {str(secret)!r} could not be read "
        "(Permission denied)"
    )


def make_directory(path: Path) -> None:
    path.mkdir()


def make_symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


def make_dangling_symlink(path: Path) -> None:
    path.symlink_to(path.with_name("missing"))


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


# How to make an entry of the secrets folder that is no usable file, and the problem.
UNUSABLE_SECRET_ENTRIES = {
    "directory": (make_directory, "is a directory, not a file"),
    "symlink loop": (make_symlink_loop, "is a symbolic link loop"),
    "dangling symlink": (
        make_dangling_symlink,
        "is a symbolic link to {target!r}, which does not exist",
    ),
    "fifo": (make_fifo, "is not a regular file but a FIFO"),
}


@pytest.mark.parametrize(
    ("make", "expected"),
    UNUSABLE_SECRET_ENTRIES.values(),
    ids=UNUSABLE_SECRET_ENTRIES.keys(),
)
def test_unusable_secret_entry_named(
    make: Any, expected: str, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    entry = secrets_dir / "APPLIANCE_LOGGING__LEVEL"
    make(entry)

    problem = only_problem(config, secrets_dir)

    target = str(secrets_dir / "missing")
    assert problem.startswith(
        f"logging.level: secret file {str(entry)!r} "
        + expected.format(target=target)
    )
    assert "remove it" in problem


def test_non_utf8_secret_name_named(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, listener_yaml())
    (secrets_dir / "APPLIANCE_LOGGING__LEV\udce9L").write_text("debug")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        f"secret file '{secrets_dir}/APPLIANCE_LOGGING__LEV\\xe9L': the name is not "
        "UTF-8 (byte 0xe9 at offset 22)"
    )
    assert "debug" not in problem


def test_unlistable_secrets_folder_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # Tests may run as root, who can list a folder of mode 000, so the listing fails here.
    config = write_config(tmp_path, listener_yaml())
    real_iterdir = Path.iterdir

    def iterdir(path: Path) -> Any:
        if path == secrets_dir:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        f"secrets folder {str(secrets_dir)!r} could not be listed (Permission denied)"
    )


@pytest.mark.parametrize(
    ("name", "value", "path", "list_name"),
    [
        (
            "APPLIANCE_KNOWN_SERVERS__0__PORT",
            "993",
            "known_servers.0.port",
            "APPLIANCE_KNOWN_SERVERS",
        ),
        (
            "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS__0",
            "10.0.0.0/8",
            "listeners.imap.proxy_protocol.trusted_networks.0",
            "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
        ),
    ],
)
def test_list_item_secret_rejected(
    name: str,
    value: str,
    path: str,
    list_name: str,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / name
    secret.write_text(value)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        f"{path}: secret file {str(secret)!r} sets a value inside the list"
    )
    assert "list items have no secret files of their own" in problem
    assert f"set the whole list as JSON in {list_name}" in problem
    assert value not in problem


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
            "192.0.2.0/24\n",
        ),
        ("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL", "accept: true\n"),
    ],
)
def test_non_json_secret_named_without_value(
    name: str, text: str, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / name
    secret.write_text(text)

    problem = only_problem(config, secrets_dir)

    path = name.removeprefix("APPLIANCE_").lower().replace("__", ".")
    assert problem.startswith(
        f"{path}: the value (from secret file {str(secret)!r}) is not valid"
    )
    assert text.strip() not in problem


def test_non_json_secret_list_fix_given(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, listener_yaml())
    name = "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS"
    (secrets_dir / name).write_text("192.0.2.0/24")

    problem = only_problem(config, secrets_dir)

    assert problem.endswith(
        "this field is a list, so give a JSON list, such as "
        """'["10.0.0.0/8", "2001:db8::/48"]'"""
    )


def test_repeated_key_in_secret_json_named(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / "APPLIANCE_LIMITS"
    secret.write_text('{"max_connections": 5, "max_connections": 6}')

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        "limits: key 'max_connections' repeats an earlier key in the same JSON object "
        f"(from secret file {str(secret)!r})"
    )


# Listener references


def test_unknown_upstream_reference_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(upstream="nope"))

    problem = only_problem(path, secrets_dir)

    assert "listeners.imap.upstream" in problem
    assert "'nope'" in problem
    assert "expected one of: mail" in problem


def test_missing_upstream_reference_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(upstream=None))

    problem = only_problem(path, secrets_dir)

    assert "listeners.imap.upstream is missing" in problem
    assert "(mail)" in problem


def test_reference_without_upstreams_named(tmp_path: Path, secrets_dir: Path) -> None:
    text = "listeners:\n  imap: {protocol: imap, port: 1143, upstream: mail}\n"
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert "listeners.imap.upstream" in problem
    assert "none configured" in problem


# Listener TLS files


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_tls_listener_without_files_named(
    tls: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, listener_yaml(tls=tls))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap:")
    assert f"tls is '{tls}'" in problem
    assert "cert_file and key_file are required" in problem


def test_tls_listener_without_key_named(
    tmp_path: Path, secrets_dir: Path, pem_pair: tuple[Path, Path]
) -> None:
    cert_file, _ = pem_pair
    path = write_config(
        tmp_path, listener_yaml(tls="implicit", cert_file=str(cert_file))
    )

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap:")
    assert "key_file" in problem


def test_missing_cert_file_named(
    tmp_path: Path, secrets_dir: Path, pem_pair: tuple[Path, Path]
) -> None:
    _, key_file = pem_pair
    missing = tmp_path / "missing.pem"
    text = listener_yaml(tls="implicit", cert_file=str(missing), key_file=str(key_file))
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.cert_file:")
    assert repr(str(missing)) in problem
    assert "does not exist" in problem


def test_cert_file_folder_named(
    tmp_path: Path, secrets_dir: Path, pem_pair: tuple[Path, Path]
) -> None:
    _, key_file = pem_pair
    text = listener_yaml(
        tls="implicit", cert_file=str(tmp_path), key_file=str(key_file)
    )
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.cert_file:")
    assert repr(str(tmp_path)) in problem
    assert "is a directory, not a regular file" in problem
    assert "set the path of the PEM file inside it" in problem


def test_unreadable_cert_file_named(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
    pem_pair: tuple[Path, Path],
) -> None:
    cert_file, key_file = pem_pair
    real_access = os.access

    # The root user reads every file, so a mode of 000 proves nothing there.
    def access_denied_for_cert(path: object, mode: int, **kwargs: object) -> bool:
        if Path(str(path)) == cert_file:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access_denied_for_cert)
    text = listener_yaml(
        tls="implicit", cert_file=str(cert_file), key_file=str(key_file)
    )
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.cert_file:")
    assert repr(str(cert_file)) in problem
    assert "not readable" in problem
    assert "give the user that runs the appliance read access" in problem


@pytest.mark.skipif(os.geteuid() == 0, reason="the root user reads files of mode 000")
def test_mode_000_cert_file_named(
    tmp_path: Path, secrets_dir: Path, pem_pair: tuple[Path, Path]
) -> None:
    cert_file, key_file = pem_pair
    cert_file.chmod(0)
    text = listener_yaml(
        tls="implicit", cert_file=str(cert_file), key_file=str(key_file)
    )
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.cert_file:")
    assert "not readable" in problem


# Listener addresses and ports


@pytest.mark.parametrize(
    ("first_bind", "second_bind"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", "0.0.0.0"),
        ("::", "::1"),
        ("::1", "::1"),
    ],
)
def test_shared_address_and_port_named(
    first_bind: str, second_bind: str, tmp_path: Path, secrets_dir: Path
) -> None:
    text = f"""\
listeners:
  first: {{protocol: imap, bind: '{first_bind}', port: 1143, upstream: mail,
          allow_plaintext_login: true}}
  second: {{protocol: pop3, bind: '{second_bind}', port: 1143, upstream: mail,
           allow_plaintext_login: true}}
{UPSTREAM_YAML}"""
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert "listeners.first" in problem
    assert "listeners.second" in problem
    assert "port 1143" in problem
    assert second_bind in problem


def test_shared_port_names_both_addresses(tmp_path: Path, secrets_dir: Path) -> None:
    text = f"""\
listeners:
  first: {{protocol: imap, bind: 0.0.0.0, port: 1143, upstream: mail,
          allow_plaintext_login: true}}
  second: {{protocol: pop3, bind: 127.0.0.1, port: 1143, upstream: mail}}
{UPSTREAM_YAML}"""
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert "0.0.0.0" in problem
    assert "127.0.0.1" in problem


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_listener_port_out_of_range_named(
    port: int, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, listener_yaml(port=port))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.port:")
    assert f"value {port}:" in problem
    assert f"file {path}" in problem


def test_listener_port_text_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(port="imap"))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.port:")
    assert "value 'imap'" in problem


def test_env_port_out_of_range_names_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PORT", "99999")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.port:")
    assert "value '99999'" in problem
    assert "env APPLIANCE_LISTENERS__IMAP__PORT" in problem


def test_upstream_port_out_of_range_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML + "    port: 65536\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.port:")
    assert "value 65536" in problem


# Booleans in numeric fields

# Entry names used for paths under maps, matching listener_yaml().
ENTRY_NAMES = {"listeners": "imap", "upstreams": "mail"}


def numeric_paths(
    node: dict[str, Any], definitions: dict[str, Any], path: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Return the path of every integer or number field below a JSON Schema node."""
    if "$ref" in node:
        node = definitions[node["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in node:
        paths = []
        for option in node["anyOf"]:
            paths += numeric_paths(option, definitions, path)
        return paths
    kind = node.get("type")
    if kind in ("integer", "number"):
        return [path]
    if kind == "array" and isinstance(node.get("items"), dict):
        return numeric_paths(node["items"], definitions, (*path, "0"))
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        entry = (*path, ENTRY_NAMES[path[-1]])
        return numeric_paths(node["additionalProperties"], definitions, entry)
    paths = []
    for key, field in node.get("properties", {}).items():
        paths += numeric_paths(field, definitions, (*path, key))
    return paths


SCHEMA = AppConfig.model_json_schema(by_alias=True)
NUMERIC_PATHS = numeric_paths(SCHEMA, SCHEMA["$defs"])


def config_with(path: tuple[str, ...], value: object) -> str:
    """Return a valid config, with a known_servers entry, and `value` set at `path`."""
    document = yaml.safe_load(listener_yaml())
    document["known_servers"] = [{"host": "mail.example.org", "mode": "implicit"}]
    section = document
    for key in path[:-1]:
        section = section[int(key)] if key.isdigit() else section.setdefault(key, {})
    section[path[-1]] = value
    return yaml.safe_dump(document)


def test_numeric_paths_cover_every_section() -> None:
    sections = {path[0] for path in NUMERIC_PATHS}

    assert len(NUMERIC_PATHS) >= 21
    assert ("limits", "connect_timeout") in NUMERIC_PATHS
    assert ("listeners", "imap", "proxy_protocol", "timeout") in NUMERIC_PATHS
    assert ("known_servers", "0", "port") in NUMERIC_PATHS
    assert sections == {
        "listeners",
        "upstreams",
        "known_servers",
        "tls_auto",
        "limits",
        "admin",
    }


@pytest.mark.parametrize("path", NUMERIC_PATHS, ids=".".join)
@pytest.mark.parametrize("value", [True, False])
def test_boolean_number_rejected(
    path: tuple[str, ...], value: bool, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, config_with(path, value))

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(".".join(path) + ": value ")
    assert (
        f"value {str(value).lower()} is a boolean, but a number is expected" in problem
    )
    assert f"(from file {config})" in problem


def test_yaml_yes_for_number_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(
        tmp_path, listener_yaml() + "limits:\n  connect_timeout: yes\n"
    )

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("limits.connect_timeout: value true is a boolean")


def test_yaml_yes_for_boolean_accepted(tmp_path: Path, secrets_dir: Path) -> None:
    text = (
        "listeners:\n"
        "  imap: {protocol: imap, port: 1143, upstream: mail, allow_plaintext_login: yes}\n"
        "upstreams:\n"
        "  mail: {host: mail.example.org}\n"
        "logging: {json: on}\n"
        "tls_auto: {persist_known_servers: no}\n"
    )
    config = write_config(tmp_path, text)

    loaded = load_config(config, secrets_dir=secrets_dir)

    assert loaded.config.listeners["imap"].allow_plaintext_login is True
    assert loaded.config.logging.json_output is True
    assert loaded.config.tls_auto.persist_known_servers is False


def test_env_json_boolean_number_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LIMITS", '{"max_connections": true}')

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("limits.max_connections: value true is a boolean")
    assert "(from env APPLIANCE_LIMITS)" in problem


ENV_NUMBERS = {
    "APPLIANCE_LIMITS__CONNECT_TIMEOUT": ("1.5", ("limits", "connect_timeout"), 1.5),
    "APPLIANCE_LIMITS__MAX_CONNECTIONS": ("30", ("limits", "max_connections"), 30),
    "APPLIANCE_LIMITS__DRAIN_REMOVED_LISTENERS_AFTER": (
        "30",
        ("limits", "drain_removed_listeners_after"),
        30.0,
    ),
    "APPLIANCE_TLS_AUTO__MAX_RECORD_AGE": (
        "3600",
        ("tls_auto", "max_record_age"),
        3600.0,
    ),
    "APPLIANCE_UPSTREAMS__MAIL__PORT": ("993", ("upstreams", "mail", "port"), 993),
}


@pytest.mark.parametrize(
    ("variable", "text", "path", "expected"),
    [(variable, *case) for variable, case in ENV_NUMBERS.items()],
    ids=ENV_NUMBERS.keys(),
)
def test_env_number_text_accepted(
    variable: str,
    text: str,
    path: tuple[str, ...],
    expected: float,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(variable, text)

    value: object = load_config(config, secrets_dir=secrets_dir).config
    for key in path:
        value = value[key] if isinstance(value, dict) else getattr(value, key)

    assert value == expected


def test_env_true_for_number_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LIMITS__CONNECT_TIMEOUT", "true")

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("limits.connect_timeout: value 'true'")


def test_invalid_bind_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(bind="localhost"))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.bind:")
    assert "'localhost'" in problem


# Every duration field, by its path, with its upper bound in seconds.
DURATION_BOUNDS = [
    (("limits", "connect_timeout"), 3600),
    (("limits", "pre_auth_timeout"), 3600),
    (("limits", "idle_timeout"), 86400),
    (("limits", "auth_failure_delay"), 3600),
    (("limits", "auth_failure_delay_max"), 3600),
    (("limits", "auth_failure_reset_after"), 86400),
    (("limits", "shutdown_grace_period"), 86400),
    (("limits", "drain_removed_listeners_after"), 604800),
    (("tls_auto", "probe_timeout"), 3600),
    (("tls_auto", "max_record_age"), 2592000),
    (("listeners", "imap", "proxy_protocol", "timeout"), 3600),
]


def duration_yaml(path: tuple[str, ...], value: float) -> str:
    """Return a valid config with the duration at `path` set to `value`."""
    document = yaml.safe_load(listener_yaml())
    section = document
    for key in path[:-1]:
        section = section.setdefault(key, {})
    section[path[-1]] = value
    if path[-1] == "auth_failure_delay":
        # The delay may not exceed its own maximum, so raise that to its bound.
        section["auth_failure_delay_max"] = 3600
    return yaml.safe_dump(document)


@pytest.mark.parametrize(("path", "maximum"), DURATION_BOUNDS)
@pytest.mark.parametrize("value", [float("inf"), 1e308])
def test_unbounded_duration_rejected(
    path: tuple[str, ...],
    maximum: int,
    value: float,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, duration_yaml(path, value))

    problems = problems_for(config, secrets_dir)

    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith(".".join(path) + ": value ")
    assert f"value {value!r}:" in problem
    assert f"less than or equal to {maximum}" in problem
    assert f"(from file {config})" in problem


@pytest.mark.parametrize(("path", "maximum"), DURATION_BOUNDS)
def test_nan_duration_named(
    path: tuple[str, ...], maximum: int, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, duration_yaml(path, float("nan")))

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(".".join(path) + ": value nan is not a number (NaN)")
    assert "less than" not in problem
    assert "greater than" not in problem
    assert f"(from file {config})" in problem


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan"])
def test_nan_env_duration_named(
    text: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LIMITS__CONNECT_TIMEOUT", text)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"limits.connect_timeout: value {text!r} is not a number")
    assert "(from env APPLIANCE_LIMITS__CONNECT_TIMEOUT)" in problem


@pytest.mark.parametrize("value", [0.5, 59, 59.9])
def test_short_max_record_age_rejected(
    value: float, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(
        tmp_path, duration_yaml(("tls_auto", "max_record_age"), value)
    )

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"tls_auto.max_record_age: value {value!r}:")
    assert "greater than or equal to 60" in problem


def test_max_record_age_minimum_loads(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, duration_yaml(("tls_auto", "max_record_age"), 60))

    loaded = load_config(config, secrets_dir=secrets_dir)

    assert loaded.config.tls_auto.max_record_age == 60


@pytest.mark.parametrize(("path", "maximum"), DURATION_BOUNDS)
def test_duration_at_bound_loads(
    path: tuple[str, ...], maximum: int, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, duration_yaml(path, maximum))

    value: object = load_config(config, secrets_dir=secrets_dir).config
    for key in path:
        value = value[key] if isinstance(value, dict) else getattr(value, key)

    assert value == maximum


# Address of a plain-text listener, and the loopback address its error suggests.
NETWORK_BINDS = {
    "0.0.0.0": "127.0.0.1",
    "192.0.2.5": "127.0.0.1",
    "::": "::1",
    "2001:db8::5": "::1",
}


@pytest.mark.parametrize(("bind", "loopback"), NETWORK_BINDS.items())
def test_plaintext_on_network_address_named(
    bind: str, loopback: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, listener_yaml(bind=bind))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap:")
    assert f"'{bind}'" in problem
    assert f"bind to {loopback}," in problem
    assert "allow_plaintext_login: true" in problem


def test_listener_problem_names_key_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # No variable sets listeners.imap itself, so the one for a key inside it is named.
    path = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__BIND", "0.0.0.0")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap:")
    assert problem.endswith("(from env APPLIANCE_LISTENERS__IMAP__BIND)")


def test_section_problem_names_key_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT", "true")
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__REQUIRED", "false")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.proxy_protocol: accept is true")
    assert problem.endswith(
        "(from env APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__ACCEPT and "
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__REQUIRED)"
    )


def test_listener_problem_names_key_secret_file(
    tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / "APPLIANCE_LISTENERS__IMAP__BIND"
    secret.write_text("0.0.0.0\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap:")
    assert problem.endswith(f"(from secret file {str(secret)!r})")


def test_invalid_tls_mode_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(tls="ssl"))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("listeners.imap.tls:")
    assert "value 'ssl'" in problem


# Unquoted words land in the fields of this config as written, so PyYAML reads yes, no,
# on and off as booleans.
FLOW_YAML = """\
listeners:
  imap: {{protocol: {protocol}, port: 1143, upstream: {upstream}, tls: {tls}}}
upstreams:
  mail: {{host: mail.example.org, tls: {upstream_tls}}}
"""
FLOW_DEFAULTS = {
    "protocol": "imap",
    "upstream": "mail",
    "tls": "none",
    "upstream_tls": "auto",
}

# Field path, the words put into FLOW_YAML, whether the hint suggests `none`.
YAML_BOOLEAN_CHOICES = {
    "listener tls no": ("listeners.imap.tls", {"tls": "no"}, True),
    "listener tls off": ("listeners.imap.tls", {"tls": "off"}, True),
    "listener tls yes": ("listeners.imap.tls", {"tls": "yes"}, False),
    "protocol on": ("listeners.imap.protocol", {"protocol": "on"}, False),
    "upstream tls false": ("upstreams.mail.tls", {"upstream_tls": "false"}, True),
}


@pytest.mark.parametrize(
    ("path", "words", "suggests_none"),
    YAML_BOOLEAN_CHOICES.values(),
    ids=YAML_BOOLEAN_CHOICES.keys(),
)
def test_yaml_boolean_choice_hinted(
    path: str,
    words: dict[str, str],
    suggests_none: bool,
    tmp_path: Path,
    secrets_dir: Path,
) -> None:
    config = write_config(tmp_path, FLOW_YAML.format(**{**FLOW_DEFAULTS, **words}))

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(f"{path}: value ")
    assert "Input should be" in problem
    assert (
        "; YAML reads unquoted yes, no, on, off, true and false as booleans, so quote "
        "the value or spell it as one of the allowed values"
    ) in problem
    key = path.rsplit(".", 1)[1]
    assert problem.endswith(f", such as {key}: none") is suggests_none


def test_yaml_boolean_text_hinted(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(
        tmp_path, FLOW_YAML.format(**{**FLOW_DEFAULTS, "upstream": "no"})
    )

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("listeners.imap.upstream: value False: Input should be")
    assert problem.endswith(
        "; YAML reads unquoted yes, no, on, off, true and false as booleans, so put the "
        "value of upstream in quotes"
    )


def test_text_choice_not_hinted(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, listener_yaml(tls="ssl"))

    problem = only_problem(config, secrets_dir)

    assert "YAML reads" not in problem


# Upstreams


def test_missing_ca_file_named(tmp_path: Path, secrets_dir: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    path = write_config(tmp_path, UPSTREAM_YAML + f"    ca_file: {missing}\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.ca_file:")
    assert repr(str(missing)) in problem
    assert "does not exist" in problem


def test_client_cert_without_key_named(
    tmp_path: Path, secrets_dir: Path, pem_pair: tuple[Path, Path]
) -> None:
    cert_file, _ = pem_pair
    path = write_config(
        tmp_path, UPSTREAM_YAML + f"    client_cert_file: {cert_file}\n"
    )

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail:")
    assert "client_key_file" in problem


@pytest.mark.parametrize(
    "host",
    ["bad host!", "-bad.example", "bad-.example", "a..example", "mail_server.example"],
)
def test_invalid_host_named(host: str, tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(
        tmp_path, yaml.safe_dump({"upstreams": {"mail": {"host": host}}})
    )

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.host:")
    assert repr(host) in problem
    assert "mail.example.org" in problem


def test_invalid_server_name_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML + "    server_name: 'not a name'\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("upstreams.mail.server_name:")
    assert "'not a name'" in problem


def test_invalid_known_server_host_named(tmp_path: Path, secrets_dir: Path) -> None:
    text = "known_servers:\n  - {host: 'bad host', mode: implicit}\n"
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("known_servers.0.host:")
    assert "'bad host'" in problem


def test_conflicting_known_servers_named(tmp_path: Path, secrets_dir: Path) -> None:
    text = (
        "known_servers:\n"
        "  - {host: mail.example.org, protocol: imap, mode: none}\n"
        "  - {host: Mail.Example.org, mode: implicit}\n"
    )
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("known_servers:")
    assert "entries 0 and 1" in problem
    assert "as none and implicit" in problem
    assert "keep one of them" in problem


@pytest.mark.parametrize(
    "entries",
    [
        "[{host: a.example, protocol: imap, mode: none},"
        " {host: a.example, protocol: pop3, mode: implicit}]",
        "[{host: a.example, port: 1143, mode: none},"
        " {host: a.example, port: 1993, mode: implicit}]",
        "[{host: a.example, mode: implicit}, {host: b.example, mode: none}]",
    ],
    ids=["protocols", "ports", "hosts"],
)
def test_separate_known_servers_accepted(
    tmp_path: Path, secrets_dir: Path, entries: str
) -> None:
    path = write_config(tmp_path, listener_yaml() + f"known_servers: {entries}\n")

    config = load_config(path, secrets_dir=secrets_dir).config

    assert len(config.known_servers) == 2


def test_short_idle_timeout_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, "limits:\n  idle_timeout: 60\n")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith("limits.idle_timeout:")
    assert "value 60" in problem


def test_invalid_env_boolean_names_variable(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LOGGING__JSON", "maybe")

    problem = only_problem(None, secrets_dir)

    assert problem.startswith("logging.json:")
    assert "'maybe'" in problem
    assert "env APPLIANCE_LOGGING__JSON" in problem


def test_every_problem_listed(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, listener_yaml(port=0, colour="red"))

    problems = problems_for(path, secrets_dir)

    assert len(problems) == 2
    assert any(p.startswith("listeners.imap.port:") for p in problems)
    assert any(p.startswith("listeners.imap.colour:") for p in problems)


# Files that cannot be parsed


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("appliance.yaml", "listeners: [unclosed\n", "line 2"),
        ("appliance.yaml", "listeners:\n\t- imap\n", "line 2"),
        ("appliance.yaml", "logging:\n  level: info\n level: debug\n", "line 3"),
        ("appliance.toml", "[upstreams.mail\nhost = 1\n", "line 1"),
        ("appliance.json", '{"upstreams": {"mail": {}}', "line 1"),
    ],
)
def test_unparsable_file_named(
    name: str, text: str, line: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, text, name)

    problem = only_problem(path, secrets_dir)

    assert repr(str(path)) in problem
    assert "could not be parsed" in problem
    assert line in problem



def test_unreadable_config_file_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, "logging:\n  level: info\n")
    real_read_regular = config_loader.read_regular

    # The root user reads every file, so a mode of 000 proves nothing there.
    def read_denied(file: Path, *args: Any) -> bytes:
        if file == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_read_regular(file, *args)

    monkeypatch.setattr(config_loader, "read_regular", read_denied)

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"config file {str(path)!r} could not be read")
    assert "(permission denied)" in problem
    assert f"(uid {os.getuid()}) read access" in problem


# Seconds a config load may take before the test counts it as blocked.
BLOCKED_AFTER = 10.0


def problems_without_blocking(
    path: Path, secrets_dir: Path, fifo: Path
) -> list[str] | None:
    """Return the problems of loading `path`, or None when the load blocked on `fifo`."""
    problems: list[str] = []

    def load() -> None:
        try:
            load_config(path, secrets_dir=secrets_dir)
        except ConfigError as exc:
            problems.extend(exc.problems)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(BLOCKED_AFTER)
    if not worker.is_alive():
        return problems
    # Opening and closing the write end ends a blocked open() or read() of the FIFO.
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    worker.join(BLOCKED_AFTER)
    return None


@pytest.mark.parametrize("name", ["appliance.yaml", "appliance.toml", "appliance.json"])
def test_config_file_fifo_rejected(name: str, tmp_path: Path, secrets_dir: Path) -> None:
    path = tmp_path / name
    os.mkfifo(path)

    problems = problems_without_blocking(path, secrets_dir, path)

    assert problems is not None, "the config load blocked on the FIFO"
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"config file {str(path)!r} could not be read (not a regular file but a FIFO)"
    )
    assert "to a regular file" in problems[0]


def test_secret_fifo_after_type_check_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    # The entry's type is checked before it is read, so a FIFO can replace it between.
    monkeypatch.setattr(config_settings, "_entry_type_problem", lambda entry, path: None)
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / "APPLIANCE_LOGGING__LEVEL"
    os.mkfifo(secret)

    problems = problems_without_blocking(config, secrets_dir, secret)

    assert problems is not None, "the config load blocked on the FIFO"
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"logging.level: secret file {str(secret)!r} could not be read (not a "
        "regular file but a FIFO)"
    )


def test_oversized_config_file_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    path = tmp_path / "appliance.yaml"
    with path.open("wb") as stream:
        stream.truncate(MAX_CONFIG_FILE_SIZE + 1)

    problem = only_problem(path, secrets_dir)

    assert problem == (
        f"config file {str(path)!r} could not be read ({MAX_CONFIG_FILE_SIZE + 1} bytes, "
        f"more than the limit of {MAX_CONFIG_FILE_SIZE} bytes); check that --config or "
        "APPLIANCE_CONFIG names the config file"
    )


def test_oversized_secret_file_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    config = write_config(tmp_path, listener_yaml())
    secret = secrets_dir / "APPLIANCE_LOGGING__LEVEL"
    with secret.open("wb") as stream:
        stream.truncate(MAX_SECRET_FILE_SIZE + 1)

    problem = only_problem(config, secrets_dir)

    assert problem.startswith(
        f"logging.level: secret file {str(secret)!r} could not be read "
        f"({MAX_SECRET_FILE_SIZE + 1} bytes, more than the limit of "
        f"{MAX_SECRET_FILE_SIZE} bytes)"
    )


def test_config_path_directory_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = tmp_path / "appliance.yaml"
    path.mkdir()

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"config file {str(path)!r} could not be read")
    assert "is a directory" in problem
    assert "the file inside it" in problem


# Byte order mark, the codec of the text after it, and the encoding the error names.
WIDE_ENCODINGS = {
    "UTF-16 LE": (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    "UTF-16 BE": (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
    "UTF-32 LE": (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
}


@pytest.mark.parametrize("name", ["appliance.yaml", "appliance.toml", "appliance.json"])
@pytest.mark.parametrize(
    ("mark", "codec", "label"), WIDE_ENCODINGS.values(), ids=WIDE_ENCODINGS.keys()
)
def test_utf16_file_named(
    name: str, mark: bytes, codec: str, label: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / name
    path.write_bytes(mark + '{"logging": {"level": "info"}}\n'.encode(codec))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"config file {str(path)!r} is {label} text")
    assert f"starts with a {label} byte order mark" in problem
    assert "save it as UTF-8" in problem


def test_repeated_json_key_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    text = (
        '{"listeners": {'
        '"imap": {"protocol": "imap", "port": 1143, "upstream": "mail"}, '
        '"imap": {"protocol": "imap", "port": 1144, "upstream": "mail"}}, '
        '"upstreams": {"mail": {"host": "mail.example.org"}}}'
    )
    path = write_config(tmp_path, text, "appliance.json")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"config file {str(path)!r} could not be parsed")
    assert "key 'imap' repeats an earlier key in the same object" in problem


# TOML text that sets a key twice, the full key, and the line of the second setting.
REPEATED_TOML_KEYS = {
    "key in table": (
        '[upstreams.mail]\nhost = "a.example"\nport = 993\nhost = "b.example"\n',
        "upstreams.mail.host",
        4,
    ),
    "table header": (
        '[upstreams.mail]\nhost = "a.example"\n\n[upstreams.mail]\nport = 993\n',
        "upstreams.mail",
        4,
    ),
    "dotted key": (
        "[listeners.imap]\nproxy_protocol.accept = true\nproxy_protocol.accept = false\n",
        "listeners.imap.proxy_protocol.accept",
        3,
    ),
    "multi-line array": (
        "[listeners.imap]\n"
        'proxy_protocol.trusted_networks = ["10.0.0.0/8"]\n'
        "proxy_protocol.trusted_networks = [\n"
        '  "192.0.2.0/24",\n'
        "]\n",
        "listeners.imap.proxy_protocol.trusted_networks",
        3,
    ),
    "array of tables": (
        '[[known_servers]]\nhost = "a.example"\nmode = "none"\nhost = "b.example"\n',
        "known_servers.0.host",
        4,
    ),
    "key under value": (
        'state_dir = "/var/lib/appliance"\nstate_dir.path = "/tmp"\n',
        "state_dir",
        2,
    ),
    "quoted key with equals sign": (
        '[upstreams]\n"a=b".host = "a.example"\n"a=b".host = "b.example"\n',
        "upstreams.a=b.host",
        3,
    ),
}


@pytest.mark.parametrize(
    ("text", "key", "line"), REPEATED_TOML_KEYS.values(), ids=REPEATED_TOML_KEYS.keys()
)
def test_repeated_toml_key_named(
    text: str, key: str, line: int, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, text, "appliance.toml")

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"config file {str(path)!r} could not be parsed: ")
    assert f"key {key!r} on line {line} repeats a key set earlier" in problem
    assert "merge the two entries or rename one" in problem


def test_repeated_inline_toml_key_fix_given(tmp_path: Path, secrets_dir: Path) -> None:
    text = 'upstreams.mail = {host = "a.example", host = "b.example"}\n'
    path = write_config(tmp_path, text, "appliance.toml")

    problem = only_problem(path, secrets_dir)

    assert "Duplicate inline table key 'host'" in problem
    assert "merge the two entries or rename one" in problem


def with_extra_entry(section: str, name: str) -> str:
    """Return `listener_yaml()` with a copy of the section's entry under `name`."""
    document = yaml.safe_load(listener_yaml())
    entries = document[section]
    entries[name] = next(iter(entries.values()))
    return yaml.safe_dump(document)


@pytest.mark.parametrize(
    ("section", "name"), [("listeners", "IMAP"), ("upstreams", "MAIL")]
)
def test_names_differing_in_case_rejected(
    section: str, name: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, with_extra_entry(section, name))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"{section}: names ")
    assert "differ only in letter case; rename one" in problem
    assert f"(from file {path})" in problem


def test_variables_differing_in_case_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PORT", "2143")
    monkeypatch.setenv("APPLIANCE_LISTENERS__imap__PORT", "2144")
    path = write_config(tmp_path, listener_yaml())

    problem = only_problem(path, secrets_dir)

    assert (
        "APPLIANCE_LISTENERS__IMAP__PORT and APPLIANCE_LISTENERS__imap__PORT" in problem
    )
    assert "differ only in letter case" in problem
    assert "unset one of them" in problem


@pytest.mark.parametrize(
    ("section", "name"), [("listeners", "imap__x"), ("upstreams", "mail__x")]
)
def test_name_with_double_underscore_rejected(
    section: str, name: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, with_extra_entry(section, name))

    problem = only_problem(path, secrets_dir)

    assert problem.startswith(f"{section}: name ")
    assert "'__' separates the levels of APPLIANCE_* variables" in problem


def test_unknown_extension_lists_supported(tmp_path: Path, secrets_dir: Path) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML, "appliance.ini")

    problem = only_problem(path, secrets_dir)

    assert repr(str(path)) in problem
    assert "expected .yaml, .yml, .toml or .json" in problem


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("appliance.yaml", "- imap\n"),
        ("appliance.yaml", "42\n"),
        ("appliance.yaml", "just text\n"),
        ("appliance.json", "[1, 2]"),
        ("appliance.json", "null"),
    ],
)
def test_non_mapping_file_named(
    name: str, text: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, text, name)

    problem = only_problem(path, secrets_dir)

    assert "must contain a mapping at the top level" in problem


def test_unparsable_env_json_names_variable(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    monkeypatch.setenv("APPLIANCE_LISTENERS", "not json")

    problem = only_problem(None, secrets_dir)

    assert "APPLIANCE_LISTENERS" in problem


# Fuzzing: any mapping in the file either loads or raises ConfigError, nothing else.

KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=70000),
    st.floats(allow_nan=False),
    st.sampled_from(["imap", "pop3", "implicit", "none", "0.0.0.0", "mail", ""]),
    st.text(max_size=10),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(KEYS, children, max_size=4),
    ),
    max_leaves=15,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=st.dictionaries(KEYS, VALUES, max_size=5))
def test_any_mapping_loads_or_fails_cleanly(
    document: dict[str, object], tmp_path: Path, secrets_dir: Path
) -> None:
    # Every example overwrites the same file, so sharing tmp_path is safe.
    path = write_config(tmp_path, yaml.safe_dump(document))

    try:
        load_config(path, secrets_dir=secrets_dir)
    except ConfigError as exc:
        assert exc.problems


def test_repeated_yaml_key_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    text = (
        "listeners:\n"
        "  imap: {protocol: imap, port: 1143, upstream: mail}\n"
        "  imap: {protocol: imap, port: 1144, upstream: mail}\n"
        "upstreams:\n"
        "  mail: {host: mail.example.org}\n"
    )
    path = write_config(tmp_path, text)

    problem = only_problem(path, secrets_dir)

    assert "key 'imap' on line 3 repeats the key on line 2" in problem
    assert f'in "{path}", line 3' in problem


def test_unknown_extension_named(tmp_path: Path, secrets_dir: Path) -> None:
    path = tmp_path / "appliance.ini"
    path.write_text("[listeners]\n")

    problem = only_problem(path, secrets_dir)

    assert "unknown extension" in problem


def test_unknown_upstream_names_env_variable(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        "listeners:\n"
        "  imap: {protocol: imap, port: 1143, upstream: mail}\n"
        "upstreams:\n"
        "  mail: {host: mail.example.org}\n"
    )
    path = write_config(tmp_path, text)
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__UPSTREAM", "mial")

    problem = only_problem(path, secrets_dir)

    assert "'mial'" in problem
    assert "(from env APPLIANCE_LISTENERS__IMAP__UPSTREAM)" in problem


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("appliance.yaml", "a: " + "{b: " * 30000 + "1" + "}" * 30000 + "\n"),
        ("appliance.yaml", "a:\n" + "".join(f"{'  ' * i}- \n" for i in range(1, 70))),
        ("appliance.json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
        ("appliance.toml", "a = " + "[" * 3000 + "]" * 3000 + "\n"),
    ],
)
def test_deeply_nested_file_rejected(
    name: str, text: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, text, name)

    problem = only_problem(path, secrets_dir)

    assert repr(str(path)) in problem
    assert "nests mappings or lists" in problem


def test_yaml_merge_key_shares_settings(tmp_path: Path, secrets_dir: Path) -> None:
    text = (
        "upstreams:\n"
        "  one: &shared {host: mail.example.org, port: 993, tls: implicit}\n"
        "  two:\n"
        "    <<: *shared\n"
        "    port: 995\n"
    )
    path = write_config(tmp_path, text)

    loaded = load_config(path, secrets_dir=secrets_dir, require_listeners=False)
    upstreams = loaded.config.upstreams

    assert upstreams["two"].host == "mail.example.org"
    assert upstreams["two"].port == 995


def test_toml_bare_carriage_return_rejected(tmp_path: Path, secrets_dir: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_bytes(b'state_dir = """/tmp/a\rb"""\n')

    problem = only_problem(path, secrets_dir)

    assert "could not be parsed" in problem


@pytest.mark.parametrize("text", ["min_version: 1.3", 'min_version: "1.3"'])
def test_unquoted_tls_version_loads(
    text: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = write_config(tmp_path, UPSTREAM_YAML + f"    {text}\n")

    loaded = load_config(path, secrets_dir=secrets_dir, require_listeners=False)
    upstream = loaded.config.upstreams["mail"]

    assert upstream.min_version == "1.3"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APPLIANCE_LIMITS__MAX_CONNECTIONS", "hunter2"),
        ("APPLIANCE_UPSTREAMS__MAIL__PORT", "99999"),
        ("APPLIANCE_UPSTREAMS__MAIL__CONNECT_TIMEOUT", "hunter2"),
    ],
)
def test_secret_file_value_hidden(
    tmp_path: Path, secrets_dir: Path, variable: str, value: str
) -> None:
    path = write_config(tmp_path, listener_yaml())
    (secrets_dir / variable).write_text(value + "\n")

    problem = only_problem(path, secrets_dir)

    assert value not in problem
    assert f"(from secret file {str(secrets_dir / variable)!r})" in problem


def test_env_json_case_only_names_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    monkeypatch.setenv(
        "APPLIANCE_LISTENERS", '{"imap": {"port": 1}, "IMAP": {"port": 2}}'
    )

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("listeners: key 'IMAP' repeats an earlier key")
    assert "APPLIANCE_LISTENERS" in problem


def test_secret_json_case_only_names_rejected(
    tmp_path: Path, secrets_dir: Path
) -> None:
    config = write_config(tmp_path, listener_yaml())
    (secrets_dir / "APPLIANCE_UPSTREAMS").write_text(
        '{"mail": {"port": 21851}, "MAIL": {"port": 1}}'
    )

    problem = only_problem(config, secrets_dir)

    assert problem.startswith("upstreams: key 'MAIL' repeats an earlier key")
