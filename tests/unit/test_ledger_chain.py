"""The hash-chained ledger core: verification and the attacks it detects."""

from __future__ import annotations

import dataclasses

import pytest

from exchange.errors import LedgerIntegrityError
from exchange.ledger import GENESIS_HASH, EntryDraft, LedgerEntry, seal_entries, verify_chain


def ledger(n: int = 6) -> list[LedgerEntry]:
    drafts = [
        EntryDraft(
            event="message.submitted",
            message_id=f"m{i}",
            actor="polri-cms",
            decision="allow",
            rules=("R-TYPE-KNOWN",),
            data={"envelope_sha256": f"{i:064x}"},
        )
        for i in range(n)
    ]
    return seal_entries(drafts, size=0, head_hash=GENESIS_HASH, at="2026-11-23T00:00:00+00:00")


def verify(entries: list[LedgerEntry], size: int | None = None, head: str | None = None) -> int:
    full = ledger()
    return verify_chain(
        entries,
        size=len(full) if size is None else size,
        head_hash=full[-1].entry_hash if head is None else head,
    )


def bad_seq(entries: list[LedgerEntry], **kwargs: object) -> int | None:
    with pytest.raises(LedgerIntegrityError) as info:
        verify(entries, **kwargs)  # type: ignore[arg-type]
    return info.value.seq


def test_an_intact_ledger_verifies() -> None:
    assert verify(ledger()) == 6


def test_appends_continue_the_chain() -> None:
    first = ledger(3)
    more = seal_entries([EntryDraft(event="x")], size=3, head_hash=first[-1].entry_hash, at="t")
    assert verify_chain(first + more, size=4, head_hash=more[-1].entry_hash) == 4


def test_a_changed_field_is_detected_and_named() -> None:
    entries = ledger()
    entries[3] = dataclasses.replace(entries[3], decision="deny")
    assert bad_seq(entries) == 3


def test_a_changed_time_is_detected() -> None:
    entries = ledger()
    entries[2] = dataclasses.replace(entries[2], at="2020-01-01T00:00:00+00:00")
    assert bad_seq(entries) == 2


def test_a_rehashed_entry_breaks_the_next_link() -> None:
    entries = ledger()
    forged = seal_entries(
        [EntryDraft(event="message.submitted", message_id="forged")],
        size=2,
        head_hash=entries[1].entry_hash,
        at=entries[2].at,
    )[0]
    entries[2] = forged
    assert bad_seq(entries) == 3


def test_a_deleted_entry_is_detected_and_named() -> None:
    entries = ledger()
    del entries[4]
    assert bad_seq(entries) == 4


def test_a_truncated_ledger_is_detected() -> None:
    assert bad_seq(ledger()[:4]) == 4


def test_a_reordered_pair_is_detected() -> None:
    entries = ledger()
    entries[1], entries[2] = entries[2], entries[1]
    assert bad_seq(entries) == 1


def test_a_head_that_does_not_match_is_detected() -> None:
    with pytest.raises(LedgerIntegrityError):
        verify(ledger(), head="f" * 64)
