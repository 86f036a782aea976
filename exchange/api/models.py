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
    """Accept an RFC 3339 date-time with a time zone (``2026-11-23T10:00:00Z``), or nothing; the
    instant in the form the ledger stores its times (UTC, microseconds), so that comparing the text
    compares the instants (``…T17:00+07:00`` is ``…T10:00:00.000000+00:00``)."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-23T10:00:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError("must name its time zone (Z or +07:00)")
    try:
        return parsed.astimezone(dt.UTC).isoformat(timespec="microseconds")
    except OverflowError:  # (0001-01-01T00:00+01:00 is before year 1 in UTC)
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None


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


class KeySetHealth(BaseModel):
    version: int = Field(description="this node's key set in force")
    unacknowledged: int = Field(description="versions of ours the partner has not acknowledged yet")
    partner_version: int = Field(description="the partner's key set this node trusts")


class AgreementHealth(BaseModel):
    version: str = Field(description="the agreement version in force, under which this node sends")
    digest: str = Field(description="its SHA-256 (schemas/agreement-digest.md)")
    held: list[str] = Field(
        description="every version this node holds, oldest first: the agreement file, then each one"
        " installed (`exchange agreement install`); a message is judged by the one in force when signed"
    )


class CertificateHealth(_Open):
    """One of the node's TLS certificates."""

    name: str = Field(description="the file: ca.pem, server.pem, node.pem or partner-ca.pem")
    owner: str = Field(description="the party it belongs to")
    subject: str = Field(description="its common name")
    not_after: dt.datetime | None = Field(description="when it expires (null: unreadable)")
    days_left: int | None = Field(description="whole days until it expires (negative: expired)")
    expiring: bool = Field(description="expires within the node's expiry_warning_days, or unreadable")


class Health(_Open):
    status: Literal["ok", "warning"] = Field(
        description="warning: a certificate of the node expires within expiry_warning_days (see certificates)"
    )
    certificates: list[CertificateHealth] = Field(
        description="the node's TLS certificates as they are on disk, the ones the node serves"
    )
    party: str
    agreement: AgreementHealth
    outbox: int
    ledger_size: int
    key_sets: KeySetHealth


class KeySetReceipt(BaseModel):
    receipt: str = Field(
        description="compact JWS (typ exchange-key-set-receipt+jws) by this node's signing key"
    )


class KeySets(BaseModel):
    announcements: list[str] = Field(description="signed key-set versions, oldest first (JWS JSON)")
