"""The audit ledger's pure core: entries and leaves, the Merkle log, proofs, checkpoints."""

from exchange.ledger.entries import EntryDraft, LedgerEntry, decode_leaf, leaf_bytes
from exchange.ledger.log import Frontier, rules_column, verify_rows

__all__ = [
    "EntryDraft",
    "Frontier",
    "LedgerEntry",
    "decode_leaf",
    "leaf_bytes",
    "rules_column",
    "verify_rows",
]
