"""Delivery under faults, between two real nodes over mutual TLS: a kill proven to land mid-delivery,
a partner's outage and return, idempotent retries and the size limit, all over HTTP."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from exchange.api.routes import Accepted
from exchange.client import ExchangeClient
from exchange.demo import exchange_cli
from tests.e2e.harness import Running, start_nodes
from tests.integration.test_delivery import evidence, padded_payload
from tests.support import rfi

pytestmark = pytest.mark.e2e

LEASE = 60.0  # long, so that a restarted sender delivering at once proves it took its leases back
AGREED_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running]]:
    yield from start_nodes(
        tmp_path_factory,
        options={
            "delivery_lease_seconds": LEASE,
            "delivery_backoff_base_seconds": 0.1,
            "delivery_backoff_max_seconds": 1.0,
            "checkpoint_interval_seconds": 60.0,  # no witness traffic in the connection counts
        },
        agreement={"max_envelope_bytes": AGREED_LIMIT},
    )


def statuses(run: Running, ids: list[str]) -> dict[str, str]:
    engine = run.db()
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select id, status from messages where id in :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": ids},
        ).all()
    engine.dispose()
    return {str(r.id): str(r.status) for r in rows}


def wait_all_delivered(run: Running, ids: list[str], timeout: float) -> float:
    """Seconds until every id is ``delivered`` on the sender; fails the test after ``timeout``."""
    start = time.monotonic()
    while True:
        found = statuses(run, ids)
        if all(found.get(i) == "delivered" for i in ids):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            others = {s for s in found.values() if s != "delivered"}
            pytest.fail(f"not all delivered after {timeout}s: {len(ids)} ids, other statuses {others}")
        time.sleep(0.05)


def inbound_order(run: Running, ids: list[str]) -> list[str]:
    """The ids as the receiver stored them, in inbox order, each as many times as stored."""
    engine = run.db()
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select id from messages where direction = 'in' order by inbox_seq")
        ).all()
    engine.dispose()
    wanted = set(ids)
    return [r.id for r in rows if r.id in wanted]


def submit_many(api: ExchangeClient, n: int) -> list[str]:
    return [api.submit(rfi())["id"] for _ in range(n)]


def ledger_verifies(run: Running) -> None:
    out = exchange_cli("audit", "verify", "--dir", str(run.node.path), env=run.process.env)
    assert "ledger verified" in out


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_a_kill_proven_mid_delivery_loses_nothing_and_delivers_each_message_exactly_once(
    nodes: tuple[Running, Running], victim: str
) -> None:
    polri, pdrm = nodes
    assert pdrm.process.stop()  # a backlog, so that the kill lands while batches are in flight
    with polri.client() as api:
        ids = submit_many(api, 200)
    target = polri if victim == "sender" else pdrm
    engine = polri.db()
    pdrm.process.start()
    in_flight: list[str] = []
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while not in_flight:  # watch the sender's outbox: kill the moment a batch is leased
            in_flight = [
                r.id
                for r in conn.execute(
                    sa.text(
                        "select m.id from messages m join outbox o on o.message_id = m.id"
                        " where m.status = 'sent' and o.leased_by is not null"
                    )
                )
            ]
            conn.rollback()
            assert time.monotonic() < deadline, "no delivery was ever in flight"
    sender_log = polri.node.path / "node.log"
    log_size = len(sender_log.read_text())
    target.process.kill()
    try:
        if victim == "sender":  # frozen by the kill: the batch is still leased, never settled
            assert set(in_flight) <= {i for i, s in statuses(polri, ids).items() if s == "sent"}
        else:  # the sender's request died with the receiver: the batch went back to the queue
            deadline = time.monotonic() + 15
            while "back in the queue" not in sender_log.read_text()[log_size:]:
                assert time.monotonic() < deadline, "the sender never saw its batch fail"
                time.sleep(0.05)
    finally:
        engine.dispose()
    restarted_at = time.monotonic()
    target.process.start()
    polri.process.wait_ready()
    pdrm.process.wait_ready()
    took = wait_all_delivered(polri, ids, timeout=45)
    arrived = inbound_order(pdrm, ids)
    assert sorted(arrived) == sorted(ids)  # every message, each exactly once
    print(f"\n[{victim} killed with {len(in_flight)} in flight] all 200 delivered {took:.1f}s after restart")
    if victim == "sender":
        assert time.monotonic() - restarted_at < LEASE / 2  # own leases taken back, not waited out
    for run in (polri, pdrm):
        ledger_verifies(run)


class CountingListener:
    """Listens on the absent partner's port and counts the connections the sender opens."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.count += 1
            conn.close()

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.count


def test_a_returning_partner_gets_the_backlog_at_once_oldest_first_without_a_connection_per_message(
    nodes: tuple[Running, Running],
) -> None:
    polri, pdrm = nodes
    assert pdrm.process.stop()
    listener = CountingListener(pdrm.node.port)
    outage_start = time.monotonic()
    with polri.client() as api:
        ids = submit_many(api, 300)
    time.sleep(max(0.0, 5.0 - (time.monotonic() - outage_start)))
    outage = time.monotonic() - outage_start
    connections = listener.close()
    pdrm.process.start()
    pdrm.process.wait_ready()
    drain = wait_all_delivered(polri, ids, timeout=30)
    print(
        f"\n[backlog] {len(ids)} messages, outage {outage:.1f}s: {connections} connection(s) tried;"
        f" drained {drain:.2f}s after the partner answered"
    )
    assert 1 <= connections <= 15  # probes on the backoff schedule (cap 1 s), not one per message
    assert drain < 10.0
    assert inbound_order(pdrm, ids) == ids  # oldest first, each once


def test_a_retried_submission_with_an_idempotency_key_gets_the_original_answer_over_http(
    nodes: tuple[Running, Running],
) -> None:
    polri, _ = nodes
    key = f"cms-{uuid.uuid4()}"
    with polri.client() as api:
        first = api.request("POST", "/v1/messages", json=rfi(), headers={"Idempotency-Key": key})
        again = api.request("POST", "/v1/messages", json=rfi(), headers={"Idempotency-Key": key})
        other = api.request(
            "POST", "/v1/messages", json=rfi(case_ref="ID-MY/2026/0077"), headers={"Idempotency-Key": key}
        )
    assert first.status_code == again.status_code == 202
    assert first.headers["content-type"] == "application/json"
    answer = first.json()  # the route answers Node.submit's dict as it is: Accepted's fields, no other
    assert answer == Accepted.model_validate(answer).model_dump(by_alias=True)
    assert "idempotent-replayed" not in first.headers
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert polri.count_messages(first.json()["id"]) == 1


def test_a_message_over_the_agreed_size_answers_413_stating_the_limit_and_one_under_it_arrives(
    nodes: tuple[Running, Running],
) -> None:
    polri, pdrm = nodes
    with polri.client() as api:
        big = api.request("POST", "/v1/messages", json=evidence(200_000))
        fits = api.submit(evidence(130_000))
        api.wait_for_status(fits["id"], "delivered", 30)
    assert big.status_code == 413
    assert big.headers["content-type"] == "application/problem+json"
    assert big.json()["limit_bytes"] == AGREED_LIMIT
    assert str(AGREED_LIMIT) in big.json()["detail"]
    items: list[dict[str, object]] = []
    with pdrm.client() as api:
        cursor = 0
        while page := api.inbox(after=cursor, limit=100)["items"]:
            items += [i for i in page if i["id"] == fits["id"]]
            cursor = page[-1]["cursor"]
    assert items[0]["payload"] == padded_payload(130_000)
