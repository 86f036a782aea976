"""The Merkle ledger's pure core: leaves, the frontier, and whole-log verification under attack."""

from __future__ import annotations

import json

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from exchange.errors import LedgerIntegrityError
from exchange.ledger import EntryDraft, Frontier, decode_leaf, leaf_bytes, rules_column, verify_rows
from exchange.ledger.log import Row
from exchange.ledger.merkle import MemoryTree, leaf_hash, root_hash

AT = "2026-11-23T00:00:00.000000+00:00"


def rows(n: int = 8) -> tuple[list[Row], bytes]:
    frontier = Frontier.empty()
    out: list[Row] = []
    for seq in range(n):
        draft = EntryDraft(
            event="message.submitted",
            message_id=f"m{seq}",
            case_ref="ID-MY/1",
            actor="polri-cms",
            decision="allow",
            rules=("R-TYPE-KNOWN", "R-CLIENT-TYPE"),
            data={"n": seq},
        )
        leaf = leaf_bytes(seq, AT, draft)
        frontier.append(leaf_hash(leaf))
        out.append(
            (
                seq,
                AT,
                draft.event,
                draft.message_id,
                draft.case_ref,
                draft.actor,
                draft.decision,
                rules_column(draft.rules),
                leaf.decode(),
                leaf_hash(leaf),
            )
        )
    return out, frontier.root()


def failure(
    entries: list[Row], root: bytes, size: int | None = None, checkpoints: dict[int, bytes] | None = None
) -> str:
    with pytest.raises(LedgerIntegrityError) as info:
        verify_rows(
            entries, size=len(rows()[0]) if size is None else size, root=root, checkpoints=checkpoints
        )
    return str(info.value)


def test_an_intact_log_verifies_with_its_checkpoints() -> None:
    entries, root = rows()
    tree = MemoryTree(r[9] for r in entries)  # type: ignore[misc]
    cps = {n: root_hash(tree, n) for n in (1, 3, 8)}
    assert verify_rows(entries, size=8, root=root, checkpoints=cps) == 8


@given(st.integers(1, 300))
def test_property_frontier_root_equals_the_rfc_tree(n: int) -> None:
    frontier, tree = Frontier.empty(), MemoryTree()
    for i in range(n):
        h = leaf_hash(i.to_bytes(4, "big"))
        assert sorted(frontier.append(h)) == sorted(tree.append(h))
        assert frontier.root() == root_hash(tree, i + 1)
    assert Frontier.from_json(n, frontier.to_json()).root() == frontier.root()


def test_leaf_encoding_is_rfc8785_and_decodes_back() -> None:
    draft = EntryDraft(
        event="e",
        message_id="m",
        case_ref="c/1",
        actor="a",
        decision="deny",
        rules=("R-B", "R-A"),
        data={"z": 1, "a": ["x", None, True], "nested": {"é": "ü"}},
    )
    leaf = leaf_bytes(5, AT, draft)
    assert leaf == rfc8785.dumps(json.loads(leaf))
    entry = decode_leaf(leaf)
    assert (entry.seq, entry.event, entry.rules, entry.case_ref) == (5, "e", ("R-B", "R-A"), "c/1")


def test_floats_are_refused_in_entries() -> None:
    with pytest.raises(ValueError, match="float"):
        leaf_bytes(0, AT, EntryDraft(event="e", data={"score": 0.5}))


def test_a_changed_index_column_is_named() -> None:
    entries, root = rows()
    seq, at, event, mid, case, actor, _decision, rules, leaf, h = entries[3]
    entries[3] = (seq, at, event, mid, case, actor, "deny", rules, leaf, h)
    assert "entry 3 was altered" in failure(entries, root)


def test_a_rewritten_leaf_is_named() -> None:
    entries, root = rows()
    row = list(entries[5])
    row[8] = str(row[8]).replace('"allow"', '"deny"')
    row[6] = "deny"
    entries[5] = tuple(row)  # type: ignore[assignment]
    assert "entry 5 was altered" in failure(entries, root)


def test_a_rewritten_leaf_and_stored_hash_breaks_the_root_and_checkpoints() -> None:
    entries, root = rows()
    tree = MemoryTree(r[9] for r in entries)  # type: ignore[misc]
    cps = {4: root_hash(tree, 4), 8: root}
    row = list(entries[2])
    row[8] = str(row[8]).replace('"allow"', '"deny"')
    row[6] = "deny"
    row[9] = leaf_hash(str(row[8]).encode())
    entries[2] = tuple(row)  # type: ignore[assignment]
    assert "checkpoint at size 4" in failure(entries, root, checkpoints=cps)
    assert "recorded root" in failure(entries, root)


def test_a_deleted_entry_is_named() -> None:
    entries, root = rows()
    del entries[4]
    assert "entry 4 is missing" in failure(entries, root)


def test_a_truncated_log_is_detected() -> None:
    entries, root = rows()
    assert "entry 6 onwards is missing" in failure(entries[:6], root)


def test_a_reordered_pair_is_detected() -> None:
    entries, root = rows()
    entries[1], entries[2] = entries[2], entries[1]
    assert "entry 1 is missing" in failure(entries, root)


def test_a_forged_head_is_detected() -> None:
    entries, _ = rows()
    assert "recorded root" in failure(entries, b"\x00" * 32)
