"""Checkpoints witnessed by the partner: cosigned when consistent; forks, rollbacks, split views and
forgeries refused and ledgered as incidents; the audit checks it all afterwards."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
import sqlalchemy as sa

from exchange import crypto, envelope
from exchange.auditing import AuditService
from exchange.checkpoints import CheckpointService
from exchange.db import repo
from exchange.errors import CheckpointConflict, LedgerIntegrityError, PartnerKeysUnavailable
from exchange.keys.rotation import KeyAdmin
from exchange.ledger import EntryDraft
from exchange.ledger.checkpoint import CheckpointError, sign_checkpoint
from exchange.node import Node
from exchange.transport.checkpointer import Checkpointer
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_key_rotation import admin, drain, failing_fetch, fetch_from
from tests.integration.test_node_flow import Loopback
from tests.support import signed_message

NOW = dt.datetime.now(dt.UTC)


def grow(node: Node, n: int) -> None:
    node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="x")] * n, "t"))


def audit(node: Node) -> str:
    return AuditService(node.db, node.agreement, node.party).verify().summary()


def incidents(node: Node) -> list[str]:
    with node.db.read() as conn:
        return [e.data["reason"] for e in repo.iter_ledger(conn) if e.event == "checkpoint.incident"]


def test_checkpoints_are_cosigned_round_after_round_and_audit_clean(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    checkpointer = Checkpointer(CheckpointService(id_node), Loopback(my_node), 1)
    for n in (3, 1, 9):
        grow(id_node, n)
        assert checkpointer.run_once() is not None
    assert checkpointer.run_once() is None  # nothing new: no checkpoint, no request
    status = CheckpointService(id_node).status()
    assert status["latest_cosigned"]["size"] == 13
    assert "3 signed checkpoints" in audit(id_node)
    assert "3 partner cosignatures" in audit(id_node)
    assert "3 partner checkpoints witnessed" in audit(my_node)
    assert incidents(my_node) == []


def test_a_lost_cosignature_is_recovered_from_the_witnessed_size(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    service = CheckpointService(id_node)
    grow(id_node, 4)
    service.sign_latest(NOW)
    request = service.to_witness()
    assert request is not None
    CheckpointService(my_node).witness(request.note, request.from_size, request.proof, NOW)  # answer lost
    grow(id_node, 3)
    assert Checkpointer(service, Loopback(my_node), 1).run_once() == 7  # 409 -> proof from 4 -> cosigned
    assert "2 partner checkpoints witnessed" in audit(my_node)


def _fork(node: Node, size: int) -> str:
    """A checkpoint signed with the node's real checkpoint key over a tree that is not its ledger."""
    origin = node.agreement.parties[node.party].ledger_origin
    return sign_checkpoint(origin, size, hashlib.sha256(b"rewritten history").digest(), node.keys.checkpoint)


def test_a_forked_checkpoint_is_refused_and_ledgered(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    grow(id_node, 5)
    assert Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once() == 5
    witness = CheckpointService(my_node)
    with pytest.raises(CheckpointConflict, match="fork"):
        witness.witness(_fork(id_node, 5), 5, [], NOW)  # same size, another root
    with pytest.raises(CheckpointConflict, match="inconsistent"):
        witness.witness(_fork(id_node, 9), 5, [hashlib.sha256(b"x").digest()], NOW)  # proof cannot hold
    with pytest.raises(CheckpointConflict, match="rollback"):
        witness.witness(_fork(id_node, 3), 5, [], NOW)  # smaller than witnessed
    assert incidents(my_node) == ["fork", "inconsistent with the checkpoint witnessed at size 5", "rollback"]
    assert "1 partner checkpoints witnessed" in audit(my_node)  # nothing refused was stored


def _message_from(node: Node, checkpoint: str | None, created: dt.datetime) -> str:
    """A genuine sealed message from ``node`` carrying ``checkpoint``, created at ``created``."""
    return signed_message(node, created, checkpoint)


def small_then_witnessed(id_node: Node, my_node: Node) -> tuple[dict[str, Any], dict[str, Any]]:
    """ID's checkpoint at size 3 (never witnessed), then at size 6, witnessed by MY."""
    grow(id_node, 3)
    CheckpointService(id_node).sign_latest(NOW)
    with id_node.db.read() as conn:
        small = repo.latest_checkpoint(conn)
    grow(id_node, 3)
    Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once()
    with id_node.db.read() as conn:
        honest = repo.latest_checkpoint(conn)
    assert small is not None
    assert honest is not None
    return small, honest


def test_a_split_view_or_a_rollback_in_one_message_is_caught_and_ledgered(
    node_pair: tuple[Node, Node],
) -> None:
    id_node, my_node = node_pair
    small, honest = small_then_witnessed(id_node, my_node)
    now = dt.datetime.now(dt.UTC)
    assert my_node.receive([_message_from(id_node, honest["note"], now)], now)[0].accepted
    assert my_node.receive([_message_from(id_node, small["note"], now)], now)[0].accepted
    assert incidents(my_node) == []  # an older checkpoint sealed before the newer was witnessed: honest
    forked = _fork(id_node, 6)
    assert my_node.receive([_message_from(id_node, forked, now)], now)[0].accepted  # content still verified
    assert incidents(my_node) == ["split view"]
    later = now + dt.timedelta(seconds=my_node.settings.clock_skew_seconds + 60)
    assert my_node.receive([_message_from(id_node, small["note"], later)], later)[0].accepted
    assert incidents(my_node) == ["split view", "rollback"]


def test_one_batch_judges_each_message_by_its_own_checkpoint_and_time(node_pair: tuple[Node, Node]) -> None:
    """Messages of one batch mostly carry one note, judged once; a batch that mixes honest notes,
    a split view and a rollback still flags exactly the messages that carry them."""
    id_node, my_node = node_pair
    small, honest = small_then_witnessed(id_node, my_node)
    now = dt.datetime.now(dt.UTC)
    later = now + dt.timedelta(seconds=my_node.settings.clock_skew_seconds + 60)
    batch = [
        _message_from(id_node, honest["note"], now),
        _message_from(id_node, small["note"], now),  # sealed before size 6 was witnessed: honest
        _message_from(id_node, _fork(id_node, 6), now),
        _message_from(id_node, honest["note"], later),
        _message_from(id_node, small["note"], later),  # the same note, sealed long after: a rollback
    ]
    assert all(r.accepted for r in my_node.receive(batch, later))
    assert incidents(my_node) == ["split view", "rollback"]
    with my_node.db.read() as conn:
        flagged = [e.message_id for e in repo.iter_ledger(conn) if e.event == "checkpoint.incident"]
    ids = [envelope.peek_header(b)["msg_id"] for b in batch]
    assert flagged == [ids[2], ids[4]]


def test_checkpoints_not_signed_by_the_partner_key_are_refused(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    origin = id_node.agreement.parties["ID"].ledger_origin
    stranger = crypto.private_jwk(crypto.new_message_key("ckpt"), "x")
    forged = sign_checkpoint(origin, 1, hashlib.sha256(b"r").digest(), stranger)
    with pytest.raises(CheckpointError):
        CheckpointService(my_node).witness(forged, 0, [], NOW)
    with pytest.raises(CheckpointError):  # MY's own key cannot speak for ID's log either
        CheckpointService(my_node).witness(
            sign_checkpoint(origin, 1, b"\0" * 32, my_node.keys.checkpoint), 0, [], NOW
        )


def _under_an_unannounced_checkpoint_key(node: Node) -> str:
    """A checkpoint of size 1 of ``node``'s log, signed by a checkpoint key it activated without
    announcing it: its partner cannot know the key without fetching ``node``'s key sets."""
    keys = admin(node, key_activation_wait_seconds=0)
    keys.rotate("checkpoint")
    keys.activate("checkpoint", force=True)
    origin = node.agreement.parties[node.party].ledger_origin
    return sign_checkpoint(origin, 1, hashlib.sha256(b"one").digest(), node.keys.checkpoint)


def test_a_checkpoint_to_witness_under_a_key_we_could_not_look_up_is_neither_refused_nor_cosigned(
    node_pair: tuple[Node, Node],
) -> None:
    """The partner asks us to witness a checkpoint signed by a key it activated before we learnt
    it, and its key sets cannot be fetched: PartnerKeysUnavailable (502, it asks again), nothing
    witnessed or ledgered; once the fetch works the same request is cosigned."""
    id_node, my_node = node_pair
    note = _under_an_unannounced_checkpoint_key(id_node)
    now = dt.datetime.now(dt.UTC)  # (the new key is in force from its activation on)
    fetched: list[int] = []
    my_node.fetch_partner_key_sets = failing_fetch(fetched)
    witness = CheckpointService(my_node)
    with pytest.raises(PartnerKeysUnavailable):
        witness.witness(note, 0, [], now)
    assert fetched == [1]
    assert incidents(my_node) == []
    with my_node.db.read() as conn:
        assert repo.latest_witnessed(conn) is None
    my_node.fetch_partner_key_sets = fetch_from(id_node)
    assert witness.witness(note, 0, [], now).startswith("— ")
    assert incidents(my_node) == []


def test_the_audit_names_a_forged_or_rewritten_checkpoint(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    grow(id_node, 4)
    Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once()
    with id_node.db.transaction() as conn:
        conn.execute(sa.text("update checkpoints set note = :n"), {"n": _fork(id_node, 4)})
    with pytest.raises(LedgerIntegrityError, match="checkpoint at size 4"):
        audit(id_node)
    with my_node.db.transaction() as conn:
        conn.execute(sa.text("update witnessed set cosignature = replace(cosignature, 'A', 'B')"))
    with pytest.raises(LedgerIntegrityError, match="witnessed partner checkpoint at size 4"):
        audit(my_node)


def test_a_refused_checkpoint_is_an_incident_on_both_sides(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    grow(id_node, 5)
    assert Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once() == 5
    with my_node.db.transaction() as conn:  # MY's record now contradicts ID's honest log
        conn.execute(sa.text("update witnessed set root_hash = :r"), {"r": hashlib.sha256(b"other").digest()})
    grow(id_node, 2)
    assert Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once() is None
    assert incidents(my_node) == ["inconsistent with the checkpoint witnessed at size 5"]
    assert incidents(id_node) == ["refused by the partner"]


def test_chunked_parallel_verification_agrees_and_names_the_first_bad_entry(
    node_pair: tuple[Node, Node],
) -> None:
    id_node, my_node = node_pair
    checkpointer = Checkpointer(CheckpointService(id_node), Loopback(my_node), 1)
    for n in (3, 30, 37, 30):  # checkpoints at 3, 33, 70, 100: inside and at the ends of chunks
        grow(id_node, n)
        checkpointer.run_once()
    service = AuditService(id_node.db, id_node.agreement, id_node.party)
    single = service.verify(workers=1).summary()
    assert "100 entries, 4 signed checkpoints" in single
    assert service.verify(workers=2, chunk=8).summary() == single
    drop = (
        ["drop trigger ledger_entries_append_only on ledger_entries"]
        if id_node.db.dialect == "postgresql"
        else ["drop trigger ledger_entries_no_update"]
    )
    with id_node.db.transaction() as conn:  # a database administrator's tampering
        for statement in drop:
            conn.execute(sa.text(statement))
        conn.execute(sa.text("update ledger_entries set event = 'y' where seq in (37, 90)"))
    with pytest.raises(LedgerIntegrityError, match="entry 37 was altered"):
        service.verify(workers=2, chunk=8)
    with pytest.raises(LedgerIntegrityError, match="entry 37 was altered"):
        service.verify(workers=1)


def test_a_note_verified_before_its_key_was_revoked_is_judged_afresh_after(
    node_pair: tuple[Node, Node],
) -> None:
    """A node keeps each partner note it verified, by note and the keys it used: once the key
    that signed a note is revoked, a message sealed afterwards carrying that note is an incident,
    whatever was verified before."""
    id_node, my_node = node_pair
    grow(id_node, 3)
    assert Checkpointer(CheckpointService(id_node), Loopback(my_node), 1).run_once() == 3
    with id_node.db.read() as conn:
        latest = repo.latest_checkpoint(conn)
    assert latest is not None
    now = dt.datetime.now(dt.UTC)
    assert my_node.receive([_message_from(id_node, latest["note"], now)], now)[0].accepted
    assert incidents(my_node) == []
    old = str(id_node.keys.checkpoint.kid)
    KeyAdmin(id_node.settings, id_node.registry).revoke(old, reason="stolen", effective_at=now)
    drain(DeliveryWorker(id_node, Loopback(my_node)))  # MY learns of the revocation
    assert my_node.partner.history.in_force(old, now + dt.timedelta(seconds=1)) is None
    later = now + dt.timedelta(seconds=1)
    assert my_node.receive([_message_from(id_node, latest["note"], later)], later)[0].accepted
    assert incidents(my_node) == ["invalid"]


def test_a_carried_checkpoint_under_a_key_we_could_not_look_up_is_no_incident(
    node_pair: tuple[Node, Node],
) -> None:
    """The partner signs its checkpoints with a key it activated before we learnt it, and its key
    sets cannot be fetched: the batch is refused for now (502), no incident is ledgered; once the
    fetch works the key is learnt and the same message admitted, still without one. A note by a
    key no key set names is an incident, as before."""
    id_node, my_node = node_pair
    note = _under_an_unannounced_checkpoint_key(id_node)
    now = dt.datetime.now(dt.UTC)
    sealed = _message_from(id_node, note, now)
    fetched: list[int] = []
    my_node.fetch_partner_key_sets = failing_fetch(fetched)
    with pytest.raises(PartnerKeysUnavailable):
        my_node.receive([sealed], now)
    assert fetched == [1]
    assert incidents(my_node) == []
    my_node.fetch_partner_key_sets = fetch_from(id_node)
    assert my_node.receive([sealed], now)[0].accepted
    assert incidents(my_node) == []
    stranger = crypto.private_jwk(crypto.new_message_key("ckpt"), "x")
    origin = id_node.agreement.parties["ID"].ledger_origin
    forged = sign_checkpoint(origin, 2, hashlib.sha256(b"two").digest(), stranger)
    assert my_node.receive([_message_from(id_node, forged, now)], now)[0].accepted  # content verified
    assert incidents(my_node) == ["invalid"]
