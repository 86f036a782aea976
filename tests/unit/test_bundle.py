"""Offline audit bundles: per-entry RFC 9162 inclusion proofs and a consistency proof reproduce the
signed roots; tampering, a missing cosignature and members of the wrong type are refused."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from exchange.errors import LedgerIntegrityError
from exchange.ledger import EntryDraft, leaf_bytes
from exchange.ledger.bundle import build_bundle, verify_bundle
from exchange.ledger.checkpoint import (
    checkpoint_with,
    cosign,
    sign_checkpoint,
    verify_checkpoint,
)
from exchange.ledger.merkle import MemoryTree, consistency_proof, leaf_hash, root_hash
from tests.unit.key_chains import Chain

ID, MY = Chain("ID"), Chain("MY")  # version 1 of each party's keys, as the agreement pins them
OWN, PARTNER = ID.checkpoint, MY.checkpoint
ORIGIN, WITNESS = ID.origin, MY.witness
SIGNED_AT = "2026-11-01T00:00:00+00:00"
APPENDED_AT = "2026-10-31T23:00:00+00:00"  # every entry before the checkpoints that hold it
COSIGNED_AT = int(dt.datetime.fromisoformat(SIGNED_AT).timestamp()) + 1
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def cosigned(tree: MemoryTree, size: int) -> str:
    note = sign_checkpoint(ORIGIN, size, root_hash(tree, size), OWN)
    checkpoint = verify_checkpoint(note, origin=ORIGIN, key=OWN)
    return checkpoint_with(note, [cosign(checkpoint, witness=WITNESS, key=PARTNER, timestamp=COSIGNED_AT)])


def bundle(n: int, start: int, end: int, first: int | None = None) -> dict[str, Any]:
    leaves = [
        leaf_bytes(i, APPENDED_AT, EntryDraft(event="e", case_ref="C/1", data={"i": i})).decode()
        for i in range(n)
    ]
    tree = MemoryTree(leaf_hash(x.encode()) for x in leaves)
    earliest = None
    if first is not None and first < n:
        earliest = (cosigned(tree, first), SIGNED_AT, consistency_proof(tree, first, n))
    return build_bundle(
        party="ID",
        agreement={"version": "v", "digest": "d" * 64},
        origin=ORIGIN,
        entries=[(i, leaves[i]) for i in range(start, end)],
        source=tree,
        checkpoint=cosigned(tree, n),
        signed_at=SIGNED_AT,
        size=n,
        key_sets={"ID": [], "MY": []},
        earliest=earliest,
    )


def verify(b: dict[str, Any], **kwargs: Any) -> Any:
    return verify_bundle(json.loads(json.dumps(b)), own=ID.anchor(), partner=MY.anchor(), **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 130)
    .flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1)))
    .flatmap(lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.integers(t[1] + 1, t[0])))
)
def test_property_every_range_of_every_tree_verifies(case: tuple[int, int, int]) -> None:
    n, start, end = case
    report = verify(bundle(n, start, end, first=end))
    assert [e.seq for e in report.entries] == list(range(start, end))
    assert report.cosigned
    assert report.since_size == (end if end < n else None)


def _flip_hash(h: str) -> str:
    raw = bytearray(base64.b64decode(h))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["entries"][1].update(leaf=b["entries"][1]["leaf"].replace('"e"', '"f"')), "altered"),
        (lambda b: b["entries"].pop(2), "consecutive"),
        (lambda b: b["entries"][0]["inclusion"].pop(), "altered"),
        (
            lambda b: b["entries"][3]["inclusion"].__setitem__(
                0, _flip_hash(b["entries"][3]["inclusion"][0])
            ),
            "altered",
        ),
        (lambda b: b["entries"][0].update(index=8), "consecutive"),
        (lambda b: b.update(checkpoint=b["checkpoint"].replace("\n40\n", "\n41\n")), "checkpoint"),
        (lambda b: b.update(checkpoint=b["checkpoint"][:-6] + "AAAA=\n"), "does not verify"),
        (lambda b: b["consistency"]["proof"].pop(), "not consistent"),
        (lambda b: b["consistency"].update(checkpoint=b["checkpoint"]), "not consistent"),
        (lambda b: b.update(format="exchange-audit-bundle/2"), "bundle"),
    ],
)
def test_a_tampered_bundle_is_refused(mutate: Any, message: str) -> None:
    b = copy.deepcopy(bundle(40, 9, 27, first=30))
    mutate(b)
    with pytest.raises(LedgerIntegrityError, match=message):
        verify(b)


def test_a_bundle_stripped_of_its_cosignature_fails_unless_the_auditor_allows_it() -> None:
    b = bundle(16, 0, 16)
    stripped = dict(b, checkpoint=b["checkpoint"].rsplit("\u2014 " + WITNESS, 1)[0])
    assert WITNESS not in stripped["checkpoint"]
    with pytest.raises(LedgerIntegrityError, match="not cosigned by the partner"):
        verify(stripped)
    report = verify(stripped, allow_uncosigned=True)
    assert not report.cosigned
    assert "NOT cosigned" in report.summary()


def test_a_bad_cosignature_line_from_the_partner_key_is_refused_even_beside_a_good_one() -> None:
    b = bundle(8, 0, 8)
    good = b["checkpoint"].split("\n")[-2]
    raw = bytearray(base64.b64decode(good.split(" ")[2]))
    raw[-1] ^= 1
    bad = f"\u2014 {WITNESS} {base64.b64encode(bytes(raw)).decode()}"
    with pytest.raises(LedgerIntegrityError, match="does not verify"):
        verify(dict(b, checkpoint=b["checkpoint"] + bad + "\n"))


def test_the_bundle_matches_its_published_schema() -> None:
    schema = json.loads((SCHEMAS / "audit-bundle.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    Draft202012Validator(schema).validate(bundle(20, 3, 11, first=12))
    leaf_schema = Draft202012Validator(json.loads((SCHEMAS / "ledger-leaf.schema.json").read_text()))
    for entry in bundle(5, 0, 5)["entries"]:
        leaf_schema.validate(json.loads(entry["leaf"]))


def test_a_bundle_checked_against_other_keys_is_refused() -> None:
    b = bundle(8, 0, 8)
    with pytest.raises(LedgerIntegrityError, match="checkpoint"):
        verify_bundle(b, own=Chain("ID").anchor(), partner=MY.anchor())


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            found += _paths(item, (*prefix, index))
    return found


@pytest.mark.parametrize("replacement", [None, 7, "x", [], {}, True])
def test_a_bundle_with_any_member_of_the_wrong_type_is_refused_cleanly(replacement: Any) -> None:
    """Whatever member is replaced, the verifier refuses with LedgerIntegrityError, never a crash."""
    original = bundle(9, 2, 6, first=7)
    for path in _paths(original):
        b = copy.deepcopy(original)
        target = b
        for key in path[:-1]:
            target = target[key]
        if target[path[-1]] == replacement:
            continue
        target[path[-1]] = replacement
        try:
            verify(b)
        except LedgerIntegrityError:
            continue
        if path == ("consistency",) and replacement is None:
            continue  # a bundle need not carry an earlier checkpoint
        assert path in {
            ("party",),
            ("agreement",),
            ("agreement", "version"),
            ("agreement", "digest"),
            ("origin",),
        }, path


def _own_bundle(
    chain: Chain, key: Any, *, appended_at: str, signed_at: str, key_sets: dict[str, list[str]]
) -> dict[str, Any]:
    """A bundle of three entries appended at ``appended_at`` signed by ``key``, claiming
    ``signed_at``, not cosigned."""
    leaves = [
        leaf_bytes(i, appended_at, EntryDraft(event="message.destroyed", message_id=f"m{i}")).decode()
        for i in range(3)
    ]
    tree = MemoryTree(leaf_hash(x.encode()) for x in leaves)
    return build_bundle(
        party="ID",
        agreement={"version": "v", "digest": "d" * 64},
        origin=chain.origin,
        entries=list(enumerate(leaves)),
        source=tree,
        checkpoint=sign_checkpoint(chain.origin, 3, root_hash(tree, 3), key),
        signed_at=signed_at,
        size=3,
        key_sets=key_sets,
    )


def test_a_revoked_checkpoint_key_cannot_make_history_by_backdating_its_signed_at() -> None:
    """``signed_at`` is not signed: a holder of a revoked checkpoint key could claim a time before
    the revocation. Without the partner's cosignature, a key revoked at any time is refused; and no
    checkpoint holds an entry appended after it says it was signed."""
    chain, partner = Chain("ID"), Chain("MY")
    stolen = chain.checkpoint
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    chain.revoke("checkpoint", at=start + dt.timedelta(hours=3), effective=start + dt.timedelta(hours=2))
    keys = {"ID": chain.announcements, "MY": partner.announcements}
    before = (start + dt.timedelta(hours=1)).isoformat()
    later = (start + dt.timedelta(hours=100)).isoformat()
    cases = {
        "backdated": (
            _own_bundle(chain, stolen, appended_at=before, signed_at=before, key_sets=keys),
            "revoked at",
        ),
        "entries after signing": (
            _own_bundle(chain, stolen, appended_at=later, signed_at=before, key_sets={"ID": [], "MY": []}),
            "after the checkpoint that holds it says it was signed",
        ),
    }
    for name, (forged, reason) in cases.items():
        with pytest.raises(LedgerIntegrityError, match=reason):
            verify_bundle(
                json.loads(json.dumps(forged)),
                own=chain.anchor(),
                partner=partner.anchor(),
                allow_uncosigned=True,
            )
        assert name


def test_a_checkpoint_said_to_be_signed_after_the_partner_cosigned_it_is_refused() -> None:
    b = bundle(5, 0, 5)
    b["signed_at"] = "2026-11-02T00:00:00+00:00"  # a day after the cosignature's time
    with pytest.raises(LedgerIntegrityError, match="after the partner cosigned it"):
        verify(b)
