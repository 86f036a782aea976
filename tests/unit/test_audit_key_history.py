"""The audit across key rotations, with real keys: checkpoints and cosignatures verify by the key in
force when they were made, on either side of each party's checkpoint-key rotation; a revoked key's
later signatures fail (checkpoints) or are flagged (ledgered signatures); the key-set chain is walked
from the agreement's version 1 and any break fails; a bundle carries the history and verifies offline."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import pytest
from joserfc.jwk import OKPKey

from exchange.errors import LedgerIntegrityError
from exchange.keys.announcement import announce
from exchange.ledger import EntryDraft, decode_leaf, leaf_bytes
from exchange.ledger.audit import AuditKeys, AuditReport, flag_signatures, verify_audit
from exchange.ledger.bundle import build_bundle, verify_bundle
from exchange.ledger.checkpoint import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    CheckpointError,
    NoteVerifier,
    checkpoint_with,
    cosign,
    sign_checkpoint,
    verify_checkpoint,
)
from exchange.ledger.key_history import PartyKeys, verify_cosigned
from exchange.ledger.merkle import MemoryTree, consistency_proof, leaf_hash, root_hash
from tests.unit.key_chains import Chain, entry, new_key

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
Entries = list[tuple[str, dict[str, Any], dt.datetime]]


def at(hours: float) -> dt.datetime:
    return T0 + hours * HOUR


class Ledger:
    """One party's ledger, its checkpoints (cosigned by the partner) and the partner checkpoints
    it witnessed, all built with the keys of two chains."""

    def __init__(
        self, own: Chain, partner: Chain, entries: list[tuple[str, dict[str, Any], dt.datetime]]
    ) -> None:
        self.own, self.partner = own, partner
        self.leaves = [
            leaf_bytes(i, when.isoformat(), EntryDraft(event=event, data=data))
            for i, (event, data, when) in enumerate(entries)
        ]
        self.tree = MemoryTree(leaf_hash(leaf) for leaf in self.leaves)
        self.checkpoints: list[dict[str, Any]] = []
        self.witnessed: list[dict[str, Any]] = []

    def checkpoint(
        self, size: int, when: dt.datetime, key: OKPKey, cosigner: OKPKey | None, cosigned: dt.datetime
    ) -> None:
        root = root_hash(self.tree, size)
        note = sign_checkpoint(self.own.origin, size, root, key)
        line = None
        if cosigner is not None:
            cp = verify_checkpoint(note, origin=self.own.origin, key=key)
            line = cosign(cp, witness=self.partner.witness, key=cosigner, timestamp=int(cosigned.timestamp()))
        self.checkpoints.append(
            {
                "size": size,
                "root_hash": root,
                "note": note,
                "created_at": when.isoformat(),
                "cosignature": line,
            }
        )

    def witness(self, other: Ledger, size: int, when: dt.datetime, signer: OKPKey, cosigner: OKPKey) -> None:
        """Record ``other``'s checkpoint of ``size`` signed by ``signer``, cosigned by us at ``when``."""
        root = root_hash(other.tree, size)
        note = sign_checkpoint(other.own.origin, size, root, signer)
        cp = verify_checkpoint(note, origin=other.own.origin, key=signer)
        previous = self.witnessed[-1]["size"] if self.witnessed else 0
        proof = consistency_proof(other.tree, previous, size) if previous else []
        self.witnessed.append(
            {
                "size": size,
                "root_hash": root,
                "note": note,
                "previous_size": previous,
                "proof": json.dumps([p.hex() for p in proof]),
                "cosignature": cosign(
                    cp, witness=self.own.witness, key=cosigner, timestamp=int(when.timestamp())
                ),
                "witnessed_at": when.isoformat(),
            }
        )

    def verify_entries(self, roots: Mapping[int, bytes]) -> int:
        for size, root in roots.items():
            if root != root_hash(self.tree, size):
                raise LedgerIntegrityError(f"the ledger does not reproduce the root at size {size}")
        return self.tree.size

    def audit(self, keys: AuditKeys | None = None) -> AuditReport:
        return verify_audit(
            self.verify_entries,
            checkpoints=self.checkpoints,
            witnessed=self.witnessed,
            keys=keys or audit_keys(self.own, self.partner),
            signed=[decode_leaf(leaf) for leaf in self.leaves],
        )


def audit_keys(own: Chain, partner: Chain, skew: dt.timedelta = dt.timedelta(0)) -> AuditKeys:
    return AuditKeys(
        own=own.anchor().walk(own.announcements),
        partner=partner.anchor().walk(partner.announcements),
        skew=skew,
    )


def rotated() -> tuple[Ledger, Ledger, dict[str, OKPKey]]:
    """ID and MY each rotate their checkpoint key (MY an hour after ID), checkpointing and
    witnessing each other before, between and after the rotations."""
    id_chain, my_chain = Chain("ID"), Chain("MY")
    keys = {"id1": id_chain.checkpoint, "my1": my_chain.checkpoint}
    id_ledger, my_ledger = (
        Ledger(
            own,
            partner,
            [("envelope.received", {"signer_kid": partner.signing.kid}, at(h)) for h in range(6)],
        )
        for own, partner in ((id_chain, my_chain), (my_chain, id_chain))
    )
    id_ledger.checkpoint(2, at(1), keys["id1"], keys["my1"], at(1.01))
    my_ledger.checkpoint(2, at(1), keys["my1"], keys["id1"], at(1.01))
    id_ledger.witness(my_ledger, 2, at(1.01), keys["my1"], keys["id1"])
    my_ledger.witness(id_ledger, 2, at(1.01), keys["id1"], keys["my1"])
    keys["id2"] = id_chain.rotate_checkpoint(announced=at(2), activated=at(3))
    id_ledger.checkpoint(3, at(3.5), keys["id2"], keys["my1"], at(3.51))  # ID's new key, MY's old
    my_ledger.checkpoint(3, at(3.5), keys["my1"], keys["id2"], at(3.51))
    id_ledger.witness(my_ledger, 3, at(3.51), keys["my1"], keys["id2"])
    my_ledger.witness(id_ledger, 3, at(3.51), keys["id2"], keys["my1"])
    keys["my2"] = my_chain.rotate_checkpoint(announced=at(3.6), activated=at(4))
    id_ledger.checkpoint(5, at(5), keys["id2"], keys["my2"], at(5.01))  # both new keys
    my_ledger.checkpoint(5, at(5), keys["my2"], keys["id2"], at(5.01))
    id_ledger.witness(my_ledger, 5, at(5.01), keys["my2"], keys["id2"])
    my_ledger.witness(id_ledger, 5, at(5.01), keys["id2"], keys["my2"])
    return id_ledger, my_ledger, keys


def test_checkpoints_and_cosignatures_verify_across_both_parties_rotations() -> None:
    id_ledger, my_ledger, _ = rotated()
    for ledger in (id_ledger, my_ledger):
        report = ledger.audit()
        assert (report.checkpoints, report.cosignatures, report.witnessed) == (3, 3, 3)
        assert report.key_versions == {"ID": 3, "MY": 3}
        assert report.flagged == ()
        assert "key-set histories verified (ID at version 3, MY at version 3)" in report.summary()


def test_without_the_announcements_a_checkpoint_by_the_new_key_fails() -> None:
    id_ledger, _, _ = rotated()
    anchors_only = AuditKeys(own=id_ledger.own.anchor().walk([]), partner=id_ledger.partner.anchor().walk([]))
    with pytest.raises(
        LedgerIntegrityError, match=r"checkpoint at size 3 is forged.*no signature by a checkpoint key of ID"
    ):
        id_ledger.audit(anchors_only)


@pytest.mark.parametrize(
    ("sign", "message"),
    [
        # the old key after it was retired (valid until the activation of the new one)
        (
            lambda k: ("id1", at(3.5), "my1", at(3.51)),
            "checkpoint at size 6 is forged.*ID-ckpt-1 was not in force",
        ),
        # the new key while it was only announced (next), not yet active
        (
            lambda k: ("id2", at(2.5), "my1", at(2.51)),
            "checkpoint at size 6 is forged.*not in force at 2026-11-01T02:30",
        ),
        # the partner cosigning with its new key before activating it
        (
            lambda k: ("id2", at(3.7), "my2", at(3.7)),
            "cosignature of checkpoint at size 6 does not verify.*MY-ckpt-",
        ),
    ],
)
def test_a_signature_by_a_key_not_in_force_then_fails(sign: Any, message: str) -> None:
    id_ledger, _, keys = rotated()
    signer, when, cosigner, cosigned = sign(keys)
    id_ledger.checkpoint(6, when, keys[signer], keys[cosigner], cosigned)
    with pytest.raises(LedgerIntegrityError, match=message):
        id_ledger.audit()


def test_a_checkpoint_by_a_revoked_key_fails_after_the_revocation_time_only() -> None:
    id_chain, my_chain = Chain("ID"), Chain("MY")
    old = id_chain.checkpoint
    entries: Entries = [("message.submitted", {}, at(h)) for h in range(4)]
    before = Ledger(id_chain, my_chain, entries)
    before.checkpoint(2, at(1.9), old, my_chain.checkpoint, at(1.95))
    id_chain.revoke("checkpoint", at=at(2.5), effective=at(2))
    assert before.audit().checkpoints == 1  # signed before the revocation's effective time: still trusted
    after = Ledger(id_chain, my_chain, entries)
    after.checkpoint(2, at(1.9), old, my_chain.checkpoint, at(1.95))
    after.checkpoint(3, at(2.1), old, my_chain.checkpoint, at(2.15))
    with pytest.raises(
        LedgerIntegrityError,
        match=r"size 3 is forged.*ID's key ID-ckpt-1 was revoked at 2026-11-01T02:00:00\+00:00",
    ):
        after.audit()


def test_a_witnessed_partner_checkpoint_is_judged_on_this_nodes_clock_with_the_skew_allowed() -> None:
    id_ledger, my_ledger, keys = rotated()
    early = Ledger(id_ledger.own, my_ledger.own, [("e", {}, at(0))] * 8)
    early.witness(my_ledger, 5, at(3.99), keys["my2"], keys["id2"])  # MY activated at 4:00 on its clock
    with pytest.raises(LedgerIntegrityError, match="witnessed partner checkpoint at size 5 is forged"):
        early.audit()
    assert early.audit(audit_keys(id_ledger.own, my_ledger.own, skew=dt.timedelta(minutes=5))).witnessed == 1


def flagged_cases() -> tuple[Chain, Chain, Entries]:
    id_chain, my_chain = Chain("ID"), Chain("MY")
    old = my_chain.signing.kid
    new = my_chain.revoke("signing", at=at(3), effective=at(2)).kid
    own = id_chain.signing.kid
    entries: Entries = [
        ("envelope.received", {"signer_kid": old, "signed_at": at(1.5).isoformat()}, at(3.5)),  # before T
        ("envelope.received", {"signer_kid": old, "signed_at": at(2.5).isoformat()}, at(2.6)),  # after T
        ("receipt.verified", {"signer_kid": old}, at(2.2)),  # no signed_at: the entry's time, after T
        ("receipt.verified", {"signer_kid": old}, at(1.9)),  # before T
        ("envelope.received", {"signer_kid": new, "signed_at": at(3.2).isoformat()}, at(3.2)),
        ("envelope.received", {"signer_kid": "MY-sig-unknown"}, at(3.2)),
        ("message.submitted", {"signer_kid": own, "signed_at": at(3).isoformat()}, at(3)),
        ("message.submitted", {"signer_kid": old, "signed_at": at(1).isoformat()}, at(1)),  # not ours
        ("envelope.received", {"signer_kid": new, "signed_at": "yesterday"}, at(3.2)),
        ("envelope.redelivered", {"signer_kid": old}, at(5)),  # names no signature it judges
    ]
    return id_chain, my_chain, entries


def test_ledgered_signatures_after_a_revocation_are_flagged_and_earlier_ones_are_not() -> None:
    id_chain, my_chain, entries = flagged_cases()
    ledger = Ledger(id_chain, my_chain, entries)
    flagged = {f.seq: f for f in ledger.audit().flagged}
    assert sorted(flagged) == [1, 2, 5, 7, 8]
    assert flagged[1].revoked_at == at(2).isoformat()
    assert flagged[1].signed_at == at(2.5).isoformat()
    assert flagged[1].reason == f"MY's key {my_chain.sets[1].keys[-2].kid} was revoked at {at(2).isoformat()}"
    assert flagged[2].signed_at == at(2.2).isoformat()
    assert "revoked" in flagged[2].reason
    assert flagged[5].revoked_at is None
    assert "not in force" in flagged[5].reason
    assert flagged[7].party == "ID"
    assert "not in force" in flagged[7].reason
    assert "unreadable" in flagged[8].reason
    assert "entry 1 (envelope.received): signed at 2026-11-01T02:30:00+00:00 by MY's key" in flagged[1].line()
    assert "5 signatures FLAGGED" in ledger.audit().summary()


def test_a_partners_signature_read_on_this_nodes_clock_gets_the_skew_but_never_past_a_revocation() -> None:
    id_chain, my_chain, _ = flagged_cases()
    old = my_chain.sets[1].keys[-2].kid
    new = my_chain.signing.kid
    entries: Entries = [
        ("envelope.received", {"signer_kid": new}, at(2.99)),  # just before MY issued the new key
        ("envelope.received", {"signer_kid": old}, at(1.99)),  # just before the revocation
    ]
    keys = AuditKeys(
        own=id_chain.anchor().walk(id_chain.announcements),
        partner=my_chain.anchor().walk(my_chain.announcements),
        skew=dt.timedelta(minutes=5),
    )
    ledger = Ledger(id_chain, my_chain, entries)
    assert flag_signatures([decode_leaf(x) for x in ledger.leaves], keys) == ()
    strict = AuditKeys(own=keys.own, partner=keys.partner)
    assert [f.seq for f in flag_signatures([decode_leaf(x) for x in ledger.leaves], strict)] == [0]


def _swap(items: list[str]) -> None:
    items[0], items[1] = items[1], items[0]


def _alter(items: list[str]) -> None:
    doc = json.loads(items[1])
    doc["payload"] = doc["payload"][:-2] + ("A" if doc["payload"][-2] != "A" else "B") + doc["payload"][-1]
    items[1] = json.dumps(doc)


def _foreign() -> str:
    """A version 2 of another MY chain (another anchor): well signed, but not on top of ours."""
    other = Chain("MY")
    other.rotate_checkpoint(at(1), at(1.5))
    return other.announcements[0]


def _forge(chain: Chain) -> Any:
    def forge(items: list[str]) -> None:  # a version 4 signed by a key of nobody's
        key_set = chain.sets[-1].model_copy(update={"version": 4, "previous": "0" * 64})
        items.append(announce(key_set, [new_key("sig", "MY-sig-stranger")]))

    return forge


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda chain: lambda items: items.pop(0), "breaks after version 1: skipped-version"),
        (lambda chain: _swap, "breaks after version 1: skipped-version"),
        (lambda chain: _alter, "breaks after version 2: malformed"),
        (lambda chain: lambda items: items.append(items[-1]), "breaks after version 3: replay"),
        (lambda chain: lambda items: items.insert(0, _foreign()), "breaks after version 1: mix-and-match"),
        (_forge, "breaks after version 3: mix-and-match"),
    ],
)
def test_a_tampered_announcement_chain_fails(tamper: Any, reason: str) -> None:
    id_ledger, _, _ = rotated()
    chain = id_ledger.partner
    announcements = list(chain.announcements)
    tamper(chain)(announcements)
    with pytest.raises(LedgerIntegrityError, match=f"key-set history of MY {reason}"):
        chain.anchor().walk(announcements)


def test_a_version_issued_before_the_one_it_follows_breaks_the_chain() -> None:
    chain = Chain("MY")
    chain.rotate_checkpoint(announced=at(3), activated=at(2))
    with pytest.raises(LedgerIntegrityError, match="issued-before: version 3 is issued before the last"):
        chain.anchor().walk(chain.announcements)


def test_another_partys_announcements_are_refused() -> None:
    mine, theirs = Chain("ID"), Chain("MY")
    theirs.rotate_checkpoint(at(1), at(2))
    with pytest.raises(LedgerIntegrityError, match="key-set history of ID breaks after version 1"):
        mine.anchor().walk(theirs.announcements)


# --- the offline bundle -------------------------------------------------------------------------


def history_bundle(ledger: Ledger) -> dict[str, Any]:
    """A bundle of entries 0..2 against the checkpoint of size 5 (signed by the new keys), with the
    consistency proof from the one of size 3 (ID's new key, cosigned by MY's old one)."""
    latest, first = ledger.checkpoints[-1], ledger.checkpoints[1]
    return build_bundle(
        party=ledger.own.party,
        agreement={"version": "v", "digest": "d" * 64},
        origin=ledger.own.origin,
        entries=[(i, ledger.leaves[i].decode()) for i in range(3)],
        source=ledger.tree,
        checkpoint=checkpoint_with(latest["note"], [latest["cosignature"]]),
        signed_at=latest["created_at"],
        size=latest["size"],
        key_sets={"ID": ledger.own.announcements, "MY": ledger.partner.announcements},
        earliest=(
            checkpoint_with(first["note"], [first["cosignature"]]),
            first["created_at"],
            consistency_proof(ledger.tree, 3, 5),
        ),
    )


def verify_offline(ledger: Ledger, bundle: dict[str, Any], **kwargs: Any) -> Any:
    return verify_bundle(
        json.loads(json.dumps(bundle)), own=ledger.own.anchor(), partner=ledger.partner.anchor(), **kwargs
    )


def test_a_bundle_carrying_the_key_history_verifies_offline() -> None:
    id_ledger, _, _ = rotated()
    report = verify_offline(id_ledger, history_bundle(id_ledger))
    assert report.cosigned
    assert report.since_size == 3
    assert report.key_versions == {"ID": 3, "MY": 3}
    assert (
        "key-set histories walked from the agreement (ID at version 3, MY at version 3)" in report.summary()
    )


def test_a_bundle_whose_announcements_are_removed_fails_clearly() -> None:
    id_ledger, _, _ = rotated()
    bundle = history_bundle(id_ledger)
    stripped = copy.deepcopy(bundle)
    stripped["key_sets"]["ID"] = []
    with pytest.raises(
        LedgerIntegrityError,
        match="checkpoint does not verify: the note carries no signature by a checkpoint key of ID"
        r" \(its key sets walk to ID at version 1, MY at 3\)",
    ):
        verify_offline(id_ledger, stripped)
    partner_stripped = copy.deepcopy(bundle)
    partner_stripped["key_sets"]["MY"] = []  # MY's new key: its cosignature is by a key unknown
    with pytest.raises(LedgerIntegrityError, match="not cosigned by the partner node"):
        verify_offline(id_ledger, partner_stripped)
    del bundle["key_sets"]
    with pytest.raises(LedgerIntegrityError, match="carries no key sets of ID and MY"):
        verify_offline(id_ledger, bundle)


def test_a_bundle_naming_a_key_of_its_own_is_not_trusted() -> None:
    id_ledger, _, _ = rotated()
    bundle = history_bundle(id_ledger)
    forged = list(bundle["key_sets"]["ID"])
    _forge(id_ledger.own)(forged)
    bundle["key_sets"]["ID"] = forged
    with pytest.raises(LedgerIntegrityError, match="key-set history of ID breaks after version 3"):
        verify_offline(id_ledger, bundle)


def test_a_bundle_backdated_before_its_keys_activation_fails() -> None:
    id_ledger, _, _ = rotated()
    bundle = history_bundle(id_ledger)
    bundle["signed_at"] = at(2.5).isoformat()  # ID's new key was only announced then
    with pytest.raises(LedgerIntegrityError, match=r"checkpoint does not verify.*not in force"):
        verify_offline(id_ledger, bundle)


def test_a_bundle_flags_the_revoked_signatures_of_its_entries() -> None:
    id_chain, my_chain, entries = flagged_cases()
    ledger = Ledger(id_chain, my_chain, entries)
    ledger.checkpoint(len(entries), at(6), id_chain.checkpoint, my_chain.checkpoint, at(6.01))
    latest = ledger.checkpoints[-1]
    bundle = build_bundle(
        party="ID",
        agreement={"version": "v", "digest": "d" * 64},
        origin=id_chain.origin,
        entries=[(i, leaf.decode()) for i, leaf in enumerate(ledger.leaves)],
        source=ledger.tree,
        checkpoint=checkpoint_with(latest["note"], [latest["cosignature"]]),
        signed_at=latest["created_at"],
        size=latest["size"],
        key_sets={"ID": id_chain.announcements, "MY": my_chain.announcements},
    )
    report = verify_offline(ledger, bundle)
    assert [f.seq for f in report.flagged] == [1, 2, 5, 7, 8]
    assert "5 signatures FLAGGED" in report.summary()


def test_the_checkpoint_keys_of_a_history_are_listed_with_their_newest_state() -> None:
    id_ledger, _, keys = rotated()
    history: PartyKeys = id_ledger.own.anchor().walk(id_ledger.own.announcements)
    listed = {k.kid: k for k in history.checkpoint_keys()}
    old, new = str(keys["id1"].kid), str(keys["id2"].kid)
    assert listed[old].state == "retired"
    assert listed[old].valid_until == at(3)
    assert listed[new].state == "active"
    assert [NoteVerifier.parse(v.vkey).algorithm for _, v in history.verifiers(SIG_ED25519)] == [1, 1]
    assert {v.name for _, v in history.verifiers(SIG_COSIGNATURE_V1)} == {"ID-node/witness"}


def test_a_cosignature_in_the_second_a_key_became_active_verifies_though_its_time_is_whole_seconds() -> None:
    chain = Chain("MY")
    activated = T0 + dt.timedelta(hours=1, microseconds=400_000)  # 01:00:00.4
    new = chain.rotate_checkpoint(announced=T0, activated=activated)
    keys = chain.anchor().walk(chain.announcements)
    other = Chain("ID")
    note = sign_checkpoint(other.origin, 1, b"\x01" * 32, other.checkpoint)
    checkpoint = verify_checkpoint(note, origin=other.origin, key=other.checkpoint)
    made_at = activated + dt.timedelta(milliseconds=300)  # 01:00:00.7, stamped 01:00:00
    line = cosign(checkpoint, witness=chain.witness, key=new, timestamp=int(made_at.timestamp()))
    assert verify_cosigned(checkpoint, line, keys)[1] == new.kid
    too_early = cosign(checkpoint, witness=chain.witness, key=new, timestamp=int(activated.timestamp()) - 1)
    with pytest.raises(CheckpointError, match="not in force"):
        verify_cosigned(checkpoint, too_early, keys)


def test_the_audit_refuses_a_retired_key_brought_back_after_it_left_the_set() -> None:
    """The audit applies the node's rules over the whole history, not only against the version
    before: a retired checkpoint key that left the set may not come back under its old id."""
    chain = Chain("MY")
    old = chain.checkpoint
    new = chain.rotate_checkpoint(at(1), at(2))  # version 3: the old key retired
    chain.publish(at(3), (*chain.others(), entry(new, "checkpoint", "active")), [chain.signing])  # it left
    chain.anchor().walk(chain.announcements)  # so far a valid history
    chain.publish(
        at(4),
        (*chain.others(), entry(new, "checkpoint", "active"), entry(old, "checkpoint", "next", at(4))),
        [chain.signing],
    )
    with pytest.raises(LedgerIntegrityError, match=f"breaks after version 4: bad-transition.*{old.kid}"):
        chain.anchor().walk(chain.announcements)
