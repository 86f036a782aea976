"""The audit of a node reads both parties' key histories from the database: a partner's revocation
accepted by the node flags what the ledger recorded as signed by that key after the revocation time
(on the node, through the API answer's shape, the CLI's exit code and an offline bundle), and an
announcement edited in the database breaks the verification."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from exchange import crypto
from exchange.auditing import AuditService
from exchange.checkpoints import CheckpointService
from exchange.cli import app
from exchange.db import repo
from exchange.db.schema import key_sets
from exchange.errors import LedgerIntegrityError
from exchange.keys.announcement import KeyEntry, announce
from exchange.keys.registry import KeyRegistry, anchor
from exchange.ledger import EntryDraft
from exchange.node import Node
from exchange.transport.checkpointer import Checkpointer
from tests.integration.conftest import Pair
from tests.integration.test_node_flow import Loopback
from tests.support import RUNNER, NodeDir, cli

REVOKED_AT = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)


@pytest.fixture
def id_and_nodes(nodes: Pair) -> tuple[NodeDir, Node, Node]:
    """ID's directory and the two nodes."""
    return nodes[0], nodes[2], nodes[3]


def revoke_partner_signing_key(id_node: Node, my_node: Node) -> str:
    """MY revokes its signing key from REVOKED_AT (version 2, signed by the old and the new key);
    the ID node accepts it as it would over the peer channel. Returns the revoked kid."""
    first = anchor(id_node.agreement, "MY")
    old = my_node.keys.signing
    new = crypto.private_jwk(crypto.new_message_key("sig"), "MY-sig-2")
    public = crypto.public_jwk_dict(new)
    issued = REVOKED_AT + dt.timedelta(hours=1)
    keys = [k for k in first.key_set.keys if k.kid != old.kid]
    revoked = next(k for k in first.key_set.keys if k.kid == old.kid)
    keys.append(revoked.model_copy(update={"state": "revoked", "revoked_at": REVOKED_AT}))
    keys.append(
        KeyEntry.model_validate(
            {
                "kid": new.kid,
                "purpose": "signing",
                "state": "active",
                "valid_from": issued,
                "jwk": {k: public[k] for k in ("kty", "crv", "x")},
            }
        )
    )
    key_set = first.key_set.model_copy(
        update={"version": 2, "issued_at": issued, "previous": first.digest, "keys": tuple(keys)}
    )
    registry = KeyRegistry(id_node.db, id_node.agreement, "ID", "MY")
    registry.accept_partner([announce(key_set, [old, new])], issued)
    return str(old.kid)


def test_a_partners_revocation_flags_what_its_key_signed_afterwards(
    id_and_nodes: tuple[NodeDir, Node, Node],
) -> None:
    id_dir, id_node, my_node = id_and_nodes
    kid = str(my_node.keys.signing.kid)
    before = (REVOKED_AT - dt.timedelta(minutes=1)).isoformat()
    after = (REVOKED_AT + dt.timedelta(minutes=1)).isoformat()
    drafts = [
        EntryDraft(event="envelope.received", data={"signer_kid": kid, "signed_at": before}),
        EntryDraft(event="envelope.received", data={"signer_kid": kid, "signed_at": after}),
        EntryDraft(event="receipt.verified", data={"signer_kid": kid}),  # ledgered at "now": after
    ]
    now = dt.datetime.now(dt.UTC).isoformat()
    id_node.committer.run(lambda conn, head: repo.append_ledger(conn, head, drafts, now))
    service = AuditService(id_node.db, id_node.agreement, id_node.party)
    assert service.verify().flagged == ()  # not revoked yet: nothing to flag
    revoke_partner_signing_key(id_node, my_node)
    Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once()

    report = service.verify()
    assert [(f.seq, f.kid, f.revoked_at) for f in report.flagged] == [
        (1, kid, REVOKED_AT.isoformat()),
        (2, kid, REVOKED_AT.isoformat()),
    ]
    assert report.key_versions == {"ID": 1, "MY": 2}
    assert report.checkpoints == 1
    assert report.cosignatures == 1
    rows = service.checkpoints()["verifier_keys"]
    assert {(r["holder"], r["kid"], r["state"]) for r in rows} >= {
        ("ID", str(id_node.keys.checkpoint.kid), "active"),
        ("MY", str(my_node.keys.checkpoint.kid), "active"),
    }

    out = RUNNER.invoke(app, ["audit", "verify", "--dir", str(id_dir.path)])
    assert out.exit_code == 1
    assert "ledger verified:" in out.output
    assert "2 signatures FLAGGED" in out.output
    assert f"entry 1 (envelope.received): signed at {after} by MY's key {kid}, revoked at" in out.output

    bundle = service.export(0)
    assert len(bundle["key_sets"]["MY"]) == 1
    assert bundle["key_sets"]["ID"] == []
    (id_dir.path / "bundle.json").write_text(json.dumps(bundle))
    offline = ["audit", "verify", "--bundle", str(id_dir.path / "bundle.json")]
    offline += ["--agreement", str(id_dir.path / "agreement.toml")]
    checked = RUNNER.invoke(app, offline)
    assert checked.exit_code == 1, checked.output
    assert "bundle verified:" in checked.output
    assert "MY at version 2" in checked.output
    assert "FLAGGED" in checked.output
    bundle["key_sets"]["MY"] = []  # without MY's announcement the revocation is not known: nothing flagged
    (id_dir.path / "bundle.json").write_text(json.dumps(bundle))
    assert "FLAGGED" not in cli(*offline)


def test_an_announcement_edited_in_the_database_breaks_the_audit(
    id_and_nodes: tuple[NodeDir, Node, Node],
) -> None:
    _, id_node, my_node = id_and_nodes
    revoke_partner_signing_key(id_node, my_node)
    service = AuditService(id_node.db, id_node.agreement, id_node.party)
    assert service.verify().key_versions["MY"] == 2
    with id_node.db.transaction() as conn:
        stored = conn.execute(sa.select(key_sets.c.announcement)).scalar_one()
        document = json.loads(stored)
        document["signatures"] = document["signatures"][1:]  # drop the old key's signature
        conn.execute(key_sets.update().values(announcement=json.dumps(document)))
    with pytest.raises(LedgerIntegrityError, match="key-set history of MY breaks after version 1"):
        service.verify()


def test_an_announcement_deleted_from_the_database_breaks_the_audit(
    id_and_nodes: tuple[NodeDir, Node, Node],
) -> None:
    """The ledger's keys.accepted entry (witnessed by the partner) says version 2 was accepted: a
    table without it, which would bring back the key version 2 revoked, fails the audit."""
    _, id_node, my_node = id_and_nodes
    revoke_partner_signing_key(id_node, my_node)
    service = AuditService(id_node.db, id_node.agreement, id_node.party)
    assert service.verify().key_versions["MY"] == 2
    with id_node.db.read() as conn:
        (accepted,) = [e for e in repo.iter_ledger(conn) if e.event == "keys.accepted"]
    with id_node.db.transaction() as conn:
        conn.execute(key_sets.delete().where(key_sets.c.party == "MY", key_sets.c.version == 2))
    with pytest.raises(LedgerIntegrityError, match="records MY's key set version 2") as broken:
        service.verify()
    assert broken.value.seq == accepted.seq


def test_checkpoints_come_a_page_at_a_time_and_exports_one_at_a_time(nodes: Pair) -> None:
    """An auditor's listing of checkpoints is bounded (one is signed every few seconds, for
    years), paged back by size; and exports beyond the service's concurrency are Busy (503)."""
    from exchange.errors import Busy

    _, _, id_node, my_node = nodes
    checkpointer = Checkpointer(CheckpointService(id_node), Loopback(my_node), 1)
    now = dt.datetime.now(dt.UTC).isoformat()
    for _ in range(5):
        id_node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="x")], now))
        checkpointer.run_once()
    service = AuditService(id_node.db, id_node.agreement, id_node.party, concurrent=1)
    everything = service.checkpoints(limit=1000)["checkpoints"]
    assert len(everything) == 5
    pages, before = [], None
    while True:
        page = service.checkpoints(before=before, limit=2)
        pages.append([c["size"] for c in page["checkpoints"]])
        before = page["next_before"]
        if before is None:
            break
    assert pages == [
        [c["size"] for c in everything[3:]],
        [c["size"] for c in everything[1:3]],
        [everything[0]["size"]],
    ]
    assert service._export_slots is not None
    with service._export_slots, pytest.raises(Busy):  # an export under way
        service.export(0)
    assert service.export(0)["entries"]
