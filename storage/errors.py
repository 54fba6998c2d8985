"""What storage callers handle, without importing DuckDB: the errors and the shape of a query result.

The broker process talks to DuckDB only through its database process (storage.db_process), so it
must not pay for importing duckdb (~26 MB of RSS) just to name these.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StorageError(Exception):
    """A storage failure; `.message` is one line a user can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QueryTimeout(StorageError):
    """A read ran past its bound and was interrupted."""


class QueryRefused(StorageError):
    """Ad-hoc SQL that is not one read-only statement, or that DuckDB rejected."""


class QueryResult(msgspec.Struct, frozen=True):
    """Columns and rows of an ad-hoc query; `truncated` when rows stopped at QUERY_MAX_ROWS."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
