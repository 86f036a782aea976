"""Units of work on both databases: all or nothing whatever their first statement, and on PostgreSQL
(where the node sends BEGIN and COMMIT itself, in the round trips of other statements) what a
ledger append and a read cost in round trips."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import pq

from exchange.db import repo
from exchange.db.engine import Database, at_commit, defer_inserts, insert, upgrade
from exchange.db.schema import agreements, ledger_entries, ledger_subtrees
from exchange.ledger import EntryDraft, verify_rows

AGREEMENT_ROW = {"version": "v2", "digest": "d" * 64, "document": "{}", "installed_at": "t"}


class Abandoned(Exception):
    """Raised inside a unit of work to have it rolled back."""


def stored(db: Database) -> tuple[int, int, int]:
    """The ledger head's size, the entries and the agreement rows, read afresh."""
    with db.read() as conn:
        entries = conn.execute(sa.select(sa.func.count()).select_from(ledger_entries)).scalar_one()
        rows = conn.execute(sa.select(sa.func.count()).select_from(agreements)).scalar_one()
        return repo.read_ledger_head(conn).size, entries, rows


def append_one(conn: Any) -> None:
    repo.append_ledger(conn, repo.lock_ledger_head(conn), [EntryDraft(event="test.entry")], "t")


def update_first(conn: Any) -> None:  # a first statement other than the ledger lock
    insert(conn, agreements.insert(), [AGREEMENT_ROW])
    append_one(conn)


def read_first(conn: Any) -> None:  # a first statement without parameters (another path to the driver)
    conn.exec_driver_sql("SELECT 1")
    insert(conn, agreements.insert(), [AGREEMENT_ROW])
    append_one(conn)


@pytest.mark.parametrize(
    "work", [append_one, update_first, read_first], ids=["lock-first", "insert-first", "raw-read-first"]
)
def test_a_unit_of_work_abandoned_after_its_statements_leaves_nothing(
    db_url: str, work: Callable[[Any], None]
) -> None:
    with Database(db_url) as db:

        def abandon() -> None:
            with db.transaction() as conn:
                work(conn)
                conn.execute(sa.select(ledger_entries.c.seq)).all()  # statements were sent
                raise Abandoned

        with pytest.raises(Abandoned):
            abandon()
        assert stored(db) == (0, 0, 0)
        with db.transaction() as conn:
            work(conn)
        assert stored(db)[:2] == (1, 1)


def test_a_failing_deferred_statement_fails_the_commit_and_nothing_of_the_unit_is_written(
    db_url: str,
) -> None:
    """The deferred inserts, the head and (on PostgreSQL) the COMMIT go in one round trip: a failing
    insert there must keep the COMMIT from taking effect."""
    with Database(db_url) as db:
        with db.transaction() as conn:
            append_one(conn)

        def fail_at_commit() -> None:
            with db.transaction() as conn:
                defer_inserts(conn)
                append_one(conn)
                insert(conn, agreements.insert(), [AGREEMENT_ROW])
                insert(conn, ledger_subtrees.insert(), [{"level": 9, "idx": 0, "hash": b"x" * 32}] * 2)

        with pytest.raises(sa.exc.IntegrityError):
            fail_at_commit()
        assert stored(db) == (1, 1, 0)
        with db.read() as conn:  # and the ledger is whole
            head = repo.read_ledger_head(conn)
            assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 1


@contextmanager
def round_trips(db: Database, tmp_path: Path) -> Iterator[list[int]]:
    """Count the round trips the pooled connection makes inside: what libpq sends that waits for
    an answer (a simple query, or a pipeline's or extended query's sync)."""
    with db.engine.connect() as conn:
        driver: Any = conn.connection.driver_connection
    trace = tmp_path / "libpq.trace"
    counted: list[int] = []
    with trace.open("w") as out:
        driver.pgconn.trace(out.fileno())
        driver.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield counted
        finally:
            driver.pgconn.untrace()
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    counted.append(sum(1 for f in sent if f[0] == "F" and f[2] in ("Query", "Sync")))


@pytest.mark.postgres
def test_on_postgresql_an_append_takes_two_round_trips_and_a_read_one(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    url = make_pg_database()
    upgrade(url)
    with Database(url, pool_size=1) as db:
        for _ in range(6):  # psycopg prepares a statement at its fifth use: count the steady state
            with db.transaction() as conn:
                defer_inserts(conn)
                append_one(conn)
        with round_trips(db, tmp_path) as append, db.transaction() as conn:
            defer_inserts(conn)
            append_one(conn)  # BEGIN with the lock; the rows, the head, NOTIFY and COMMIT
        with round_trips(db, tmp_path) as read, db.read() as conn:
            repo.read_ledger_head(conn)  # no BEGIN, no COMMIT
        assert (append, read) == ([2], [1])
        assert stored(db)[:2] == (7, 7)


@pytest.mark.postgres
def test_on_postgresql_a_transaction_sends_its_begin_with_its_first_statement(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    """Whatever its first statement, the BEGIN goes in its round trip; that statement's error is
    raised as SQLAlchemy raises it, and leaves no transaction open."""
    url = make_pg_database()
    upgrade(url)
    with Database(url, pool_size=1) as db:
        for _ in range(6):  # psycopg prepares a statement at its fifth use: count the steady state
            with db.transaction() as conn:
                conn.execute(
                    sa.select(ledger_entries.c.seq).where(ledger_entries.c.seq > sa.bindparam("s")), {"s": 0}
                )
        with round_trips(db, tmp_path) as trips, db.transaction() as conn:
            conn.execute(
                sa.select(ledger_entries.c.seq).where(ledger_entries.c.seq > sa.bindparam("s")), {"s": 0}
            )
            conn.execute(agreements.insert(), AGREEMENT_ROW)
        assert trips == [3]  # BEGIN with the read; the insert; COMMIT
        returned: list[tuple[Any, Any]] = []  # how each connection comes back to the pool (before
        sa.event.listen(  # the pool's own safety rollback: _never_pooled_inside_a_transaction)
            db.engine.pool,
            "checkin",
            lambda dbapi_conn, _record: returned.append(
                (dbapi_conn.info.transaction_status, dbapi_conn.pgconn.pipeline_status)
            ),
            insert=True,
        )
        failing: list[tuple[str, dict[str, Any]]] = [
            ("SELECT 1/:zero", {"zero": 0}),  # the server's error
            ("SELECT no_such_column FROM agreements WHERE version = :v", {"v": "v2"}),
            ("SELECT :what", {"what": object()}),  # the client's: a parameter it cannot send
        ]
        for sql, params in failing:
            with pytest.raises(sa.exc.StatementError), db.transaction() as conn:
                conn.execute(sa.text(sql), params)
        assert returned == [(pq.TransactionStatus.IDLE, pq.PipelineStatus.OFF)] * len(failing)
        # what cannot go in a pipeline still goes first, its BEGIN just before it: a server-side
        # cursor, and raw SQL without parameters (which may hold several statements)
        streamed = sa.select(agreements.c.version).where(agreements.c.version == sa.bindparam("v"))
        with db.transaction() as conn:
            rows = conn.execute(streamed.execution_options(stream_results=True), {"v": "v2"})
            assert rows.scalars().all() == ["v2"]
            conn.execute(agreements.insert(), {**AGREEMENT_ROW, "version": "v3", "digest": "3" * 64})
        with db.transaction() as conn:
            assert conn.exec_driver_sql("SELECT 1; SELECT 2").scalar() == 1  # (the first result)
            conn.execute(agreements.insert(), {**AGREEMENT_ROW, "version": "v4", "digest": "4" * 64})
        assert stored(db) == (0, 0, 3)


def test_a_statement_for_the_commit_inside_a_savepoint_is_refused(db_url: str) -> None:
    """Its savepoint's rollback would not take it back: it would commit all the same."""
    with Database(db_url) as db:
        with db.transaction() as conn:
            conn.execute(agreements.insert(), AGREEMENT_ROW)
            with conn.begin_nested(), pytest.raises(RuntimeError, match="inside a savepoint"):
                at_commit(conn, agreements.delete(), {})
        assert stored(db) == (0, 0, 1)


def test_a_write_inside_a_read_is_refused_and_leaves_nothing(db_url: str) -> None:
    """On PostgreSQL a read runs without a transaction: a write there would commit at once."""
    with Database(db_url) as db:

        def write_in_a_read() -> None:
            with db.read() as conn:
                conn.execute(agreements.insert(), AGREEMENT_ROW)

        with pytest.raises(RuntimeError, match=r"write inside Database\.read"):
            write_in_a_read()
        assert stored(db) == (0, 0, 0)


@pytest.mark.postgres
def test_a_connection_left_inside_a_transaction_is_rolled_back_when_it_returns_to_the_pool(
    make_pg_database: Callable[[], str],
) -> None:
    """Even with SQLAlchemy told not to roll back autocommit connections on their return: one left
    holding the ledger head's lock would stop every later append."""
    url = make_pg_database()
    upgrade(url)
    with Database(url, pool_size=1) as db:
        db.engine.dialect.skip_autocommit_rollback = True
        with db.engine.connect() as conn:
            driver: Any = conn.connection.driver_connection
            driver.execute("BEGIN")
            driver.execute("SELECT size FROM ledger_head WHERE id = 1 FOR UPDATE")
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")
            with other.transaction():
                other.execute("SELECT size FROM ledger_head WHERE id = 1 FOR UPDATE")  # not held
