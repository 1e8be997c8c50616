"""Log output and the admin HTTP listener for health checks and metrics."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, WithJsonSchema, field_validator

from appliance.config.models.common import (
    LOG_LEVELS,
    LogLevel,
    Port,
    StrictModel,
    normalize_bind,
)


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
        # An unknown level stays as written, so that the error shows the file's value.
        if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
            return value.strip().upper()
        return value


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
