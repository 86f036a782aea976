"""Audit export bundles (``schemas/audit-bundle.schema.json``): a range of ledger entries that an
auditor verifies offline with standard tools. Pure.

A bundle holds a cosigned checkpoint (the log's signed note followed by cosignature lines), the
entries ``[start, end)`` each with its RFC 9162 inclusion proof against that checkpoint, and, when the
range was first covered by an earlier checkpoint, that checkpoint with an RFC 9162 consistency proof to
the bundle's. Every hash is standard base64. It carries both parties' key-set announcements after the
agreement's version 1, so that checkpoints signed after a checkpoint-key rotation verify offline.

The verifier trusts no key the bundle names: it walks each party's announcements from the agreement's
anchor (every version signed by the one before it), then judges the log's signature at the time the
bundle says the checkpoint was made and each cosignature at its own signed time, by the key set in
force then. Unless asked for less, it requires the partner node's cosignature. Entries recording a
signature by a key not in force when it was made are flagged in the report
(:func:`~exchange.ledger.audit.flag_signatures`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exchange.errors import LedgerIntegrityError
from exchange.ledger.audit import AuditKeys, FlaggedSignature, flag_signatures
from exchange.ledger.checkpoint import (
    SIG_COSIGNATURE_V1,
    Checkpoint,
    CheckpointError,
    NoteVerifier,
    known_signatures,
    split_note,
)
from exchange.ledger.entries import LedgerEntry, decode_leaf
from exchange.ledger.key_history import (
    PartyAnchor,
    PartyKeys,
    moment,
    open_logged,
    revoked_at,
    verify_cosigned,
)
from exchange.ledger.merkle import (
    ProofError,
    SubtreeSource,
    inclusion_proof,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

BUNDLE_FORMAT = "exchange-audit-bundle/3"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64_hashes(items: Any, what: str) -> list[bytes]:
    """Decode a list of base64 SHA-256 hashes. Raises LedgerIntegrityError naming ``what``."""
    if not isinstance(items, list) or len(items) > 64:
        raise LedgerIntegrityError(f"{what} is not a list of at most 64 hashes")
    try:
        hashes = [base64.b64decode(str(h), validate=True) for h in items]
    except (ValueError, binascii.Error) as exc:
        raise LedgerIntegrityError(f"{what} holds a hash that is not base64") from exc
    if any(len(h) != 32 for h in hashes):
        raise LedgerIntegrityError(f"{what} holds a hash that is not 32 bytes")
    return hashes


class _RangeSource:
    """Complete subtrees inside ``[start, end)`` hashed from the leaves in memory; the others read
    once each from ``source``. Proofs for a whole range then cost O(range + log n) hashes."""

    def __init__(self, source: SubtreeSource, leaves: Mapping[int, bytes], start: int, end: int) -> None:
        self.source, self.leaves, self.start, self.end = source, leaves, start, end
        self.memo: dict[tuple[int, int], bytes] = {}

    def subtree(self, level: int, index: int) -> bytes:
        key = (level, index)
        if key not in self.memo:
            first, last = index << level, (index + 1) << level
            if self.start <= first and last <= self.end:
                self.memo[key] = (
                    self.leaves[index]
                    if level == 0
                    else node_hash(self.subtree(level - 1, 2 * index), self.subtree(level - 1, 2 * index + 1))
                )
            else:
                self.memo[key] = self.source.subtree(level, index)
        return self.memo[key]


def build_bundle(
    *,
    party: str,
    agreement: Mapping[str, str],
    origin: str,
    entries: Sequence[tuple[int, str]],
    source: SubtreeSource,
    checkpoint: str,
    signed_at: str,
    size: int,
    key_sets: Mapping[str, Sequence[str]],
    earliest: tuple[str, str, list[bytes]] | None = None,
) -> dict[str, Any]:
    """A bundle of ``entries`` (consecutive ``(seq, leaf)``) proven against the cosigned
    ``checkpoint`` note of ``size`` made at ``signed_at``; ``key_sets`` holds each party's
    announcements after version 1, in order; ``earliest`` is the first checkpoint covering the
    entries (its note, when it was made, the consistency proof from it), if it is another one."""
    start, end = entries[0][0], entries[-1][0] + 1
    ranged = _RangeSource(source, {seq: leaf_hash(leaf.encode()) for seq, leaf in entries}, start, end)
    return {
        "format": BUNDLE_FORMAT,
        "party": party,
        "agreement": dict(agreement),
        "origin": origin,
        "checkpoint": checkpoint,
        "signed_at": signed_at,
        "key_sets": {party: list(announcements) for party, announcements in key_sets.items()},
        "entries": [
            {"index": seq, "leaf": leaf, "inclusion": [b64(h) for h in inclusion_proof(ranged, seq, size)]}
            for seq, leaf in entries
        ],
        "consistency": (
            None
            if earliest is None
            else {"checkpoint": earliest[0], "signed_at": earliest[1], "proof": [b64(h) for h in earliest[2]]}
        ),
    }


@dataclass(frozen=True)
class BundleReport:
    entries: list[LedgerEntry]
    size: int
    cosigners: dict[str, int]  # witness key name -> cosignature timestamp
    partner_witness: str
    since_size: int | None
    key_versions: dict[str, int]
    flagged: tuple[FlaggedSignature, ...] = ()

    @property
    def cosigned(self) -> bool:
        return self.partner_witness in self.cosigners

    def summary(self) -> str:
        first, last = self.entries[0].seq, self.entries[-1].seq
        if self.cosigned:
            cosign = "cosigned by " + ", ".join(sorted(self.cosigners))
        else:
            cosign = (
                "NOT cosigned by the partner: accepted only because --allow-uncosigned was given; its"
                " signing time is not authenticated: check that the key-set versions below are the newest"
            )
        since = f"; consistent with the checkpoint of size {self.since_size}" if self.since_size else ""
        where = f"the signed checkpoint of size {self.size}"
        versions = ", ".join(f"{party} at version {v}" for party, v in sorted(self.key_versions.items()))
        flagged = f"; {len(self.flagged)} signatures FLAGGED" if self.flagged else ""
        return (
            f"bundle verified: entries {first}..{last} are in {where} ({cosign}){since};"
            f" key-set histories walked from the agreement ({versions}){flagged}"
        )


@dataclass(frozen=True)
class _Signed:
    """A bundle's checkpoint as verified: when it says it was signed (a field nothing signs), by
    which key of the log's history, and the cosigners whose lines verify on it."""

    checkpoint: Checkpoint
    at: dt.datetime
    kid: str
    cosigners: dict[str, int]


def _checkpoint(note: Any, signed_at: Any, keys: AuditKeys, what: str) -> _Signed:
    """The checkpoint signed by a key of the log's history in force at ``signed_at``, and the
    cosigners whose lines verify on it: the partner node by a key of its history in force at the
    cosignature's time, further witnesses by the agreement's keys. Lines by unknown keys are ignored."""
    try:
        at = moment(signed_at)
    except ValueError as exc:
        raise LedgerIntegrityError(f"the bundle's {what} has no readable signed_at") from exc
    try:
        checkpoint, kid = open_logged(str(note), keys.own, at)
        text, signatures = split_note(checkpoint.note)
        cosigners = known_signatures(text, signatures, keys.witnesses)
        partner_ids = {v.key_id for _, v in keys.partner.verifiers(SIG_COSIGNATURE_V1)}
        for signature in signatures:
            if signature.name == keys.partner.witness_name and signature.key_id in partner_ids:
                cosigners[signature.name], _ = verify_cosigned(checkpoint, signature.line, keys.partner)
        return _Signed(checkpoint, at, kid, cosigners)
    except CheckpointError as exc:
        held = (
            f"{keys.own.party} at version {keys.own.version}, {keys.partner.party} at {keys.partner.version}"
        )
        raise LedgerIntegrityError(
            f"the bundle's {what} does not verify: {exc} (its key sets walk to {held})"
        ) from exc


def _key_sets(
    bundle: Mapping[str, Any], own: PartyAnchor, partner: PartyAnchor
) -> tuple[PartyKeys, PartyKeys]:
    """Both parties' keys, walked from the agreement's anchors over the bundle's announcements."""
    carried = bundle.get("key_sets")
    if not isinstance(carried, dict) or any(
        not isinstance(carried.get(p.party), list) or not all(isinstance(a, str) for a in carried[p.party])
        for p in (own, partner)
    ):
        raise LedgerIntegrityError(
            f"the bundle carries no key sets of {own.party} and {partner.party}: a list of announcements each"
        )
    return own.walk(carried[own.party]), partner.walk(carried[partner.party])


def verify_bundle(
    bundle: Mapping[str, Any],
    *,
    own: PartyAnchor,
    partner: PartyAnchor,
    witnesses: Sequence[NoteVerifier] = (),
    allow_uncosigned: bool = False,
    require: Sequence[str] = (),
    skew: dt.timedelta = dt.timedelta(0),
) -> BundleReport:
    """Verify a bundle against what the agreement pins: each party's version 1 key set (``own`` is
    the log's party, ``partner`` the cosigning node), from which the bundle's announcements are
    walked, and any further witness keys; ``require`` names further witnesses whose cosignature must
    be there too. ``skew`` is the clock skew allowed when a partner's signature is judged at a time
    of the log's clock (see :func:`~exchange.ledger.audit.flag_signatures`).

    Raises:
        LedgerIntegrityError: naming the first entry or part that does not verify, a key-set
            history that does not walk from the agreement, the missing partner cosignature (unless
            ``allow_uncosigned``), or a required witness's.
    """
    if bundle.get("format") != BUNDLE_FORMAT:
        raise LedgerIntegrityError(f"not an {BUNDLE_FORMAT} bundle")
    own_keys, partner_keys = _key_sets(bundle, own, partner)
    keys = AuditKeys(own_keys, partner_keys, tuple(witnesses), skew)
    signed = _checkpoint(bundle.get("checkpoint"), bundle.get("signed_at"), keys, "checkpoint")
    checkpoint, cosigners = signed.checkpoint, signed.cosigners
    if partner.witness_name in cosigners and signed.at > dt.datetime.fromtimestamp(
        cosigners[partner.witness_name], dt.UTC
    ) + skew + dt.timedelta(seconds=1):
        raise LedgerIntegrityError(
            f"the bundle's checkpoint says it was signed at {signed.at.isoformat()}, after the partner"
            " cosigned it: its signed_at is not the log's"
        )
    revoked = revoked_at(own_keys.history, signed.kid)
    if partner.witness_name not in cosigners and revoked is not None:
        raise LedgerIntegrityError(
            f"the bundle's checkpoint is signed by {signed.kid}, revoked at {revoked.isoformat()}, and not"
            " cosigned by the partner: nothing shows when it was signed (signed_at is not signed)"
        )
    if partner.witness_name not in cosigners and not allow_uncosigned:
        raise LedgerIntegrityError(
            f"the bundle's checkpoint is not cosigned by the partner node ({partner.witness_name}):"
            " nothing shows the partner saw this history (--allow-uncosigned accepts that)"
        )
    missing = sorted(set(require) - set(cosigners))
    if missing:
        raise LedgerIntegrityError(f"the bundle's checkpoint is not cosigned by {', '.join(missing)}")
    items = bundle.get("entries")
    if not isinstance(items, list) or not items:
        raise LedgerIntegrityError("the bundle holds no entries")
    indexes = [e.get("index") if isinstance(e, dict) else None for e in items]
    start = indexes[0] if type(indexes[0]) is int else -1
    if (
        start < 0
        or any(type(i) is not int for i in indexes)
        or indexes != list(range(start, start + len(items)))
    ):
        raise LedgerIntegrityError("the bundle's entries are not a consecutive range")
    end = start + len(items)
    if not 0 <= start < end <= checkpoint.size:
        raise LedgerIntegrityError(f"entries {start}..{end - 1} are not in a tree of size {checkpoint.size}")
    decoded = []
    for item in items:
        index, raw = item["index"], str(item.get("leaf")).encode()
        try:
            entry = decode_leaf(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerIntegrityError(f"entry {index} is not a ledger leaf") from exc
        if entry.seq != index:
            raise LedgerIntegrityError(f"entry {index} claims position {entry.seq}")
        proof = unb64_hashes(item.get("inclusion"), f"the inclusion proof of entry {index}")
        try:
            verify_inclusion(leaf_hash(raw), index, checkpoint.size, proof, checkpoint.root)
        except ProofError as exc:
            raise LedgerIntegrityError(
                f"entry {index} is not in the signed tree of size {checkpoint.size}: it was altered ({exc})"
            ) from exc
        decoded.append(entry)
    try:
        appended = max(decoded, key=lambda e: moment(e.at))
    except ValueError as exc:
        raise LedgerIntegrityError("an entry of the bundle has no readable time") from exc
    if moment(appended.at) > signed.at + skew:
        raise LedgerIntegrityError(
            f"entry {appended.seq} was appended at {appended.at}, after the checkpoint that holds it says"
            f" it was signed ({signed.at.isoformat()}): its signed_at is not the log's"
        )
    since = None
    consistency = bundle.get("consistency")
    if consistency is not None and not isinstance(consistency, dict):
        raise LedgerIntegrityError("the bundle's consistency member is not an object")
    if consistency is not None:
        earlier = _checkpoint(
            consistency.get("checkpoint"), consistency.get("signed_at"), keys, "earlier checkpoint"
        ).checkpoint
        if earlier.size < end:
            raise LedgerIntegrityError("the bundle's earlier checkpoint does not cover the range")
        proof = unb64_hashes(consistency.get("proof"), "the consistency proof")
        try:
            verify_consistency(earlier.size, checkpoint.size, proof, earlier.root, checkpoint.root)
        except ProofError as exc:
            raise LedgerIntegrityError(
                f"the checkpoint of size {checkpoint.size} is not consistent with the earlier one of size"
                f" {earlier.size}: {exc}"
            ) from exc
        since = earlier.size
    return BundleReport(
        decoded,
        checkpoint.size,
        cosigners,
        partner.witness_name,
        since,
        {own.party: own_keys.version, partner.party: partner_keys.version},
        flag_signatures(decoded, keys),
    )
