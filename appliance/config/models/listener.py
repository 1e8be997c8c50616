"""Listeners: where mail clients connect, and how their sessions find an upstream."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, IPvAnyNetwork, field_validator, model_validator

from appliance.config.models.common import (
    ListenerTls,
    LoginSeparator,
    Port,
    Protocol,
    Seconds,
    StrictModel,
    TlsVersion,
    _check_readable,
    normalize_bind,
    normalize_route_host,
)


class LoginRoute(StrictModel):
    """An allow-list entry of `route_by_login`: where logins with a server part go."""

    upstream: str
    """Name of a configured upstream, matched ignoring letter case. Without `host`, a
    login whose server part is this name, also compared ignoring case, goes to this
    upstream."""

    host: str | None = None
    """Host name (`mail.example.org`) or pattern whose `*` stands for exactly one label
    (`*.example.org`). A matching server part is reached with the settings of `upstream`
    (port, TLS mode, CA file, client certificate) and its host replaced by the server
    part, which is also the name checked in the server's certificate. IP addresses and
    a bare `*` are not accepted."""

    @field_validator("host")
    @classmethod
    def _validate_host(cls, value: str | None) -> str | None:
        return None if value is None else normalize_route_host(value)


class RouteByLoginConfig(StrictModel):
    """Routing by login: a client logs in as `user@server`, and the appliance logs in to
    `server` as `user`. A login whose server part is not on the allow-list fails like a
    wrong password and opens no connection."""

    separator: LoginSeparator = "@"
    """Character between the user and the server part. A login is split at its last
    separator, so with `@` the login `alice@example.org@mail` is user
    `alice@example.org` on server `mail`. A login with an empty part between
    separators, such as `alice@@mail`, `@mail` or `alice@`, fails."""

    allow: list[LoginRoute] = Field(
        min_length=1, examples=[[{"upstream": "mail", "host": "*.example.org"}]]
    )
    """Server parts that may be reached, tried in order; the first match wins."""


class ProxyProtocolConfig(StrictModel):
    """PROXY protocol headers (version 1 or 2) from load balancers before a listener.

    The header names the real client, which then appears in the logs and counts toward
    the per-address limits in place of the load balancer.
    """

    accept: bool = False
    """Read a PROXY protocol header first on connections from `trusted_networks`."""

    trusted_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, examples=[["10.0.0.0/8", "2001:db8::/48"]]
    )
    """Networks of the load balancers, such as `10.0.0.0/8` or `2001:db8::/48`; only
    their headers are believed. A connection from elsewhere that starts with a header
    is closed."""

    required: bool = True
    """Close connections without a header: every connection from outside
    `trusted_networks`, and a trusted one whose header does not arrive within
    `timeout`. When false, clients outside `trusted_networks` are served directly, and a
    trusted connection without a header gets its greeting only after `timeout`, because
    IMAP and POP3 clients send nothing before the greeting."""

    timeout: Seconds = 3.0
    """Seconds allowed for the header to arrive after the connection is accepted."""

    @model_validator(mode="after")
    def _validate_networks(self) -> ProxyProtocolConfig:
        if self.accept and not self.trusted_networks:
            raise ValueError(
                "accept is true but trusted_networks is empty; list the networks of "
                "the load balancers, such as [10.0.0.0/8]"
            )
        return self

    def trusts(self, host: str) -> bool:
        """Return whether a peer address lies in `trusted_networks`."""
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_networks)


class ListenerConfig(StrictModel):
    """A local address where mail clients connect."""

    protocol: Protocol
    """Mail protocol spoken on this listener."""

    bind: str = "127.0.0.1"
    """IPv4 or IPv6 address to listen on; `0.0.0.0` or `::` for every interface."""

    port: Port
    """TCP port to listen on."""

    tls: ListenerTls = "none"
    """Client-side TLS: `none` (plain text), `implicit` (TLS from the first byte, RFC 8314)
    or `starttls` (plain text upgraded with STARTTLS/STLS before login)."""

    cert_file: Path | None = None
    """PEM certificate chain presented to clients; required unless `tls` is `none`."""

    key_file: Path | None = None
    """Unencrypted PEM private key of `cert_file`; required unless `tls` is `none`."""

    min_version: TlsVersion = "1.2"
    """Lowest TLS version accepted from clients."""

    upstream: str | None = None
    """Name of the upstream (a key of `upstreams`, matched ignoring letter case) that
    sessions on this listener reach; a listener sets either this or `route_by_login`."""

    route_by_login: RouteByLoginConfig | None = None
    """Choose the upstream from each login instead of a fixed `upstream`."""

    proxy_protocol: ProxyProtocolConfig = Field(default_factory=ProxyProtocolConfig)
    """PROXY protocol headers from load balancers; off by default."""

    allow_plaintext_login: bool = False
    """Accept logins without TLS on the client side: on a `starttls` listener before the
    upgrade, and on a `none` listener bound to an address other than loopback."""

    @field_validator("bind")
    @classmethod
    def _validate_bind(cls, value: str) -> str:
        return normalize_bind(value)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _validate_file(cls, value: Path | None) -> Path | None:
        return _check_readable(value)

    @model_validator(mode="after")
    def _validate_tls(self) -> ListenerConfig:
        if self.tls != "none" and (self.cert_file is None or self.key_file is None):
            raise ValueError(
                f"tls is {self.tls!r}, so cert_file and key_file are required; "
                "set both or set tls to 'none'"
            )
        if self.tls == "none" and not self.is_loopback and not self.allow_plaintext_login:
            version = ipaddress.ip_address(self.bind).version
            loopback = "::1" if version == 6 else "127.0.0.1"
            raise ValueError(
                f"tls is 'none' on non-loopback address {self.bind!r}, so passwords would "
                "cross the network in clear text; use tls 'implicit' or 'starttls', bind "
                f"to {loopback}, or set allow_plaintext_login: true"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.bind).is_loopback
