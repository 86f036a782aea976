"""The audit ledger's pure core: entries, their canonical encoding, and verification."""

from exchange.ledger.chain import (
    GENESIS_HASH,
    EntryDraft,
    LedgerEntry,
    chain_hash,
    seal_entries,
    verify_chain,
)

__all__ = ["GENESIS_HASH", "EntryDraft", "LedgerEntry", "chain_hash", "seal_entries", "verify_chain"]
