"""Unit tests of `appliance check-config`, `appliance schema` and run's config step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import cli
from appliance.cli import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILURE,
    EXIT_OK,
    config_schema,
    main,
)
from appliance.config import load_config
from tests.support.certs import TestPKI
from tests.support.sources import isolate_config_sources

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO_ROOT / "schemas" / "appliance.schema.json"

# A `run` that should fail but starts instead listens on loopback only, and the mode of
# its upstream is pinned, so it probes no server.
CONFIG_YAML = """\
listeners:
  imap:
    protocol: imap
    bind: 127.0.0.1
    port: 21143
    upstream: mail
upstreams:
  mail:
    host: mail.example.org
known_servers:
  - host: mail.example.org
    mode: implicit
logging:
  level: warning
"""


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_config_sources(monkeypatch, tmp_path)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir()
    return folder


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(CONFIG_YAML, encoding="utf-8")
    return path


def check_config(path: Path, secrets_dir: Path) -> int:
    return main(
        ["check-config", "--config", str(path), "--secrets-dir", str(secrets_dir)]
    )


# check-config: valid config


def test_check_config_valid_exits_zero(
    capsys: pytest.CaptureFixture[str], config_file: Path, secrets_dir: Path
) -> None:
    code = check_config(config_file, secrets_dir)

    captured = capsys.readouterr()
    assert code == EXIT_OK
    assert captured.err == ""
    assert captured.out.startswith(f"# config file: {config_file}\n")


def test_check_config_labels_each_source(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    secrets_dir: Path,
) -> None:
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PORT", "1143")
    (secrets_dir / "APPLIANCE_UPSTREAMS__MAIL__SERVER_NAME").write_text(
        "imap.example.org\n"
    )

    code = check_config(config_file, secrets_dir)

    lines = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    assert f'    protocol: "imap"  # file {config_file}' in lines
    assert "    port: 1143  # env APPLIANCE_LISTENERS__IMAP__PORT" in lines
    assert '    tls: "none"  # default' in lines
    secret = secrets_dir / "APPLIANCE_UPSTREAMS__MAIL__SERVER_NAME"
    assert f'    server_name: "********"  # secret file {str(secret)!r}' in lines
    assert f'  level: "WARNING"  # file {config_file}' in lines


def test_check_config_hides_secret_values(
    capsys: pytest.CaptureFixture[str], config_file: Path, secrets_dir: Path
) -> None:
    (secrets_dir / "APPLIANCE_UPSTREAMS__MAIL__HOST").write_text("hidden.example.org")

    code = check_config(config_file, secrets_dir)

    assert code == EXIT_OK
    assert "hidden.example.org" not in capsys.readouterr().out


def test_check_config_output_parses_as_yaml(
    capsys: pytest.CaptureFixture[str], config_file: Path, secrets_dir: Path
) -> None:
    expected = load_config(config_file, secrets_dir=secrets_dir).config

    check_config(config_file, secrets_dir)

    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed == expected.model_dump(mode="json", by_alias=True)


def test_check_config_masked_output_parses(
    capsys: pytest.CaptureFixture[str], config_file: Path, secrets_dir: Path
) -> None:
    (secrets_dir / "APPLIANCE_UPSTREAMS__MAIL__HOST").write_text("hidden.example.org")

    check_config(config_file, secrets_dir)

    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["upstreams"]["mail"]["host"] == "********"


def test_check_config_without_file_uses_env(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    secrets_dir: Path,
) -> None:
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PROTOCOL", "imap")
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__PORT", "1143")
    monkeypatch.setenv("APPLIANCE_LISTENERS__IMAP__UPSTREAM", "mail")
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__HOST", "mail.example.org")

    code = main(["check-config", "--secrets-dir", str(secrets_dir)])

    lines = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    assert lines[0] == "# config file: none (environment and defaults only)"
    assert "  max_connections: 1000  # default" in lines


def test_check_config_without_listeners_rejected(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_text("", encoding="utf-8")

    code = check_config(path, secrets_dir)

    captured = capsys.readouterr()
    assert code == EXIT_CONFIG_ERROR
    assert captured.out == ""
    assert "listeners: no listener is configured" in captured.err
    assert f"config file {str(path)!r} is empty" in captured.err


def test_check_config_reads_config_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    secrets_dir: Path,
) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config_file))
    monkeypatch.setenv("APPLIANCE_SECRETS_DIR", str(secrets_dir))

    code = main(["check-config"])

    assert code == EXIT_OK
    assert capsys.readouterr().out.startswith(f"# config file: {config_file}\n")


def test_check_config_warns_unknown_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    secrets_dir: Path,
) -> None:
    monkeypatch.setenv("APPLIANCE_LISTNERS__IMAP__PORT", "1143")

    code = check_config(config_file, secrets_dir)

    err = capsys.readouterr().err
    assert code == EXIT_OK
    assert err.startswith(
        "warning: environment variable APPLIANCE_LISTNERS__IMAP__PORT"
    )


def test_check_config_unknown_variable_any_encoding(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    secrets_dir: Path,
) -> None:
    # An unknown name is ignored with a warning, whatever bytes its value has. The
    # value of a known name must be UTF-8 (see test_config_errors).
    monkeypatch.setenv("APPLIANCE_FOO", "\udce9")

    code = check_config(config_file, secrets_dir)

    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    assert err.startswith("warning: environment variable APPLIANCE_FOO matches no")


def test_check_config_warns_unknown_secret(
    capsys: pytest.CaptureFixture[str], config_file: Path, secrets_dir: Path
) -> None:
    secret = secrets_dir / "APPLIANCE_BOGUS"
    secret.write_text("x")

    code = check_config(config_file, secrets_dir)

    err = capsys.readouterr().err
    assert code == EXIT_OK
    assert err.startswith(
        f"warning: secret file {str(secret)!r} matches no config field"
    )


# check-config: invalid config


def test_check_config_invalid_exits_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG_YAML.replace("port: 21143", "port: 0"))

    code = check_config(path, secrets_dir)

    captured = capsys.readouterr()
    assert code == EXIT_CONFIG_ERROR
    assert captured.out == ""
    assert captured.err.startswith("config is invalid:\n")
    assert "  - listeners.imap.port: value 0:" in captured.err


def test_check_config_lists_every_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / "bad.yaml"
    text = CONFIG_YAML.replace("port: 21143", "port: 0") + "colour: red\n"
    path.write_text(text)

    code = check_config(path, secrets_dir)

    problem_lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")
    ]
    assert code == EXIT_CONFIG_ERROR
    assert len(problem_lines) == 2


def test_check_config_lists_every_tls_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    pki = TestPKI(tmp_path / "pki")
    cert = pki.issue_server_cert("listener")
    # Both listeners name the CA certificate as key_file, and the upstream names a
    # private key as ca_file.
    listener = {
        "protocol": "imap",
        "tls": "implicit",
        "cert_file": str(cert.cert_file),
        "key_file": str(pki.ca_file),
        "upstream": "mail",
    }
    document = {
        "listeners": {
            "imaps": {**listener, "port": 1993},
            "imaps-backup": {**listener, "port": 1994},
        },
        "upstreams": {"mail": {"host": "localhost", "ca_file": str(cert.key_file)}},
    }
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(document))

    code = check_config(path, secrets_dir)

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert err.startswith("config is invalid:\n")
    assert "\n  - listeners.imaps." in err
    assert "\n  - listeners.imaps-backup." in err
    assert "\n  - upstreams.mail.ca_file:" in err
    assert "Traceback" not in err


def test_check_config_missing_file_exits_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    missing = tmp_path / "missing.yaml"

    code = check_config(missing, secrets_dir)

    assert code == EXIT_CONFIG_ERROR
    assert str(missing) in capsys.readouterr().err


def test_check_config_bad_key_exits_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    pki = TestPKI(tmp_path / "pki")
    listener = pki.issue_server_cert("listener")
    other = pki.issue_server_cert("other")
    document = yaml.safe_load(CONFIG_YAML)
    document["listeners"]["imaps"] = {
        "protocol": "imap",
        "port": 993,
        "tls": "implicit",
        "cert_file": str(listener.cert_file),
        "key_file": str(other.key_file),
        "upstream": "mail",
    }
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump(document))

    code = check_config(path, secrets_dir)

    captured = capsys.readouterr()
    assert code == EXIT_CONFIG_ERROR
    assert captured.out == ""
    assert "  - listeners.imaps.cert_file:" in captured.err


def test_check_config_truncated_key_explained(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    pki = TestPKI(tmp_path / "pki")
    listener = pki.issue_server_cert("listener")
    truncated_key = tmp_path / "truncated.key"
    truncated_key.write_bytes(listener.key_file.read_bytes().split(b"-----END")[0])
    document = yaml.safe_load(CONFIG_YAML)
    document["listeners"]["imaps"] = {
        "protocol": "imap",
        "port": 993,
        "tls": "implicit",
        "cert_file": str(listener.cert_file),
        "key_file": str(truncated_key),
        "upstream": "mail",
    }
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump(document))

    code = check_config(path, secrets_dir)

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert f"  - listeners.imaps.key_file: {str(truncated_key)!r} is truncated" in err
    assert "copy the whole file again" in err
    assert "PEM lib" not in err


@pytest.mark.parametrize("text", ["- 1\n", "42\n"])
def test_check_config_non_mapping_exits_two(
    text: str, tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)

    assert check_config(path, secrets_dir) == EXIT_CONFIG_ERROR


def test_run_invalid_config_exits_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    missing = tmp_path / "missing.yaml"

    code = main(["run", "--config", str(missing), "--secrets-dir", str(secrets_dir)])

    assert code == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err.startswith("config is invalid:")


def test_run_without_listeners_exits_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_text("upstreams: {mail: {host: mail.example.org}}\n")

    code = main(["run", "--config", str(path), "--secrets-dir", str(secrets_dir)])

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert f"listeners: no listener is configured (config file {str(path)!r}" in err


def test_healthcheck_without_listeners_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_dir: Path
) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_text("admin: {enabled: true}\n")

    code = main(
        ["healthcheck", "--config", str(path), "--secrets-dir", str(secrets_dir)]
    )

    out = capsys.readouterr().out
    assert code == EXIT_FAILURE
    assert out.startswith("unhealthy: config is invalid: listeners: no listener")


NON_JSON_NETWORKS = "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_non_json_variable_exits_two(
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
    secrets_dir: Path,
) -> None:
    monkeypatch.setenv(NON_JSON_NETWORKS, "10.0.0.0/8")

    code = main([command, "--config", str(config_file), "--secrets-dir", str(secrets_dir)])

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert err.startswith("config is invalid:\n")
    assert (
        "  - listeners.imap.proxy_protocol.trusted_networks: value '10.0.0.0/8' "
        f"(from env {NON_JSON_NETWORKS}) is not valid JSON" in err
    )


def test_healthcheck_non_json_variable_fails(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
    secrets_dir: Path,
) -> None:
    monkeypatch.setenv(NON_JSON_NETWORKS, "10.0.0.0/8")

    code = main(
        ["healthcheck", "--config", str(config_file), "--secrets-dir", str(secrets_dir)]
    )

    out = capsys.readouterr().out
    assert code == EXIT_FAILURE
    assert out.startswith(
        "unhealthy: config is invalid: listeners.imap.proxy_protocol.trusted_networks:"
    )


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_non_utf8_secret_exits_two(
    command: str,
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    secrets_dir: Path,
) -> None:
    secret = secrets_dir / "APPLIANCE_LIMITS__MAX_CONNECTIONS"
    secret.write_bytes(b"\xff\xfe")

    code = main([command, "--config", str(config_file), "--secrets-dir", str(secrets_dir)])

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert f"  - limits.max_connections: secret file {str(secret)!r} is not UTF-8" in err


def set_non_utf8_variable_name(monkeypatch: pytest.MonkeyPatch, secrets_dir: Path) -> None:
    monkeypatch.setenv("APPLIANCE_LOGGING__LEV\udce9L", "debug")


def make_secret_directory(monkeypatch: pytest.MonkeyPatch, secrets_dir: Path) -> None:
    (secrets_dir / "APPLIANCE_LOGGING__LEVEL").mkdir()


def set_list_item_variable(monkeypatch: pytest.MonkeyPatch, secrets_dir: Path) -> None:
    monkeypatch.setenv("APPLIANCE_KNOWN_SERVERS__0__PORT", "993")
    monkeypatch.setenv("APPLIANCE_KNOWN_SERVERS", '[{"host": "a.example", "mode": "none"}]')


def set_key_under_null(monkeypatch: pytest.MonkeyPatch, secrets_dir: Path) -> None:
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL__PORT", "995")
    monkeypatch.setenv("APPLIANCE_UPSTREAMS__MAIL", "null")


def set_top_level_null(monkeypatch: pytest.MonkeyPatch, secrets_dir: Path) -> None:
    monkeypatch.setenv("APPLIANCE_LISTENERS", "null")


# How to break one config source, and the start of the problem line it must give.
BROKEN_SOURCES = {
    "non-UTF-8 variable name": (
        set_non_utf8_variable_name,
        r"  - environment variable APPLIANCE_LOGGING__LEV\xe9L: the name is not UTF-8",
    ),
    "secret directory": (
        make_secret_directory,
        "  - logging.level: secret file '{folder}/APPLIANCE_LOGGING__LEVEL' is a directory",
    ),
    "list item variable": (
        set_list_item_variable,
        "  - known_servers.0.port: value '993' (from env APPLIANCE_KNOWN_SERVERS__0__PORT)",
    ),
    "key under null": (
        set_key_under_null,
        "  - upstreams.mail.port: value '995' (from env APPLIANCE_UPSTREAMS__MAIL__PORT)",
    ),
    "top-level null": (
        set_top_level_null,
        "  - listeners: value 'null' (from env APPLIANCE_LISTENERS) is invalid",
    ),
}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(
    ("break_source", "expected"), BROKEN_SOURCES.values(), ids=BROKEN_SOURCES.keys()
)
def test_broken_source_exits_two(
    break_source: Any,
    expected: str,
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
    secrets_dir: Path,
) -> None:
    break_source(monkeypatch, secrets_dir)

    code = main([command, "--config", str(config_file), "--secrets-dir", str(secrets_dir)])

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert err.startswith("config is invalid:\n")
    assert expected.format(folder=secrets_dir) in err
    assert "Traceback" not in err


def test_missing_command_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([])

    assert caught.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# Examples


def test_check_config_subprocess_exits_zero(secrets_dir: Path) -> None:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith("APPLIANCE_")
    }
    command = [
        sys.executable,
        "-m",
        "appliance.cli",
        "check-config",
        "--config",
        "examples/quickstart.yaml",
        "--secrets-dir",
        str(secrets_dir),
    ]

    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("# config file: examples/quickstart.yaml\n")
    assert "  # file examples/quickstart.yaml" in result.stdout


# schema


def test_schema_file_matches_models(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["schema"])

    printed = json.loads(capsys.readouterr().out)
    committed = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert code == EXIT_OK
    assert printed == committed, (
        "schemas/appliance.schema.json is stale; regenerate it with "
        "`python3 -m appliance.cli schema > schemas/appliance.schema.json`"
    )


def test_schema_names_draft_and_title() -> None:
    schema = config_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Mail proxy appliance config"


def test_schema_rejects_unknown_keys() -> None:
    schema = config_schema()

    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        assert definition["additionalProperties"] is False, name


def test_schema_uses_json_alias() -> None:
    logging_properties = config_schema()["$defs"]["LoggingConfig"]["properties"]

    assert "json" in logging_properties
    assert "json_output" not in logging_properties


def test_schema_accepts_lower_case_level() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(config_schema())

    assert validator.is_valid({"logging": {"level": "info"}})


def test_check_config_unusable_state_dir(
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    secrets_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APPLIANCE_STATE_DIR", "/proc/appliance-state")

    code = check_config(config_file, secrets_dir)

    assert code == EXIT_CONFIG_ERROR
    assert "state_dir: '/proc/appliance-state' cannot be created" in capsys.readouterr().err


def test_interrupted_command_prints_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted_probe(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "probe", interrupted_probe)

    code = main(["probe", "127.0.0.1"])

    captured = capsys.readouterr()
    assert code == cli.EXIT_INTERRUPTED
    assert captured.err == "probe: interrupted\n"
