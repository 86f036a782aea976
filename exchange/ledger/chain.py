"""A hash-chained, append-only ledger (the first ledger; the Merkle log replaces the chaining).

Each entry's leaf is the RFC 8785 canonical JSON of *all* its fields except its own hash,
including its sequence number and time, so nothing outside the hash can change. Each entry hash
is ``SHA-256(previous entry hash || leaf)``, starting from :data:`GENESIS_HASH`.

Invariants: sequence numbers are 0, 1, 2, … with no gap; an entry holds hashes, identifiers,
decisions and rule ids, never message content or the identity of a victim, witness or informant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exchange.canonical import canonical_json
from exchange.crypto import constant_time_equal
from exchange.errors import LedgerIntegrityError

GENESIS_HASH = "0" * 64
LEAF_FORMAT = "exchange-ledger-entry/1"


@dataclass(frozen=True)
class EntryDraft:
    """An event to record, before it has a position in the ledger."""

    event: str
    message_id: str | None = None
    actor: str | None = None
    decision: str | None = None
    rules: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerEntry:
    """An entry at its position: the draft plus sequence number, time and hashes."""

    seq: int
    at: str
    event: str
    message_id: str | None
    actor: str | None
    decision: str | None
    rules: tuple[str, ...]
    data: Mapping[str, Any]
    prev_hash: str
    entry_hash: str

    def leaf(self) -> bytes:
        """The canonical encoding the entry hash covers."""
        return leaf_bytes(self.seq, self.at, self)


def leaf_bytes(seq: int, at: str, draft: EntryDraft | LedgerEntry) -> bytes:
    """Canonical JSON of an entry's content at position ``seq`` and time ``at``."""
    return canonical_json(
        {
            "format": LEAF_FORMAT,
            "seq": seq,
            "at": at,
            "event": draft.event,
            "message_id": draft.message_id,
            "actor": draft.actor,
            "decision": draft.decision,
            "rules": list(draft.rules),
            "data": dict(draft.data),
        }
    )


def chain_hash(prev_hash: str, leaf: bytes) -> str:
    """``SHA-256(bytes(prev_hash) || leaf)`` as hex."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + leaf).hexdigest()


def seal_entries(drafts: Sequence[EntryDraft], *, size: int, head_hash: str, at: str) -> list[LedgerEntry]:
    """Place drafts after a ledger of ``size`` entries ending in ``head_hash``."""
    entries = []
    prev = head_hash
    for offset, draft in enumerate(drafts):
        seq = size + offset
        entry_hash = chain_hash(prev, leaf_bytes(seq, at, draft))
        entries.append(
            LedgerEntry(
                seq=seq,
                at=at,
                event=draft.event,
                message_id=draft.message_id,
                actor=draft.actor,
                decision=draft.decision,
                rules=tuple(draft.rules),
                data=dict(draft.data),
                prev_hash=prev,
                entry_hash=entry_hash,
            )
        )
        prev = entry_hash
    return entries


def verify_chain(entries: Iterable[LedgerEntry], *, size: int, head_hash: str) -> int:
    """Recompute the chain and compare it with the recorded head.

    Returns the number of entries checked.

    Raises:
        LedgerIntegrityError: naming the first entry that is missing, out of place, altered, or
            whose link to the previous entry is broken; or a head that does not match.
    """
    prev = GENESIS_HASH
    expected_seq = 0
    for entry in entries:
        if entry.seq != expected_seq:
            raise LedgerIntegrityError(
                f"entry {expected_seq} is missing (found entry {entry.seq} in its place)", seq=expected_seq
            )
        if not constant_time_equal(entry.prev_hash, prev):
            raise LedgerIntegrityError(f"entry {entry.seq} does not link to entry {entry.seq - 1}", entry.seq)
        if not constant_time_equal(chain_hash(prev, entry.leaf()), entry.entry_hash):
            raise LedgerIntegrityError(f"entry {entry.seq} was altered (its hash does not match)", entry.seq)
        prev = entry.entry_hash
        expected_seq += 1
    if expected_seq != size:
        raise LedgerIntegrityError(
            f"the ledger holds {expected_seq} entries but its head records {size}: entry {expected_seq}"
            " onwards is missing",
            seq=expected_seq,
        )
    if not constant_time_equal(prev, head_hash):
        raise LedgerIntegrityError("the ledger's last entry does not match its recorded head", seq=size - 1)
    return expected_seq
