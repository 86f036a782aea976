"""RFC 9457 problem details: the one table from error classes to HTTP status codes.

Domain errors carry no status; this module decides it. Lookup walks the exception's class
hierarchy, so a subclass inherits its family's status unless it has its own row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from exchange.errors import (
    Busy,
    CheckpointConflict,
    ConfigurationError,
    ContentDestroyed,
    ContentUnavailable,
    DatabaseUnavailable,
    EnvelopeError,
    ExchangeError,
    IdempotencyKeyReused,
    InvalidInput,
    LedgerIntegrityError,
    MessageTooLarge,
    NotFound,
    PolicyRefusal,
    TransactionConflict,
    TransportError,
    Unauthorised,
    Unavailable,
)
from exchange.ledger.checkpoint import CheckpointError
from exchange.observability import logs

log = logging.getLogger("exchange.api")

PROBLEM_TYPE_BASE = "https://exchange.invalid/problems/"
MEDIA_TYPE = "application/problem+json"

#: error class -> (status, problem type slug, title)
STATUS_TABLE: dict[type[ExchangeError], tuple[int, str, str]] = {
    InvalidInput: (422, "invalid-input", "The request is invalid"),
    NotFound: (404, "not-found", "Not found"),
    ContentDestroyed: (410, "destroyed", "The message's content was destroyed"),
    ContentUnavailable: (500, "content-unavailable", "Stored content could not be opened"),
    Unauthorised: (403, "forbidden", "The client certificate is not registered for this API"),
    PolicyRefusal: (403, "policy-refusal", "Refused by the agreement's rules"),
    EnvelopeError: (400, "envelope-rejected", "The envelope was rejected"),
    TransportError: (502, "partner-unreachable", "The partner node could not be reached"),
    CheckpointConflict: (409, "checkpoint-conflict", "The checkpoint conflicts with one already witnessed"),
    CheckpointError: (400, "invalid-checkpoint", "The checkpoint is malformed or not validly signed"),
    LedgerIntegrityError: (500, "ledger-integrity", "The ledger failed verification"),
    ConfigurationError: (500, "configuration", "The node is misconfigured"),
    MessageTooLarge: (413, "message-too-large", "The sealed message would exceed the agreement's limit"),
    IdempotencyKeyReused: (422, "idempotency-key-reused", "The Idempotency-Key was used for another request"),
    Unavailable: (503, "unavailable", "The node cannot serve this request now; retry later"),
    DatabaseUnavailable: (503, "database-unavailable", "The node's database is unavailable; retry later"),
    TransactionConflict: (
        503,
        "transaction-conflict",
        "The node's database aborted the request's transaction in a conflict with another; retry",
    ),
    Busy: (503, "busy", "The node is already doing as much of this work as it allows; retry later"),
}


class FieldProblem(BaseModel):
    """One invalid field of a request."""

    field: str = Field(description="where: a body path such as payload/victims/0/age, or a parameter")
    message: str


class RuleProblem(BaseModel):
    """One rule of the agreement that refused the request."""

    rule: str = Field(description="the rule's stable id")
    reason: str


class Problem(BaseModel):
    """An RFC 9457 problem: every error answer of the node has this shape."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description=f"a URI naming the kind of problem, under {PROBLEM_TYPE_BASE}")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[FieldProblem] | None = Field(default=None, description="every invalid field (422)")
    violations: list[RuleProblem] | None = Field(default=None, description="every refusing rule (403)")


#: what each problem status means on this API, for the OpenAPI description
PROBLEM_STATUSES: dict[int, str] = {
    400: "Malformed request: not JSON, a key repeated in one object, a NUL in the URL, or a rejected"
    " envelope or checkpoint",
    403: "The certificate may not use this endpoint, or the agreement's rules refused (each rule named)",
    404: "No such resource, or none this client may know of",
    405: "The method is not allowed on this path (see the Allow header)",
    409: "Conflicts with the state already recorded",
    410: "The resource existed but is gone for good",
    408: "The request body did not arrive within the node's body_timeout_seconds",
    413: "The request body is larger than the node accepts",
    415: "The request body is not application/json",
    422: "Invalid request: names every invalid field",
    500: "Internal error (logged); nothing of the request is revealed",
    502: "The partner node could not be reached",
    503: "The node cannot serve now (its database unavailable or busy, a transaction lost a conflict,"
    " or too many requests in progress: `overloaded`); retry after Retry-After seconds",
}


def problem(
    status: int, slug: str, title: str, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _row_for(exc: ExchangeError) -> tuple[int, str, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return 500, "internal", "Internal error"


async def exchange_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ExchangeError)
    status, slug, title = _row_for(exc)
    extra: dict[str, Any] = {}
    headers: dict[str, str] | None = None
    detail = str(exc)
    if isinstance(exc, InvalidInput):
        extra["errors"] = [{"field": e.field, "message": e.message} for e in exc.errors]
    if isinstance(exc, MessageTooLarge):
        extra["limit_bytes"] = exc.limit
        extra["envelope_bytes"] = exc.size
    if isinstance(exc, Unavailable):
        retry_after = request.app.state.node.settings.unavailable_retry_after_seconds
        headers = {"retry-after": str(retry_after)}
        detail = title
    elif isinstance(exc, PolicyRefusal):
        extra["violations"] = [
            {"rule": v.rule_id, "version": v.rule_version, "reason": v.reason, "remedy": v.remedy}
            for v in exc.violations
        ]
        log.info(
            "refused by the rules: %s",
            ", ".join(v.rule_id for v in exc.violations),
            extra=logs.fields(logs.Event.POLICY_REFUSED, rule_ids=[v.rule_id for v in exc.violations]),
        )
    elif isinstance(exc, ContentDestroyed):
        extra["destroyed_at"] = exc.destroyed_at
        extra["reason"] = exc.reason
    elif isinstance(exc, CheckpointConflict):
        extra["witnessed_size"] = exc.witnessed_size
        extra["incident"] = exc.incident
    elif isinstance(exc, EnvelopeError):
        detail = "rejected"  # a peer learns one opaque reason; the detail is in the log and ledger
    elif status >= 500:
        detail = title
    return problem(status, slug, title, detail, headers, **extra)


#: app.state attribute: request path -> a function naming further invalid fields of a body that
#: failed validation, so that one answer names every invalid field (not one round at a time)
MORE_FIELD_ERRORS = "more_field_errors"


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": "/".join(str(p) for p in err["loc"] if p != "body") or "(body)", "message": err["msg"]}
        for err in exc.errors()
    ]
    more = getattr(request.app.state, MORE_FIELD_ERRORS, {}).get(request.url.path)
    if more is not None and isinstance(exc.body, dict):
        errors += [{"field": e.field, "message": e.message} for e in more(exc.body)]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "invalid-input", "The request is invalid", detail, errors=errors)


async def http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (404 no route, 405 with its Allow header) as problem JSON."""
    assert isinstance(exc, StarletteHTTPException)
    return problem(
        exc.status_code, f"http-{exc.status_code}", str(exc.detail), str(exc.detail), headers=exc.headers
    )


async def unexpected_error_handler(_request: Request, _exc: Exception) -> JSONResponse:
    return problem(500, "internal", "Internal error", "an internal error occurred; it has been logged")
