"""The TOML configuration file (docs/config.md) -> a validated `model.Config`.

TOML 1.0 (parsed by the standard library's tomllib). Errors name the field as
"vf[1].mac: must be a MAC address" so an operator can find the line; a syntax error names
the line and column. A config that fails validation starts nothing.
"""

from __future__ import annotations

import os
import stat
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


def load(path: str | Path, *, private: bool = False) -> Config:
    """Read, parse and validate a config file. Raises ConfigError.

    private (what the daemon asks for): a file that holds keys must be readable by its
    owner only (mode 0600 or stricter) and owned by root or the daemon's user, or it is
    refused: anyone else who can read it has the keys. Checked on the open file, so the
    file read is the file checked."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), "", f"cannot read: {getattr(e, 'strerror', None) or e}") \
            from None
    cfg = loads(text, str(p))
    if private and cfg.sas:  # keys are only ever in SAs
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(str(p), "", f"holds keys but others may read it (mode "
                              f"{mode:04o}): make it 0600 or stricter (chmod 600 {p})")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(str(p), "", f"holds keys but is owned by uid {st.st_uid}:"
                              " it must belong to root or the daemon's user")
    return cfg
