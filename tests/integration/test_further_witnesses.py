"""A further witness named in the agreement (an independent tlog-witness written from the spec in
tests/independent) cosigns both nodes' checkpoints through the C2SP protocol; the audit, the export
bundle and `exchange audit verify` check its cosignatures."""

from __future__ import annotations

import base64
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import tomli_w

from exchange.agreement import load_agreement
from exchange.auditing import AuditService, party_anchor
from exchange.checkpoints import CheckpointService
from exchange.cli import app
from exchange.config import load_settings
from exchange.db import repo
from exchange.errors import InvalidInput, LedgerIntegrityError, TransportError
from exchange.ledger import EntryDraft
from exchange.ledger.bundle import verify_bundle
from exchange.node import Node
from exchange.transport.checkpointer import Checkpointer
from exchange.transport.peer import HttpWitness
from tests.independent import tlog
from tests.independent.witness import MiniWitness
from tests.integration.test_node_flow import Loopback
from tests.support import RUNNER, NodeDir, cli, make_pair

NAME = "witness.aseanapol.example/w1"


@pytest.fixture
def setup(
    tmp_path: Path, db_urls: tuple[str | None, str | None]
) -> Iterator[tuple[Node, Node, MiniWitness, NodeDir]]:
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    agreement = load_agreement(id_dir.path / "agreement.toml")
    logs = [p.ledger_verifier.vkey for p in agreement.parties.values()]
    with MiniWitness(NAME, logs) as witness:
        for node in (id_dir, my_dir):
            path = node.path / "agreement.toml"
            data = tomllib.loads(path.read_text())
            data["witnesses"] = [{"name": NAME, "key": witness.vkey, "url": witness.url}]
            path.write_text(tomli_w.dumps(data, multiline_strings=True))
        pair = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
        yield pair[0], pair[1], witness, id_dir
        for n in pair:
            n.close()


def grow(node: Node, n: int) -> None:
    node.committer.run(
        lambda conn, head: repo.append_ledger(
            conn, head, [EntryDraft(event="x")] * n, "2026-01-01T00:00:00+00:00"
        )
    )


def checkpointer(node: Node, partner: Node, witness: MiniWitness) -> Checkpointer:
    return Checkpointer(CheckpointService(node), Loopback(partner), 1, [HttpWitness(NAME, witness.url, 5)])


def test_a_further_witness_cosigns_through_the_protocol_and_the_audit_checks_it(
    setup: tuple[Node, Node, MiniWitness, NodeDir],
) -> None:
    id_node, my_node, witness, id_dir = setup
    rounds = checkpointer(id_node, my_node, witness)
    for n in (3, 5, 9):
        grow(id_node, n)
        assert rounds.run_once() is not None
    assert witness.answers == [3, 8, 17]  # each round proven consistent from the last one it cosigned
    grow(my_node, 2)
    checkpointer(my_node, id_node, witness).run_once()
    assert witness.latest.keys() == {"ID-node/ledger", "MY-node/ledger"}  # both logs witnessed
    audit = AuditService(id_node.db, id_node.agreement, id_node.party)
    assert f"3 cosignatures by witness {NAME}" in audit.verify().summary()
    out = cli("audit", "verify", "--dir", str(id_dir.path))
    assert f"3 cosignatures by witness {NAME}" in out
    keys = cli("audit", "keys", "--dir", str(id_dir.path))
    assert witness.vkey in keys
    assert id_node.agreement.parties["ID"].ledger_verifier.vkey in keys

    bundle = json.loads(json.dumps(audit.export(0, 3)))
    party = id_node.agreement.parties
    report = verify_bundle(
        bundle,
        own=party_anchor(id_node.agreement, "ID"),
        partner=party_anchor(id_node.agreement, "MY"),
        witnesses=[w.verifier for w in id_node.agreement.witnesses],
    )
    assert set(report.cosigners) == {"MY-node/witness", NAME}
    agreement_file = str(id_dir.path / "agreement.toml")
    (id_dir.path / "bundle.json").write_text(json.dumps(bundle))
    offline = ("audit", "verify", "--bundle", str(id_dir.path / "bundle.json"), "--agreement", agreement_file)
    assert NAME in cli(*offline, "--require-witness", NAME)
    stripped = dict(bundle, checkpoint=bundle["checkpoint"].split(f"\u2014 {NAME}")[0])
    (id_dir.path / "stripped.json").write_text(json.dumps(stripped))
    refused = RUNNER.invoke(
        app,
        [
            *offline[:2],
            "--bundle",
            str(id_dir.path / "stripped.json"),
            "--agreement",
            agreement_file,
            "--require-witness",
            NAME,
        ],
    )
    assert isinstance(refused.exception, LedgerIntegrityError)
    assert f"not cosigned by {NAME}" in str(refused.exception)
    assert report.since_size == 3  # entries 0..2 were first covered by the checkpoint of size 3
    assert [e.seq for e in report.entries] == [0, 1, 2]
    # the independent implementation opens the bundle's checkpoint with the published keys alone
    _, signers = tlog.open_note(
        bundle["checkpoint"],
        [
            tlog.parse_vkey(v)
            for v in (party["ID"].ledger_verifier.vkey, party["MY"].witness_verifier.vkey, witness.vkey)
        ],
    )
    assert set(signers) == {"ID-node/ledger", "MY-node/witness", NAME}
    root = tlog.parse_checkpoint(bundle["checkpoint"].split("\n\n")[0] + "\n")[2]
    for entry in bundle["entries"]:
        proof = [base64.b64decode(h) for h in entry["inclusion"]]
        tlog.check_inclusion(entry["leaf"].encode(), entry["index"], 17, proof, root)


def test_a_lost_answer_is_recovered_with_the_witness_size_from_409(
    setup: tuple[Node, Node, MiniWitness, NodeDir],
) -> None:
    id_node, my_node, witness, _ = setup
    rounds = checkpointer(id_node, my_node, witness)
    grow(id_node, 4)
    rounds.run_once()
    with id_node.db.transaction() as conn:  # as if the witness's answer had been lost
        conn.execute(sa.text("delete from witness_cosignatures"))
    grow(id_node, 3)
    rounds.run_once()  # old 0 -> 409 "4" -> old 4 with a proof -> 200
    assert witness.answers == [4, 7]
    with id_node.db.read() as conn:
        assert repo.latest_cosigned_by(conn, NAME) == 7


def test_a_forged_or_altered_witness_cosignature_fails_the_audit(
    setup: tuple[Node, Node, MiniWitness, NodeDir],
) -> None:
    id_node, my_node, witness, _ = setup
    grow(id_node, 4)
    checkpointer(id_node, my_node, witness).run_once()
    audit = AuditService(id_node.db, id_node.agreement, id_node.party)
    assert "1 cosignatures by witness" in audit.verify().summary()
    with id_node.db.transaction() as conn:
        line = conn.execute(sa.text("select cosignature from witness_cosignatures")).scalar_one()
        raw = bytearray(base64.b64decode(line.split(" ")[2]))
        raw[-1] ^= 1
        forged = f"{line.rsplit(' ', 1)[0]} {base64.b64encode(bytes(raw)).decode()}"
        conn.execute(sa.text("update witness_cosignatures set cosignature = :c"), {"c": forged})
    with pytest.raises(LedgerIntegrityError, match=f"by witness {NAME} does not verify"):
        audit.verify()


def test_a_witness_that_refuses_is_an_incident(setup: tuple[Node, Node, MiniWitness, NodeDir]) -> None:
    id_node, my_node, witness, _ = setup
    witness.logs.clear()  # the witness no longer knows our log: 404
    grow(id_node, 2)
    assert checkpointer(id_node, my_node, witness).run_once() == 2  # the partner still cosigned
    with id_node.db.read() as conn:
        reasons = [e.data["reason"] for e in repo.iter_ledger(conn) if e.event == "checkpoint.incident"]
    assert reasons == [f"refused by witness {NAME}"]


def test_a_partner_outage_does_not_hold_back_the_further_witness(
    setup: tuple[Node, Node, MiniWitness, NodeDir],
) -> None:
    id_node, my_node, witness, _ = setup
    loopback = Loopback(my_node)
    loopback.down = True
    rounds = Checkpointer(CheckpointService(id_node), loopback, 1, [HttpWitness(NAME, witness.url, 5)])
    grow(id_node, 3)
    with pytest.raises(TransportError):
        rounds.run_once()
    assert witness.answers == [3]  # cosigned by the further witness all the same
    loopback.down = False
    assert rounds.run_once() == 3


def test_an_export_without_an_end_stops_at_the_bundle_limit(
    setup: tuple[Node, Node, MiniWitness, NodeDir], monkeypatch: pytest.MonkeyPatch
) -> None:
    id_node, my_node, witness, _ = setup
    grow(id_node, 12)
    checkpointer(id_node, my_node, witness).run_once()
    monkeypatch.setattr("exchange.auditing.MAX_EXPORT", 5)
    audit = AuditService(id_node.db, id_node.agreement, id_node.party)
    assert [e["index"] for e in audit.export(4)["entries"]] == [4, 5, 6, 7, 8]
    with pytest.raises(InvalidInput):
        audit.export(0, 12)
