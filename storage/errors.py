"""What storage callers handle, without importing DuckDB: the errors and the shape of a query result.

The broker process talks to DuckDB only through its database process (storage.db_process), so it
must not pay for importing duckdb (see docs/performance.md#importing-duckdb) just to name these.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StorageError(Exception):
    """A storage failure; `.message` is one line a user can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StorageCorrupt(StorageError):
    """The DuckDB file is damaged (a block fails its checksum, or cannot be read back): `.message` names
    the file. Retrying does not help; the file needs the operator (restore it from a backup)."""

    code = "INTERNAL"  # the protocol's error code when a client's request hits the damage (docs/protocol.md)


# What DuckDB says when a block it reads back is damaged (DuckDB 2.0 wording).
CORRUPTION_MARKERS = ("Corrupt database file", "does not match stored checksum", "Could not read enough bytes",
                      "not a valid DuckDB database file")


def is_corruption(text: str) -> bool:
    """Whether a DuckDB error's text reports a damaged database file."""
    return any(marker in text for marker in CORRUPTION_MARKERS)


class QueryTimeout(StorageError):
    """A read ran past its bound and was interrupted."""


class QueryRefused(StorageError):
    """Ad-hoc SQL that is not one read-only statement, or that DuckDB rejected."""


class QueryResult(msgspec.Struct, frozen=True):
    """Columns and rows of an ad-hoc query; `truncated` when rows stopped at QUERY_MAX_ROWS."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
