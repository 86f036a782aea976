"""The names of ledger events about messages and decisions, defined once."""

from __future__ import annotations

from enum import StrEnum


class LedgerEvent(StrEnum):
    SUBMITTED = "message.submitted"
    SUBMISSION_REFUSED = "submission.refused"
    RECEIVED = "envelope.received"
    REDELIVERED = "envelope.redelivered"
    REJECTED = "envelope.rejected"
    RECEIPT_ISSUED = "receipt.issued"
    RELEASED = "message.released"
    RELEASE_REFUSED = "release.refused"
    POLICY_INCIDENT = "policy.incident"
    DESTROYED = "message.destroyed"
    DESTRUCTION_CERTIFIED = "destruction.certified"
    READ = "message.read"
    ONWARD_RELEASED = "message.released_onward"
    ONWARD_REFUSED = "onward.refused"
    CONSENT_REQUESTED = "consent.requested"
    CONSENT_DECIDED = "consent.decided"
    RECLASSIFIED = "message.reclassified"
    CONTROL_REJECTED = "control.rejected"
    REQUEST_OVERDUE = "request.overdue"
    INCIDENT_NOTIFIED = "incident.notified"
    SEALED_AT_REST = "message.sealed_at_rest"
