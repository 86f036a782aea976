"""Delivery and faults on SQLite and PostgreSQL, through the real migrations, without sockets: the
size limit, byte-bounded batches, a partner's 4xx about one envelope, expiry, leases, idempotent
submission and an unavailable database."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import tomli_w

from exchange.config import load_settings
from exchange.db import repo
from exchange.db.schema import outbox
from exchange.envelope.size import batch_bytes
from exchange.errors import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    InvalidInput,
    MessageTooLarge,
    PartnerRefused,
    TransactionConflict,
    TransportError,
)
from exchange.idempotency import IdempotentSubmission
from exchange.keys.rotation import KeyAdmin
from exchange.messages import MessageSubmission
from exchange.node import Node, PeerResult
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_node_flow import Clock, Loopback, actor, claim_due
from tests.support import NodeDir, make_pair, rfi, set_node_options

Pair = tuple[NodeDir, NodeDir, Node, Node]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def set_agreement(nodes: Sequence[NodeDir], **values: object) -> None:
    """Change the agreement both nodes hold (the same file, so they still agree on its digest)."""
    for nd in nodes:
        path = nd.path / "agreement.toml"
        data = tomllib.loads(path.read_text())
        data.update(values)
        path.write_text(tomli_w.dumps(data))


@pytest.fixture
def pair(tmp_path: Path, db_urls: tuple[str | None, str | None]) -> Iterator[Pair]:
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    set_agreement((id_dir, my_dir), max_envelope_bytes=256 * 1024)
    for nd in (id_dir, my_dir):
        set_node_options(nd.path, replay_window_seconds=5, delivery_expiry_margin_seconds=1)
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    yield id_dir, my_dir, id_node, my_node
    id_node.close()
    my_node.close()


def padded_payload(size: int) -> dict[str, object]:
    """An EVIDENCE_TRANSFER payload carrying about ``size`` bytes of (base64) photographs."""
    chunk = 200_000  # the schema's largest item content
    items = []
    for i in range(0, max(size, 1), chunk):
        content = "QUJD" * (min(chunk, size - i) // 4)
        items.append(
            {
                "subject": "SUS-001",
                "description": f"photograph {i // chunk}",
                "kind": "PHOTOGRAPH",
                "sha256": "a" * 64,
                "content": content,
            }
        )
    return {"summary": "photographs of the recruiters' premises", "items": items}


def evidence(size: int) -> dict[str, object]:
    """A valid EVIDENCE_TRANSFER submission of about ``size`` bytes of evidence."""
    return rfi(
        type="EVIDENCE_TRANSFER",
        data_subjects=[{"pseudonym": "SUS-001", "role": "SUSPECT"}],
        payload=padded_payload(size),
    )


def padded(size: int) -> MessageSubmission:
    return MessageSubmission.model_validate(evidence(size))


def test_a_message_whose_sealed_envelope_exceeds_the_agreement_limit_is_refused_naming_it(
    pair: Pair,
) -> None:
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    with pytest.raises(MessageTooLarge) as info:
        id_node.submit(polri, padded(200_000), now())
    assert info.value.limit == 256 * 1024
    assert info.value.size > info.value.limit
    assert "262144 bytes" in str(info.value)
    with id_node.db.read() as conn:
        assert repo.outbox_size(conn) == 0


def test_the_receiver_opens_what_the_limit_allows_beyond_the_jose_library_defaults(pair: Pair) -> None:
    """joserfc refuses a JWS payload over 128,000 bytes by default: a ~130 KB body was accepted by
    the sender and then always rejected as `bad-signature`. The limits now follow the agreement."""
    id_dir, my_dir, id_node, my_node = pair
    accepted = id_node.submit(actor(id_node, id_dir, "polri-cms"), padded(130_000), now())
    assert DeliveryWorker(id_node, Loopback(my_node)).run_once() == 1
    assert id_node.status(actor(id_node, id_dir, "polri-cms"), accepted["id"], now())["status"] == "delivered"
    items = my_node.inbox(actor(my_node, my_dir, "pdrm-d7"), 0, 10, now()).items
    assert items[0]["payload"] == padded_payload(130_000)


class BodyLimitedLoopback(Loopback):
    """The partner behind a body limit: a batch whose request body is over ``limit`` gets 413 (as
    the partner's BodyLimit answers), whatever else is in it."""

    def __init__(self, partner: Node, limit: int) -> None:
        super().__init__(partner)
        self.limit = limit
        self.sizes: list[int] = []

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        body = len(json.dumps({"envelopes": list(envelopes)}))
        self.sizes.append(body)
        if body > self.limit:
            self.attempts += 1
            raise PartnerRefused(413, f"the body exceeds {self.limit} bytes")
        return super().send(envelopes)


def test_a_partner_4xx_about_one_envelope_fails_that_envelope_and_never_holds_the_batch(pair: Pair) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    small = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(3)]
    big = id_node.submit(polri, padded(100_000), now())["id"]
    small += [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(3)]
    transport = BodyLimitedLoopback(my_node, limit=100_000)  # a partner configured below the agreement
    worker = DeliveryWorker(id_node, transport)
    assert worker.run_once() == 7  # one round: split, six delivered, the big one failed
    assert {id_node.status(polri, m, now())["status"] for m in small} == {"delivered"}
    failed = id_node.status(polri, big, now())
    assert failed["status"] == "failed"
    assert "HTTP 413" in failed["status_reason"]
    assert worker.partner.failures == 0  # a refusal is not an outage
    with id_node.db.read() as conn:
        entries = [e for e in repo.iter_ledger(conn) if e.event == "message.delivery_failed"]
        assert repo.outbox_size(conn) == 0
    assert [(e.message_id, e.data["reason"]) for e in entries] == [(big, "http-413")]


def test_batches_are_bounded_by_bytes_as_well_as_count(pair: Pair) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    ids = [id_node.submit(polri, padded(20_000), now())["id"] for _ in range(8)]
    transport = BodyLimitedLoopback(my_node, limit=10**9)
    worker = DeliveryWorker(id_node, transport)
    worker.max_request_bytes = 100_000  # as a smaller agreement limit would make it
    settled = 0
    while (n := worker.run_once()) > 0:
        settled += n
    assert settled == 8
    assert len(transport.sizes) >= 3
    assert max(transport.sizes) <= 100_000
    assert {id_node.status(polri, m, now())["status"] for m in ids} == {"delivered"}


class ClaimRolledBack(Exception):
    """Raised to roll a claim back."""


def test_a_claim_reads_only_the_envelopes_its_round_may_carry(pair: Pair) -> None:
    """The claim reads its due rows with their envelopes in one statement: only the first row's
    and those whose running sum of sizes is within the round's byte bound, not a whole batch of
    the largest envelopes into memory; a round still takes at least one."""
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    ids = [id_node.submit(polri, padded(20_000), now())["id"] for _ in range(5)]

    def claim(max_bytes: int) -> tuple[list[Any], repo.Claim]:
        read: list[Any] = []
        claimed: list[repo.Claim] = []

        def rolled_back() -> None:
            with id_node.db.transaction() as conn:
                params = {"now_": 2e9, "since_": 0.0, "limit_": 10, "party_": id_node.party}
                read[:] = conn.execute(repo._CLAIM_CANDIDATES, {**params, "max_bytes_": max_bytes}).all()
                claimed.append(claim_due(conn, id_node, at=2e9, max_bytes=max_bytes))
                raise ClaimRolledBack

        with pytest.raises(ClaimRolledBack):
            rolled_back()
        return read, claimed[0]

    size = len(repo_envelope(id_node, ids[0]))
    read, claimed = claim(int(2.5 * size))
    assert [r.message_id for r in read] == ids
    assert [r.envelope is not None for r in read] == [True, True, False, False, False]
    assert [c.message_id for c in claimed.envelopes] == ids[:2]
    assert [c.envelope for c in claimed.envelopes] == [repo_envelope(id_node, m) for m in ids[:2]]
    assert batch_bytes([len(c.envelope) for c in claimed.envelopes]) <= int(2.5 * size)
    assert claimed.more_due

    read, claimed = claim(size // 2)  # one envelope over the bound: still sent alone
    assert [r.envelope is not None for r in read] == [True, False, False, False, False]
    assert [c.message_id for c in claimed.envelopes] == ids[:1]


def test_a_transaction_dequeues_a_message_once_however_often_it_asks(pair: Pair) -> None:
    """The dequeue waits for the commit: the transaction's second read must not find the row it
    already dequeues (two settlings in one batch would both ledger it)."""
    id_dir, _my_dir, id_node, _my_node = pair
    mid = id_node.submit(actor(id_node, id_dir, "polri-cms"), MessageSubmission.model_validate(rfi()), now())[
        "id"
    ]
    with id_node.db.transaction() as conn:
        assert repo.dequeue_many(conn, [mid, "not-queued"]) == {mid}
        assert repo.dequeue_many(conn, [mid]) == set()
    with id_node.db.read() as conn:
        assert repo.outbox_size(conn) == 0


REFUSED = TransportError("partner unreachable: connection refused")


def test_a_round_given_back_after_a_partner_failure_leaves_a_message_settled_meanwhile_be(pair: Pair) -> None:
    """A worker whose lease ran out gives its round back when the partner fails; a message another
    worker delivered and dequeued meanwhile stays delivered, not queued without an outbox row."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    first, second = (
        id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(2)
    )
    transport = Loopback(my_node)
    slow = DeliveryWorker(id_node, transport)
    with id_node.db.transaction() as conn:  # the slow worker's round, whose lease then runs out
        claim = claim_due(conn, id_node, lease_seconds=0.0, worker=slow.worker_id)
    assert [c.message_id for c in claim.envelopes] == [first, second]
    assert DeliveryWorker(id_node, Loopback(my_node)).run_once() == 2  # another worker delivers both
    assert {id_node.status(polri, m, now())["status"] for m in (first, second)} == {"delivered"}
    slow._partner_down(claim.envelopes, claim.lease, REFUSED)
    assert {id_node.status(polri, m, now())["status"] for m in (first, second)} == {"delivered"}


def test_a_round_given_back_after_its_lease_ran_out_leaves_a_later_lease_of_its_rows_in_flight(
    pair: Pair,
) -> None:
    """A worker whose lease ran out gives its round back when the partner fails; rows claimed again
    meanwhile (by the next leader of the node, under the same worker name) stay leased to that
    claim, sent, and are not made due at once: they would go twice while the other round is on the
    wire."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    ids = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(2)]
    slow = DeliveryWorker(id_node, Loopback(my_node))
    with id_node.db.transaction() as conn:  # the slow worker's round, whose lease then runs out
        claim = claim_due(conn, id_node, lease_seconds=0.0, worker=slow.worker_id)
    with id_node.db.transaction() as conn:  # claimed again, in flight for the next 600 s
        again = claim_due(conn, id_node, at=time.time() + 0.01, worker=slow.worker_id)
    assert [c.message_id for c in again.envelopes] == ids
    slow._partner_down(claim.envelopes, claim.lease, REFUSED)
    with id_node.db.read() as conn:
        rows = conn.execute(sa.select(outbox.c.leased_by, outbox.c.next_attempt_at)).all()
    assert again.lease is not None
    assert sorted(rows) == [(again.lease.worker, again.lease.until)] * 2  # the later lease, untouched
    assert {id_node.status(polri, m, now())["status"] for m in ids} == {"sent"}
    slow._partner_down(again.envelopes, again.lease, REFUSED)
    with id_node.db.read() as conn:  # the lease that holds them gives them back
        assert conn.execute(sa.select(outbox.c.leased_by)).scalars().all() == [None, None]
    assert {id_node.status(polri, m, now())["status"] for m in ids} == {"queued"}


def deadlock() -> sa.exc.OperationalError:
    """What SQLAlchemy raises when PostgreSQL aborts a statement's transaction in a deadlock."""
    return sa.exc.OperationalError("INSERT ...", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


@pytest.mark.parametrize(
    "failures",
    [
        pytest.param([deadlock], id="conflict-in-the-batch"),
        pytest.param([lambda: ValueError("an envelope's own fault"), deadlock], id="conflict-in-a-savepoint"),
    ],
)
def test_a_received_batch_that_loses_a_conflict_is_answered_to_retry_and_no_envelope_is_rejected(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, failures: list[Callable[[], Exception]]
) -> None:
    """A conflict with another transaction is not the envelope's fault: the batch is not stored
    (the sender gets 503 and sends it again), no envelope is ledgered as rejected (the sender would
    fail its message for good), and sent again it is admitted. Also when the batch went one
    savepoint per envelope after an envelope's own failure."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    with id_node.db.transaction() as conn:
        envelopes = [c.envelope for c in claim_due(conn, id_node).envelopes]
    admit, pending = my_node._admit, list(failures)

    def failing_admit(*args: Any, **kwargs: Any) -> Any:
        if pending:
            raise pending.pop(0)()
        return admit(*args, **kwargs)

    monkeypatch.setattr(my_node, "_admit", failing_admit)
    with my_node.db.read() as conn:
        before = [e.event for e in repo.iter_ledger(conn)]
    with pytest.raises(TransactionConflict):
        my_node.receive(envelopes, now())
    with my_node.db.read() as conn:
        assert [e.event for e in repo.iter_ledger(conn)] == before  # nothing stored, nothing rejected
    assert [r.accepted for r in my_node.receive(envelopes, now())] == [True]


def repo_envelope(node: Node, message_id: str) -> str:
    with node.db.read() as conn:
        row = repo.get_message(conn, message_id)
    assert row is not None
    return str(row["envelope"])


def test_a_message_not_delivered_within_the_replay_window_ends_failed_expired_and_ledgered(
    pair: Pair,
) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    clock = Clock()
    transport = Loopback(my_node)
    transport.down = True
    worker = DeliveryWorker(id_node, transport, clock=clock, jitter=lambda: 0.0)
    assert worker.expiry_seconds == 4  # replay window 5 s less the 1 s margin
    old = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"]
    assert worker.run_once() == 0
    clock.now += 3
    young = id_node.submit(
        polri, MessageSubmission.model_validate(rfi()), dt.datetime.fromtimestamp(clock.now, dt.UTC)
    )["id"]
    clock.now += 1.5  # the old one is past its deadline, the young one is not
    assert worker.run_once() == 1
    status = id_node.status(polri, old, now())
    assert status["status"] == "failed"
    assert status["status_reason"].startswith("expired")
    with id_node.db.read() as conn:
        failed = [e for e in repo.iter_ledger(conn) if e.event == "message.delivery_failed"]
    assert [(e.message_id, e.data["reason"]) for e in failed] == [(old, "expired")]
    transport.down = False
    clock.now = max(clock.now, worker.partner.retry_at)
    assert worker.run_once() == 1
    assert id_node.status(polri, young, now())["status"] == "delivered"


class Watched(Loopback):
    """A Loopback that notes every statement of the sender and, when a batch goes out, the
    statements so far and the claimed messages' status and attempts."""

    def __init__(self, receiver: Node, sender: Node) -> None:
        super().__init__(receiver)
        self.sender = sender
        self.statements: list[str] = []
        for engine in {sender.db.engine, sender.db.reader}:  # SQLite reads through a second engine
            sa.event.listen(engine, "before_cursor_execute", lambda *a: self.statements.append(a[2].lower()))
        self.before_send: list[str] = []
        self.claimed: list[tuple[str, int]] = []
        self.calls: list[str] = []

    def announce_keys(self, announcements: list[str]) -> str:
        self.calls.append("announce")
        return super().announce_keys(announcements)

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        self.calls.append("send")
        self.before_send = list(self.statements)
        with self.sender.db.read() as conn:
            self.claimed = [
                (r.status, r.attempts)
                for r in conn.execute(
                    sa.text("select status, attempts from messages where direction = 'out'")
                )
            ]
        return super().send(envelopes)


def test_a_round_claims_in_three_statements_and_reads_the_key_sets_and_deadlines_no_further(
    pair: Pair,
) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    clock = Clock()
    transport = Watched(my_node, id_node)
    worker = DeliveryWorker(id_node, transport, clock=clock)
    id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    assert worker.run_once() == 1  # the first round sweeps, reads the key sets and announces
    worker.finish_settling()
    queued_at = dt.datetime.fromtimestamp(clock.now, dt.UTC)  # due on the fake clock, however long
    for _ in range(3):  # the first round took on a loaded machine
        id_node.submit(polri, MessageSubmission.model_validate(rfi()), queued_at)
    sweep = worker.sweep_seconds
    assert sweep == 0.4  # a tenth of the 4 s expiry, shorter than delivery_expiry_sweep_seconds
    clock.now += sweep / 2
    transport.statements.clear()
    assert worker.run_once() == 3
    claim = [s for s in transport.before_send if not s.startswith(("begin", "commit", "rollback"))]
    assert len(claim) == 3, claim  # pick (and see the key sets), lease, mark sent returning the envelopes
    assert "key_sets" in claim[0]
    assert not [s for s in claim[1:] if "key_sets" in s or "min(outbox.enqueued_at)" in s]
    assert sorted(transport.claimed) == [("delivered", 1), ("sent", 1), ("sent", 1), ("sent", 1)]
    worker.finish_settling()
    with id_node.db.read() as conn:
        sent = [e.data["attempts"] for e in repo.iter_ledger(conn) if e.event == "message.sent"]
    assert sent == [1, 1, 1, 1]  # each the first attempt, as the outbox counted it
    clock.now += sweep  # the sweep is due again
    transport.statements.clear()
    worker.run_once()
    assert [s for s in transport.statements if "min(outbox.enqueued_at)" in s]


def test_a_key_set_version_loaded_after_the_last_acknowledgement_is_announced_before_the_round_sends(
    pair: Pair,
) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    transport = Watched(my_node, id_node)
    worker = DeliveryWorker(id_node, transport)
    id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    worker.run_once()
    worker.finish_settling()
    id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    worker.run_once()
    assert transport.calls == ["send", "send"]  # version 1 is the agreement's: nothing to announce
    staged = KeyAdmin(id_node.settings, id_node.registry).rotate("signing")  # version 2, now loaded
    id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    transport.calls.clear()
    worker.run_once()
    assert transport.calls == ["announce", "send"]
    assert my_node.registry.history("ID").version == 2
    assert my_node.registry.history("ID").current.key(staged.kid) is not None
    assert [r["acknowledged_at"] is not None for r in id_node.registry.own_rows()] == [True]


def test_a_message_signed_by_another_process_with_a_version_the_leader_has_not_loaded_is_preceded_by_it(
    pair: Pair,
) -> None:
    """The delivery leader's registry may be up to key_refresh_seconds behind another process of
    the node; what the claim takes was signed under a version already stored, and the claim sees
    it: the version goes first, even if the partner could not have fetched it."""
    id_dir, _my_dir, id_node, my_node = pair
    set_node_options(id_dir.path, key_refresh_seconds=3600.0)
    leader = Node(load_settings(id_dir.path))  # another process, its key sets read now
    try:
        transport = Watched(my_node, leader)
        worker = DeliveryWorker(leader, transport)
        polri = actor(id_node, id_dir, "polri-cms")
        id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
        worker.run_once()
        worker.finish_settling()
        old = str(id_node.keys.signing.kid)
        KeyAdmin(id_node.settings, id_node.registry).revoke(old, reason="stolen", effective_at=now())
        mid = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"]  # the new key
        assert leader.registry.history("ID").version == 1  # the leader has not read version 2
        my_node.fetch_partner_key_sets = None  # nor could the partner look it up
        transport.calls.clear()
        worker.run_once()
        worker.finish_settling()
        assert transport.calls == ["announce", "send"]
        assert id_node.status(polri, mid, now())["status"] == "delivered"
    finally:
        leader.close()


def test_a_message_past_its_deadline_is_never_sent_while_it_waits_for_the_sweep(pair: Pair) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    clock = Clock()
    transport = Watched(my_node, id_node)
    worker = DeliveryWorker(id_node, transport, clock=clock)
    worker.expire_overdue(clock.now)  # swept just now: the next sweep is a while away
    late = id_node.submit(
        polri,
        MessageSubmission.model_validate(rfi()),
        dt.datetime.fromtimestamp(clock.now - 3600, dt.UTC),
    )["id"]
    assert worker.run_once() == 0
    assert "send" not in transport.calls
    assert id_node.status(polri, late, now())["status"] == "queued"
    clock.now -= 60  # the clock stepped back: the sweep does not wait for it to catch up
    assert worker.run_once() == 1
    assert id_node.status(polri, late, now())["status"] == "failed"
    assert "send" not in transport.calls


def test_an_expiry_sweep_that_found_a_full_batch_sweeps_again_at_the_next_round(pair: Pair) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    set_node_options(id_dir.path, delivery_batch_size=2)
    node = Node(load_settings(id_dir.path), id_node.db)
    polri = actor(node, id_dir, "polri-cms")
    clock = Clock()
    worker = DeliveryWorker(node, Loopback(my_node), clock=clock)
    old = dt.datetime.fromtimestamp(clock.now - worker.expiry_seconds - 1, dt.UTC)
    for _ in range(5):
        node.submit(polri, MessageSubmission.model_validate(rfi()), old)
    assert [worker.run_once() for _ in range(4)] == [2, 2, 1, 0]  # no wait between full sweeps


def test_backoff_never_pushes_the_next_probe_past_the_oldest_message_s_deadline(pair: Pair) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    set_node_options(id_dir.path, delivery_backoff_max_seconds=300.0)
    clock = Clock()
    transport = Loopback(my_node)
    transport.down = True
    node = Node(load_settings(id_dir.path), id_node.db)
    worker = DeliveryWorker(node, transport, clock=clock, jitter=lambda: 0.99)
    mid = node.submit(actor(node, id_dir, "polri-cms"), MessageSubmission.model_validate(rfi()), now())["id"]
    deadline = clock.now - 1.0 + worker.expiry_seconds
    for _ in range(10):
        worker.run_once()
        if worker.partner.retry_at >= deadline:
            break
        clock.now = worker.partner.retry_at
    assert clock.now < deadline  # every probe before it fell inside the window
    assert transport.attempts >= 3
    transport.down = False
    worker.partner.retry_at = clock.now  # the partner is back just before the deadline
    assert worker.run_once() == 1
    assert node.status(actor(node, id_dir, "polri-cms"), mid, now())["status"] == "delivered"


def test_a_restarted_node_takes_back_its_own_leases_at_once(pair: Pair) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    mine = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"]
    theirs = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"]
    crashed = DeliveryWorker(id_node, Loopback(my_node))
    t = now().timestamp() + 1
    with id_node.db.transaction() as conn:  # what the crashed worker had claimed: leased for 60 s
        for mid, holder in ((mine, crashed.worker_id), (theirs, "another-host:/srv/node")):
            conn.execute(
                sa.text("update outbox set next_attempt_at = :n, leased_by = :w where message_id = :m"),
                {"n": t + 60, "w": holder, "m": mid},
            )
    restarted = DeliveryWorker(id_node, Loopback(my_node), clock=lambda: t)
    assert restarted.run_once() == 1  # its own lease at once; another worker's waits for expiry
    assert id_node.status(polri, mine, now())["status"] == "delivered"
    assert id_node.status(polri, theirs, now())["status"] == "queued"


def test_a_retried_submission_with_the_same_idempotency_key_returns_the_original_answer(pair: Pair) -> None:
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    service = IdempotentSubmission(id_node)
    first, replayed = service.submit(polri, MessageSubmission.model_validate(rfi()), "order-42", now())
    assert not replayed
    again, replayed = service.submit(polri, MessageSubmission.model_validate(rfi()), "order-42", now())
    assert replayed
    assert again == first
    with pytest.raises(IdempotencyKeyReused):
        service.submit(
            polri, MessageSubmission.model_validate(rfi(case_ref="ID-MY/2026/0002")), "order-42", now()
        )
    with pytest.raises(InvalidInput):
        service.submit(polri, MessageSubmission.model_validate(rfi()), "bad key", now())
    with id_node.db.read() as conn:
        assert repo.outbox_size(conn) == 1


def test_the_idempotency_store_cannot_confirm_a_guessed_submission(pair: Pair) -> None:
    """Someone holding a copy of the database guesses a submission (a name in a template): the
    stored digest is keyed by the node's own secret, so the plain SHA-256 of the guess matches
    nothing; a key stored before the keyed digest (the plain one) is still replayed."""
    from sqlalchemy import text

    from exchange.db.schema import idempotency_keys as keys_table
    from exchange.idempotency import legacy_request_digest

    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    service = IdempotentSubmission(id_node)
    guess = MessageSubmission.model_validate(rfi(payload={"summary": "Siti Rahayu, 12", "questions": ["q"]}))
    first, _ = service.submit(polri, guess, "guess-1", now())
    with id_node.db.read() as conn:
        stored = conn.execute(text("select request_sha256 from idempotency_keys")).scalar_one()
    assert stored != legacy_request_digest(guess)
    with id_node.db.transaction() as conn:  # as a node before the keyed digest wrote it
        conn.execute(keys_table.update().values(request_sha256=legacy_request_digest(guess)))
    again, replayed = service.submit(polri, guess, "guess-1", now())
    assert (again, replayed) == (first, True)


def test_concurrent_submissions_with_one_idempotency_key_make_one_message(pair: Pair) -> None:
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    service = IdempotentSubmission(id_node)
    answers: list[str] = []
    barrier = threading.Barrier(4)

    def submit() -> None:
        barrier.wait()
        answer, _ = service.submit(polri, MessageSubmission.model_validate(rfi()), "same-key", now())
        answers.append(answer["id"])

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 4
    assert len(set(answers)) == 1
    with id_node.db.read() as conn:
        assert repo.outbox_size(conn) == 1


def test_a_full_disk_is_database_unavailable_logged_once_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLITE_FULL, the error a full disk gives, made real by capping the database's pages at the
    current size (no test may fill the machine's disk)."""
    id_dir, _my_dir = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    polri = actor(node, id_dir, "polri-cms")
    node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    full = {"on": True}

    def cap_pages(dbapi_conn: object, _record: object) -> None:
        if full["on"]:
            cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            cur.execute(f"PRAGMA max_page_count = {pages}")
            cur.close()

    sa.event.listen(node.db.engine, "connect", cap_pages)
    node.db.engine.dispose()
    caplog.set_level(logging.INFO, logger="exchange")
    for _ in range(5):
        with pytest.raises(DatabaseUnavailable):
            node.submit(polri, padded(60_000), now())
    conditions = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(conditions) == 1
    assert "full" in conditions[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    full["on"] = False
    node.db.engine.dispose()
    node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    assert any("available again" in r.getMessage() for r in caplog.records)
    node.close()


def test_a_round_that_took_every_due_message_is_not_followed_by_one_that_finds_none(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop goes again at once only when the claim left due messages behind (a full batch);
    otherwise it sleeps until a submission wakes it, without a claim that finds nothing."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    set_node_options(id_dir.path, delivery_batch_size=2)
    id_node.settings = load_settings(id_dir.path)
    ids = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(3)]
    claims: list[int] = []
    claim_due = repo.claim_due

    def counted(*args: object, **kwargs: object) -> repo.Claim:
        claim = claim_due(*args, **kwargs)  # type: ignore[arg-type]
        claims.append(len(claim.envelopes))
        return claim

    monkeypatch.setattr(repo, "claim_due", counted)
    worker = DeliveryWorker(id_node, Loopback(my_node))
    assert worker.step() == 0.0  # two of three: one is left, so at once again
    assert worker.step() == worker.interval  # the last one: nothing left, sleep (settled first)
    assert claims == [2, 1]
    assert [id_node.status(polri, m, now())["status"] for m in ids] == ["delivered"] * 3
    worker.close()


def test_the_loop_sends_the_next_round_while_the_last_one_is_settled(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2 goes out while round 1's receipts are still being recorded; each is settled once,
    in order, and nothing is delivered twice."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    set_node_options(id_dir.path, delivery_batch_size=2)
    id_node.settings = load_settings(id_dir.path)
    ids = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(4)]
    link = Loopback(my_node)
    worker = DeliveryWorker(id_node, link)
    settle, release, settling = worker._settle, threading.Event(), threading.Event()
    settled: list[list[str]] = []

    def slow_settle(done: list[tuple[repo.Claimed, object]]) -> int:
        settling.set()
        assert release.wait(10)
        settled.append([c.message_id for c, _ in done])
        return settle(done)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "_settle", slow_settle)
    assert worker.step() == 0.0  # round 1 sent; its settling has begun and is held
    assert settling.wait(10)
    assert worker._settling is not None
    second = threading.Thread(target=worker.step)
    second.start()  # round 2 is sent while round 1 is held, then waits for it before settling
    deadline = now() + dt.timedelta(seconds=10)
    while link.batches < 2:
        assert now() < deadline, "round 2 was not sent while round 1 was being settled"
    assert settled == []
    release.set()
    second.join(10)
    assert worker.step() == worker.interval  # nothing left: round 2 settled before it sleeps
    assert settled == [ids[:2], ids[2:]]
    assert [id_node.status(polri, m, now())["status"] for m in ids] == ["delivered"] * 4
    with my_node.db.read() as conn:
        assert len(repo.inbound_after(conn, 0, 10)) == 4
    worker.close()


def test_a_round_whose_settling_failed_strands_nothing_the_next_round_sent(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 1's settling fails (the database went away); round 2 is sent and settled all the same,
    the failure logged; round 1's message, leased, goes again and the partner answers with its
    original receipt: nothing lost, nothing stored twice."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    set_node_options(id_dir.path, delivery_batch_size=1)
    id_node.settings = load_settings(id_dir.path)
    first, second = (
        id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())["id"] for _ in range(2)
    )
    worker = DeliveryWorker(id_node, Loopback(my_node))
    settle = worker._settle
    failures = [RuntimeError("the settling transaction failed")]

    def failing_once(done: list[tuple[repo.Claimed, object]]) -> int:
        if failures:
            raise failures.pop()
        return settle(done)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "_settle", failing_once)
    assert worker.run_once(settle_later=True) == 1  # round 1 sent; its settling will fail
    with caplog.at_level("ERROR", logger="exchange.delivery"):
        assert worker.run_once(settle_later=True) == 1  # round 2: sent, and settled regardless
        assert worker.finish_settling() == 1
    assert [r.getMessage() for r in caplog.records] == [
        "settling a delivery round failed; its messages go again when their leases end"
    ]
    assert id_node.status(polri, second, now())["status"] == "delivered"
    assert id_node.status(polri, first, now())["status"] == "sent"  # leased: not lost
    worker.close()
    restarted = DeliveryWorker(id_node, Loopback(my_node))  # takes its lease back: sent again
    assert restarted.run_once() == 1
    assert id_node.status(polri, first, now())["status"] == "delivered"
    with my_node.db.read() as conn:  # the partner answered the copy with its receipt, stored once
        assert len(repo.inbound_after(conn, 0, 10)) == 2
        assert [e.event for e in repo.iter_ledger(conn)][-1] == "envelope.redelivered"


def test_finish_settling_raises_the_error_of_the_round_being_settled(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())
    worker = DeliveryWorker(id_node, Loopback(my_node))

    def failing(done: list[tuple[repo.Claimed, object]]) -> int:
        raise DatabaseUnavailable("the database went away while settling")

    monkeypatch.setattr(worker, "_settle", failing)
    assert worker.run_once(settle_later=True) == 1
    with pytest.raises(DatabaseUnavailable):
        worker.finish_settling()
    worker.close()  # nothing left in flight; closing twice, or after a failure, is harmless
    worker.close()


class OddReceipts(Loopback):
    """The partner node answering with genuinely signed receipts that no check of the code's
    foresaw, one kind per envelope after the first: ``received_at`` empty, a number, a time without
    its offset, and a receipt whose protected header is nested past the parser's depth."""

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        from joserfc import jws

        from exchange.canonical import canonical_json
        from exchange.envelope import receipt as receipts

        results = super().send(envelopes)
        odd: list[object] = ["", 5, dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat()]
        key = self.partner.keys.signing
        answered = [results[0]]
        for result, received_at in zip(results[1:4], odd, strict=True):
            assert result.receipt is not None
            body = json.loads(jws.extract_compact(result.receipt.encode()).payload)
            body["received_at"] = received_at
            header = {"alg": "EdDSA", "kid": key.kid, "typ": receipts.RECEIPT_TYP}
            signed = jws.serialize_compact(header, canonical_json(body), key, registry=receipts._REGISTRY)
            answered.append(PeerResult(True, signed))
        nested = base64.urlsafe_b64encode(b"[" * 100_000).decode().rstrip("=")
        answered.append(PeerResult(True, nested + ".e30.AA"))
        return answered


def test_a_receipt_no_check_foresaw_fails_its_message_alone_and_never_the_round(pair) -> None:  # type: ignore[no-untyped-def]
    """One odd answer from the partner used to raise out of the settling and discard the whole
    round: every message of it stayed leased, went again, and in the end expired. Now each fails
    alone (ledgered receipt.invalid) and the others of the round are delivered."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    sent = [id_node.submit(polri, MessageSubmission.model_validate(rfi()), now()) for _ in range(5)]
    assert DeliveryWorker(id_node, OddReceipts(my_node)).run_once() == 5
    status = {m["id"]: id_node.status(polri, m["id"], now()) for m in sent}
    assert status[sent[0]["id"]]["status"] == "delivered"
    for message in sent[1:]:
        assert status[message["id"]]["status"] == "failed", status[message["id"]]
        assert status[message["id"]]["status_reason"] == "invalid receipt: malformed"
    with id_node.db.read() as conn:
        invalid = [str(e.message_id) for e in repo.iter_ledger(conn) if e.event == "receipt.invalid"]
        assert repo.outbox_size(conn) == 0
    assert sorted(invalid) == sorted(m["id"] for m in sent[1:])


def test_trouble_with_this_node_s_database_while_judging_a_receipt_never_fails_the_message(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judging a receipt may fetch and store the partner's key sets: the database failing there is
    this node's trouble, not the receipt's. The round is not settled (its messages stay sent and
    leased, and go again), and no receipt is ledgered invalid."""
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    sent = id_node.submit(polri, MessageSubmission.model_validate(rfi()), now())

    def unavailable(*_args: object, **_kwargs: object) -> None:
        raise DatabaseUnavailable("the database is unavailable")

    monkeypatch.setattr(id_node, "verify_by_partner", unavailable)
    with pytest.raises(DatabaseUnavailable):  # (the delivery loop waits and goes again)
        DeliveryWorker(id_node, Loopback(my_node)).run_once()
    assert id_node.status(polri, sent["id"], now())["status"] == "sent"
    with id_node.db.read() as conn:
        assert [e for e in repo.iter_ledger(conn) if e.event == "receipt.invalid"] == []
