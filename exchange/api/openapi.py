"""The OpenAPI description, completed: every problem answer an operation can give, with the
problem JSON schema, and the mutual-TLS security scheme every connection uses.

FastAPI describes the success answers and the request shapes from the code; this module adds what
the edge and the error table answer (:mod:`exchange.api.guard`, :mod:`exchange.api.problems`), so
an integrator or a fuzzer reads the whole contract from ``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from exchange.api.problems import MEDIA_TYPE, PROBLEM_STATUSES, Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
#: paths any certificate the TLS layer trusts may call (none since /healthz asks who calls)
UNAUTHENTICATED_PATHS: set[str] = set()
#: problems an operation answers beyond those its shape implies, by path
EXTRA_PROBLEMS: dict[str, set[int]] = {"/v1/peer/checkpoints": {400, 409}, "/v1/audit/export": {404}}
SECURITY_SCHEME = {
    "type": "mutualTLS",
    "description": (
        "Every connection presents a client certificate. Local systems: a certificate of this node's CA "
        "registered with `exchange clients add` (auditors with the AUDITOR role; `/metrics` only for "
        "monitoring systems registered with `exchange clients add-monitoring`). Peer endpoints: the "
        "partner node's certificate only (partner CA, node purpose, public key pinned in the agreement)."
    ),
}


def _problem_statuses(path: str, operation: dict[str, Any]) -> set[int]:
    statuses = {503}
    if path not in UNAUTHENTICATED_PATHS:
        statuses.add(403)
    parameters = operation.get("parameters", [])
    if parameters:
        statuses.add(400)  # a NUL in the URL (exchange/api/guard.py)
    if parameters or "requestBody" in operation:
        statuses.add(422)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if "requestBody" in operation:
        statuses |= {400, 408, 413, 415}
    declared = {int(code) for code in operation.get("responses", {}) if str(code).isdigit()}
    return statuses | EXTRA_PROBLEMS.get(path, set()) | {s for s in declared if s >= 400}


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the problem answers and the security scheme to a generated description (in place)."""
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"mutualTLS": SECURITY_SCHEME}
    spec["security"] = [{"mutualTLS": []}]
    for path, item in spec.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status in sorted(_problem_statuses(path, operation)):
                content = responses.get(str(status), {}).get("content", {})
                if content and not {MEDIA_TYPE, "application/json"} & set(content):
                    continue  # an answer in the route's own format (the witness protocol's 409)
                responses[str(status)] = {
                    "description": PROBLEM_STATUSES.get(status, "Problem"),
                    "content": {MEDIA_TYPE: {"schema": PROBLEM_REF}},
                    **({"headers": _retry_after()} if status == 503 else {}),
                }
    return spec


def _retry_after() -> dict[str, Any]:
    return {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 0}}}


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the completed description (built once, then cached)."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    done: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "spec" not in done:
            done["spec"] = complete(generate())
        spec: dict[str, Any] = done["spec"]
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
