"""The error types of the storage package."""

from __future__ import annotations


class StorageError(RuntimeError):
    """The storage cannot be used: a bad URL, an unreachable server, an old schema.

    The message is one line and names the URL with its password redacted.
    """


class StorageUnreachable(StorageError):
    """The server did not answer within ``$SEARCH_CONNECT_TIMEOUT`` (an outage, not a typo)."""
