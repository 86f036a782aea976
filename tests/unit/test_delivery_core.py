"""The pure parts of delivery: backoff and probe scheduling, the size limit, key syntax, and which
database errors are unavailability."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from types import SimpleNamespace

import psycopg
import pytest
import sqlalchemy as sa

from exchange.api.problems import exchange_error_handler
from exchange.db.engine import is_conflict, is_unavailable
from exchange.envelope.size import batch_bytes, check_envelope_size, peer_body_limit
from exchange.errors import ConfigurationError, InvalidInput, MessageTooLarge, TransactionConflict
from exchange.idempotency import check_key
from exchange.transport.worker import (
    PartnerBackoff,
    backoff_ceiling,
    backoff_delay,
    delivery_expiry_seconds,
    probe_delay,
)


@pytest.mark.parametrize(
    ("failures", "jitter", "expected"),
    [
        (1, 0.0, 0.25),
        (1, 0.999, 0.49975),
        (2, 0.0, 0.5),
        (4, 0.0, 2.0),
        (30, 0.0, 5.0),
        (30, 0.5, 7.5),
        (5000, 0.0, 5.0),  # a partner away for days: no overflow, still the cap
        (10**9, 0.5, 7.5),
    ],
)
def test_backoff_grows_exponentially_to_its_cap(failures: int, jitter: float, expected: float) -> None:
    assert backoff_delay(failures, base=0.5, cap=10.0, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("refusals", "expected"), [(1, 10.0), (2, 20.0), (3, 40.0), (9, 2560.0), (10, 3600.0), (10**6, 3600.0)]
)
def test_refused_key_set_receipts_double_the_wait_up_to_an_hour(refusals: int, expected: float) -> None:
    assert backoff_ceiling(refusals, base=10.0, cap=3600.0) == expected


@pytest.mark.parametrize(
    ("until_deadline", "expected"),
    [(None, 10.0), (1000.0, 10.0), (8.0, 4.0), (1.0, 0.5), (-3.0, 0.5)],
)
def test_probes_close_in_on_the_oldest_message_s_deadline_instead_of_jumping_past_it(
    until_deadline: float | None, expected: float
) -> None:
    delay = probe_delay(30, base=0.5, cap=20.0, jitter=0.0, until_deadline=until_deadline)
    assert delay == pytest.approx(expected)


def test_partner_backoff_holds_until_the_probe_then_clears_on_success() -> None:
    partner = PartnerBackoff()
    assert partner.ready(0.0)
    partner.failed(100.0, 5.0)
    partner.failed(105.0, 10.0)
    assert partner.failures == 2
    assert not partner.ready(114.9)
    assert partner.ready(115.0)
    partner.succeeded()
    assert partner.failures == 0
    assert partner.ready(0.0)


def test_expiry_is_the_shorter_of_the_maximum_wait_and_the_replay_window_less_the_margin() -> None:
    assert delivery_expiry_seconds(7 * 86400, 30 * 86400, 600) == 7 * 86400
    assert delivery_expiry_seconds(7 * 86400, 60, 10) == 50
    with pytest.raises(ConfigurationError, match="margin"):
        delivery_expiry_seconds(100, 60, 60)


def test_an_envelope_over_the_limit_is_refused_naming_size_and_limit() -> None:
    check_envelope_size("x" * 1000, 1000)
    with pytest.raises(MessageTooLarge) as info:
        check_envelope_size("x" * 1001, 1000)
    assert (info.value.size, info.value.limit) == (1001, 1000)
    assert isinstance(info.value, InvalidInput)
    assert "1000 bytes" in str(info.value)


def test_the_peer_body_limit_carries_one_envelope_at_the_limit() -> None:
    envelope = "e" * 5000
    assert len(json.dumps({"envelopes": [envelope]})) <= peer_body_limit(5000)
    assert len(json.dumps({"envelopes": ["e" * 100] * 40})) <= batch_bytes([100] * 40)
    assert batch_bytes([100, 200]) < batch_bytes([100, 200, 1])


@pytest.mark.parametrize("key", ["a", "order-42", "x" * 128, "b3e1f0c2-9d1a-4c55-8a37-0f5e2f1d9c1e"])
def test_idempotency_keys_of_visible_ascii_are_accepted(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "with space", "x" * 129, "tab\there", "caf\u00e9", "\ud800"])
def test_malformed_idempotency_keys_are_refused_naming_the_header(key: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_key(key)
    assert info.value.errors[0].field == "Idempotency-Key"


def _sqlite_error(sql: str, *setup: str) -> sa.exc.OperationalError:
    conn = sqlite3.connect(":memory:")
    try:
        for statement in setup:
            conn.execute(statement)
        conn.execute(sql)
    except sqlite3.Error as exc:
        return sa.exc.OperationalError(sql, {}, exc)
    finally:
        conn.close()
    raise AssertionError("the statement succeeded")


@pytest.mark.parametrize(
    "lost",
    [psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure],
)
def test_a_transaction_lost_in_a_conflict_is_a_conflict_not_unavailability(lost: type[Exception]) -> None:
    exc = sa.exc.OperationalError("update", {}, lost("lost"))
    assert is_conflict(exc)
    assert not is_unavailable(exc)  # the database is up: not a condition, no 503 for everyone
    assert not is_conflict(sa.exc.OperationalError("connect", {}, psycopg.errors.AdminShutdown("down")))
    assert is_unavailable(sa.exc.OperationalError("connect", {}, psycopg.errors.AdminShutdown("down")))
    held = sa.exc.OperationalError("update", {}, psycopg.errors.LockNotAvailable("lock timeout"))
    assert not is_conflict(held)  # past a lock_timeout: the lock may stay held
    assert is_unavailable(held)


def test_a_conflict_that_outlived_its_retries_is_a_503_to_retry_naming_no_statement() -> None:
    settings = SimpleNamespace(unavailable_retry_after_seconds=3)
    request = SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(node=SimpleNamespace(settings=settings)))
    )
    exc = TransactionConflict("the transaction lost a conflict with another: DeadlockDetected")
    answer = asyncio.run(exchange_error_handler(request, exc))  # type: ignore[arg-type]
    body = json.loads(bytes(answer.body))
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "3")
    assert answer.headers["content-type"] == "application/problem+json"
    assert body["type"].endswith("/transaction-conflict")
    assert "Deadlock" not in body["detail"]  # the title, not the database's words


def test_a_full_database_is_unavailability_but_a_missing_table_is_a_bug() -> None:
    full = _sqlite_error(
        "insert into t values (randomblob(100000))", "create table t (b blob)", "pragma max_page_count = 3"
    )
    assert "full" in str(full.orig)  # SQLITE_FULL, what a full disk gives
    assert is_unavailable(full)
    assert not is_unavailable(_sqlite_error("select * from no_such_table"))
    assert is_unavailable(sa.exc.OperationalError("connect", {}, Exception("connection refused")))
    assert not is_unavailable(sa.exc.IntegrityError("insert", {}, Exception("duplicate key")))
