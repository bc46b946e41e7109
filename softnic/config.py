"""The TOML configuration file (docs/config.md) -> a validated `model.Config`.

TOML 1.0 (parsed by the standard library's tomllib). Errors name the field as
"vf[1].mac: must be a MAC address" so an operator can find the line; a syntax error names
the line and column. A config that fails validation starts nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .model import Config, ValidationError

__all__ = ["ConfigError", "load", "loads"]


class ConfigError(ValueError):
    """The file could not be read, parsed or validated. `field` names the culprit."""

    def __init__(self, source: str, field: str, message: str) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}" if field else f"{where}{message}")
        self.field = field
        self.message = message


def loads(text: str, source: str = "") -> Config:
    """Parse and validate TOML text. Raises ConfigError."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The decoder's message gives line and column, never more than the offending
        # token's position (a key on that line is not echoed).
        raise ConfigError(source, "", f"TOML syntax error: {e}") from None
    try:
        return Config.from_dict(raw)
    except ValidationError as e:
        raise ConfigError(source, e.field, e.message) from None


def load(path: str | Path) -> Config:
    """Read, parse and validate a config file. Raises ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), "", f"cannot read: {getattr(e, 'strerror', None) or e}") \
            from None
    return loads(text, str(p))
