"""Warnings for upstreams that expose logins: plain text or unverified TLS to a remote host."""

from __future__ import annotations

import pytest

from appliance.config import AppConfig
from appliance.config.loader import exposure_warnings


def config_with(**upstream: object) -> AppConfig:
    return AppConfig.model_validate(
        {
            "listeners": {
                "imap": {"protocol": "imap", "port": 1143, "upstream": "mail"}
            },
            "upstreams": {"mail": upstream},
        }
    )


def test_plain_text_to_remote_host_warns() -> None:
    warnings = exposure_warnings(config_with(host="mail.example.org", tls="none"))

    assert len(warnings) == 1
    assert warnings[0].startswith("upstreams.mail: tls: none sends every login")
    assert "mail.example.org" in warnings[0]


def test_unverified_tls_to_remote_host_warns() -> None:
    warnings = exposure_warnings(
        config_with(host="192.0.2.10", tls="implicit", verify=False)
    )

    assert len(warnings) == 1
    assert warnings[0].startswith("upstreams.mail: verify: false accepts any")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "mail.localhost"])
def test_loopback_upstream_does_not_warn(host: str) -> None:
    assert exposure_warnings(config_with(host=host, tls="none")) == []
    assert exposure_warnings(config_with(host=host, verify=False)) == []


def test_verified_tls_does_not_warn() -> None:
    assert exposure_warnings(config_with(host="mail.example.org", tls="auto")) == []


def test_mapped_loopback_does_not_warn() -> None:
    assert exposure_warnings(config_with(host="::ffff:127.0.0.1", tls="none")) == []


def test_auto_with_plaintext_allowed_warns() -> None:
    warnings = exposure_warnings(
        config_with(host="192.0.2.5", tls="auto", allow_plaintext=True)
    )

    assert len(warnings) == 1
    assert warnings[0].startswith("upstreams.mail: allow_plaintext: true sends")


def test_pinned_plaintext_mode_warns() -> None:
    config = AppConfig.model_validate(
        {
            "listeners": {
                "imap": {"protocol": "imap", "port": 1143, "upstream": "mail"}
            },
            "upstreams": {"mail": {"host": "mail.example.org"}},
            "known_servers": [
                {"host": "mail.example.org", "protocol": "imap", "mode": "none"}
            ],
        }
    )

    warnings = exposure_warnings(config)

    assert len(warnings) == 1
    assert warnings[0].startswith("known_servers[0]: mode none sends logins")


def test_host_rule_template_warns_despite_loopback() -> None:
    config = AppConfig.model_validate(
        {
            "listeners": {
                "imap": {
                    "protocol": "imap",
                    "port": 1143,
                    "route_by_login": {
                        "separator": "@",
                        "allow": [{"upstream": "tmpl", "host": "*.example.org"}],
                    },
                }
            },
            "upstreams": {"tmpl": {"host": "localhost", "tls": "none"}},
        }
    )

    warnings = exposure_warnings(config)

    assert len(warnings) == 1
    assert warnings[0].startswith("upstreams.tmpl: tls: none sends every login")
    assert "route_by_login host rules" in warnings[0]
