"""Upstreams: the mail servers that sessions are carried to."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator, model_validator

from appliance.config.models.common import (
    ClientAddressMode,
    Port,
    StrictModel,
    TlsVersion,
    UpstreamTls,
    _check_readable,
    default_port,
    normalize_host,
)


class UpstreamConfig(StrictModel):
    """A mail server that sessions are carried to."""

    host: str
    """Host name or IP address of the mail server. A name's addresses are reused for
    30 s, and looked up again at once after a failed connect or an accepted reload."""

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

    session_resumption: bool = False
    """Resume TLS sessions of earlier connections to this upstream, so the server skips
    its signature and the appliance skips certificate checks already made for the same
    server name. Up to 64 sessions per server name are kept, each offered once, in memory
    only; every reload drops them. Off by default: CPython copies every session through
    its DER encoding when storing and offering it, which costs the appliance more CPU
    than the shorter handshake saves. Turn it on where the server's CPU matters more,
    for example a busy server with an RSA certificate."""

    client_cert_file: Path | None = None
    """PEM client certificate presented to the server (TLS client authentication)."""

    client_key_file: Path | None = None
    """Unencrypted PEM private key of `client_cert_file`."""

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
