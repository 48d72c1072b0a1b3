"""Configuration: typed sections, YAML with inheritance, command-line overrides."""

from megatron_paci.config.cli import parse_args
from megatron_paci.config.loader import (
    ConfigError,
    config_from_dict,
    format_config,
    load_config,
    to_yaml,
)
from megatron_paci.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "format_config",
    "load_config",
    "parse_args",
    "to_yaml",
]
