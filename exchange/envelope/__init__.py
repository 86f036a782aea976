"""Seal and open envelopes (a JWS inside a JWE) and sign and verify receipts. Pure functions."""

from exchange.envelope.jose import (
    HEADER_FIELDS,
    OpenedEnvelope,
    envelope_digest,
    open_envelope,
    open_stored,
    peek_header,
    seal,
    seal_signed,
    sign,
    signed_payload,
)
from exchange.envelope.receipt import Receipt, sign_receipt, verify_receipt
from exchange.envelope.size import check_envelope_size, peer_body_limit

__all__ = [
    "HEADER_FIELDS",
    "OpenedEnvelope",
    "Receipt",
    "check_envelope_size",
    "envelope_digest",
    "open_envelope",
    "open_stored",
    "peek_header",
    "peer_body_limit",
    "seal",
    "seal_signed",
    "sign",
    "sign_receipt",
    "signed_payload",
    "verify_receipt",
]
