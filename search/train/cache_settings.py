"""The data cache's settings, read from the environment without importing torch.

A worker checks them before any work (``search run`` / ``search worker``: a bad value is one
line and exit 2), its trial processes read them again (``search.train.cache``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DISK_BYTES = 4 * 2**30
DEFAULT_MEMORY_BYTES = 256 * 2**20
_OFF = {"off", "0", "false", "no", "none"}  # values of SEARCH_DATA_CACHE that turn it off
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class CacheSettingError(ValueError):
    """A ``$SEARCH_DATA_CACHE_*_BYTES`` that is not a byte count (one line, exit 2)."""


@dataclass(frozen=True)
class CacheSettings:
    """Where the cache lives and how much it may hold.

    Args:
        directory: The disk tier's directory; None: no disk tier.
        disk_bytes: Bound of the disk tier (0: none).
        memory_bytes: Bound of the in-process tier (0: none).
    """

    directory: Path | None
    disk_bytes: int = DEFAULT_DISK_BYTES
    memory_bytes: int = DEFAULT_MEMORY_BYTES

    @property
    def enabled(self) -> bool:
        """Whether either tier holds anything."""
        return (self.directory is not None and self.disk_bytes > 0) or self.memory_bytes > 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CacheSettings:
        """The settings the environment asks for (module docstring); off: both bounds 0.

        Example:
            >>> CacheSettings.from_env({"SEARCH_DATA_CACHE": "off"}).enabled
            False
            >>> env = {"SEARCH_CACHE": "/c", "SEARCH_DATA_CACHE_DISK_BYTES": "1G"}
            >>> s = CacheSettings.from_env(env)
            >>> s.directory, s.disk_bytes
            (PosixPath('/c/data'), 1073741824)
        """
        env = os.environ if environ is None else environ
        where = env.get("SEARCH_DATA_CACHE", "").strip()
        if where.lower() in _OFF:
            return cls(None, 0, 0)
        if where:
            directory = Path(where).expanduser()
        else:
            service = env.get("SEARCH_CACHE", "").strip()
            base = Path(service).expanduser() if service else Path.home() / ".cache" / "search"
            directory = base / "data"
        return cls(
            directory,
            _parse_bytes(env, "SEARCH_DATA_CACHE_DISK_BYTES", DEFAULT_DISK_BYTES),
            _parse_bytes(env, "SEARCH_DATA_CACHE_MEMORY_BYTES", DEFAULT_MEMORY_BYTES),
        )


def _parse_bytes(env: Mapping[str, str], name: str, default: int) -> int:
    """A byte count such as ``4G``, ``300M`` or ``1048576`` from ``env[name]``."""
    text = env.get(name, "").strip().upper().removesuffix("IB").removesuffix("B")
    if not text:
        return default
    unit = text[-1] if text[-1] in _UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        why = f"${name} must be a byte count such as 4G or 300M, not {text!r}"
        raise CacheSettingError(why) from None
    if value < 0:
        raise CacheSettingError(f"${name} must not be negative, but got {text!r}")
    return int(value * _UNITS[unit])
