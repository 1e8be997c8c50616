"""The generated config reference page must match the models."""

from pathlib import Path

from appliance.config.reference import render_reference

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_page_matches_models() -> None:
    assert PAGE.read_text() == render_reference(), (
        "docs/configuration.md is stale; regenerate it with "
        "`python3 -m appliance.cli schema --format markdown > docs/configuration.md`"
    )


def test_reference_names_env_variables() -> None:
    page = render_reference()

    assert "`APPLIANCE_LISTENERS__NAME__PORT`" in page
    assert "`APPLIANCE_UPSTREAMS__NAME__HOST`" in page


def test_reference_lists_every_limit() -> None:
    page = render_reference()

    for name in ("connect_timeout", "pre_auth_timeout", "max_literal_size"):
        assert f"| `{name}` |" in page


def test_reference_marks_json_variables() -> None:
    page = render_reference()

    networks = "`APPLIANCE_LISTENERS__NAME__PROXY_PROTOCOL__TRUSTED_NETWORKS` (JSON list)"
    assert networks in page
    assert "`APPLIANCE_LIMITS` (JSON object)" in page
    assert "`APPLIANCE_LISTENERS` (JSON object)" in page
    assert "`APPLIANCE_LISTENERS__NAME__ROUTE_BY_LOGIN` (JSON object)" in page
    assert "`APPLIANCE_LIMITS__MAX_CONNECTIONS` |" in page
