"""The message envelope: a compact JWS (EdDSA/Ed25519) nested in a compact JWE
(ECDH-ES+A256KW over X25519, A256GCM). Format: ``schemas/envelope.md``.

Guarantees of :func:`open_envelope` when it returns:
- the JWE decrypted under one of our keys named by its ``kid`` (so it was meant for us), with the
  protected header authenticated by AES-GCM;
- the JWS verified under a signing key of the expected sender, named by its ``kid``, and its payload
  is exactly the RFC 8785 canonical form of the message (so it has no duplicate member and no two
  parsers can read two different messages from the same signed bytes);
- the JWE protected header has every required field (``malformed`` otherwise, before decrypting),
  ``cty`` is ``JOSE``, and any ``crit`` parameter is one this implementation understands; other
  unknown parameters are ignored, as RFC 7515 §4 and RFC 7516 §4 require;
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
import hmac
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwe, jws
from joserfc.errors import (
    InvalidHeaderValueError,
    JoseError,
    MissingHeaderError,
    SecurityWarning,
    UnsupportedHeaderError,
)
from joserfc.jwk import OKPKey
from joserfc.registry import HeaderParameter

from exchange.canonical import canonical_json, sha256_hex
from exchange.envelope.size import LARGEST_ENVELOPE_BYTES
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
    jwe_registry = jwe.JWERegistry(
        header_registry=_registry_entries(), algorithms=[JWE_ALG, JWE_ENC], strict_check_header=False
    )
    jwe_registry.max_ciphertext_length = max_envelope_bytes
    jws_registry = jws.JWSRegistry(algorithms=[JWS_ALG], strict_check_header=False)
    jws_registry.max_payload_length = max_envelope_bytes
    return jwe_registry, jws_registry


# strict_check_header=False: an unknown parameter not listed in ``crit`` must be ignored (RFC 7516 §4,
# RFC 7515 §4); joserfc still refuses a ``crit`` that names a parameter outside the registry.
_JWE_REGISTRY, _JWS_REGISTRY = _registries(MAX_ENVELOPE_BYTES)
#: Header parameters this implementation understands, beyond the JOSE registries: what ``crit`` may name.
UNDERSTOOD_PARAMS = frozenset(HEADER_FIELDS)


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted envelope: only produced by :func:`open_envelope`."""

    message: dict[str, Any]
    header: dict[str, Any]
    signer_kid: KeyId
    recipient_kid: KeyId
    digest: str  # hex SHA-256 of the compact JWE as received
    signed: str = ""  # the verified compact JWS (kept at rest as evidence)


def envelope_digest(compact: str) -> str:
    """Hex SHA-256 of an envelope's compact serialisation: what receipts and ledgers name."""
    return sha256_hex(compact)


def _header_of(message: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {param: message[field] for param, field in HEADER_FIELDS.items()}
    except KeyError as exc:
        raise ValueError(f"message lacks the envelope field {exc.args[0]!r}") from exc


def sign(message: Mapping[str, Any], *, signing_key: OKPKey) -> str:
    """The compact JWS of ``message`` (canonical JSON). Raises ``ValueError`` without a kid."""
    if signing_key.kid is None:
        raise ValueError("the signing key must carry a kid")
    return jws.serialize_compact(
        {"alg": JWS_ALG, "kid": signing_key.kid, "typ": SIGNED_TYP},
        canonical_json(dict(message)),
        signing_key,
        registry=_JWS_REGISTRY,
    )


def signed_payload(signed: str) -> dict[str, Any]:
    """The message inside a compact JWS, NOT verified: only for a JWS this node signed itself or
    verified when it admitted it (content at rest). Raises EnvelopeError("malformed")."""
    try:
        stored_limit = _registries(LARGEST_ENVELOPE_BYTES)[1]  # our own copy: not the library default
        payload = json.loads(jws.extract_compact(signed.encode(), registry=stored_limit).payload)
    except (JoseError, ValueError) as exc:
        raise EnvelopeError("malformed", "not a compact JWS with a JSON payload") from exc
    if not isinstance(payload, dict):
        raise EnvelopeError("malformed", "the signed payload is not an object")
    return payload


def seal(message: Mapping[str, Any], *, signing_key: OKPKey, recipient_key: OKPKey) -> str:
    """Sign ``message`` (canonical JSON) and encrypt it for ``recipient_key``.

    Returns the compact JWE. Raises ``ValueError`` if the message lacks an envelope field or
    holds a value JSON cannot represent.
    """
    return seal_signed(sign(message, signing_key=signing_key), message, recipient_key=recipient_key)


def seal_signed(signed: str, message: Mapping[str, Any], *, recipient_key: OKPKey) -> str:
    """Encrypt the JWS ``signed`` of ``message`` for ``recipient_key`` (the envelope's JWE)."""
    if recipient_key.kid is None:
        raise ValueError("the recipient key must carry a kid")
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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise EnvelopeError("malformed", "the signed payload has a duplicate member")
    return dict(pairs)


def canonical_object(payload: bytes) -> dict[str, Any]:
    """The JSON object ``payload`` encodes, if it is exactly that object's RFC 8785 form.

    Raises:
        EnvelopeError: ``malformed``: not JSON, not an object, a duplicate member, or other bytes
            than the canonical form (whitespace, escapes, member order, number spelling).
    """
    try:
        message = json.loads(payload, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("malformed", "signed payload is not JSON") from exc
    if not isinstance(message, dict):
        raise EnvelopeError("malformed", "signed payload is not an object")
    try:
        canonical = canonical_json(message)
    except ValueError as exc:
        raise EnvelopeError("malformed", "signed payload holds a value outside RFC 8785") from exc
    if not hmac.compare_digest(canonical, payload):
        raise EnvelopeError("malformed", "signed payload is not its RFC 8785 canonical form")
    return message


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
    if header.get("cty") != "JOSE":
        raise EnvelopeError("malformed", "cty is not JOSE: the plaintext must be a JWS")
    missing = [param for param in HEADER_FIELDS if param not in header]
    if missing:
        raise EnvelopeError("malformed", f"the protected header lacks {', '.join(missing)}")
    crit = header.get("crit")
    if crit is not None and (
        not isinstance(crit, list)
        or not crit
        or any(not isinstance(p, str) or p not in UNDERSTOOD_PARAMS or p not in header for p in crit)
    ):
        raise EnvelopeError("malformed", f"crit names a parameter not understood: {crit!r}")
    recipient_kid = header.get("kid")
    if not isinstance(recipient_kid, str) or KeyId(recipient_kid) not in decryption_keys:
        raise EnvelopeError("unknown-recipient-key", f"kid {recipient_kid!r}")
    try:
        decrypted = jwe.decrypt_compact(compact, decryption_keys[KeyId(recipient_kid)], registry=jwe_registry)
    except (MissingHeaderError, InvalidHeaderValueError, UnsupportedHeaderError) as exc:
        raise EnvelopeError("malformed", type(exc).__name__) from exc
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
    message = canonical_object(verified.payload)
    in_header = {param: protected.get(param) for param in HEADER_FIELDS}
    in_message = {param: message.get(field) for param, field in HEADER_FIELDS.items()}
    if canonical_json(in_header) != canonical_json(in_message):  # one encoding each, not one per field
        for param, field in HEADER_FIELDS.items():
            if canonical_json(in_header[param]) != canonical_json(in_message[param]):
                raise EnvelopeError("header-mismatch", f"{param} differs from the signed {field}")
    return OpenedEnvelope(
        message=message,
        header=protected,
        signer_kid=KeyId(signer_kid),
        recipient_kid=KeyId(recipient_kid),
        digest=envelope_digest(compact),
        signed=signed.decode() if isinstance(signed, bytes) else str(signed),
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
