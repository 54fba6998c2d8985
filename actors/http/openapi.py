"""The OpenAPI 3.1 document of /api/v1, generated from the route table and the body Structs.

Nothing here is written by hand: paths and methods come from `actors.http.app.API_ROUTES`, schemas
from `msgspec.json.schema_components` over the request and response Structs.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from actors.http.errors import STATUS
from actors.http.schemas import ErrorOut

REF = "#/components/schemas/{name}"


class Operation(msgspec.Struct, frozen=True):
    """One method of one route: what it takes, what it answers, and with which success status."""

    summary: str
    response: Any
    status: int = 200
    request: Any = None
    params: tuple[str, ...] = ()  # query parameters (strings; `limit`, `after` whole numbers)
    required: tuple[str, ...] = ()  # those of `params` a request must give


def document(routes: list[tuple[str, dict[str, Operation]]], version: str) -> dict[str, Any]:
    types = [ErrorOut]
    for _, ops in routes:
        for op in ops.values():
            types += [t for t in (op.request, op.response) if t is not None]
    unique = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(unique, ref_template=REF)
    ref_of = dict(zip(unique, refs, strict=True))
    paths: dict[str, Any] = {}
    for path, ops in routes:
        item: dict[str, Any] = {}
        for method, op in ops.items():
            item[method.lower()] = _operation(path, method, op, ref_of)
        paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "tqbroker REST API", "version": version,
                 "description": "Task queue broker; see docs/protocol.md, section REST API."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def _operation(path: str, method: str, op: Operation, ref_of: dict[Any, Any]) -> dict[str, Any]:
    error = {"description": "error", "content": {"application/json": {"schema": ref_of[ErrorOut]}}}
    success = {"description": "success", "content": {"application/json": {"schema": ref_of[op.response]}}}
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _operation_id(method, path),
        "responses": {
            str(op.status): success,
            **{str(status): error for status in sorted(set(STATUS.values()))},
        },
    }
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
              for p in re.findall(r"{(\w+)}", path)]
    params += [{"name": p, "in": "query", "required": p in op.required,
                "schema": {"type": "integer" if p in ("limit", "after") else "string"}} for p in op.params]
    if params:
        out["parameters"] = params
    if op.request is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref_of[op.request]}}}
    return out


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.removeprefix("/api/v1/").split("/") if w]
    return method.lower() + "_" + "_".join(words or ["root"])
