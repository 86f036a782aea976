"""Audit export bundles (``schemas/audit-bundle.schema.json``): a range of ledger entries that an
auditor verifies offline with standard tools. Pure.

A bundle holds a cosigned checkpoint (the log's signed note followed by cosignature lines), the
entries ``[start, end)`` each with its RFC 9162 inclusion proof against that checkpoint, and, when the
range was first covered by an earlier checkpoint, that checkpoint with an RFC 9162 consistency proof to
the bundle's. Every hash is standard base64. The verifier checks everything against the keys the
agreement pins (never keys a bundle names) and, unless asked for less, requires the partner node's
cosignature.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exchange.errors import LedgerIntegrityError
from exchange.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    NoteVerifier,
    known_signatures,
    open_checkpoint,
    split_note,
)
from exchange.ledger.entries import LedgerEntry, decode_leaf
from exchange.ledger.merkle import (
    ProofError,
    SubtreeSource,
    inclusion_proof,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

BUNDLE_FORMAT = "exchange-audit-bundle/2"


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
    size: int,
    earliest: tuple[str, list[bytes]] | None = None,
) -> dict[str, Any]:
    """A bundle of ``entries`` (consecutive ``(seq, leaf)``) proven against the cosigned
    ``checkpoint`` note of ``size``; ``earliest`` is the first checkpoint covering them and the
    consistency proof from it, if it is another one."""
    start, end = entries[0][0], entries[-1][0] + 1
    ranged = _RangeSource(source, {seq: leaf_hash(leaf.encode()) for seq, leaf in entries}, start, end)
    return {
        "format": BUNDLE_FORMAT,
        "party": party,
        "agreement": dict(agreement),
        "origin": origin,
        "checkpoint": checkpoint,
        "entries": [
            {"index": seq, "leaf": leaf, "inclusion": [b64(h) for h in inclusion_proof(ranged, seq, size)]}
            for seq, leaf in entries
        ],
        "consistency": (
            None if earliest is None else {"checkpoint": earliest[0], "proof": [b64(h) for h in earliest[1]]}
        ),
    }


@dataclass(frozen=True)
class BundleReport:
    entries: list[LedgerEntry]
    size: int
    cosigners: dict[str, int]  # witness key name -> cosignature timestamp
    partner_witness: str
    since_size: int | None

    @property
    def cosigned(self) -> bool:
        return self.partner_witness in self.cosigners

    def summary(self) -> str:
        first, last = self.entries[0].seq, self.entries[-1].seq
        if self.cosigned:
            cosign = "cosigned by " + ", ".join(sorted(self.cosigners))
        else:
            cosign = "NOT cosigned by the partner: accepted only because --allow-uncosigned was given"
        since = f"; consistent with the checkpoint of size {self.since_size}" if self.since_size else ""
        where = f"the signed checkpoint of size {self.size}"
        return f"bundle verified: entries {first}..{last} are in {where} ({cosign}){since}"


def _checkpoint(
    note: Any, log: NoteVerifier, witnesses: Sequence[NoteVerifier], what: str
) -> tuple[Checkpoint, dict[str, int]]:
    """The checkpoint signed by ``log`` and the witnesses whose cosignature lines verify on it."""
    try:
        checkpoint = open_checkpoint(str(note), log)
        text, signatures = split_note(checkpoint.note)
        return checkpoint, known_signatures(text, signatures, witnesses)
    except CheckpointError as exc:
        raise LedgerIntegrityError(f"the bundle's {what} does not verify: {exc}") from exc


def verify_bundle(
    bundle: Mapping[str, Any],
    *,
    log: NoteVerifier,
    partner_witness: NoteVerifier,
    witnesses: Sequence[NoteVerifier] = (),
    allow_uncosigned: bool = False,
    require: Sequence[str] = (),
) -> BundleReport:
    """Verify a bundle with the keys the agreement pins: the log's checkpoint key, the partner
    node's witness key and any further witness keys; ``require`` names further witnesses whose
    cosignature must be there too.

    Raises:
        LedgerIntegrityError: naming the first entry or part that does not verify, the missing
            partner cosignature (unless ``allow_uncosigned``), or a required witness's.
    """
    if bundle.get("format") != BUNDLE_FORMAT:
        raise LedgerIntegrityError(f"not an {BUNDLE_FORMAT} bundle")
    all_witnesses = [partner_witness, *witnesses]
    checkpoint, cosigners = _checkpoint(bundle.get("checkpoint"), log, all_witnesses, "checkpoint")
    if partner_witness.name not in cosigners and not allow_uncosigned:
        raise LedgerIntegrityError(
            f"the bundle's checkpoint is not cosigned by the partner node ({partner_witness.name}):"
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
    since = None
    consistency = bundle.get("consistency")
    if consistency is not None and not isinstance(consistency, dict):
        raise LedgerIntegrityError("the bundle's consistency member is not an object")
    if consistency is not None:
        earlier, _ = _checkpoint(consistency.get("checkpoint"), log, all_witnesses, "earlier checkpoint")
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
    return BundleReport(decoded, checkpoint.size, cosigners, partner_witness.name, since)
