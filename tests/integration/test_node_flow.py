"""The whole message path on SQLite and PostgreSQL, through the real migrations, without sockets:
the transport double hands envelopes straight to the partner Node."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exchange import crypto
from exchange.auditing import AuditService
from exchange.checkpoints import CheckpointService, WitnessRequest
from exchange.config import load_settings
from exchange.db import repo
from exchange.db.engine import Database
from exchange.db.schema import ledger_entries, messages
from exchange.envelope.size import batch_bytes
from exchange.errors import (
    CheckpointConflict,
    DatabaseNotMigrated,
    InvalidInput,
    PolicyRefusal,
    TransportError,
)
from exchange.messages import MessageSubmission
from exchange.node import Node, PeerResult
from exchange.policy import Actor
from exchange.transport.peer import WitnessAnswer
from exchange.transport.worker import DeliveryWorker
from tests.support import NodeDir, make_pair, register_client, response_to, rfi


class Loopback:
    """A PeerTransport that delivers to a Node in the same process; can fail on demand."""

    def __init__(self, partner: Node) -> None:
        self.partner = partner
        self.down = False
        self.lose_answer = False  # deliver, then fail as if the connection dropped
        self.batches = 0
        self.attempts = 0  # connections tried, successful or not

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        self.attempts += 1
        if self.down:
            raise TransportError("partner unreachable: connection refused")
        self.batches += 1
        results = self.partner.receive(envelopes, dt.datetime.now(dt.UTC))
        if self.lose_answer:
            raise TransportError("connection reset after the request was sent")
        return results

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        return AuditService(self.partner.db, self.partner.agreement, self.partner.party).message_history(
            message_id
        )

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        if self.down:
            raise TransportError("partner unreachable: connection refused")
        try:
            line = CheckpointService(self.partner).witness(
                request.note, request.from_size, request.proof, dt.datetime.now(dt.UTC)
            )
        except CheckpointConflict as exc:
            return WitnessAnswer(None, exc.witnessed_size, exc.incident)
        return WitnessAnswer(line)

    def announce_keys(self, announcements: list[str]) -> str:
        if self.down:
            raise TransportError("partner unreachable: connection refused")
        return self.partner.accept_key_sets(announcements, dt.datetime.now(dt.UTC))

    def fetch_key_sets(self, after: int) -> list[str]:
        if self.down:
            raise TransportError("partner unreachable: connection refused")
        return self.partner.registry.announcements_after(self.partner.party, after)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp() + 1.0  # what was just queued is due

    def __call__(self) -> float:
        return self.now


def actor(node: Node, nd: NodeDir, name: str) -> Actor:
    found = node.actor_for(crypto.certificate_info(nd.client(name).cert.read_bytes()).fingerprint)
    assert found is not None
    return found


@pytest.fixture
def pair(tmp_path: Path, db_urls: tuple[str | None, str | None]):  # type: ignore[no-untyped-def]
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    yield id_dir, my_dir, id_node, my_node
    id_node.close()
    my_node.close()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def claim_due(
    conn: Any,
    node: Node,
    *,
    at: float | None = None,
    lease_seconds: float = 600.0,
    limit: int = 10,
    max_bytes: int = 10**9,
    worker: str = "w1",
) -> repo.Claim:
    """``node``'s due outbox rows claimed in ``conn``'s transaction, as its delivery worker claims
    them (request bodies framed as the worker frames them), at ``at`` (default: now)."""
    when = time.time() if at is None else at
    return repo.claim_due(
        conn,
        now=when,
        queued_since=0.0,
        lease_seconds=lease_seconds,
        limit=limit,
        max_bytes=max_bytes,
        worker=worker,
        frame=batch_bytes,
        updated_at=dt.datetime.fromtimestamp(when, dt.UTC).isoformat(),
        key_sets_of=node.party,
    )


def test_a_request_crosses_and_its_response_comes_back(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri, pdrm = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    accepted = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    assert accepted["status"] == "queued"
    assert accepted["classification"]["partner_equivalent"] == {"scheme": "ARAHAN", "level": "RAHSIA"}
    assert DeliveryWorker(id_node, Loopback(my_node)).run_once() == 1
    status = id_node.status(polri, accepted["id"], now())
    assert status["status"] == "delivered"
    assert status["receipt"]["jws"].count(".") == 2

    page = my_node.inbox(pdrm, 0, 10, now())
    assert [i["id"] for i in page.items] == [accepted["id"]]
    item = page.items[0]
    assert item["payload"] == rfi()["payload"]
    assert item["classification"] == {
        "scheme": "POLRI",
        "level": "RAHASIA",
        "common": "S",
        "local_equivalent": "RAHSIA",
    }

    reply = my_node.submit(pdrm, MessageSubmission.model_validate(response_to(accepted["id"])), now())
    assert reply["thread_id"] == accepted["thread_id"]
    assert DeliveryWorker(my_node, Loopback(id_node)).run_once() == 1
    back = id_node.inbox(polri, 0, 10, now()).items
    assert back[0]["in_reply_to"] == accepted["id"]
    assert back[0]["classification"]["level"] == "SULIT"
    assert back[0]["classification"]["local_equivalent"] == "RAHASIA"

    with id_node.db.transaction() as conn:
        events = [e.event for e in repo.iter_ledger(conn)]
    assert events == [
        "message.submitted",
        "message.sent",
        "receipt.verified",
        "envelope.received",
        "receipt.issued",
        "message.released",
    ]


def test_the_stored_rows_and_ledger_hold_no_plaintext(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    secret = "RCR-SECRET-RECRUITER-NAME"
    body = rfi(payload={"summary": secret, "questions": [secret]})
    id_node.submit(actor(id_node, id_dir, "polri-cms"), MessageSubmission.model_validate(body), now())
    DeliveryWorker(id_node, Loopback(my_node)).run_once()
    my_node.inbox(actor(my_node, my_dir, "pdrm-d7"), 0, 10, now())
    for node in (id_node, my_node):
        with node.db.transaction() as conn:
            dump = repr(conn.execute(sa.select(messages)).all()) + repr(
                conn.execute(sa.select(ledger_entries)).all()
            )
        assert secret not in dump


def test_inbox_pages_have_no_gaps_and_no_repeats(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri, pdrm = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    worker = DeliveryWorker(id_node, Loopback(my_node))
    sent = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(5)]
    worker.run_once()
    seen: list[str] = []
    cursor = 0
    page = my_node.inbox(pdrm, cursor, 2, now())
    seen += [i["id"] for i in page.items]
    cursor = page.next_cursor
    sent += [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(3)]
    worker.run_once()  # arrivals between pages land after the cursor
    while True:
        page = my_node.inbox(pdrm, cursor, 2, now())
        if not page.items:
            break
        assert len(page.items) <= 2
        seen += [i["id"] for i in page.items]
        cursor = page.next_cursor
    assert seen == sent


def test_release_only_to_cleared_systems(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    low = register_client(my_dir, "pdrm-terhad", "TERHAD")
    low_actor = actor(my_node, my_dir, low.name)
    id_node.submit(actor(id_node, id_dir, "polri-cms"), MessageSubmission.model_validate(rfi()), now())
    DeliveryWorker(id_node, Loopback(my_node)).run_once()
    assert my_node.inbox(low_actor, 0, 10, now()).items == []
    assert len(my_node.inbox(actor(my_node, my_dir, "pdrm-d7"), 0, 10, now()).items) == 1


def test_a_redelivered_envelope_gets_the_same_receipt_and_is_stored_once(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    accepted = id_node.submit(
        actor(id_node, id_dir, "polri-cms"), MessageSubmission.model_validate(rfi()), now()
    )
    with id_node.db.transaction() as conn:
        compact = repo.get_message(conn, accepted["id"])["envelope"]  # type: ignore[index]
    first = my_node.receive([compact], now())
    second = my_node.receive([compact, compact], now())
    assert first[0].accepted
    assert first[0].receipt == second[0].receipt == second[1].receipt
    with my_node.db.transaction() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar_one()
        events = [e.event for e in repo.iter_ledger(conn)]
    assert count == 1
    assert events.count("envelope.received") == 1
    assert events.count("envelope.redelivered") == 1  # once per message, however often it comes
    for _ in range(3):  # a partner replaying it, a hundred copies a batch: the same receipt, no entry
        assert {r.receipt for r in my_node.receive([compact] * 100, now())} == {first[0].receipt}
    with my_node.db.read() as conn:
        assert [e.event for e in repo.iter_ledger(conn)] == events


def test_a_lost_answer_mid_delivery_is_retried_and_stored_once(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    clock = Clock()
    transport = Loopback(my_node)
    worker = DeliveryWorker(id_node, transport, clock=clock, jitter=lambda: 0.0)
    polri = actor(id_node, id_dir, "polri-cms")
    accepted = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    transport.lose_answer = True
    assert worker.run_once() == 0
    status = id_node.status(polri, accepted["id"], now())
    assert status["status"] == "queued"
    assert "connection reset" in status["status_reason"]
    transport.lose_answer = False
    assert worker.run_once() == 0  # backing off: not due yet
    clock.now += 1.0
    assert worker.run_once() == 1
    assert id_node.status(polri, accepted["id"], now())["status"] == "delivered"
    with my_node.db.transaction() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar_one() == 1


def test_partner_down_messages_wait_with_backoff_and_go_when_it_returns(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    clock = Clock()
    transport = Loopback(my_node)
    transport.down = True
    worker = DeliveryWorker(id_node, transport, clock=clock, jitter=lambda: 0.0)
    polri = actor(id_node, id_dir, "polri-cms")
    ids = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(3)]
    waits = []
    for _ in range(4):
        assert worker.run_once() == 0
        assert worker.run_once() == 0  # backing off: no connection before the next probe
        waits.append(worker.partner.retry_at - clock.now)
        clock.now = worker.partner.retry_at
    assert transport.attempts == 4  # one probe per backoff step, not one per message
    assert waits == sorted(waits)
    assert waits[-1] > waits[0]
    transport.down = False
    assert worker.run_once() == 3
    assert {id_node.status(polri, i, now())["status"] for i in ids} == {"delivered"}


def test_a_restart_loses_nothing(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    accepted = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    id_node.close()
    restarted = Node(load_settings(id_dir.path))  # a new process would do the same
    assert DeliveryWorker(restarted, Loopback(my_node)).run_once() == 1
    assert restarted.status(polri, accepted["id"], now())["status"] == "delivered"
    restarted.close()


def test_envelope_rejected_by_the_partner_is_marked_failed_and_ledgered(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    accepted = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    with id_node.db.transaction() as conn:
        compact = repo.get_message(conn, accepted["id"])["envelope"]  # type: ignore[index]
    tampered = compact[:-6] + ("AAAAAA" if not compact.endswith("AAAAAA") else "BBBBBB")
    with id_node.db.transaction() as conn:
        repo.update_message(conn, accepted["id"], envelope=tampered, envelope_sha256=crypto_digest(tampered))
    assert DeliveryWorker(id_node, Loopback(my_node)).run_once() == 1
    status = id_node.status(polri, accepted["id"], now())
    assert status["status"] == "failed"
    assert "rejected" in status["status_reason"]
    with my_node.db.transaction() as conn:
        rejected = [e for e in repo.iter_ledger(conn) if e.event == "envelope.rejected"]
    assert rejected
    assert rejected[0].data["reason"] == "decrypt-failed"


def crypto_digest(compact: str) -> str:
    from exchange.envelope import envelope_digest

    return envelope_digest(compact)


def test_refusals_are_ledgered_and_nothing_is_queued(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    with pytest.raises(PolicyRefusal) as refused:
        id_node.submit(polri, MessageSubmission.model_validate(rfi(tlp=None, legal_basis=[])), now())
    assert [(v.rule_id, v.rule_version) for v in refused.value.violations] == [("R-COMPLETE", "R-COMPLETE@1")]
    assert "message.tlp" in refused.value.violations[0].reason
    assert "message.legal_basis" in refused.value.violations[0].reason
    with pytest.raises(InvalidInput) as info:
        id_node.submit(polri, MessageSubmission.model_validate(rfi(handling_codes=["H9"])), now())
    assert {e.field for e in info.value.errors} == {"handling_codes"}
    with pytest.raises(InvalidInput) as info:
        id_node.submit(polri, MessageSubmission.model_validate(rfi(payload={"questions": []})), now())
    assert {e.field for e in info.value.errors} == {"payload/summary", "payload/questions"}
    with id_node.db.transaction() as conn:
        entries = list(repo.iter_ledger(conn))
        assert repo.outbox_size(conn) == 0
    assert [e.event for e in entries] == ["submission.refused"]
    assert "R-COMPLETE@1" in entries[0].rules
    assert entries[0].data["refused"] == ["R-COMPLETE@1"]
    assert entries[0].data["agreement"] == {
        "version": id_node.agreement.version,
        "digest": id_node.agreement.digest,
    }


def test_an_unmigrated_database_is_refused_naming_the_command(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseNotMigrated, match="exchange db upgrade"):
        db.check_migrated()
    db.dispose()
