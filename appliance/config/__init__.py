"""Config models, sources and loading."""

from appliance.config.loader import ConfigError, LoadedConfig, load_config
from appliance.config.models import (
    KnownServer,
    Limits,
    ListenerConfig,
    LoggingConfig,
    UpstreamConfig,
)
from appliance.config.settings import AppConfig

__all__ = [
    "AppConfig",
    "ConfigError",
    "KnownServer",
    "Limits",
    "ListenerConfig",
    "LoadedConfig",
    "LoggingConfig",
    "UpstreamConfig",
    "load_config",
]
