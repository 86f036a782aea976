"""The names of ledger events about messages and decisions, defined once."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from exchange.ledger.entries import LedgerEntry


class LedgerEvent(StrEnum):
    SUBMITTED = "message.submitted"
    SUBMISSION_REFUSED = "submission.refused"
    RECEIVED = "envelope.received"
    REDELIVERED = "envelope.redelivered"
    REJECTED = "envelope.rejected"
    RECEIPT_ISSUED = "receipt.issued"
    RECEIPT_VERIFIED = "receipt.verified"
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
    KEYS_ROTATED = "keys.rotated"  # a next key made and announced
    KEYS_ACTIVATED = "keys.activated"  # a next key made active, the old one retiring
    KEYS_RETIRED = "keys.retired"  # a retiring key retired, its private key destroyed
    KEYS_REVOKED = "keys.revoked"
    KEYS_RENEWED = "keys.renewed"  # the same keys with a fresh expiry
    KEYS_ACCEPTED = "keys.accepted"  # a partner's key-set version accepted
    KEYS_REJECTED = "keys.rejected"  # a partner's key-set announcement refused, or its receipt of ours
    KEYS_ACKNOWLEDGED = "keys.acknowledged"  # the partner's signed receipt of our versions
    TLS_CERTIFICATE_RENEWED = "tls.certificate_renewed"  # the node's server or node certificate replaced
    CLIENT_CERTIFICATE_RENEWED = "client.certificate_renewed"  # a local system's certificate replaced


#: the events that record a key-set version as published (this node's steps, ``data.version``) or
#: accepted (the partner's, ``data.party`` and ``data.version``): the key_sets table must hold it
KEY_SET_RECORDED = (
    LedgerEvent.KEYS_ROTATED,
    LedgerEvent.KEYS_ACTIVATED,
    LedgerEvent.KEYS_RETIRED,
    LedgerEvent.KEYS_REVOKED,
    LedgerEvent.KEYS_RENEWED,
    LedgerEvent.KEYS_ACCEPTED,
)


def recorded_key_set_versions(entries: Iterable[LedgerEntry]) -> dict[str, tuple[int, int]]:
    """By party, the highest key-set version ``entries`` (of :data:`KEY_SET_RECORDED`) record as
    published or accepted, with the sequence number of the entry that records it."""
    found: dict[str, tuple[int, int]] = {}
    for entry in entries:
        version = entry.data.get("version")
        if entry.event not in KEY_SET_RECORDED or not isinstance(version, int):
            continue
        party = str(entry.data.get("party", entry.actor))
        if version > found.get(party, (1, -1))[0]:
            found[party] = (version, entry.seq)
    return found
