"""A content-addressed cache of what every trial of a worker computes alike, in two tiers.

Trials run in a fresh process each (``search.worker.isolation``), so what one trial computed
reaches the next through the disk: entries live under the cache directory, one file each, named
by the digest of their key. An in-process tier in front of it (an LRU bounded in bytes) serves
callers that train repeatedly in one process (benches, tests) without reading the disk again.

Keys are content, never paths or times: the caller puts into the key the digests of whatever
the value was computed from (``search.train.token_cache``). An entry is written to a temporary
file and renamed into place, and it carries a checksum of its payload, so a concurrent reader,
a killed writer or a damaged file never yields a wrong value: an entry that does not check out
is deleted and recomputed. (The checksum is a CRC-32, against accidents: it reads at several
GB/s where blake2b ran at a few hundred MB/s here, and whoever can write the directory could
write a matching digest anyway.) The disk tier is bounded in bytes too, least recently used
entries (by modification time, refreshed on each hit) going first.

Settings, from the environment of the worker (its trial processes inherit it):

``SEARCH_DATA_CACHE``
    The directory; unset: ``$SEARCH_CACHE/data`` (the service's cache, default
    ``~/.cache/search``, where the tiny replicas live too); ``off`` (or ``0``) turns the cache
    off.
``SEARCH_DATA_CACHE_DISK_BYTES``
    Bound of the disk tier (default 4 GiB; ``0``: memory only). Suffixes K, M, G (powers of 2).
``SEARCH_DATA_CACHE_MEMORY_BYTES``
    Bound of the in-process tier (default 256 MiB; ``0``: disk only).

Example:
    >>> import tempfile, torch
    >>> cache = TwoTierCache(CacheSettings(Path(tempfile.mkdtemp()), 2**20, 2**20))
    >>> calls = []
    >>> def compute():
    ...     calls.append(1)
    ...     return {"ids": torch.arange(4)}, {}
    >>> for _ in range(2):
    ...     tensors, meta = cache.get_or_compute({"what": "demo"}, compute)
    >>> tensors["ids"].tolist(), len(calls)
    ([0, 1, 2, 3], 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from search.train.cache_settings import CacheSettings

FORMAT_VERSION = 1
"""Bumped whenever what an entry holds, or how a key is built, changes."""
STALE_TEMP_S = 3600.0  # a temporary file this old was left by a killed writer
_CHECK_BYTES = 4  # CRC-32 of the payload, at the head of every entry file
_SUFFIX = ".entry"

Payload = tuple[dict[str, Tensor], dict[str, str]]
"""What an entry holds: named tensors and string metadata (a safetensors file)."""


def key_digest(key: Mapping[str, object]) -> str:
    """The hex digest naming an entry: its key as canonical JSON, with the format version.

    Example:
        >>> key_digest({"a": 1, "b": "x"}) == key_digest({"b": "x", "a": 1})
        True
    """
    text = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def payload_bytes(payload: Payload) -> int:
    """What an entry occupies in memory, roughly: its tensors' bytes and its metadata's."""
    tensors, meta = payload
    return sum(t.nbytes for t in tensors.values()) + sum(len(k) + len(v) for k, v in meta.items())


class MemoryTier:
    """An LRU of payloads whose total size never exceeds ``max_bytes``.

    An entry larger than the bound is not kept; adding one evicts the least recently used
    entries until it fits.

    Args:
        max_bytes: The bound (0 keeps nothing).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Payload, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Payload | None:
        """The payload under ``name`` (now the most recently used), or None."""
        with self._lock:
            hit = self._entries.get(name)
            if hit is None:
                return None
            self._entries.move_to_end(name)
            return hit[0]

    def put(self, name: str, payload: Payload) -> None:
        """Keep ``payload`` under ``name`` if it fits the bound, evicting the oldest first."""
        size = payload_bytes(payload)
        with self._lock:
            old = self._entries.pop(name, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            while self._bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
            self._entries[name] = (payload, size)
            self._bytes += size

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class DiskTier:
    """Entry files in one directory, each written atomically and checked when read.

    An entry file is the CRC-32 of its payload followed by the payload (a safetensors file).
    The directory's entries are kept under ``max_bytes`` after each write, least recently
    used first (a hit refreshes the file's modification time).

    Args:
        directory: Where the entries live (created on the first write).
        max_bytes: The bound (an entry larger than it is not written).
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def path(self, name: str) -> Path:
        """The file of entry ``name``."""
        return self.directory / f"{name}{_SUFFIX}"

    def get(self, name: str) -> Payload | None:
        """The entry's payload, or None when it is absent, unreadable or does not check out
        (such an entry is deleted: the caller recomputes it)."""
        path = self.path(name)
        try:
            with path.open("rb") as f:
                head, body = f.read(_CHECK_BYTES), f.read()
        except OSError:
            return None
        try:
            if len(head) != _CHECK_BYTES or zlib.crc32(body) != int.from_bytes(head, "little"):
                raise ValueError("checksum mismatch")
            tensors = load_safetensors(body)
            meta = _metadata(body)
        except (ValueError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError):
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass  # evicted meanwhile by another worker: the payload read stays good
        return tensors, meta

    def put(self, name: str, payload: Payload) -> None:
        """Write the entry (temporary file, then rename), then evict down to the bound.

        A failure to write (disk full, read-only directory) leaves the cache as it was: the
        value is only not cached.
        """
        tensors, meta = payload
        body = save_safetensors({k: t.contiguous() for k, t in tensors.items()}, metadata=meta)
        if _CHECK_BYTES + len(body) > self.max_bytes:
            return
        check = zlib.crc32(body).to_bytes(_CHECK_BYTES, "little")
        tmp_name = ""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=_SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(check)
                f.write(body)
            os.replace(tmp_name, self.path(name))
            tmp_name = ""
        except OSError:
            return
        finally:
            if tmp_name:
                Path(tmp_name).unlink(missing_ok=True)
        self.evict()

    def evict(self) -> None:
        """Delete the least recently used entries until the rest fit ``max_bytes``, and the
        temporary files killed writers left behind."""
        entries: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            listing = list(os.scandir(self.directory))
        except OSError:
            return
        for item in listing:
            try:
                stat = item.stat()
            except OSError:
                continue  # removed meanwhile
            if item.name.startswith(".tmp-"):
                if now - stat.st_mtime > STALE_TEMP_S:
                    Path(item.path).unlink(missing_ok=True)
            elif item.name.endswith(_SUFFIX):
                entries.append((stat.st_mtime, stat.st_size, Path(item.path)))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors payload (its JSON header)."""
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + n].decode())
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return {str(k): str(v) for k, v in meta.items()}


class TwoTierCache:
    """The in-process tier in front of the disk tier, under one ``get_or_compute``.

    Args:
        settings: Directory and bounds (:meth:`CacheSettings.from_env`).
    """

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.memory = MemoryTier(settings.memory_bytes)
        self.disk = (
            DiskTier(settings.directory / f"v{FORMAT_VERSION}", settings.disk_bytes)
            if settings.directory is not None and settings.disk_bytes > 0
            else None
        )
        self.hits = {"memory": 0, "disk": 0, "miss": 0}

    def get_or_compute(self, key: Mapping[str, object], compute: Callable[[], Payload]) -> Payload:
        """The payload cached under ``key``, else ``compute()``'s, then cached in both tiers.

        ``compute`` raising leaves nothing cached. Callers must not modify the tensors they
        get (every hit returns the same ones).
        """
        name = key_digest(key)
        payload = self.memory.get(name)
        if payload is not None:
            self.hits["memory"] += 1
            return payload
        payload = self.disk.get(name) if self.disk is not None else None
        if payload is not None:
            self.hits["disk"] += 1
        else:
            self.hits["miss"] += 1
            payload = compute()
            if self.disk is not None:
                self.disk.put(name, payload)
        self.memory.put(name, payload)
        return payload


_shared: tuple[CacheSettings, TwoTierCache] | None = None
_shared_lock = threading.Lock()


def shared_cache() -> TwoTierCache | None:
    """This process' cache for the current environment's settings (None when turned off).

    The settings are read on each call, so a change of ``SEARCH_DATA_CACHE`` (a test's
    temporary directory) takes effect at once, with an empty in-process tier.
    """
    global _shared
    settings = CacheSettings.from_env()
    if not settings.enabled:
        return None
    with _shared_lock:
        if _shared is None or _shared[0] != settings:
            _shared = (settings, TwoTierCache(settings))
        return _shared[1]
