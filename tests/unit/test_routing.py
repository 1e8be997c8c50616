"""Routing by login: splitting, allow-list matching, the routed config and its checks."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from appliance.config import AppConfig
from appliance.config.models import ProxyProtocolConfig, RouteByLoginConfig
from appliance.proxy.errors import UpstreamError
from appliance.proxy.guard import ClientGuard
from appliance.proxy.routing import (
    Route,
    host_matches,
    resolve_route,
    routed_config,
    split_login,
)
from appliance.proxy.session import Session, Snapshot
from appliance.tls.contexts import build_all_contexts
from appliance.tls.policy import UpstreamPlanner


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


UPSTREAMS: dict[str, Any] = {
    "mail": {"host": "127.0.0.1", "port": 1143, "tls": "none"},
    "Backup_2": {"host": "127.0.0.1", "port": 2143, "tls": "none"},
    "example": {"host": "imap.example.org", "port": 993, "tls": "implicit"},
    "auto": {"host": "placeholder.example.net", "tls": "auto"},
}
ALLOW = [
    {"upstream": "mail"},
    {"upstream": "Backup_2"},
    {"upstream": "example", "host": "*.Example.ORG."},
    {"upstream": "auto", "host": "imap.example.net"},
]


def make_config(
    separator: str = "@", allow: list[dict[str, Any]] | None = None, **listener: Any
) -> AppConfig:
    entry: dict[str, Any] = {
        "protocol": "imap",
        "port": 1143,
        "route_by_login": {"separator": separator, "allow": allow or ALLOW},
    }
    entry.update(listener)
    return AppConfig(listeners={"routed": entry}, upstreams=UPSTREAMS)


def route_of(login: bytes, separator: str = "@") -> Route | None:
    config = make_config(separator)
    routing = config.listeners["routed"].route_by_login
    assert routing is not None
    return resolve_route(login, routing, config.upstreams)


# Splitting


SPLITS = {
    "simple": (b"alice@mail", "@", (b"alice", "mail")),
    "hash": (b"alice#mail", "#", (b"alice", "mail")),
    "last separator": (b"alice@example.org@mail", "@", (b"alice@example.org", "mail")),
    "other separator in user": (
        b"alice@example.org#mail",
        "#",
        (b"alice@example.org", "mail"),
    ),
    "upper case server": (b"alice@MAIL", "@", (b"alice", "mail")),
    "trailing dot": (b"alice@mail.", "@", (b"alice", "mail")),
    "user case kept": (b"Alice@mail", "@", (b"Alice", "mail")),
    "8-bit user": ("jürgen@mail".encode(), "@", ("jürgen".encode(), "mail")),
}


@pytest.mark.parametrize(
    "login, separator, expected", SPLITS.values(), ids=SPLITS.keys()
)
def test_split_login_at_last_separator(
    login: bytes, separator: str, expected: tuple[bytes, str]
) -> None:
    assert split_login(login, separator) == expected


UNSPLITTABLE = {
    "no separator": (b"alice", "@"),
    "other separator only": (b"alice@mail", "#"),
    "empty user": (b"@mail", "@"),
    "empty server": (b"alice@", "@"),
    "doubled separator": (b"alice@@mail", "@"),
    "empty middle part": (b"a@@b@mail", "@"),
    "only separators": (b"@@", "@"),
    "dot only server": (b"alice@.", "@"),
    "8-bit server": ("alice@mäil".encode(), "@"),
}


@pytest.mark.parametrize(
    "login, separator", UNSPLITTABLE.values(), ids=UNSPLITTABLE.keys()
)
def test_split_login_rejects_empty_parts(login: bytes, separator: str) -> None:
    assert split_login(login, separator) is None


# Matching


ROUTED = {
    "named upstream": (b"alice@mail", Route(b"alice", "mail")),
    "named upstream any case": (b"alice@backup_2", Route(b"alice", "Backup_2")),
    "named upstream trailing dot": (b"alice@MAIL.", Route(b"alice", "mail")),
    "email user": (b"alice@example.org@mail", Route(b"alice@example.org", "mail")),
    "pattern": (
        b"alice@imap.example.org",
        Route(b"alice", "example", "imap.example.org"),
    ),
    "pattern any case": (
        b"alice@IMAP.Example.Org.",
        Route(b"alice", "example", "imap.example.org"),
    ),
    "exact host": (
        b"bob@imap.example.net",
        Route(b"bob", "auto", "imap.example.net"),
    ),
}


@pytest.mark.parametrize("login, expected", ROUTED.values(), ids=ROUTED.keys())
def test_resolve_route_admits_allowed_server(login: bytes, expected: Route) -> None:
    assert route_of(login) == expected


NOT_ROUTED = {
    "unknown server": b"alice@elsewhere",
    "upstream host instead of name": b"alice@127.0.0.1",
    "ipv4 literal": b"alice@192.0.2.7",
    "ipv6 literal": b"alice@[2001:db8::1]",
    "bare ipv6": b"alice@2001:db8::1",
    "numeric name": b"alice@2130706433",
    "host with port": b"alice@mail:143",
    "pattern host with port": b"alice@imap.example.org:993",
    "pattern base domain": b"alice@example.org",
    "two labels under pattern": b"alice@a.b.example.org",
    "pattern suffix without dot": b"alice@evilexample.org",
    "wildcard literal": b"alice@*.example.org",
    "space in server": b"alice@imap example.org",
    "control byte": b"alice@mail\r\n",
    "underscore host": b"alice@im_ap.example.org",
    "label with leading hyphen": b"alice@-imap.example.org",
    "empty user": b"@mail",
    "empty server": b"alice@",
    "doubled separator": b"alice@@mail",
    "exact host subdomain": b"bob@x.imap.example.net",
}


@pytest.mark.parametrize("login", NOT_ROUTED.values(), ids=NOT_ROUTED.keys())
def test_resolve_route_rejects_other_server(login: bytes) -> None:
    assert route_of(login) is None


def test_resolve_route_uses_configured_separator() -> None:
    assert route_of(b"alice#mail", "#") == Route(b"alice", "mail")
    assert route_of(b"alice@mail", "#") is None


def test_resolve_route_first_rule_wins() -> None:
    allow = [
        {"upstream": "example", "host": "mail"},
        {"upstream": "mail"},
    ]
    config = make_config(allow=allow)
    routing = config.listeners["routed"].route_by_login
    assert routing is not None

    route = resolve_route(b"alice@mail", routing, config.upstreams)

    assert route == Route(b"alice", "example", "mail")


@given(st.binary(max_size=80))
def test_fuzz_routed_server_is_safe(login: bytes) -> None:
    route = route_of(login)

    if route is not None and route.host is not None:
        assert (
            host_matches(route.host, "*.example.org")
            or route.host == "imap.example.net"
        )
        assert all(c.isalnum() or c in ".-" for c in route.host)
    if route is not None:
        assert route.upstream in UPSTREAMS


# Routed config and the TLS policy


def routed_snapshot(login: bytes, **config_fields: Any) -> Snapshot:
    config = make_config()
    if config_fields:
        config = config.model_copy(update=config_fields)
    snapshot = Snapshot(config, build_all_contexts(config))
    route = route_of(login)
    assert route is not None
    return dataclasses.replace(snapshot, config=routed_config(config, route))


async def test_pattern_route_targets_matched_host() -> None:
    snapshot = routed_snapshot(b"alice@imap.example.org")

    [target] = await UpstreamPlanner(snapshot).plan(snapshot, "example", "imap")

    assert target.host == "imap.example.org"
    assert target.server_name == "imap.example.org"
    assert target.port == 993
    assert target.mode == "implicit"
    assert target.name == "example"


async def test_named_route_keeps_config() -> None:
    config = make_config()
    route = route_of(b"alice@mail")
    assert route is not None

    assert routed_config(config, route) is config


async def test_routed_host_uses_known_server_entry() -> None:
    config = make_config()
    pinned = AppConfig(
        listeners=config.model_dump()["listeners"],
        upstreams=UPSTREAMS,
        known_servers=[{"host": "imap.example.net", "mode": "starttls"}],
    )
    snapshot = Snapshot(pinned, build_all_contexts(pinned))
    route = route_of(b"bob@imap.example.net")
    assert route is not None
    routed = dataclasses.replace(snapshot, config=routed_config(pinned, route))

    [target] = await UpstreamPlanner(routed).plan(routed, "auto", "imap")

    assert target.host == "imap.example.net"
    assert target.mode == "starttls"
    assert target.port == 143


def test_routed_config_leaves_original_untouched() -> None:
    config = make_config()
    route = route_of(b"alice@imap.example.org")
    assert route is not None

    routed_config(config, route)

    assert config.upstreams["example"].host == "imap.example.org"
    assert route_of(b"alice@x.example.org") == Route(
        b"alice", "example", "x.example.org"
    )


def test_route_upstream_ignores_case() -> None:
    allow = [
        {"upstream": "MAIL"},
        {"upstream": "backup_2"},
        {"upstream": "Example", "host": "*.example.org"},
    ]
    config = make_config(allow=allow)
    routing = config.listeners["routed"].route_by_login
    assert routing is not None

    named = resolve_route(b"alice@mail", routing, config.upstreams)
    backup = resolve_route(b"alice@Backup_2", routing, config.upstreams)
    hosted = resolve_route(b"alice@x.example.org", routing, config.upstreams)

    assert [rule.upstream for rule in routing.allow] == ["mail", "Backup_2", "example"]
    assert named == Route(b"alice", "mail")
    assert backup == Route(b"alice", "Backup_2")
    assert hosted == Route(b"alice", "example", "x.example.org")


# Config checks


CONFIG_ERRORS = {
    "upstream and route": (
        {"upstream": "mail"},
        "sets both upstream and route_by_login",
    ),
    "unknown route upstream": (
        {"route_by_login": {"allow": [{"upstream": "nowhere"}]}},
        "allow[0].upstream is 'nowhere', which is not a configured upstream",
    ),
    "empty allow-list": (
        {"route_by_login": {"allow": []}},
        "at least 1 item",
    ),
    "ip pattern": (
        {"route_by_login": {"allow": [{"upstream": "mail", "host": "192.0.2.7"}]}},
        "is not a host name or pattern",
    ),
    "bare wildcard": (
        {"route_by_login": {"allow": [{"upstream": "mail", "host": "*"}]}},
        "is not a host name or pattern",
    ),
    "inner wildcard": (
        {"route_by_login": {"allow": [{"upstream": "mail", "host": "a.*.org"}]}},
        "is not a host name or pattern",
    ),
    "pattern with port": (
        {
            "route_by_login": {
                "allow": [{"upstream": "mail", "host": "*.example.org:1"}]
            }
        },
        "is not a host name or pattern",
    ),
    "unknown separator": (
        {"route_by_login": {"separator": "+", "allow": ALLOW}},
        "separator",
    ),
}


@pytest.mark.parametrize(
    "listener, message", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys()
)
def test_config_rejects_invalid_routing(listener: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ValidationError, match=message.replace("[", r"\[").replace("(", r"\(")
    ):
        make_config(**listener)


def test_config_needs_upstream_or_route() -> None:
    with pytest.raises(ValidationError, match="or a route_by_login section"):
        AppConfig(
            listeners={"plain": {"protocol": "imap", "port": 1143}}, upstreams=UPSTREAMS
        )


def test_config_rejects_template_with_server_name() -> None:
    upstreams = {
        **UPSTREAMS,
        "example": {**UPSTREAMS["example"], "server_name": "x.org"},
    }

    with pytest.raises(ValidationError, match="that upstream sets server_name"):
        AppConfig(
            listeners={
                "routed": {
                    "protocol": "imap",
                    "port": 1143,
                    "route_by_login": {"allow": ALLOW},
                }
            },
            upstreams=upstreams,
        )


def test_config_rejects_imap_id_for_pop3() -> None:
    upstreams = {
        **UPSTREAMS,
        "mail": {**UPSTREAMS["mail"], "send_client_address": "imap_id"},
    }

    with pytest.raises(ValidationError, match="speaks POP3, which has no ID command"):
        AppConfig(
            listeners={"pop": {"protocol": "pop3", "port": 1110, "upstream": "mail"}},
            upstreams=upstreams,
        )


def test_config_accepts_proxy_v2_for_pop3() -> None:
    upstreams = {
        **UPSTREAMS,
        "mail": {**UPSTREAMS["mail"], "send_client_address": "proxy_v2"},
    }

    config = AppConfig(
        listeners={"pop": {"protocol": "pop3", "port": 1110, "upstream": "mail"}},
        upstreams=upstreams,
    )

    assert config.upstreams["mail"].send_client_address == "proxy_v2"


def test_route_hosts_are_normalized() -> None:
    routing = RouteByLoginConfig(allow=[{"upstream": "x", "host": " *.Example.ORG. "}])

    assert routing.allow[0].host == "*.example.org"


# PROXY protocol settings


def test_proxy_protocol_needs_networks_when_accepting() -> None:
    with pytest.raises(ValidationError, match="trusted_networks is empty"):
        ProxyProtocolConfig(accept=True)


def test_proxy_protocol_rejects_host_bits() -> None:
    with pytest.raises(ValidationError):
        ProxyProtocolConfig(accept=True, trusted_networks=["10.0.0.1/8"])


TRUST = {
    "inside ipv4": ("10.1.2.3", True),
    "outside ipv4": ("192.0.2.7", False),
    "mapped ipv4": ("::ffff:10.1.2.3", True),
    "inside ipv6": ("2001:db8::1", True),
    "outside ipv6": ("2001:db9::1", False),
    "not an address": ("?", False),
}


@pytest.mark.parametrize("host, trusted", TRUST.values(), ids=TRUST.keys())
def test_proxy_protocol_trusts_listed_networks(host: str, trusted: bool) -> None:
    settings = ProxyProtocolConfig(
        accept=True, trusted_networks=["10.0.0.0/8", "2001:db8::/32"]
    )

    assert settings.trusts(host) is trusted


async def test_failed_route_counts_as_failed_login() -> None:
    """A routed server that fails to connect earns the failed-login delay."""
    guard = ClientGuard()
    limits = AppConfig().limits

    async def fail_connect(setup: Any) -> None:
        raise UpstreamError("connect", "connection refused")

    session = SimpleNamespace(
        connect_upstream=fail_connect,
        env=SimpleNamespace(guard=guard),
        client_host="192.0.2.7",
        limits=limits,
    )
    with pytest.raises(UpstreamError):
        await Session.connect_route(session, setup=None)

    assert guard.login_delay("192.0.2.7", limits) == limits.auth_failure_delay
