"""Pydantic models of the appliance's config: its public interface.

Every model rejects unknown keys, so a misspelt key fails validation instead of silently
doing nothing. Field docstrings become the descriptions in the JSON Schema and in the
config reference.
"""

from appliance.config.models.common import (
    DAY,
    DEFAULT_PORTS,
    HOUR,
    LOG_LEVELS,
    ClientAddressMode,
    KnownMode,
    ListenerTls,
    LoginSeparator,
    LogLevel,
    LongSeconds,
    Port,
    Protocol,
    Seconds,
    StrictModel,
    TlsVersion,
    UpstreamTls,
    WEEK,
    default_port,
    is_host_name,
    normalize_bind,
    normalize_host,
    normalize_route_host,
)
from appliance.config.models.limits import Limits
from appliance.config.models.listener import (
    ListenerConfig,
    LoginRoute,
    ProxyProtocolConfig,
    RouteByLoginConfig,
)
from appliance.config.models.observability import AdminConfig, LoggingConfig
from appliance.config.models.tls_auto import KnownServer, TlsAutoConfig
from appliance.config.models.upstream import UpstreamConfig

__all__ = [
    "DAY",
    "DEFAULT_PORTS",
    "HOUR",
    "LOG_LEVELS",
    "AdminConfig",
    "ClientAddressMode",
    "KnownMode",
    "KnownServer",
    "Limits",
    "ListenerConfig",
    "ListenerTls",
    "LogLevel",
    "LoggingConfig",
    "LoginRoute",
    "LoginSeparator",
    "LongSeconds",
    "Port",
    "Protocol",
    "ProxyProtocolConfig",
    "RouteByLoginConfig",
    "Seconds",
    "StrictModel",
    "TlsAutoConfig",
    "TlsVersion",
    "UpstreamConfig",
    "UpstreamTls",
    "WEEK",
    "default_port",
    "is_host_name",
    "normalize_bind",
    "normalize_host",
    "normalize_route_host",
]
