"""Unit tests of the config models, built directly without the loader."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from appliance.config import (
    AppConfig,
    KnownServer,
    Limits,
    ListenerConfig,
    LoggingConfig,
    UpstreamConfig,
)
from appliance.config.models import normalize_host


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # AppConfig reads APPLIANCE_* variables, so the caller's shell must not leak in.
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Return readable placeholder files, because the models check no PEM content."""
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert_file.write_text("certificate\n")
    key_file.write_text("key\n")
    return cert_file, key_file


LABEL_TEXT = st.text(
    alphabet=string.ascii_letters + string.digits, min_size=1, max_size=20
)
HOST_LABELS = st.one_of(LABEL_TEXT, st.tuples(LABEL_TEXT, LABEL_TEXT).map("-".join))


def listener(**fields: object) -> ListenerConfig:
    values: dict[str, object] = {"protocol": "imap", "port": 1143, "upstream": "mail"}
    values.update(fields)
    return ListenerConfig(**values)


# ListenerConfig


def test_listener_defaults_to_loopback_plaintext() -> None:
    config = listener()

    assert config.bind == "127.0.0.1"
    assert config.tls == "none"
    assert config.min_version == "1.2"
    assert config.allow_plaintext_login is False
    assert config.cert_file is None


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        (" 127.0.0.1 ", "127.0.0.1"),
        ("0:0::0", "::"),
    ],
)
def test_listener_bind_is_normalized(bind: str, expected: str) -> None:
    assert listener(bind=bind, allow_plaintext_login=True).bind == expected


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("0.0.0.0", False)],
)
def test_listener_is_loopback_follows_bind(bind: str, loopback: bool) -> None:
    assert listener(bind=bind, allow_plaintext_login=True).is_loopback is loopback


@pytest.mark.parametrize("bind", ["localhost", "256.1.1.1", "", "mail.example.org"])
def test_listener_bind_rejects_non_address(bind: str) -> None:
    with pytest.raises(ValidationError):
        listener(bind=bind)


def test_listener_rejects_unknown_key() -> None:
    with pytest.raises(ValidationError):
        listener(colour="red")


def test_listener_rejects_unknown_protocol() -> None:
    with pytest.raises(ValidationError):
        listener(protocol="smtp")


def test_listener_is_frozen() -> None:
    config = listener()

    with pytest.raises(ValidationError):
        config.port = 2143


@settings(max_examples=50)
@given(port=st.integers(min_value=1, max_value=65535))
def test_listener_accepts_every_valid_port(port: int) -> None:
    assert listener(port=port).port == port


@settings(max_examples=50)
@given(port=st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_listener_rejects_port_outside_range(port: int) -> None:
    with pytest.raises(ValidationError):
        listener(port=port)


def test_plaintext_on_any_address_needs_opt_in() -> None:
    with pytest.raises(ValidationError):
        listener(bind="0.0.0.0")

    assert listener(bind="0.0.0.0", allow_plaintext_login=True).bind == "0.0.0.0"


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_tls_listener_accepts_cert_and_key(
    tls: str, pem_pair: tuple[Path, Path]
) -> None:
    cert_file, key_file = pem_pair

    config = listener(tls=tls, bind="0.0.0.0", cert_file=cert_file, key_file=key_file)

    assert config.cert_file == cert_file
    assert config.key_file == key_file


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_tls_listener_without_key_rejected(
    tls: str, pem_pair: tuple[Path, Path]
) -> None:
    cert_file, _ = pem_pair

    with pytest.raises(ValidationError):
        listener(tls=tls, cert_file=cert_file)


# UpstreamConfig


def test_upstream_defaults_verify_and_probe() -> None:
    config = UpstreamConfig(host="mail.example.org")

    assert config.tls == "auto"
    assert config.verify is True
    assert config.allow_plaintext is False
    assert config.port is None
    assert config.min_version == "1.2"


def test_upstream_resumption_off_by_default() -> None:
    config = UpstreamConfig(host="mail.example.org")

    assert config.session_resumption is False


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("MAIL.Example.ORG.", "mail.example.org"),
        (" mail.example.org ", "mail.example.org"),
        ("localhost", "localhost"),
        ("192.0.2.10", "192.0.2.10"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("2001:db8:0:0::1", "2001:db8::1"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_upstream_host_is_normalized(host: str, expected: str) -> None:
    assert UpstreamConfig(host=host).host == expected


@pytest.mark.parametrize(
    "host",
    ["", "bad host!", "-bad.example", "bad-.example", "a..example", "x" * 64 + ".org"],
)
def test_upstream_host_rejects_invalid_name(host: str) -> None:
    with pytest.raises(ValidationError):
        UpstreamConfig(host=host)


def test_upstream_host_rejects_overlong_name() -> None:
    host = ".".join(["a" * 63] * 4)

    with pytest.raises(ValidationError):
        UpstreamConfig(host=host)


@pytest.mark.parametrize(
    ("protocol", "tls", "expected"),
    [
        ("imap", "implicit", 993),
        ("imap", "starttls", 143),
        ("imap", "none", 143),
        ("pop3", "implicit", 995),
        ("pop3", "starttls", 110),
        ("pop3", "none", 110),
    ],
)
def test_upstream_port_follows_standard(protocol: str, tls: str, expected: int) -> None:
    assert UpstreamConfig(host="mail.example.org").port_for(protocol, tls) == expected


def test_upstream_explicit_port_wins() -> None:
    config = UpstreamConfig(host="mail.example.org", port=1993)

    assert config.port_for("imap", "implicit") == 1993


def test_upstream_port_uses_configured_tls() -> None:
    config = UpstreamConfig(host="mail.example.org", tls="implicit")

    assert config.port_for("pop3") == 995


def test_server_name_defaults_to_host() -> None:
    assert UpstreamConfig(host="Mail.Example.org").tls_server_name == "mail.example.org"


def test_server_name_is_normalized() -> None:
    config = UpstreamConfig(host="192.0.2.10", server_name="IMAP.Example.org.")

    assert config.tls_server_name == "imap.example.org"


def test_server_name_rejects_invalid_name() -> None:
    with pytest.raises(ValidationError):
        UpstreamConfig(host="192.0.2.10", server_name="not a name")


def test_client_cert_without_key_rejected(pem_pair: tuple[Path, Path]) -> None:
    cert_file, _ = pem_pair

    with pytest.raises(ValidationError):
        UpstreamConfig(host="mail.example.org", client_cert_file=cert_file)


def test_client_key_without_cert_rejected(pem_pair: tuple[Path, Path]) -> None:
    _, key_file = pem_pair

    with pytest.raises(ValidationError):
        UpstreamConfig(host="mail.example.org", client_key_file=key_file)


def test_upstream_rejects_unknown_tls_mode() -> None:
    with pytest.raises(ValidationError):
        UpstreamConfig(host="mail.example.org", tls="ssl")


@settings(max_examples=50)
@given(text=st.text(max_size=80))
def test_normalize_host_raises_only_value_error(text: str) -> None:
    try:
        normalize_host(text)
    except ValueError:
        pass


@settings(max_examples=50)
@given(labels=st.lists(HOST_LABELS, min_size=1, max_size=5))
def test_normalize_host_is_idempotent(labels: list[str]) -> None:
    host = normalize_host(".".join(labels))

    assert normalize_host(host) == host
    assert host == host.lower()


# KnownServer, Limits, LoggingConfig


def test_known_server_host_is_normalized() -> None:
    entry = KnownServer(host="Mail.Example.ORG.", mode="implicit")

    assert entry.host == "mail.example.org"
    assert entry.port is None
    assert entry.protocol is None


def test_known_server_requires_mode() -> None:
    with pytest.raises(ValidationError):
        KnownServer(host="mail.example.org")


def test_known_server_rejects_auto_mode() -> None:
    with pytest.raises(ValidationError):
        KnownServer(host="mail.example.org", mode="auto")


def test_limits_defaults_allow_imap_idle() -> None:
    limits = Limits()

    assert limits.idle_timeout >= 1800
    assert limits.max_line_length == 8192
    assert limits.max_literal_size == 65536


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("connect_timeout", 0),
        ("pre_auth_timeout", -1),
        ("idle_timeout", 1799),
        ("max_line_length", 511),
        ("max_line_length", (1 << 20) + 1),
        ("max_literal_size", -1),
        ("max_literal_size", (1 << 24) + 1),
        ("max_connections", 0),
        ("shutdown_grace_period", -0.5),
    ],
)
def test_limits_reject_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        Limits(**{field: value})


def test_limits_accept_zero_literal_size() -> None:
    assert Limits(max_literal_size=0).max_literal_size == 0


@pytest.mark.parametrize("level", ["info", " debug ", "Warning", "TRACE"])
def test_log_level_is_upper_cased(level: str) -> None:
    assert LoggingConfig(level=level).level == level.strip().upper()


def test_log_level_rejects_unknown_name() -> None:
    with pytest.raises(ValidationError):
        LoggingConfig(level="verbose")


def test_unknown_log_level_error_shows_input() -> None:
    with pytest.raises(ValidationError) as caught:
        LoggingConfig(level="loud")

    assert caught.value.errors()[0]["input"] == "loud"


def test_logging_json_alias_sets_json_output() -> None:
    assert LoggingConfig(json=True).json_output is True


def test_logging_rejects_field_name() -> None:
    with pytest.raises(ValidationError):
        LoggingConfig(json_output=True)


def test_logging_dumps_json_alias() -> None:
    assert LoggingConfig(json=True).model_dump(by_alias=True) == {
        "level": "INFO",
        "json": True,
    }


# AppConfig


def test_empty_config_is_valid() -> None:
    config = AppConfig()

    assert config.listeners == {}
    assert config.upstreams == {}
    assert config.known_servers == []
    assert config.state_dir == Path("/var/lib/appliance")


def test_app_config_rejects_unknown_key() -> None:
    with pytest.raises(ValidationError):
        AppConfig(listner={})


@pytest.mark.parametrize("name", ["imap", "imap-1", "pop3_backup", "A9"])
def test_upstream_name_accepts_identifier(name: str) -> None:
    config = AppConfig(upstreams={name: {"host": "mail.example.org"}})

    assert list(config.upstreams) == [name]


@pytest.mark.parametrize("name", ["", "bad name", "a.b", "a/b", "a:b"])
def test_upstream_name_rejects_punctuation(name: str) -> None:
    with pytest.raises(ValidationError):
        AppConfig(upstreams={name: {"host": "mail.example.org"}})


def test_listener_without_upstream_rejected() -> None:
    with pytest.raises(ValidationError):
        AppConfig(
            listeners={"imap": {"protocol": "imap", "port": 1143}},
            upstreams={"mail": {"host": "mail.example.org"}},
        )


@pytest.mark.parametrize("reference", ["mail", "Mail", "MAIL"])
def test_upstream_reference_ignores_case(reference: str) -> None:
    config = AppConfig(
        listeners={"imap": {"protocol": "imap", "port": 1143, "upstream": reference}},
        upstreams={"mail": {"host": "mail.example.org"}},
    )

    assert config.listeners["imap"].upstream == "mail"


def test_unknown_upstream_reference_named() -> None:
    with pytest.raises(ValidationError) as caught:
        AppConfig(
            listeners={"imap": {"protocol": "imap", "port": 1143, "upstream": "Mial"}},
            upstreams={
                "mail": {"host": "mail.example.org"},
                "Backup": {"host": "backup.example.org"},
            },
        )

    message = str(caught.value)
    assert "listeners.imap.upstream is 'Mial'" in message
    assert "not a configured upstream" in message
    assert "expected one of: Backup, mail" in message


def test_listeners_on_distinct_ports_accepted() -> None:
    config = AppConfig(
        listeners={
            "imap": {"protocol": "imap", "port": 1143, "upstream": "mail"},
            "pop3": {"protocol": "pop3", "port": 1110, "upstream": "mail"},
        },
        upstreams={"mail": {"host": "mail.example.org"}},
    )

    assert sorted(config.listeners) == ["imap", "pop3"]


def test_listeners_on_distinct_loopback_addresses_accepted() -> None:
    config = AppConfig(
        listeners={
            "a": {"protocol": "imap", "port": 1143, "upstream": "mail"},
            "b": {
                "protocol": "imap",
                "bind": "127.0.0.2",
                "port": 1143,
                "upstream": "mail",
            },
        },
        upstreams={"mail": {"host": "mail.example.org"}},
    )

    assert config.listeners["b"].bind == "127.0.0.2"
