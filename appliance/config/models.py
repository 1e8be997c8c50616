"""Pydantic models of the appliance's config: its public interface.

Every model rejects unknown keys, so a misspelt key fails validation instead of silently
doing nothing. Field docstrings become the descriptions in the JSON Schema and in the
config reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    WithJsonSchema,
    field_validator,
    model_validator,
)

Protocol = Literal["imap", "pop3"]
ListenerTls = Literal["none", "implicit", "starttls"]
UpstreamTls = Literal["none", "implicit", "starttls", "auto"]
ClientAddressMode = Literal["none", "proxy_v2", "imap_id"]
LoginSeparator = Literal["@", "#", "%"]
KnownMode = Literal["implicit", "starttls", "none"]
TlsVersion = Literal["1.2", "1.3"]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"]
LOG_LEVELS = get_args(LogLevel)
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]

# Ports from RFC 3501/1939 (plain, STARTTLS) and RFC 8314 (implicit TLS).
DEFAULT_PORTS: dict[tuple[str, str], int] = {
    ("imap", "plain"): 143,
    ("imap", "implicit"): 993,
    ("pop3", "plain"): 110,
    ("pop3", "implicit"): 995,
}

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def default_port(protocol: str, tls: str) -> int:
    """Return the standard port for a protocol and upstream TLS mode."""
    kind = "implicit" if tls == "implicit" else "plain"
    return DEFAULT_PORTS[(protocol, kind)]


def normalize_host(value: str) -> str:
    """Validate a host name or IP address and return it lower-cased without a final dot."""
    host = value.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOSTNAME_LABEL.match(x) for x in labels):
        raise ValueError(
            f"{value!r} is not a valid host name or IP address; "
            "expected a name such as mail.example.org or an address such as 192.0.2.10"
        )
    return host


def is_host_name(value: str) -> bool:
    """Return whether `value` is a DNS host name and not an IP address in any spelling.

    A final label of digits only is refused as well, because resolvers read names such
    as `127.1` or `2130706433` as IPv4 addresses.
    """
    labels = value.split(".")
    if not value or len(value) > 253:
        return False
    if not all(_HOSTNAME_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()


def normalize_route_host(value: str) -> str:
    """Validate a routing host, which is a host name or `*.` and a host name.

    Returns the host lower-cased without a final dot.
    """
    host = value.strip().rstrip(".").lower()
    name = host[2:] if host.startswith("*.") else host
    if not is_host_name(name):
        raise ValueError(
            f"{value!r} is not a host name or pattern; expected a name such as "
            "mail.example.org or a pattern such as *.example.org, where * stands for "
            "one label (IP addresses are not allowed)"
        )
    return host


def normalize_bind(value: str) -> str:
    """Validate a bind address, an IP address optionally in brackets, and normalize it."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address; expected an address such as "
            "127.0.0.1, 0.0.0.0, ::1 or ::"
        ) from None


def _check_readable(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.exists():
        raise ValueError(f"file {str(path)!r} does not exist; expected a readable PEM file")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a regular file; expected a PEM file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file {str(path)!r} is not readable by this process")
    return path


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LoginRoute(StrictModel):
    """An allow-list entry of `route_by_login`: where logins with a server part go."""

    upstream: str
    """Name of a configured upstream. Without `host`, a login whose server part is this
    name, compared case-insensitively, goes to this upstream."""

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

    allow: list[LoginRoute] = Field(min_length=1)
    """Server parts that may be reached, tried in order; the first match wins."""


class ProxyProtocolConfig(StrictModel):
    """PROXY protocol headers (version 1 or 2) from load balancers before a listener.

    The header names the real client, which then appears in the logs and counts toward
    the per-address limits in place of the load balancer.
    """

    accept: bool = False
    """Read a PROXY protocol header first on connections from `trusted_networks`."""

    trusted_networks: list[IPvAnyNetwork] = Field(default_factory=list)
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
    """PEM private key of `cert_file`; required unless `tls` is `none`."""

    min_version: TlsVersion = "1.2"
    """Lowest TLS version accepted from clients."""

    upstream: str | None = None
    """Name of the upstream (a key of `upstreams`) that sessions on this listener reach;
    a listener sets either this or `route_by_login`."""

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
            raise ValueError(
                f"tls is 'none' on non-loopback address {self.bind!r}, so passwords would "
                "cross the network in clear text; use tls 'implicit' or 'starttls', bind "
                "to 127.0.0.1, or set allow_plaintext_login: true"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.bind).is_loopback


class UpstreamConfig(StrictModel):
    """A mail server that sessions are carried to."""

    host: str
    """Host name or IP address of the mail server."""

    port: Port | None = None
    """TCP port; when unset it follows the listener's protocol and the TLS mode
    (IMAP 143 or 993, POP3 110 or 995)."""

    tls: UpstreamTls = "auto"
    """Upstream TLS: `implicit`, `starttls`, `none` (the explicit choice of plain text) or
    `auto` (probe once, remember the strongest mode the server offers, never downgrade)."""

    allow_plaintext: bool = False
    """Under `tls: auto`, allow plain text to a server that offers no TLS at all."""

    verify: bool = True
    """Verify the server's certificate chain and host name."""

    ca_file: Path | None = None
    """PEM file of CA certificates to trust instead of the system store."""

    server_name: str | None = None
    """Name sent in SNI and checked against the certificate; defaults to `host`."""

    min_version: TlsVersion = "1.2"
    """Lowest TLS version accepted from the server."""

    client_cert_file: Path | None = None
    """PEM client certificate presented to the server (TLS client authentication)."""

    client_key_file: Path | None = None
    """PEM private key of `client_cert_file`."""

    send_client_address: ClientAddressMode = "none"
    """How the server learns the real client address, so that its per-address limits
    and authentication penalties hit that client and not every user of the appliance:
    `none`; `proxy_v2`, a PROXY protocol version 2 header right after connecting and
    before any TLS (Dovecot: `haproxy = yes` on the listener and the appliance in
    `haproxy_trusted_networks`); or `imap_id`, for IMAP only, an ID command with
    `x-originating-ip` and `x-originating-port` before login (Dovecot: the appliance in
    `login_trusted_networks`). Probes for `tls: auto` send no header, so combine
    `proxy_v2` with a fixed `tls` mode or a `known_servers` entry."""

    @field_validator("host")
    @classmethod
    def _validate_host(cls, value: str) -> str:
        return normalize_host(value)

    @field_validator("server_name")
    @classmethod
    def _validate_server_name(cls, value: str | None) -> str | None:
        return None if value is None else normalize_host(value)

    @field_validator("ca_file", "client_cert_file", "client_key_file")
    @classmethod
    def _validate_file(cls, value: Path | None) -> Path | None:
        return _check_readable(value)

    @model_validator(mode="after")
    def _validate_client_cert(self) -> UpstreamConfig:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError(
                "client_cert_file and client_key_file go together; set both or neither"
            )
        return self

    def port_for(self, protocol: str, tls: str | None = None) -> int:
        """Return the port to connect to for a protocol and a concrete TLS mode."""
        if self.port is not None:
            return self.port
        return default_port(protocol, tls or self.tls)

    @property
    def tls_server_name(self) -> str:
        return self.server_name or self.host


class KnownServer(StrictModel):
    """An operator's fixed TLS mode for a server, which overrides probing."""

    host: str
    """Host name or IP address, compared case-insensitively."""

    port: Port | None = None
    """Port the entry applies to; unset means the standard port of `mode`."""

    protocol: Protocol | None = None
    """Protocol the entry applies to; unset means both."""

    mode: KnownMode
    """TLS mode to use for this server."""

    @field_validator("host")
    @classmethod
    def _validate_host(cls, value: str) -> str:
        return normalize_host(value)


class TlsAutoConfig(StrictModel):
    """Probing and the learned known-servers list behind `tls: auto`."""

    probe_timeout: Seconds = 10.0
    """Seconds allowed for each connection of a probe, TLS handshake and STARTTLS
    included; the implicit-TLS and plain-port connections run in parallel."""

    max_record_age: Seconds = 86400.0
    """Seconds after which a learned record is probed again in the background, so a
    server recorded as plain text or STARTTLS moves up once it offers more. A probe
    never moves a record down."""

    persist_known_servers: bool = True
    """Keep learned records in `known_servers.json` under `state_dir` across restarts.
    When false, records live in memory only and `state_dir` is not used. Read at
    start, like `state_dir`: a reload does not change where records are kept."""


class Limits(StrictModel):
    """Timeouts and size limits that bound what one client can cost."""

    connect_timeout: Seconds = 10.0
    """Seconds allowed for connecting to an upstream, TLS handshake included."""

    pre_auth_timeout: Seconds = 60.0
    """Seconds a client may take from connecting to a successful login."""

    idle_timeout: Annotated[float, Field(ge=1800)] = 1860.0
    """Seconds without traffic after which an authenticated session is closed; at least
    1800, because RFC 3501 lets IMAP clients sit in IDLE for 30 minutes."""

    max_line_length: Annotated[int, Field(ge=512, le=1 << 20)] = 8192
    """Maximum length in bytes of one command or response line before login."""

    max_literal_size: Annotated[int, Field(ge=0, le=1 << 24)] = 65536
    """Maximum size in bytes of one IMAP literal before login."""

    max_connections: Annotated[int, Field(ge=1)] = 1000
    """Maximum concurrent sessions on one listener."""

    max_protocol_errors: Annotated[int, Field(ge=1)] = 10
    """Invalid commands before login after which a session is closed."""

    max_connections_per_address: Annotated[int, Field(ge=1)] = 50
    """Maximum concurrent sessions from one client address, over all listeners, so
    that a flood from one address cannot take every session or every upstream login
    process. Clients behind one NAT share an address, so raise it for such sites.
    Without PROXY protocol, every client behind a load balancer has its address."""

    ipv6_prefix_length: Annotated[int, Field(ge=32, le=128)] = 64
    """Length of the IPv6 prefix that counts as one client address for
    `max_connections_per_address` and the failed-login delay, because one host
    usually gets a whole /64. 128 counts every IPv6 address alone."""

    auth_failure_delay: Annotated[float, Field(ge=0)] = 1.0
    """Seconds that the next login from a client address waits after an
    authentication failure from it. The delay doubles with each further failure, up to
    `auth_failure_delay_max`, and a successful login resets it. Syntax errors do not
    count. 0 turns the delay off."""

    auth_failure_delay_max: Seconds = 15.0
    """Upper bound in seconds of the failed-login delay."""

    auth_failure_reset_after: Seconds = 900.0
    """Seconds without an authentication failure after which the failures of a client
    address are forgotten."""

    shutdown_grace_period: Annotated[float, Field(ge=0)] = 10.0
    """Seconds that running sessions get to finish after SIGTERM or SIGINT."""

    drain_removed_listeners_after: Seconds | None = None
    """Seconds that sessions on a listener removed by a reload may go on before they are
    closed as at shutdown; unset lets them run to their natural end."""

    @model_validator(mode="after")
    def _validate_auth_failure_delay(self) -> Limits:
        if self.auth_failure_delay > self.auth_failure_delay_max:
            raise ValueError(
                f"auth_failure_delay ({self.auth_failure_delay}) is larger than "
                f"auth_failure_delay_max ({self.auth_failure_delay_max}); lower the "
                "first or raise the second"
            )
        return self


class LoggingConfig(StrictModel):
    """Log output."""

    level: Annotated[
        LogLevel,
        WithJsonSchema(
            {"enum": [*LOG_LEVELS, *(name.lower() for name in LOG_LEVELS)], "type": "string"}
        ),
    ] = "INFO"
    """Lowest level written: TRACE, DEBUG, INFO, SUCCESS, WARNING or ERROR."""

    json_output: bool = Field(default=False, alias="json")
    """Write one JSON object per line instead of text."""

    @field_validator("level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value


class AdminConfig(StrictModel):
    """HTTP listener for health checks and Prometheus: /healthz, /readyz, /metrics.

    The endpoints have no authentication, and `/readyz` names the configured upstreams
    and their TLS state. Bind to an address other than loopback only on a trusted
    network, such as a pod network that Kubernetes probes and Prometheus use. Changes to
    this section take effect at the next restart.
    """

    enabled: bool = False
    """Start the admin listener."""

    bind: str = "127.0.0.1"
    """IPv4 or IPv6 address to listen on; `0.0.0.0` or `::` for every interface."""

    port: Port = 9143
    """TCP port to listen on."""

    @field_validator("bind")
    @classmethod
    def _validate_bind(cls, value: str) -> str:
        return normalize_bind(value)
