"""Typed answers and parameter types of the HTTP API, for the OpenAPI description.

Each answer names the fields integrators rely on; nested records that other modules own (ledger
entries, inbox items) are described as objects, and every model admits further fields, so adding a
field to an answer never breaks the contract.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: the largest integer a cursor, sequence number or size may be (a signed 64-bit database column)
MAX_INT64 = 2**63 - 1
Int64 = Annotated[int, Field(le=MAX_INT64)]


def _rfc3339(value: str | None) -> str | None:
    """Accept an RFC 3339 date-time with a time zone (``2026-11-23T10:00:00Z``), or nothing."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-23T10:00:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError("must name its time zone (Z or +07:00)")
    return value


RFC3339 = Annotated[str | None, AfterValidator(_rfc3339)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Receipt(_Open):
    jws: str = Field(description="the partner node's signed receipt (compact JWS)")
    received_at: str | None = None


class MessageStatus(_Open):
    """What a local system may know of a message it sent or received."""

    id: str
    status: str = Field(description="queued, sent, delivered, failed (outbound) or received (inbound)")
    status_reason: str | None = None
    attempts: int | None = None
    receipt: Receipt | None = None


class InboxPage(_Open):
    items: list[dict[str, Any]] = Field(description="released messages, redacted where the rules say")
    next_cursor: int = Field(description="pass as `after` to read on")


class EnvelopeResult(_Open):
    status: Literal["accepted", "rejected"]
    receipt: str | None = Field(default=None, description="signed receipt (compact JWS) when accepted")


class EnvelopeResults(_Open):
    results: list[EnvelopeResult] = Field(description="one per envelope, in order")


class LedgerEntries(_Open):
    entries: list[dict[str, Any]] = Field(description="ledger entries: ids, hashes, decisions; no content")


class Health(_Open):
    status: Literal["ok"]
    party: str
    agreement: dict[str, str]
    outbox: int
    ledger_size: int
