"""Whole-ledger audit: the tree, every checkpoint, every cosignature, every witnessed checkpoint.

Pure: it takes the stored rows and checkpoint records and the public keys the agreement pins, and
returns what it checked or raises :class:`~exchange.errors.LedgerIntegrityError` naming the first bad
entry or checkpoint. The same function serves ``exchange audit verify`` on a node and on an export
bundle, offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import OKPKey

from exchange.errors import LedgerIntegrityError
from exchange.ledger.checkpoint import CheckpointError, verify_checkpoint, verify_cosignature
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


@dataclass(frozen=True)
class AuditReport:
    entries: int
    checkpoints: int
    cosignatures: int
    witnessed: int

    def summary(self) -> str:
        return (
            f"{self.entries} entries, {self.checkpoints} signed checkpoints"
            f" consistent with them, {self.cosignatures} partner cosignatures,"
            f" {self.witnessed} partner checkpoints witnessed and consistent"
        )


def verify_audit(
    verify_entries: Callable[[Mapping[int, bytes]], int],
    *,
    checkpoints: Sequence[Mapping[str, Any]],
    witnessed: Sequence[Mapping[str, Any]],
    keys: AuditKeys,
) -> AuditReport:
    """Verify everything an auditor can from the records (see the module docstring).

    ``verify_entries(roots_by_size)`` checks every entry and that the ledger reproduces each given
    checkpoint root (one pass: ``verify_rows``; chunked: ``verify_range`` and ``combine_ranges``)
    and returns the number of entries.

    Raises:
        LedgerIntegrityError: naming the first bad entry, checkpoint, cosignature or witnessed checkpoint.
    """
    roots: dict[int, bytes] = {}
    cosigned = 0
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
    return AuditReport(entries, len(roots), cosigned, len(witnessed))
