"""A node's public key set and the announcements that change it, in the manner of TUF's root
rotation. Pure: documents, keys and an explicit ``now`` in, a value or an exception out.

A key set lists every key of a party with its purpose (signing, encryption, checkpoint), state
(next, active, retiring, retired, revoked), validity and revocation time; it has a version, an
expiry, and the SHA-256 of the previous announcement (so versions cannot be mixed and matched). An
announcement is the key set's RFC 8785 JSON signed as a JWS in the general JSON serialization, one
signature per signing key.

:func:`accept` takes version N+1 on top of a trusted version N only if: it is for the same party;
its version is exactly N+1 (no rollback, no replay, no skipped version: a node several versions behind
walks every version in order with :func:`walk`); it names the digest of N's announcement; it is
unexpired at the one evaluation time given; and it is signed by N's active signing key, by the new
set's active signing key and by every signing key it introduces (proof of possession), each key
counted once, a second signature by the same key refused. :func:`key_in_force` judges a signature
by the key set in force when it was made: a revoked key is trusted only for what it signed before
its revocation time.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet as JWKSet
from joserfc.jwk import OKPKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from exchange.canonical import canonical_json, sha256_hex
from exchange.errors import KeyManagementError
from exchange.types import KeyId

KEY_SET_FORMAT = "exchange-key-set/1"
ANNOUNCEMENT_TYP = "exchange-key-set+jws"
RECEIPT_TYP = "exchange-key-set-receipt+jws"
MAX_KEYS = 64  # keys one key set may list
_JWS = jws.JWSRegistry(algorithms=["EdDSA"])
Purpose = Literal["signing", "encryption", "checkpoint"]
State = Literal["next", "active", "retiring", "retired", "revoked"]


class AnnouncementRejected(KeyManagementError):
    """A key-set announcement that is not accepted; ``reason`` is a short code for the ledger."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class PublicKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kty: Literal["OKP"]
    crv: Literal["Ed25519", "X25519"]
    x: str = Field(min_length=43, max_length=43)


@functools.lru_cache(maxsize=1024)
def _jose_key(kid: str, kty: str, crv: str, x: str) -> OKPKey:
    """A public OKP key as a JOSE key, built once: the receiver looks its partner's keys up for
    every message. Keys are only read, so threads share them."""
    return OKPKey.import_key({"kty": kty, "crv": crv, "x": x, "kid": kid})


class KeyEntry(BaseModel):
    """One key of a party and where it stands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kid: str = Field(min_length=1, max_length=128)
    purpose: Purpose
    state: State
    jwk: PublicKey
    valid_from: AwareDatetime  # (a time without a zone cannot be compared: refused, never stored)
    valid_until: AwareDatetime | None = None
    revoked_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KeyEntry:
        if (self.state == "revoked") != (self.revoked_at is not None):
            raise ValueError(f"key {self.kid}: a revoked key, and only one, has a revocation time")
        wanted = "X25519" if self.purpose == "encryption" else "Ed25519"
        if self.jwk.crv != wanted:
            raise ValueError(f"key {self.kid}: a {self.purpose} key is {wanted}")
        return self

    @classmethod
    def public(
        cls, kid: str, purpose: Purpose, state: State, jwk: Mapping[str, str], valid_from: dt.datetime
    ) -> KeyEntry:
        """An entry for the public half of ``jwk`` (its ``kty``, ``crv`` and ``x``: whatever else
        it holds, a private part included, is left out). Raises ValidationError if it is not a
        public key of ``purpose``."""
        return cls.model_validate(
            {
                "kid": kid,
                "purpose": purpose,
                "state": state,
                "jwk": {"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"]},
                "valid_from": valid_from,
            }
        )

    @property
    def okp(self) -> OKPKey:
        """The key as a JOSE key (built once per kid and public key: see :func:`_jose_key`)."""
        return _jose_key(self.kid, self.jwk.kty, self.jwk.crv, self.jwk.x)


class KeySet(BaseModel):
    """A party's public keys at one version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["exchange-key-set/1"] = "exchange-key-set/1"
    party: str
    version: int = Field(ge=1)
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    previous: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tls_pins: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], ...] = Field(
        default=(),
        max_length=4,
        description="the node-to-node certificate keys the partner admits: hex SHA-256 of each"
        " SubjectPublicKeyInfo (two while a certificate key is replaced)",
    )
    keys: tuple[KeyEntry, ...] = Field(min_length=1, max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _one_active_each(self) -> KeySet:
        kids = [k.kid for k in self.keys]
        if len(set(kids)) != len(kids):
            raise ValueError("a key id is listed twice")
        for purpose in ("signing", "encryption", "checkpoint"):
            if sum(k.purpose == purpose and k.state == "active" for k in self.keys) != 1:
                raise ValueError(f"exactly one active {purpose} key")
        if (self.version == 1) != (self.previous is None):
            raise ValueError("version 1, and only it, has no previous announcement")
        return self

    def active(self, purpose: Purpose) -> KeyEntry:
        return next(k for k in self.keys if k.purpose == purpose and k.state == "active")

    def key(self, kid: str) -> KeyEntry | None:
        return next((k for k in self.keys if k.kid == kid), None)


@dataclass(frozen=True)
class Trusted:
    """A key set this node trusts, with the digest of the announcement that carried it."""

    key_set: KeySet
    digest: str


def announce(key_set: KeySet, signers: Sequence[OKPKey]) -> str:
    """The announcement of ``key_set`` signed by each of ``signers`` (JWS general JSON)."""
    payload = canonical_json(key_set.model_dump(mode="json", exclude_none=True))
    members: list[Any] = [
        {"protected": {"alg": "EdDSA", "kid": k.kid, "typ": ANNOUNCEMENT_TYP}} for k in signers
    ]
    signed = jws.serialize_json(members, payload, JWKSet(list(signers)), registry=_JWS)
    return json.dumps(signed, sort_keys=True)


def announcement_digest(announcement: str) -> str:
    return sha256_hex(announcement)


def _signers(announcement: str, keys: dict[str, OKPKey]) -> tuple[KeySet, list[str]]:
    """The key set an announcement carries and the kids of ``keys`` whose signature verifies.

    Raises AnnouncementRejected: not a general JWS of a key set, or a key that signed twice.
    """
    try:
        document = json.loads(announcement)
        signatures = document["signatures"]
        payload = document["payload"]
        if not isinstance(signatures, list) or not isinstance(payload, str):
            raise TypeError("signatures and payload")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise AnnouncementRejected("malformed", "not a JWS in the general JSON serialization") from exc
    verified: list[str] = []
    seen: set[str] = set()
    for member in signatures:
        try:
            flattened: Any = {
                "payload": payload,
                "protected": member["protected"],
                "signature": member["signature"],
            }
            header = json.loads(_b64decode(member["protected"]))
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise AnnouncementRejected("malformed", "a signature without its protected header") from exc
        kid = header.get("kid") if isinstance(header, dict) else None
        if not isinstance(kid, str):
            raise AnnouncementRejected("malformed", "a signature names no key")
        if kid in seen:
            raise AnnouncementRejected("duplicate-signature", f"key {kid} signed twice")
        seen.add(kid)
        key = keys.get(kid)
        if key is None:
            continue  # a signature by a key we do not know counts for nothing
        try:
            jws.deserialize_json(flattened, key, registry=_JWS)
        except (JoseError, ValueError):
            continue
        verified.append(kid)
    try:
        key_set = KeySet.model_validate_json(_b64decode(payload))
    except (ValidationError, ValueError, RecursionError) as exc:
        raise AnnouncementRejected("malformed", "the payload is not a key set") from exc
    if canonical_json(key_set.model_dump(mode="json", exclude_none=True)) != _b64decode(payload):
        raise AnnouncementRejected("malformed", "the payload is not its RFC 8785 form")
    return key_set, verified


def unverified_key_set(announcement: str) -> KeySet:
    """The key set an announcement carries, its signatures NOT checked (for display and ledger
    entries only; trust comes from :func:`accept`). Raises AnnouncementRejected if malformed."""
    return _signers(announcement, {})[0]


def claimed_version(announcement: str) -> int | None:
    """The version an announcement claims, read without trusting or validating it (for the
    ledger entry of a refusal); None if it names none."""
    try:
        version = json.loads(_b64decode(json.loads(announcement)["payload"]))["version"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return version if isinstance(version, int) else None


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def accept(
    trusted: Trusted,
    announcement: str,
    now: dt.datetime,
    *,
    final: bool = True,
    known: Mapping[str, KeyEntry] | None = None,
) -> Trusted:
    """Version N+1 on top of the trusted version N (see the module docstring). Only the ``final``
    version of a walk must be unexpired (as TUF checks only the last root): a partner that was away
    walks through versions that have expired since. ``known`` holds every key the party's earlier
    versions listed (by kid, as last listed): a key id keeps its key and purpose forever, a key enters
    only as ``next`` or ``active``, a retired or revoked key never comes back, and only a retired or
    revoked key may leave the set.

    Raises:
        AnnouncementRejected: ``malformed``, ``wrong-party``, ``rollback``, ``replay``,
            ``skipped-version``, ``mix-and-match``, ``issued-before`` (an issue time going back),
            ``expired`` (also: expiring when issued), ``key-changed``, ``bad-transition``,
            ``duplicate-signature``, ``missing-old-signature`` or ``missing-new-signature``.
    """
    old = trusted.key_set
    key_set, _ = _signers(announcement, {})  # parse first: versions, then continuity, then signatures
    if key_set.party != old.party:
        raise AnnouncementRejected("wrong-party", f"{key_set.party} is not {old.party}")
    if key_set.version < old.version:
        raise AnnouncementRejected("rollback", f"version {key_set.version} after {old.version}")
    if key_set.version == old.version:
        raise AnnouncementRejected("replay", f"version {key_set.version} again")
    if key_set.version > old.version + 1:
        raise AnnouncementRejected("skipped-version", f"version {key_set.version} after {old.version}")
    if key_set.previous != trusted.digest:
        raise AnnouncementRejected("mix-and-match", "it does not name the announcement trusted before it")
    if key_set.issued_at < old.issued_at:
        raise AnnouncementRejected("issued-before", f"version {key_set.version} is issued before the last")
    if key_set.expires_at <= key_set.issued_at:
        raise AnnouncementRejected("expired", f"version {key_set.version} expired when it was issued")
    if final and key_set.expires_at <= now:
        raise AnnouncementRejected("expired", f"expired at {key_set.expires_at.isoformat()}")
    ever = {**(known or {}), **{k.kid: k for k in old.keys}}
    _check_continuity(old, key_set, ever)
    # the old signature is checked with the OLD key; a new key id is new (continuity checked above)
    introduced = {k.kid: k.okp for k in key_set.keys if k.purpose == "signing" and k.kid not in ever}
    candidates = {**introduced, **{k.kid: k.okp for k in old.keys if k.purpose == "signing"}}
    key_set, verified = _signers(announcement, candidates)
    if old.active("signing").kid not in verified:
        raise AnnouncementRejected(
            "missing-old-signature", "not signed by the active signing key of the last version"
        )
    for kid in introduced:
        if kid not in verified:
            raise AnnouncementRejected("missing-new-signature", f"not signed by its new signing key {kid}")
    if key_set.active("signing").kid not in verified:
        raise AnnouncementRejected("missing-new-signature", "not signed by its own active signing key")
    return Trusted(key_set, announcement_digest(announcement))


def _check_continuity(old: KeySet, new: KeySet, ever: Mapping[str, KeyEntry]) -> None:
    """Raise AnnouncementRejected (``key-changed`` or ``bad-transition``) unless every key of ``new``
    continues what the history said of it."""
    listed = {k.kid for k in new.keys}
    for key in new.keys:
        before = ever.get(key.kid)
        if before is None:
            if key.state not in ("next", "active"):
                raise AnnouncementRejected("bad-transition", f"{key.kid} is new: it enters as next or active")
            continue
        if before.jwk != key.jwk or before.purpose != key.purpose:
            raise AnnouncementRejected("key-changed", f"{key.kid} names another key than before")
        if before.state == "revoked" and (key.state != "revoked" or key.revoked_at != before.revoked_at):
            raise AnnouncementRejected("bad-transition", f"{key.kid} was revoked from {before.revoked_at}")
        if before.state == "retired" and key.state not in ("retired", "revoked"):
            raise AnnouncementRejected("bad-transition", f"{key.kid} was retired")
    for key in old.keys:
        if key.kid not in listed and key.state not in ("retired", "revoked"):
            raise AnnouncementRejected("bad-transition", f"{key.kid} left the set while {key.state}")


def walk(
    trusted: Trusted,
    announcements: Sequence[str],
    now: dt.datetime,
    known: Mapping[str, KeyEntry] | None = None,
) -> list[Trusted]:
    """Every version from the trusted one on, each accepted on top of the last.

    Raises:
        AnnouncementRejected: at the first version that is not accepted.
    """
    history = [trusted]
    known = {**(known or {}), **{k.kid: k for k in trusted.key_set.keys}}
    for n, announcement in enumerate(announcements, start=1):
        history.append(accept(history[-1], announcement, now, final=n == len(announcements), known=known))
        known.update({k.kid: k for k in history[-1].key_set.keys})
    return history


def key_in_force(history: Sequence[KeySet], kid: str, signed_at: dt.datetime) -> KeyEntry | None:
    """The key ``kid`` as the key set in force at ``signed_at`` has it, if it was trusted for what it
    signed then: listed, not revoked before that time (in any later version), and valid then."""
    in_force = [s for s in history if s.issued_at <= signed_at]
    if not in_force:
        return None
    entry = in_force[-1].key(kid)
    if entry is None or entry.state in ("next",) or signed_at < entry.valid_from:
        return None
    if entry.valid_until is not None and signed_at >= entry.valid_until:
        return None
    for later in history:
        revoked = later.key(kid)
        if revoked is not None and revoked.revoked_at is not None and revoked.revoked_at <= signed_at:
            return None
    return entry


def key_in_force_from(history: Sequence[KeySet], kid: str) -> dt.datetime | None:
    """The earliest time at which ``key_in_force`` trusts ``kid``'s signatures: the first version
    listing it other than ``next``, from its issue and the key's ``valid_from`` (None if none does)."""
    starts = [
        max(key_set.issued_at, entry.valid_from)
        for key_set in history
        if (entry := key_set.key(kid)) is not None and entry.state != "next"
    ]
    return min(starts, default=None)


def key_ended(history: Sequence[KeySet], kid: str) -> dt.datetime | None:
    """When the key ``kid`` stopped being trusted for new signatures: the earliest end of validity
    or revocation time any version gives it (None while no version ends it)."""
    ends = [
        end
        for key_set in history
        if (entry := key_set.key(kid)) is not None
        for end in (entry.valid_until, entry.revoked_at)
        if end is not None
    ]
    return min(ends, default=None)


class KeySetReceipt(BaseModel):
    """A party's signed acknowledgement that it trusts another party's key set at ``version``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["exchange-key-set-receipt/1"] = "exchange-key-set-receipt/1"
    party: str  # who acknowledges
    of: str  # whose key set
    version: int = Field(ge=1)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    accepted_at: AwareDatetime


def sign_receipt(receipt: KeySetReceipt, key: OKPKey) -> str:
    """The receipt as a compact JWS by ``key`` (the acknowledging party's active signing key)."""
    payload = canonical_json(receipt.model_dump(mode="json"))
    return jws.serialize_compact(
        {"alg": "EdDSA", "kid": key.kid, "typ": RECEIPT_TYP}, payload, key, registry=_JWS
    )


def verify_receipt(compact: str, keys: Mapping[KeyId, OKPKey]) -> tuple[KeySetReceipt, str]:
    """The receipt and the kid that signed it, if signed by one of ``keys``.

    Raises:
        AnnouncementRejected: ``malformed``, ``unknown-key`` or ``bad-signature``.
    """
    try:
        header = json.loads(_b64decode(compact.split(".")[0]))
        kid = header["kid"]
        if header.get("typ") != RECEIPT_TYP or not isinstance(kid, str):
            raise TypeError("typ")
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise AnnouncementRejected("malformed", "not a key-set receipt") from exc
    key = keys.get(KeyId(kid))
    if key is None:
        raise AnnouncementRejected("unknown-key", f"receipt signed by unknown key {kid}")
    try:
        verified = jws.deserialize_compact(compact, key, registry=_JWS)
    except (JoseError, ValueError) as exc:
        raise AnnouncementRejected("bad-signature", "the receipt does not verify") from exc
    try:  # signed, but not a receipt of the agreed shape (a time without its zone, say)
        return KeySetReceipt.model_validate_json(verified.payload), kid
    except (ValueError, RecursionError) as exc:
        raise AnnouncementRejected("malformed", "the signed receipt is not a key-set receipt") from exc
