"""Content at rest: a message's signed JWS encrypted under its own data key. Pure.

The at-rest form is a compact JWE (RFC 7516): ``alg`` A256KW (the per-message content key, fresh
for every encryption, wrapped by a key-encryption key), ``enc`` A256GCM, ``kid`` the KEK's id, and
in the protected header (authenticated as AES-GCM associated data) ``msg_id`` and ``meta``, the
SHA-256 of the message's immutable metadata. :func:`open_at_rest` returns the JWS only if the KEK
named by ``kid`` unwraps the content key, the ciphertext authenticates, and the header names the
expected message and metadata digest: a content moved to another row, or a row whose metadata was
edited, does not open.

Destroying a KEK (``exchange.keys.kek``) makes every at-rest copy wrapped by it unreadable, in the
database and in every backup of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from joserfc.registry import HeaderParameter

from exchange.canonical import canonical_json, sha256_hex
from exchange.crypto import constant_time_equal
from exchange.envelope.jose import peek_header
from exchange.envelope.size import LARGEST_ENVELOPE_BYTES
from exchange.errors import ContentUnavailable, EnvelopeError

AT_REST_TYP = "exchange-content+jwe"
_REGISTRY = jwe.JWERegistry(
    header_registry={
        "msg_id": HeaderParameter("exchange: the message id", "str", required=True),
        "meta": HeaderParameter("exchange: SHA-256 of the message metadata", "str", required=True),
    },
    algorithms=["A256KW", "A256GCM"],
)
_REGISTRY.max_ciphertext_length = LARGEST_ENVELOPE_BYTES  # joserfc's 64 KB default refused large messages

#: the metadata an at-rest copy is bound to: never changed after a message is accepted
BOUND_METADATA = (
    "id",
    "type",
    "sender",
    "recipient",
    "case_ref",
    "thread_id",
    "created_at",
    "envelope_sha256",
)


def metadata_digest(row: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the bound metadata of a message row."""
    return sha256_hex(canonical_json({name: row[name] for name in BOUND_METADATA}))


def seal_at_rest(signed: str, *, message_id: str, meta: str, kek: OctKey) -> str:
    """Encrypt a signed JWS for storage under a fresh content key wrapped by ``kek``."""
    if kek.kid is None:
        raise ValueError("the KEK must carry a kid")
    header = {
        "alg": "A256KW",
        "enc": "A256GCM",
        "kid": kek.kid,
        "typ": AT_REST_TYP,
        "msg_id": message_id,
        "meta": meta,
    }
    return jwe.encrypt_compact(header, signed.encode(), kek, registry=_REGISTRY)


def kek_id_of(compact: str) -> str:
    """The id of the KEK that wraps an at-rest copy (from its header, not verified)."""
    try:
        kid = peek_header(compact).get("kid")
    except EnvelopeError as exc:
        raise ContentUnavailable("the stored content is damaged") from exc
    if not isinstance(kid, str):
        raise ContentUnavailable("the stored content names no key")
    return kid


def open_at_rest(compact: str, *, message_id: str, meta: str, kek: Callable[[str], OctKey]) -> str:
    """The signed JWS of an at-rest copy (see the module docstring).

    ``kek`` returns the KEK of a kid, or raises ContentUnavailable if it was destroyed.

    Raises:
        ContentUnavailable: the KEK is gone, or the copy does not open or is not this message's.
    """
    key = kek(kek_id_of(compact))
    try:
        opened = jwe.decrypt_compact(compact, key, registry=_REGISTRY)
    except (JoseError, ValueError) as exc:
        raise ContentUnavailable("the stored content does not decrypt under its key") from exc
    header = opened.headers()
    if not constant_time_equal(str(header.get("msg_id")), message_id) or not constant_time_equal(
        str(header.get("meta")), meta
    ):
        raise ContentUnavailable("the stored content belongs to another message or its metadata changed")
    if opened.plaintext is None:
        raise ContentUnavailable("the stored content is empty")
    return opened.plaintext.decode()


def rewrap(compact: str, *, message_id: str, meta: str, old: Callable[[str], OctKey], new: OctKey) -> str:
    """The same content under a new KEK (a fresh content key). Raises ContentUnavailable."""
    return seal_at_rest(
        open_at_rest(compact, message_id=message_id, meta=meta, kek=old),
        message_id=message_id,
        meta=meta,
        kek=new,
    )
