"""Read routing YAML from text or a file into a validated Config (or a ConfigError)."""

from __future__ import annotations

import os
from typing import TextIO

from kom_gateway.config.model import Config, ConfigError, ConfigIssue
from kom_gateway.config.schema import build_config, format_path
from kom_gateway.config.yamldoc import YamlError, parse_yaml

# A few thousand cut-over rules fit in a few hundred KiB; past this a file is refused
# unread (it would take seconds of CPU and hundreds of MB to parse and validate).
MAX_CONFIG_BYTES = 1024 * 1024


def load_config_text(text: str, source: str = "", base_dir: str = ".") -> Config:
    """Relative file paths in the config resolve against `base_dir`."""
    try:
        doc = parse_yaml(text)
    except YamlError as exc:
        raise ConfigError(
            [ConfigIssue(format_path(exc.path), exc.line, exc.message)], source
        ) from None
    return build_config(doc, source, base_dir)


def load_config_file(path: str) -> Config:
    """Load a config file; relative paths inside it resolve against its directory."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue("", 0, f"cannot read: {exc.strerror}")], path) from None
    if len(raw) > MAX_CONFIG_BYTES:
        limit = f"larger than the limit of {MAX_CONFIG_BYTES // 1024} KiB for a configuration file"
        raise ConfigError([ConfigIssue("", 0, limit)], path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue("", 0, f"not UTF-8 text ({exc.reason})")], path) from None
    return load_config_text(text, path, os.path.dirname(os.path.abspath(path)))


def load_or_report(path: str, err: TextIO) -> Config | None:
    """For commands: the config at `path`, or None with its errors printed to `err`."""
    try:
        return load_config_file(path)
    except ConfigError as exc:
        print(exc.render(), file=err)
        return None
