"""Routing by login: split `user@server`, match the server part, name the upstream.

The server part must match an entry of the listener's allow-list, either the name of a
configured upstream or a host rule (`mail.example.org`, `*.example.org`). Nothing that
fails to match reaches a socket. A host rule accepts only a DNS host name, so ports, IP
literals, brackets, spaces and control bytes never match it. A name rule compares with
config keys, which contain letters, digits, `-` and `_` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from appliance.config import AppConfig, UpstreamConfig
from appliance.config.models import RouteByLoginConfig, is_host_name


@dataclass(frozen=True)
class Route:
    """Destination of one login: the user part and the upstream it is sent to."""

    user: bytes
    """User part of the login, which the upstream receives as the login."""
    upstream: str
    """Config name of the upstream, or of the template upstream of a host rule."""
    host: str | None = None
    """Server part matched by a host rule, which replaces the template's host; None for
    a route to a named upstream."""

    @property
    def server(self) -> str:
        return self.host or self.upstream


def split_login(login: bytes, separator: str) -> tuple[bytes, str] | None:
    """Split a login at its last separator into (user part, server part).

    The server part is returned lower-cased without one final dot. Returns None when
    the login has no separator, when a part between separators is empty, and when the
    server part is not ASCII.
    """
    pieces = login.split(separator.encode("ascii"))
    if len(pieces) < 2 or not all(pieces):
        return None
    server = pieces[-1]
    user = login[: len(login) - len(server) - 1]
    if not server.isascii():
        return None
    name = server.decode("ascii").lower()
    name = name.removesuffix(".")
    return (user, name) if name else None


def resolve_route(
    login: bytes,
    routing: RouteByLoginConfig,
    upstreams: Mapping[str, UpstreamConfig],
) -> Route | None:
    """Return the route of a login, or None when the allow-list does not admit it."""
    parts = split_login(login, routing.separator)
    if parts is None:
        return None
    user, server = parts
    for rule in routing.allow:
        if rule.upstream not in upstreams:
            continue
        if rule.host is None:
            if server == rule.upstream.lower():
                return Route(user, rule.upstream)
        elif host_matches(server, rule.host):
            return Route(user, rule.upstream, server)
    return None


def host_matches(server: str, pattern: str) -> bool:
    """Return whether a lower-case server part matches a host rule.

    `*` in `*.example.org` stands for exactly one label, as in certificate names, so
    `mail.example.org` matches and `example.org` and `a.b.example.org` do not.
    """
    if not is_host_name(server):
        return False
    if not pattern.startswith("*."):
        return server == pattern
    suffix = pattern[1:]
    label = server[: len(server) - len(suffix)]
    return server.endswith(suffix) and bool(label) and "." not in label


def routed_config(config: AppConfig, route: Route) -> AppConfig:
    """Return the config that a session on `route` plans its upstream with.

    For a host rule, the template upstream's entry is replaced by a copy whose host is
    the server part, so the TLS policy (`tls: auto` records, `known_servers` entries and
    the certificate check) applies to that host. The entry keeps the template's name,
    which logs and metrics use.
    """
    if route.host is None:
        return config
    template = config.upstreams[route.upstream]
    routed = template.model_copy(update={"host": route.host, "server_name": None})
    upstreams = {**config.upstreams, route.upstream: routed}
    return config.model_copy(update={"upstreams": upstreams})
