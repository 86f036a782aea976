"""Whole-ledger audit: the tree, every checkpoint, every cosignature, every witnessed checkpoint.

Pure: it takes the stored rows and checkpoint records and the public keys the agreement pins, and
returns what it checked or raises :class:`~exchange.errors.LedgerIntegrityError` naming the first bad
entry or checkpoint. The same function serves ``exchange audit verify`` on a node and on an export
bundle, offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from joserfc.jwk import OKPKey

from exchange.errors import LedgerIntegrityError
from exchange.ledger.checkpoint import (
    CheckpointError,
    NoteVerifier,
    verify_checkpoint,
    verify_cosignature,
    verify_cosignatures,
)
from exchange.ledger.merkle import ProofError, verify_consistency


@dataclass(frozen=True)
class AuditKeys:
    """Who signs what: this node's log and witness identity, and the partner's."""

    origin: str
    checkpoint_key: OKPKey
    witness_name: str
    partner_origin: str
    partner_key: OKPKey
    partner_witness_name: str
    witnesses: tuple[NoteVerifier, ...] = ()  # further witnesses named in the agreement


@dataclass(frozen=True)
class AuditReport:
    entries: int
    checkpoints: int
    cosignatures: int
    witnessed: int
    witness_cosignatures: Mapping[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        further = "".join(
            f", {count} cosignatures by witness {name}"
            for name, count in sorted(self.witness_cosignatures.items())
        )
        return (
            f"{self.entries} entries, {self.checkpoints} signed checkpoints"
            f" consistent with them, {self.cosignatures} partner cosignatures{further},"
            f" {self.witnessed} partner checkpoints witnessed and consistent"
        )


def verify_audit(
    verify_entries: Callable[[Mapping[int, bytes]], int],
    *,
    checkpoints: Sequence[Mapping[str, Any]],
    witnessed: Sequence[Mapping[str, Any]],
    keys: AuditKeys,
    witness_cosignatures: Mapping[int, Mapping[str, str]] | None = None,
) -> AuditReport:
    """Verify everything an auditor can from the records (see the module docstring).

    ``witness_cosignatures`` maps a checkpoint size to the further witnesses' cosignature lines.
    ``verify_entries(roots_by_size)`` checks every entry and that the ledger reproduces each given
    checkpoint root (one pass: ``verify_rows``; chunked: ``verify_range`` and ``combine_ranges``)
    and returns the number of entries.

    Raises:
        LedgerIntegrityError: naming the first bad entry, checkpoint, cosignature or witnessed checkpoint.
    """
    roots: dict[int, bytes] = {}
    cosigned = 0
    known = {w.name: w for w in keys.witnesses}
    by_witness: dict[str, int] = {}
    for record in checkpoints:
        where = f"checkpoint at size {record['size']}"
        try:
            cp = verify_checkpoint(str(record["note"]), origin=keys.origin, key=keys.checkpoint_key)
        except CheckpointError as exc:
            raise LedgerIntegrityError(f"{where} is forged or damaged: {exc}") from exc
        if cp.size != record["size"] or cp.root != bytes(record["root_hash"]):
            raise LedgerIntegrityError(f"{where} does not match its signed note")
        roots[cp.size] = cp.root
        if record.get("cosignature"):
            try:
                verify_cosignature(
                    cp, str(record["cosignature"]), witness=keys.partner_witness_name, key=keys.partner_key
                )
            except CheckpointError as exc:
                raise LedgerIntegrityError(
                    f"the partner's cosignature of {where} does not verify: {exc}"
                ) from exc
            cosigned += 1
        for name, line in (witness_cosignatures or {}).get(cp.size, {}).items():
            verifier = known.get(name)
            if verifier is None:
                raise LedgerIntegrityError(
                    f"{where} carries a cosignature by {name}, a witness the agreement does not name"
                )
            try:
                verify_cosignatures(cp, line + "\n", [verifier])
            except CheckpointError as exc:
                raise LedgerIntegrityError(
                    f"the cosignature of {where} by witness {name} does not verify: {exc}"
                ) from exc
            by_witness[name] = by_witness.get(name, 0) + 1
    if set(witness_cosignatures or {}) - set(roots):
        raise LedgerIntegrityError("a further witness's cosignature names a checkpoint that does not exist")
    entries = verify_entries(roots)

    previous: tuple[int, bytes] | None = None
    for record in witnessed:
        where = f"witnessed partner checkpoint at size {record['size']}"
        try:
            cp = verify_checkpoint(str(record["note"]), origin=keys.partner_origin, key=keys.partner_key)
            verify_cosignature(
                cp, str(record["cosignature"]), witness=keys.witness_name, key=keys.checkpoint_key
            )
        except CheckpointError as exc:
            raise LedgerIntegrityError(f"{where} is forged or damaged: {exc}") from exc
        if cp.size != record["size"] or cp.root != bytes(record["root_hash"]):
            raise LedgerIntegrityError(f"{where} does not match its signed note")
        expected_previous = previous[0] if previous else 0
        if record["previous_size"] != expected_previous:
            raise LedgerIntegrityError(f"{where} was not proven from the checkpoint witnessed before it")
        if previous is not None:
            proof = [bytes.fromhex(h) for h in json.loads(str(record["proof"]))]
            try:
                verify_consistency(previous[0], cp.size, proof, previous[1], cp.root)
            except ProofError as exc:
                raise LedgerIntegrityError(
                    f"{where} is not consistent with size {previous[0]}: {exc}"
                ) from exc
        previous = (cp.size, cp.root)
    return AuditReport(entries, len(roots), cosigned, len(witnessed), by_witness)
