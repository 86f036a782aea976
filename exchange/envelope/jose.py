"""The message envelope: a compact JWS (EdDSA/Ed25519) nested in a compact JWE
(ECDH-ES+A256KW over X25519, A256GCM). Format: ``schemas/envelope.md``.

Guarantees of :func:`open_envelope` when it returns:
- the JWE decrypted under one of our keys named by its ``kid`` (so it was meant for us), with the
  protected header authenticated by AES-GCM;
- the JWS verified under a signing key of the expected sender, named by its ``kid``;
- every security field of the JWE protected header equals the same field of the signed message,
  so a header cannot be swapped between envelopes or edited in transit;
- sender and recipient are the expected parties, the agreement is one we hold, and the creation
  time is inside the replay window and not in the future beyond the allowed skew.
Otherwise it raises :class:`~exchange.errors.EnvelopeError` with a short reason code.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwe, jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import OKPKey
from joserfc.registry import HeaderParameter

from exchange.canonical import canonical_json, sha256_hex
from exchange.errors import EnvelopeError, ReplayRejected
from exchange.types import KeyId

# RFC 9864 deprecates the name "EdDSA" in favour of "Ed25519"; the agreement mandates "EdDSA"
# because every deployed JOSE library understands it (docs/adr/0002-jose-envelope.md).
warnings.filterwarnings("ignore", message="EdDSA is deprecated via RFC 9864", category=SecurityWarning)

JWS_ALG = "EdDSA"
JWE_ALG = "ECDH-ES+A256KW"
JWE_ENC = "A256GCM"
ENVELOPE_TYP = "exchange-envelope+jwe"
SIGNED_TYP = "exchange-message+jws"
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024  # the agreement's default max_envelope_bytes

#: JWE protected header parameter -> field of the signed message it must equal.
HEADER_FIELDS: dict[str, str] = {
    "msg_id": "id",
    "msg_type": "type",
    "sender": "sender",
    "recipient": "recipient",
    "classification": "classification",
    "tlp": "tlp",
    "handling_codes": "handling_codes",
    "agreement": "agreement",
    "created_at": "created_at",
}


def _is_dict(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError("must be an object")


def _registry_entries() -> dict[str, HeaderParameter]:
    kinds: dict[str, Any] = {"classification": _is_dict, "agreement": _is_dict, "handling_codes": "list[str]"}
    return {
        name: HeaderParameter(f"exchange: {name}", kinds.get(name, "str"), required=True)
        for name in HEADER_FIELDS
    }


@functools.lru_cache(maxsize=8)
def _registries(max_envelope_bytes: int) -> tuple[jwe.JWERegistry, jws.JWSRegistry]:
    """The JOSE registries with their size limits set from the agreement's ``max_envelope_bytes``
    (the library's defaults, 64 KB of ciphertext and 128 KB of JWS payload, would refuse a message
    the sender accepted)."""
    jwe_registry = jwe.JWERegistry(header_registry=_registry_entries(), algorithms=[JWE_ALG, JWE_ENC])
    jwe_registry.max_ciphertext_length = max_envelope_bytes
    jws_registry = jws.JWSRegistry(algorithms=[JWS_ALG])
    jws_registry.max_payload_length = max_envelope_bytes
    return jwe_registry, jws_registry


_JWE_REGISTRY, _JWS_REGISTRY = _registries(MAX_ENVELOPE_BYTES)


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted envelope: only produced by :func:`open_envelope`."""

    message: dict[str, Any]
    header: dict[str, Any]
    signer_kid: KeyId
    recipient_kid: KeyId
    digest: str  # hex SHA-256 of the compact JWE as received


def envelope_digest(compact: str) -> str:
    """Hex SHA-256 of an envelope's compact serialisation: what receipts and ledgers name."""
    return sha256_hex(compact)


def _header_of(message: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {param: message[field] for param, field in HEADER_FIELDS.items()}
    except KeyError as exc:
        raise ValueError(f"message lacks the envelope field {exc.args[0]!r}") from exc


def seal(message: Mapping[str, Any], *, signing_key: OKPKey, recipient_key: OKPKey) -> str:
    """Sign ``message`` (canonical JSON) and encrypt it for ``recipient_key``.

    Returns the compact JWE. Raises ``ValueError`` if the message lacks an envelope field or
    holds a value JSON cannot represent.
    """
    if signing_key.kid is None or recipient_key.kid is None:
        raise ValueError("both keys must carry a kid")
    signed = jws.serialize_compact(
        {"alg": JWS_ALG, "kid": signing_key.kid, "typ": SIGNED_TYP},
        canonical_json(dict(message)),
        signing_key,
        registry=_JWS_REGISTRY,
    )
    protected = {
        "alg": JWE_ALG,
        "enc": JWE_ENC,
        "kid": recipient_key.kid,
        "typ": ENVELOPE_TYP,
        "cty": "JOSE",
        **_header_of(message),
    }
    return jwe.encrypt_compact(protected, signed, recipient_key, registry=_JWE_REGISTRY)


def _protected_header(compact: bytes | str, parts: int, what: str) -> dict[str, Any]:
    text = compact.decode() if isinstance(compact, bytes) else compact
    pieces = text.split(".")
    if len(pieces) != parts:
        raise EnvelopeError("malformed", f"not a compact {what}")
    try:
        header = json.loads(base64.urlsafe_b64decode(pieces[0] + "=" * (-len(pieces[0]) % 4)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError("malformed", f"{what} header is not base64url JSON") from exc
    if not isinstance(header, dict):
        raise EnvelopeError("malformed", f"{what} header is not an object")
    return header


def peek_header(compact: str) -> dict[str, Any]:
    """The JWE protected header, decoded but NOT verified: for routing and logs only.

    Raises EnvelopeError("malformed") if it is not a compact JWE with a JSON object header.
    """
    return _protected_header(compact, 5, "JWE")


def peek_jws_header(compact: bytes | str) -> dict[str, Any]:
    """The protected header of a compact JWS, decoded but NOT verified.

    Raises EnvelopeError("malformed") if it is not a compact JWS with a JSON object header.
    """
    return _protected_header(compact, 3, "JWS")


def _parse_time(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise EnvelopeError("malformed", "created_at is not a string")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise EnvelopeError("malformed", "created_at is not RFC 3339") from exc
    if parsed.tzinfo is None:
        raise EnvelopeError("malformed", "created_at has no time zone")
    return parsed


def _decrypt_and_verify(
    compact: str,
    decryption_keys: Mapping[KeyId, OKPKey],
    verification_keys: Mapping[KeyId, OKPKey],
    max_envelope_bytes: int,
) -> OpenedEnvelope:
    if len(compact) > max_envelope_bytes:
        raise EnvelopeError("too-large", f"{len(compact)} bytes, limit {max_envelope_bytes}")
    jwe_registry, jws_registry = _registries(max_envelope_bytes)
    header = peek_header(compact)
    if header.get("alg") != JWE_ALG or header.get("enc") != JWE_ENC or header.get("typ") != ENVELOPE_TYP:
        raise EnvelopeError("malformed", "unexpected alg, enc or typ")
    recipient_kid = header.get("kid")
    if not isinstance(recipient_kid, str) or KeyId(recipient_kid) not in decryption_keys:
        raise EnvelopeError("unknown-recipient-key", f"kid {recipient_kid!r}")
    try:
        decrypted = jwe.decrypt_compact(compact, decryption_keys[KeyId(recipient_kid)], registry=jwe_registry)
    except (JoseError, ValueError) as exc:
        raise EnvelopeError("decrypt-failed", type(exc).__name__) from exc
    if decrypted.plaintext is None:
        raise EnvelopeError("decrypt-failed", "empty plaintext")
    protected = decrypted.headers()
    signed = decrypted.plaintext
    signer_kid = peek_jws_header(signed).get("kid")
    if not isinstance(signer_kid, str) or KeyId(signer_kid) not in verification_keys:
        raise EnvelopeError("unknown-signing-key", f"kid {signer_kid!r}")
    try:
        verified = jws.deserialize_compact(
            signed, verification_keys[KeyId(signer_kid)], registry=jws_registry
        )
    except (JoseError, ValueError) as exc:
        raise EnvelopeError("bad-signature", type(exc).__name__) from exc
    if verified.headers().get("typ") != SIGNED_TYP:
        raise EnvelopeError("malformed", "inner JWS has the wrong typ")
    try:
        message = json.loads(verified.payload)
    except ValueError as exc:
        raise EnvelopeError("malformed", "signed payload is not JSON") from exc
    if not isinstance(message, dict):
        raise EnvelopeError("malformed", "signed payload is not an object")
    for param, field in HEADER_FIELDS.items():
        if canonical_json(protected.get(param)) != canonical_json(message.get(field)):
            raise EnvelopeError("header-mismatch", f"{param} differs from the signed {field}")
    return OpenedEnvelope(
        message=message,
        header=protected,
        signer_kid=KeyId(signer_kid),
        recipient_kid=KeyId(recipient_kid),
        digest=envelope_digest(compact),
    )


def open_stored(
    compact: str,
    *,
    decryption_keys: Mapping[KeyId, OKPKey],
    verification_keys: Mapping[KeyId, OKPKey],
    max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
) -> OpenedEnvelope:
    """Decrypt and verify an envelope this node already admitted and stored (no freshness checks).

    Raises:
        EnvelopeError: as :func:`open_envelope`, for the cryptographic and header checks.
    """
    return _decrypt_and_verify(compact, decryption_keys, verification_keys, max_envelope_bytes)


def open_envelope(
    compact: str,
    *,
    decryption_keys: Mapping[KeyId, OKPKey],
    verification_keys: Mapping[KeyId, OKPKey],
    expected_sender: str,
    expected_recipient: str,
    accepted_agreements: Mapping[str, str],
    now: dt.datetime,
    clock_skew: dt.timedelta,
    replay_window: dt.timedelta,
    max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
) -> OpenedEnvelope:
    """Decrypt, verify and admit an envelope (see the module docstring for the guarantees).

    ``accepted_agreements`` maps each agreement version this node holds to its digest;
    ``max_envelope_bytes`` is the agreement's limit, which the JOSE library's limits follow.

    Raises:
        EnvelopeError: reason ``malformed``, ``unknown-recipient-key``, ``decrypt-failed``,
            ``unknown-signing-key``, ``bad-signature``, ``header-mismatch``, ``too-large``,
            ``wrong-recipient``, ``wrong-sender`` or ``unknown-agreement``.
        ReplayRejected: reason ``expired`` or ``future``.
    """
    opened = _decrypt_and_verify(compact, decryption_keys, verification_keys, max_envelope_bytes)
    message, signer_kid = opened.message, opened.signer_kid
    if message["recipient"] != expected_recipient:
        raise EnvelopeError("wrong-recipient", f"addressed to {message['recipient']!r}")
    if message["sender"] != expected_sender:
        raise EnvelopeError("wrong-sender", f"sent by {message['sender']!r}")
    if not str(signer_kid).startswith(f"{expected_sender}-"):
        raise EnvelopeError("wrong-sender", "signing key belongs to another party")
    agreement = message["agreement"]
    version = agreement.get("version")
    if version not in accepted_agreements or agreement.get("digest") != accepted_agreements[version]:
        raise EnvelopeError("unknown-agreement", f"version {version!r}")
    created = _parse_time(message["created_at"])
    if created > now + clock_skew:
        raise ReplayRejected("future", f"created {created.isoformat()}")
    if created < now - replay_window:
        raise ReplayRejected("expired", f"created {created.isoformat()}")
    return opened
