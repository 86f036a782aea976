"""The names of ledger events about messages and decisions, defined once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    AGREEMENT_INSTALLED = "agreement.installed"  # a new agreement version, in force from its effective_from


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


def key_set_mismatch(
    entries: Iterable[LedgerEntry], party: str, digests: Sequence[str]
) -> tuple[int, str] | None:
    """The first of ``entries`` (of :data:`KEY_SET_RECORDED`) recording a version of ``party``'s
    key set that ``digests`` (the SHA-256 of its stored announcements of versions 2, 3, ... in
    order) lacks or holds with another digest: (its sequence number, what is wrong), else None.
    A deleted version would bring back a key a later version revoked; a replaced one, a key the
    ledgered version never listed."""
    for entry in entries:
        version, digest = entry.data.get("version"), entry.data.get("sha256")
        if entry.event not in KEY_SET_RECORDED or str(entry.data.get("party", entry.actor)) != party:
            continue
        if not isinstance(version, int) or version < 2:
            continue
        if version - 2 >= len(digests):
            return entry.seq, (
                f"records {party}'s key set version {version}, but the key sets stored go up to"
                f" version {len(digests) + 1} only: a version was deleted"
            )
        if digests[version - 2] != digest:
            return entry.seq, (
                f"records {party}'s key set version {version} with another digest than the one"
                " stored: the version was replaced"
            )
    return None
