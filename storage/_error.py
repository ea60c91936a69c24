"""The one error type of the storage package."""

from __future__ import annotations


class StorageError(RuntimeError):
    """The storage cannot be used: a bad URL, an unreachable server, an old schema.

    The message is one line and names the URL with its password redacted.
    """
