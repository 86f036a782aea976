"""Signed receipts: the receiving node's proof that it accepted an envelope.

A receipt is a compact JWS (EdDSA) over canonical JSON naming the message id, the SHA-256 of the
envelope exactly as received, the receiver, the sender and the time of receipt. The sender
verifies it against the receiver's pinned signing keys and its own digest of what it sent, so a
receipt cannot be moved to another message or another envelope.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from exchange.canonical import canonical_json
from exchange.crypto import constant_time_equal
from exchange.envelope.jose import JWS_ALG, canonical_object, peek_jws_header
from exchange.errors import EnvelopeError
from exchange.types import KeyId

RECEIPT_TYP = "exchange-receipt+jws"
_REGISTRY = jws.JWSRegistry(algorithms=[JWS_ALG], strict_check_header=False)  # RFC 7515 §4


@dataclass(frozen=True)
class Receipt:
    """A verified receipt."""

    message_id: str
    envelope_sha256: str
    receiver: str
    sender: str
    received_at: str
    signer_kid: KeyId
    compact: str


def sign_receipt(
    *,
    message_id: str,
    envelope_sha256: str,
    receiver: str,
    sender: str,
    received_at: dt.datetime,
    signing_key: OKPKey,
) -> str:
    """A compact JWS receipt signed by ``signing_key``."""
    body = {
        "message_id": message_id,
        "envelope_sha256": envelope_sha256,
        "receiver": receiver,
        "sender": sender,
        "received_at": received_at.isoformat(timespec="microseconds"),
    }
    header = {"alg": JWS_ALG, "kid": signing_key.kid, "typ": RECEIPT_TYP}
    return jws.serialize_compact(header, canonical_json(body), signing_key, registry=_REGISTRY)


def verify_receipt(
    compact: str,
    *,
    verification_keys: Mapping[KeyId, OKPKey],
    expected_message_id: str,
    expected_envelope_sha256: str,
    expected_receiver: str,
) -> Receipt:
    """Verify a receipt for the envelope we sent.

    Raises:
        EnvelopeError: reason ``malformed`` (also: ``received_at`` not a time with its offset),
            ``unknown-signing-key``, ``bad-signature`` or ``receipt-mismatch`` (signed for another
            message, envelope or receiver).
    """
    header = peek_jws_header(compact)
    kid = header.get("kid")
    if header.get("typ") != RECEIPT_TYP:
        raise EnvelopeError("malformed", "not a receipt")
    if not isinstance(kid, str) or KeyId(kid) not in verification_keys:
        raise EnvelopeError("unknown-signing-key", f"kid {kid!r}")
    try:
        verified = jws.deserialize_compact(compact, verification_keys[KeyId(kid)], registry=_REGISTRY)
    except (JoseError, ValueError) as exc:
        raise EnvelopeError("bad-signature", type(exc).__name__) from exc
    body = canonical_object(verified.payload)  # exactly RFC 8785, as the envelope's payload
    if not (
        body.get("message_id") == expected_message_id
        and constant_time_equal(str(body.get("envelope_sha256", "")), expected_envelope_sha256)
        and body.get("receiver") == expected_receiver
    ):
        raise EnvelopeError("receipt-mismatch", "the receipt names another message, envelope or receiver")
    received_at = body.get("received_at")
    try:
        at = dt.datetime.fromisoformat(received_at) if isinstance(received_at, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:  # (it is compared with times that have theirs)
        raise EnvelopeError("malformed", "received_at is not an RFC 3339 time with its offset")
    return Receipt(
        message_id=str(body["message_id"]),
        envelope_sha256=str(body["envelope_sha256"]),
        receiver=str(body["receiver"]),
        sender=str(body.get("sender", "")),
        received_at=str(body.get("received_at", "")),
        signer_kid=KeyId(kid),
        compact=compact,
    )
