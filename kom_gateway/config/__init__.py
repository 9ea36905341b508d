"""Routing configuration: load, validate, hold and atomically replace it."""

from kom_gateway.config.holder import Active, ConfigHolder, ReloadResult
from kom_gateway.config.loader import load_config_file, load_config_text, load_or_report
from kom_gateway.config.model import (
    Address,
    Config,
    ConfigError,
    ConfigIssue,
    Endpoint,
    Group,
    ServerTLS,
    UpstreamTLS,
)

__all__ = [
    "Active",
    "Address",
    "Config",
    "ConfigError",
    "ConfigHolder",
    "ConfigIssue",
    "Endpoint",
    "Group",
    "ReloadResult",
    "ServerTLS",
    "UpstreamTLS",
    "load_config_file",
    "load_config_text",
    "load_or_report",
]
