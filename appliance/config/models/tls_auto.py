"""`tls: auto`: fixed TLS modes per server, probing and the learned records."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from appliance.config.models.common import (
    DAY,
    NUMBER_CHECK,
    KnownMode,
    Port,
    Protocol,
    Seconds,
    StrictModel,
    normalize_host,
)


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

    max_record_age: Annotated[float, Field(ge=60, le=30 * DAY), NUMBER_CHECK] = 86400.0
    """Seconds after which a learned STARTTLS record is probed again in the background,
    so the server moves up to implicit TLS once it offers it. A learned plain-text record
    does not wait for this age: a session probes it again before relying on it, at most
    once a minute. A probe never moves a record down. At least 60, because the first
    session that finds an older record starts a probe, so a smaller value would probe a
    busy server almost without pause."""

    persist_known_servers: bool = True
    """Keep learned records in `known_servers.json` under `state_dir` across restarts.
    When false, records live in memory only and `state_dir` is not used. Read at
    start, like `state_dir`: a reload does not change where records are kept."""
