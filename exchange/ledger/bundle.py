"""Audit export bundles: a range of ledger entries an auditor verifies offline.

A bundle holds the entries ``[start, end)`` (their leaves), a signed checkpoint of size ``size >= end``
with the partner's cosignature, and a range proof: the hashes of the aligned complete subtrees that
cover ``[0, start)`` and ``[end, size)``. From these alone the verifier recomputes the checkpoint's
root (so every entry in the range is in the signed tree, at its position, unaltered), checks the
checkpoint's signature and cosignature with the keys the agreement pins, and decodes every leaf.
Pure.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import OKPKey

from exchange.errors import LedgerIntegrityError
from exchange.ledger.checkpoint import CheckpointError, verify_checkpoint, verify_cosignature
from exchange.ledger.entries import LedgerEntry, decode_leaf
from exchange.ledger.merkle import SubtreeSource, leaf_hash, node_hash, root_hash

BUNDLE_FORMAT = "exchange-audit-bundle/1"


def aligned_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """The maximal aligned complete subtrees ``(level, index)`` covering leaves ``[start, end)``."""
    blocks = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length() - 1
        while start + (1 << level) > end:
            level -= 1
        blocks.append((level, start >> level))
        start += 1 << level
    return blocks


def range_proof_blocks(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """The subtrees a bundle of ``[start, end)`` in a tree of ``size`` carries besides its leaves."""
    if not 0 <= start < end <= size:
        raise ValueError(f"no range [{start}, {end}) in a tree of size {size}")
    return aligned_blocks(0, start) + aligned_blocks(end, size)


class _RangeSource:
    """Subtrees computed from the range's leaves and the carried blocks (nothing else)."""

    def __init__(self, leaves: Mapping[int, bytes], blocks: Mapping[tuple[int, int], bytes]) -> None:
        self.leaves = leaves
        self.blocks = blocks

    def subtree(self, level: int, index: int) -> bytes:
        if (level, index) in self.blocks:
            return self.blocks[(level, index)]
        if level == 0:
            if index not in self.leaves:
                raise LedgerIntegrityError(f"the bundle lacks what covers leaf {index}")
            return self.leaves[index]
        return node_hash(self.subtree(level - 1, 2 * index), self.subtree(level - 1, 2 * index + 1))


def build_bundle(
    *,
    party: str,
    agreement: Mapping[str, str],
    entries: Sequence[tuple[int, str]],
    source: SubtreeSource,
    checkpoint: Mapping[str, Any],
    keys: Mapping[str, Any],
) -> dict[str, Any]:
    """A bundle of ``entries`` (consecutive ``(seq, leaf)``) proven against ``checkpoint``."""
    start, end, size = entries[0][0], entries[-1][0] + 1, int(checkpoint["size"])
    return {
        "format": BUNDLE_FORMAT,
        "party": party,
        "agreement": dict(agreement),
        "keys": dict(keys),
        "checkpoint": {
            "size": size,
            "note": checkpoint["note"],
            "cosignature": checkpoint.get("cosignature"),
        },
        "range": {"start": start, "end": end},
        "entries": [{"seq": seq, "leaf": leaf} for seq, leaf in entries],
        "blocks": [
            {"level": lv, "index": ix, "hash": base64.b64encode(source.subtree(lv, ix)).decode()}
            for lv, ix in range_proof_blocks(start, end, size)
        ],
    }


@dataclass(frozen=True)
class BundleReport:
    entries: list[LedgerEntry]
    size: int
    cosigned: bool

    def summary(self) -> str:
        first, last = self.entries[0].seq, self.entries[-1].seq
        cosign = "cosigned by the partner" if self.cosigned else "NOT cosigned"
        where = f"the signed checkpoint of size {self.size}"
        return f"bundle verified: entries {first}..{last} are in {where} ({cosign})"


def verify_bundle(
    bundle: Mapping[str, Any],
    *,
    origin: str,
    checkpoint_key: OKPKey,
    partner_witness: str,
    partner_key: OKPKey,
) -> BundleReport:
    """Verify a bundle with the keys the agreement pins (never the keys the bundle names).

    Raises:
        LedgerIntegrityError: naming the first entry or part that does not verify.
    """
    if bundle.get("format") != BUNDLE_FORMAT:
        raise LedgerIntegrityError("not an exchange audit bundle")
    try:
        checkpoint = verify_checkpoint(bundle["checkpoint"]["note"], origin=origin, key=checkpoint_key)
    except CheckpointError as exc:
        raise LedgerIntegrityError(f"the bundle's checkpoint does not verify: {exc}") from exc
    cosigned = False
    if bundle["checkpoint"].get("cosignature"):
        try:
            verify_cosignature(
                checkpoint, bundle["checkpoint"]["cosignature"], witness=partner_witness, key=partner_key
            )
        except CheckpointError as exc:
            raise LedgerIntegrityError(f"the partner's cosignature does not verify: {exc}") from exc
        cosigned = True
    start, end = int(bundle["range"]["start"]), int(bundle["range"]["end"])
    items = bundle["entries"]
    if [e["seq"] for e in items] != list(range(start, end)) or not 0 <= start < end <= checkpoint.size:
        raise LedgerIntegrityError("the bundle's entries are not the consecutive range it claims")
    decoded = []
    leaves = {}
    for item in items:
        raw = str(item["leaf"]).encode()
        try:
            entry = decode_leaf(raw)
        except (ValueError, KeyError) as exc:
            raise LedgerIntegrityError(f"entry {item['seq']} is not a ledger leaf") from exc
        if entry.seq != item["seq"]:
            raise LedgerIntegrityError(f"entry {item['seq']} claims position {entry.seq}")
        decoded.append(entry)
        leaves[entry.seq] = leaf_hash(raw)
    wanted = set(range_proof_blocks(start, end, checkpoint.size))
    blocks = {(int(b["level"]), int(b["index"])): base64.b64decode(b["hash"]) for b in bundle["blocks"]}
    if set(blocks) != wanted:
        raise LedgerIntegrityError("the bundle's range proof carries the wrong subtrees")
    if root_hash(_RangeSource(leaves, blocks), checkpoint.size) != checkpoint.root:
        raise LedgerIntegrityError(
            f"entries {start}..{end - 1} do not reproduce the signed root of size {checkpoint.size}:"
            " one was altered"
        )
    return BundleReport(decoded, checkpoint.size, cosigned)
