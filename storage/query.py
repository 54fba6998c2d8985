"""Ad-hoc QUERY over task history: what it may read, and a reply bounded in rows and bytes.

What it may read (`check_allowed`): exactly one SELECT (DuckDB's own parser says so), and the tables it
names, read from DuckDB's parse tree (`json_serialize_sql`), must be `task_history` or a CTE of the
query itself; table functions only `range`/`generate_series`/`unnest`; no SHOW/DESCRIBE of the catalog;
no scalar function that reads settings or runs SQL text. So `snapshot_tasks` (payloads of live tasks),
`duckdb_settings()` (the data dir path) and the catalog stay private, however the name is quoted,
qualified or nested (CTE, subquery, UNION). The read-only transaction and disabled external access
(storage.database) stay as a second wall.

How much comes back (`bounded_rows`): rows are fetched in small chunks (never `fetchall`) and stop
before the row that would take the reply past `max_bytes` (msgpack size) or past QUERY_MAX_ROWS;
`truncated` says rows were left out. A single row larger than `max_bytes` is left out whole (the
reply has the rows before it and `truncated: true`): a cut value would look like real data.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import msgspec

from storage.errors import QueryRefused, QueryResult, is_corruption

QUERY_MAX_ROWS = 10_000
FETCH_ROWS = 64  # rows converted per fetch: bounds the memory held beyond the reply itself
ALLOWED_TABLES = frozenset({"task_history"})
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
REFUSED_FUNCTIONS = frozenset({"current_setting", "getenv", "query", "query_table", "which_secret"})
REFUSED_FUNCTION_PREFIXES = ("duckdb_", "pragma_", "read_")
_ALLOWED_SCHEMAS = frozenset({"", "main"})
_WHAT_IS_ALLOWED = ("QUERY may read only task_history (and range/generate_series/unnest, literals and "
                    "scalar functions)")
_RELATIONS = "SELECT lower(table_name) FROM duckdb_tables() UNION SELECT lower(view_name) FROM duckdb_views()"
_ENCODER = msgspec.msgpack.Encoder()


def run_query(cursor: duckdb.DuckDBPyConnection, sql: str, max_bytes: int) -> QueryResult:
    """Runs one allowed SELECT in a READ ONLY transaction; rows bounded as the module says."""
    check_allowed(cursor, sql)
    try:
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        cursor.execute(sql)
        columns = [d[0] for d in cursor.description or []]
        rows, truncated = bounded_rows(cursor, max_bytes - len(_ENCODER.encode(columns)))
    except duckdb.InterruptException:
        raise
    except duckdb.Error as exc:
        if is_corruption(str(exc)):
            raise  # Database.run_read names the file: the SQL is fine, the history is damaged
        raise QueryRefused(str(exc).strip()) from None
    return QueryResult(columns, rows, truncated)


def bounded_rows(cursor: duckdb.DuckDBPyConnection, max_bytes: int) -> tuple[list[list[Any]], bool]:
    """Plain rows of the executed result while they fit; True when any row was left out."""
    rows: list[list[Any]] = []
    used, biggest = 5, 0  # 5: the msgpack array header
    while chunk := cursor.fetchmany(FETCH_ROWS if 0 < biggest * FETCH_ROWS < max_bytes else 1):  # 1: sizes unknown
        for raw in chunk:
            row = [_plain(v) for v in raw]
            size = len(_ENCODER.encode(row))
            used, biggest = used + size, max(biggest, size)
            if len(rows) >= QUERY_MAX_ROWS or used > max_bytes:
                return rows, True
            rows.append(row)
    return rows, False


def check_allowed(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raises QueryRefused unless `sql` is one SELECT reading only what the module allows."""
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(str(exc).strip()) from None
    if len(statements) != 1:
        raise QueryRefused(f"QUERY takes exactly one SELECT statement, got {len(statements)} statements")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"QUERY is read-only: only SELECT is allowed, got {kind.name}")
    row = cursor.execute("SELECT json_serialize_sql($1)", [sql]).fetchall()
    tree = json.loads(row[0][0])
    if tree.get("error"):
        raise QueryRefused(str(tree.get("error_message") or "the SQL could not be parsed"))
    nodes = list(_walk(tree))
    ctes = {key.lower() for node in nodes for key in _cte_names(node)}
    if ctes:
        shadowed = ctes & {r[0] for r in cursor.execute(_RELATIONS).fetchall()} - ALLOWED_TABLES
        if shadowed:
            raise QueryRefused(f"a CTE may not be named like an internal table ({', '.join(sorted(shadowed))}), "
                               f"rename it; {_WHAT_IS_ALLOWED}")
    for node in nodes:
        problem = _problem(node, ctes)
        if problem is not None:
            raise QueryRefused(f"{problem}; {_WHAT_IS_ALLOWED}")


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)


def _cte_names(node: dict[str, Any]) -> list[str]:
    cte_map = node.get("cte_map")
    if not isinstance(cte_map, dict):
        return []
    return [str(entry.get("key", "")) for entry in cte_map.get("map", []) if isinstance(entry, dict)]


def _problem(node: dict[str, Any], ctes: set[str]) -> str | None:
    """Why this parse-tree node reads something QUERY may not, or None."""
    kind = node.get("type")
    if kind == "BASE_TABLE":
        return _table_problem(node, ctes)
    if kind == "SHOW_REF" and node.get("query") is None:
        return "SHOW of the catalog is not allowed"
    if kind == "TABLE_FUNCTION":
        name = str((node.get("function") or {}).get("function_name", "")).lower()
        if name not in ALLOWED_TABLE_FUNCTIONS:
            return f"table function {name}() is not allowed"
    if node.get("class") == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name in REFUSED_FUNCTIONS or name.startswith(REFUSED_FUNCTION_PREFIXES):
            return f"function {name}() is not allowed"
    return None


def _table_problem(node: dict[str, Any], ctes: set[str]) -> str | None:
    name = str(node.get("table_name", "")).lower()
    schema = str(node.get("schema_name", "")).lower()
    catalog = str(node.get("catalog_name", ""))
    if not catalog and not schema and name in ctes:
        return None
    if name in ALLOWED_TABLES and schema in _ALLOWED_SCHEMAS and not catalog:
        return None
    qualified = ".".join(part for part in (catalog, schema, name) if part)
    return f"table {qualified} is not readable"


def _iso(value: datetime.date | datetime.time) -> str:
    return value.isoformat()


_CONVERTERS: dict[type, Callable[[Any], Any]] = {
    datetime.datetime: _iso,
    datetime.date: _iso,
    datetime.time: _iso,
    datetime.timedelta: lambda v: v.total_seconds(),
    decimal.Decimal: float,
    uuid.UUID: str,
    bytearray: bytes,
    memoryview: bytes,
}


def _plain(value: Any) -> Any:
    """Makes a DuckDB result value msgpack-friendly: ISO strings for times, float for DECIMAL and
    INTERVAL (seconds), str for UUID and out-of-range integers, lists/dicts recursively."""
    if value is None or isinstance(value, str | bytes | bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain_key(k): _plain(v) for k, v in value.items()}
    converter = _CONVERTERS.get(type(value))
    return converter(value) if converter is not None else str(value)


def _plain_key(key: Any) -> Any:
    """A MAP key: as `_plain`, but a list (unhashable) becomes its string form."""
    plain = _plain(key)
    return str(key) if isinstance(plain, list) else plain
