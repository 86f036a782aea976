"""Offline audit bundles: range proofs reproduce the signed root; tampering is refused."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange import crypto
from exchange.errors import LedgerIntegrityError
from exchange.ledger import EntryDraft, leaf_bytes
from exchange.ledger.bundle import build_bundle, verify_bundle
from exchange.ledger.checkpoint import cosign, sign_checkpoint, verify_checkpoint
from exchange.ledger.merkle import MemoryTree, leaf_hash, root_hash

OWN = crypto.private_jwk(crypto.new_message_key("ckpt"), "own")
PARTNER = crypto.private_jwk(crypto.new_message_key("ckpt"), "partner")
ORIGIN, WITNESS = "ID-node/ledger", "MY-node/witness"


def bundle(n: int, start: int, end: int) -> dict[str, Any]:
    leaves = [
        leaf_bytes(i, "t", EntryDraft(event="e", case_ref="C/1", data={"i": i})).decode() for i in range(n)
    ]
    tree = MemoryTree(leaf_hash(x.encode()) for x in leaves)
    note = sign_checkpoint(ORIGIN, n, root_hash(tree, n), OWN)
    line = cosign(verify_checkpoint(note, origin=ORIGIN, key=OWN), witness=WITNESS, key=PARTNER, timestamp=1)
    return build_bundle(
        party="ID",
        agreement={"version": "v", "digest": "d"},
        entries=[(i, leaves[i]) for i in range(start, end)],
        source=tree,
        checkpoint={"size": n, "note": note, "cosignature": line},
        keys={},
    )


def verify(b: dict[str, Any]) -> Any:
    return verify_bundle(
        json.loads(json.dumps(b)),
        origin=ORIGIN,
        checkpoint_key=crypto.public_only(OWN),
        partner_witness=WITNESS,
        partner_key=crypto.public_only(PARTNER),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 130)
    .flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1)))
    .flatmap(lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.integers(t[1] + 1, t[0])))
)
def test_property_every_range_of_every_tree_verifies(case: tuple[int, int, int]) -> None:
    n, start, end = case
    report = verify(bundle(n, start, end))
    assert [e.seq for e in report.entries] == list(range(start, end))
    assert report.cosigned


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["entries"][1].update(leaf=b["entries"][1]["leaf"].replace('"e"', '"f"')), "altered"),
        (lambda b: b["entries"].pop(2), "consecutive"),
        (lambda b: b["blocks"][0].update(hash=b["blocks"][1]["hash"]), "altered"),
        (lambda b: b["blocks"].pop(), "wrong subtrees"),
        (
            lambda b: b["checkpoint"].update(note=b["checkpoint"]["note"].replace("\n40\n", "\n41\n")),
            "checkpoint",
        ),
        (
            lambda b: b["checkpoint"].update(cosignature=b["checkpoint"]["cosignature"][:-4] + "AAA="),
            "cosignature",
        ),
        (lambda b: b["range"].update(start=b["range"]["start"] + 1), "consecutive"),
    ],
)
def test_a_tampered_bundle_is_refused(mutate: Any, message: str) -> None:
    b = copy.deepcopy(bundle(40, 9, 27))
    mutate(b)
    with pytest.raises(LedgerIntegrityError, match=message):
        verify(b)


def test_a_bundle_checked_against_other_keys_is_refused() -> None:
    b = bundle(8, 0, 8)
    with pytest.raises(LedgerIntegrityError, match="checkpoint"):
        verify_bundle(
            b,
            origin=ORIGIN,
            checkpoint_key=crypto.public_only(PARTNER),
            partner_witness=WITNESS,
            partner_key=crypto.public_only(PARTNER),
        )
