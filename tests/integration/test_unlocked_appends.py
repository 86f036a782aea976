"""Appends after a head known beforehand (``repo.assume_ledger_head``), which lock the ledger head
only at commit: the group committer's batches of submissions and decisions on PostgreSQL. Such a
transaction commits as if it had held the lock all along, or not at all: never after a head that
another writer moved, never ahead of the stored head, never under a content key a destruction
retired meanwhile, and never deadlocked against a writer that locks the head first."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exchange import crypto
from exchange.config import load_settings
from exchange.db import repo
from exchange.db.committer import CONFLICT_RETRIES, LOCK_AFTER_MOVED_SECONDS, GroupCommitter
from exchange.db.engine import Database, before_commit, defer_inserts, upgrade
from exchange.db.schema import ledger_entries, messages, outbox
from exchange.errors import LedgerIntegrityError, TransactionConflict
from exchange.ledger import EntryDraft, verify_rows
from exchange.messages import MessageSubmission
from exchange.node import Node
from exchange.policy import Actor
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_node_flow import Loopback, actor, claim_due
from tests.integration.test_transactions import round_trips
from tests.support import make_pair, rfi


class Abandoned(Exception):
    """Raised inside a unit of work to have it rolled back."""


def append(conn: Any, head: repo.LedgerHead, event: str = "test.entry") -> repo.LedgerHead:
    return repo.append_ledger(conn, head, [EntryDraft(event=event)], "t")


def append_locked(db: Database, event: str = "test.entry") -> None:
    with db.transaction() as conn:
        append(conn, repo.lock_ledger_head(conn), event)


def ledger(db: Database) -> list[str]:
    """The events of the stored ledger, after checking that it is whole (no gap, no fork)."""
    with db.read() as conn:
        head = repo.read_ledger_head(conn)
        assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == head.size
        return [e.event for e in repo.iter_ledger(conn)]


def abandoned_append(db: Database) -> repo.LedgerHead:
    """The head an append reached in a transaction then rolled back: never committed."""
    reached: list[repo.LedgerHead] = []

    def abandon() -> None:
        with db.transaction() as conn:
            reached.append(append(conn, repo.lock_ledger_head(conn)))
            raise Abandoned

    with pytest.raises(Abandoned):
        abandon()
    return reached[0]


def append_assuming(db: Database, head: repo.LedgerHead, event: str = "assumed") -> None:
    with db.transaction(lock_free=True) as conn:
        defer_inserts(conn)
        append(conn, repo.assume_ledger_head(conn, head), event)


@pytest.fixture
def pg_url(make_pg_database: Callable[[], str]) -> str:
    """A migrated PostgreSQL database of its own."""
    url = make_pg_database()
    upgrade(url)
    return url


#: what each database raises when the head assumed is not the stored one
MOVED = (sa.exc.DBAPIError, LedgerIntegrityError)


def test_the_head_a_committed_append_reached_is_known_and_an_abandoned_one_is_not(db_url: str) -> None:
    with Database(db_url) as db:
        assert db.known_ledger_head is None
        append_locked(db)
        known = db.known_ledger_head
        assert isinstance(known, repo.LedgerHead)
        assert known.size == 1
        abandoned_append(db)
        assert db.known_ledger_head == known
        with db.read() as conn:
            assert repo.read_ledger_head(conn) == known


def test_an_append_after_a_head_another_writer_moved_is_refused_and_leaves_nothing(db_url: str) -> None:
    with Database(db_url) as db, Database(db_url) as other_process:
        append_locked(db)
        known = db.known_ledger_head
        append_locked(other_process, "other")
        with pytest.raises(MOVED, match="ledger head moved") as refused:
            append_assuming(db, known)
        assert repo.head_moved(refused.value)
        assert ledger(db) == ["test.entry", "other"]


def test_an_append_after_a_head_ahead_of_the_stored_one_is_refused_and_leaves_no_gap(db_url: str) -> None:
    """A head that was never committed (or a database restored under a running node): the
    entries' keys would not collide, so only the head's guard stops entries beyond its end."""
    with Database(db_url) as db:
        append_locked(db)
        ahead = abandoned_append(db)
        with pytest.raises(MOVED, match="ledger head moved"):
            append_assuming(db, ahead)
        assert ledger(db) == ["test.entry"]
        with db.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(ledger_entries)).scalar_one() == 1


def test_an_append_after_a_head_of_the_right_size_but_another_root_is_refused(db_url: str) -> None:
    """The same size, another ledger: a head known before the database was restored and grown back
    to that size by another writer (here: a head never committed, then another entry committed).
    Appending after it would chain the new entries onto a frontier that is not the stored one."""
    with Database(db_url) as db, Database(db_url) as other_process:
        other = abandoned_append(db)
        append_locked(other_process, "stored")
        with db.read() as conn:
            assert repo.read_ledger_head(conn).size == other.size
        with pytest.raises(MOVED, match="ledger head moved"):
            append_assuming(db, other)
        assert ledger(db) == ["stored"]


def test_an_append_after_the_stored_head_commits_and_writes_the_head_once(db_url: str) -> None:
    with Database(db_url) as db:
        append_locked(db)
        known = db.known_ledger_head
        with db.transaction(lock_free=True) as conn:
            defer_inserts(conn)
            head = repo.assume_ledger_head(conn, known)
            assert repo.lock_ledger_head(conn) == head  # the assumed head: no lock now
            head = append(conn, head, "a")
            append(conn, head, "b")
        assert ledger(db) == ["test.entry", "a", "b"]
        assert db.known_ledger_head.size == 3
        with db.transaction(lock_free=True) as conn:  # nothing appended: the head is still checked
            repo.assume_ledger_head(conn, db.known_ledger_head)
        with pytest.raises(MOVED, match="ledger head moved"), db.transaction(lock_free=True) as conn:
            repo.assume_ledger_head(conn, known)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE outbox SET attempts = 1",
        "DELETE FROM outbox",
        "SELECT size FROM ledger_head WHERE id = 1 FOR UPDATE",
        "SELECT message_id FROM outbox FOR SHARE",
        "WITH gone AS (DELETE FROM outbox RETURNING 1) SELECT count(*) FROM gone",
        "INSERT INTO agreements (version, digest, document, installed_at) VALUES ('v', 'd', '{}', 't')",
        "SELECT pg_advisory_xact_lock(1)",
    ],
    ids=["update", "delete", "for-update", "for-share", "cte-delete", "insert-not-deferred", "advisory"],
)
def test_a_lock_free_transaction_refuses_a_row_lock_before_its_commit(db_url: str, statement: str) -> None:
    """Every other writer locks the ledger head first: a row locked before it could deadlock."""
    with Database(db_url) as db:
        append_locked(db)
        known = db.known_ledger_head

        def lock_a_row() -> None:
            with db.transaction(lock_free=True) as conn:
                repo.assume_ledger_head(conn, known)
                conn.execute(sa.select(outbox.c.message_id)).all()  # a plain read is fine
                conn.exec_driver_sql(statement)

        with pytest.raises(RuntimeError, match="row lock in a lock-free transaction"):
            lock_a_row()
        assert ledger(db) == ["test.entry"]


@pytest.mark.postgres
def test_an_unlocked_append_waits_for_a_writer_holding_the_lock_then_is_refused_without_deadlock(
    pg_url: str,
) -> None:
    with Database(pg_url) as db, Database(pg_url) as other_process:
        append_locked(db)
        known = db.known_ledger_head
        holding = threading.Event()

        def writer_holding_the_lock() -> None:
            with other_process.transaction() as conn:
                append(conn, repo.lock_ledger_head(conn), "locker")
                conn.execute(sa.select(messages.c.id)).all()  # the lock is taken and the BEGIN sent
                holding.set()
                time.sleep(0.5)

        locker = threading.Thread(target=writer_holding_the_lock)
        locker.start()
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError, match="ledger head moved"):
            append_assuming(db, known)
        waited = time.monotonic() - started
        locker.join()
        assert 0.2 < waited < 5  # it waited for the lock, and was not ended by deadlock detection
        assert ledger(db) == ["test.entry", "locker"]


@pytest.mark.postgres
def test_a_writer_locking_the_head_after_an_unlocked_append_appends_after_it(
    pg_url: str,
) -> None:
    with Database(pg_url) as db, Database(pg_url) as other_process:
        append_locked(db)
        known = db.known_ledger_head
        assert known is not None
        committing = threading.Event()
        done: list[str] = []

        def lock_after_it() -> None:
            committing.wait(10)
            time.sleep(0.15)  # the unlocked commit holds the head row now, for 0.5 s
            append_locked(other_process, "locker")
            done.append("locker")

        locker = threading.Thread(target=lock_after_it)
        locker.start()

        def hold_the_head(conn: Any) -> None:  # after the head's write, in the commit's pipeline
            committing.set()  # (the pipeline goes to the server once its actions are queued)
            conn.execute(sa.text("SELECT pg_sleep(0.5)"))

        with db.transaction(lock_free=True) as conn:
            defer_inserts(conn)
            append(conn, repo.assume_ledger_head(conn, known), "assumed")
            before_commit(conn, "hold", hold_the_head)
        locker.join()
        assert done == ["locker"]
        assert ledger(db) == ["test.entry", "assumed", "locker"]


def counted(runs: Counter[str], name: str) -> Callable[[Any, repo.LedgerHead], repo.LedgerHead]:
    def unit(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
        runs[name] += 1
        return append(conn, head, name)

    return unit


@pytest.mark.postgres
def test_the_committer_appends_unlocked_after_its_known_head_and_goes_again_locked_when_it_moved(
    pg_url: str, tmp_path: Path
) -> None:
    with Database(pg_url, pool_size=1) as db, Database(pg_url) as other_process:
        committer = GroupCommitter(db)
        runs: Counter[str] = Counter()
        try:
            committer.run(counted(runs, "first"), appends_only=True)  # no head known yet: locked
            assert committer.unlocked.commits == 0
            for n in range(6):  # psycopg prepares a statement at its fifth use: the steady state
                committer.run(counted(runs, f"warm{n}"), appends_only=True)
            assert committer.unlocked.commits == 6
            with round_trips(db, tmp_path) as trips:
                committer.run(counted(runs, "unlocked"), appends_only=True)
            assert trips == [1]  # BEGIN, the head (locked and written), the rows, NOTIFY, COMMIT
            committer.run(counted(runs, "updates"))  # a unit that may update: always locked
            assert committer.unlocked.commits == 7

            append_locked(other_process, "other")  # another process moves the head
            committer.run(counted(runs, "after-other"), appends_only=True)
            assert (committer.unlocked.retried, runs["after-other"]) == (1, 2)  # unlocked, then again locked
            committer.run(counted(runs, "next"), appends_only=True)
            assert (committer.unlocked.commits, runs["next"]) == (7, 1)  # locked for a while
            time.sleep(LOCK_AFTER_MOVED_SECONDS)
            committer.run(counted(runs, "later"), appends_only=True)
            assert committer.unlocked.commits == 8

            def failing(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
                runs["failing"] += 1
                append(conn, head, "failing")
                raise ValueError("this unit fails")

            with pytest.raises(ValueError, match="this unit fails"):
                committer.run(failing, appends_only=True)
            assert runs["failing"] == 2  # unlocked, then again alone holding the lock
            committer.run(counted(runs, "after-failing"), appends_only=True)
            assert committer.unlocked.commits == 9  # a unit's own error does not lock the next batches

            def colliding(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
                runs["colliding"] += 1
                if runs["colliding"] == 1:  # a transaction of this same process appends meanwhile
                    same_process = threading.Thread(target=append_locked, args=(db, "same-process"))
                    same_process.start()
                    same_process.join()
                return append(conn, head, "colliding")

            committer.run(colliding, appends_only=True)
            assert (runs["colliding"], committer.unlocked.retried) == (2, 3)  # moved: again, locked
            committer.run(counted(runs, "after-colliding"), appends_only=True)
            assert committer.unlocked.commits == 10  # moved by this process: the next goes unlocked
        finally:
            committer.close()
        assert ledger(db) == [
            "first",
            *(f"warm{n}" for n in range(6)),
            "unlocked",
            "updates",
            "other",
            "after-other",
            "next",
            "later",
            "after-failing",
            "same-process",
            "colliding",
            "after-colliding",
        ]


@pytest.mark.postgres
def test_two_processes_committing_unlocked_at_once_lose_nothing_and_keep_one_ledger(
    pg_url: str,
) -> None:
    with Database(pg_url) as first, Database(pg_url) as second:
        committers = [GroupCommitter(first), GroupCommitter(second)]  # two processes of one node
        runs: Counter[str] = Counter()
        errors: list[BaseException] = []

        def submitter(committer: GroupCommitter, name: str) -> None:
            try:
                for n in range(25):
                    committer.run(counted(runs, f"{name}-{n}"), appends_only=True)
            except BaseException as exc:  # (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=submitter, args=(committers[i % 2], f"t{i}")) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for committer in committers:
            committer.close()
        assert errors == []
        events = ledger(first)
        assert sorted(events) == sorted(f"t{i}-{n}" for i in range(8) for n in range(25))  # each once
        # unlocked attempts were made (each process's first after its first commit, at least);
        # whether any committed depends on the interleaving: the other process moves the head
        assert sum(c.unlocked.commits + c.unlocked.retried for c in committers) > 0
        # a unit runs unlocked, locked, alone at most, and alone again after a conflict
        assert max(runs.values()) <= 3 + CONFLICT_RETRIES


@pytest.mark.postgres
def test_a_unit_whose_transaction_loses_a_deadlock_runs_again_and_commits_once(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL aborts one transaction of a deadlock. When it is a committer's, nothing of it was
    written: the unit runs again and its caller sees a commit, not a 503, and the database is not
    reported unavailable."""
    other_waits, other_pid = threading.Event(), []
    runs: list[int] = []

    with Database(pg_url) as db, Database(pg_url) as other_db:
        committer = GroupCommitter(db)

        def other_writer() -> None:  # holds lock 4242, then waits for the head the unit holds
            with other_db.transaction() as conn:
                conn.execute(sa.text("SET LOCAL deadlock_timeout = '20s'"))  # the unit's side detects it
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242)"))
                other_pid.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
                other_waits.set()
                repo.lock_ledger_head(conn)

        def unit(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
            runs.append(1)
            if len(runs) == 1:  # holding the head: wait until the other waits for it, then close the cycle
                conn.execute(sa.text("SET LOCAL deadlock_timeout = '100ms'"))
                other.start()
                assert other_waits.wait(10)
                deadline = time.monotonic() + 10
                with other_db.read() as watch:
                    while not watch.execute(
                        sa.text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted"),
                        {"pid": other_pid[0]},
                    ).scalar_one():
                        assert time.monotonic() < deadline, "the other writer never waited for the head"
                        time.sleep(0.01)
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242)"))
            return append(conn, head, "after.conflict")

        other = threading.Thread(target=other_writer)
        try:
            committer.run(unit)  # no error: the deadlock's loser ran again
        finally:
            committer.close()
            other.join(10)
        assert not other.is_alive()
        assert len(runs) == 2
        assert ledger(db) == ["after.conflict"]
        assert db.availability.available
    said = [r.getMessage() for r in caplog.records]
    assert any("lost a conflict" in line and "DeadlockDetected" in line for line in said)
    assert not [line for line in said if "unavailable" in line]


def test_a_unit_that_keeps_losing_conflicts_fails_with_the_conflict_after_its_retries(tmp_path: Path) -> None:
    """The retries are bounded: a unit whose transaction is aborted every time runs 1 + 3 times,
    then its caller gets the conflict (the API answers 503 with Retry-After), nothing written."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    runs: list[int] = []

    def always_aborted(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
        runs.append(1)
        append(conn, head, "never")
        raise TransactionConflict("the transaction lost a conflict with another: DeadlockDetected")

    with Database(url) as db:
        committer = GroupCommitter(db)
        try:
            with pytest.raises(TransactionConflict):
                committer.run(always_aborted)
        finally:
            committer.close()
        assert len(runs) == 1 + CONFLICT_RETRIES
        assert ledger(db) == []


def test_on_sqlite_the_committer_always_locks_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    with Database(url) as db:
        committer = GroupCommitter(db)
        runs: Counter[str] = Counter()
        try:
            for n in range(3):
                committer.run(counted(runs, str(n)), appends_only=True)
        finally:
            committer.close()
        assert committer.unlocked.commits == 0
        assert ledger(db) == ["0", "1", "2"]


@pytest.mark.postgres
def test_a_submission_sealed_under_a_key_a_destruction_retired_meanwhile_is_sealed_again_under_the_new_one(
    tmp_path: Path, make_pg_database: Callable[[], str]
) -> None:
    """The content key is chosen in the unit, before an unlocked batch commits. A destruction of
    the period in between retires that key (and destroys its file once committed): the batch must
    not commit content that no key opens."""
    id_dir, _ = make_pair(tmp_path, (make_pg_database(), make_pg_database()))
    node = Node(load_settings(id_dir.path))
    try:
        actor = node.actor_for(
            crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint
        )
        assert actor is not None
        submission = MessageSubmission.model_validate(rfi())
        node.submit(actor, submission, dt.datetime.now(dt.UTC))  # the committer learns the head
        doomed = node.submit(actor, submission, dt.datetime.now(dt.UTC))["id"]
        assert (node.committer.unlocked.commits, node.committer.unlocked.retried) == (1, 0)
        seal = node.content.seal
        sealed_under: list[str] = []

        def seal_then_destroy(row: dict[str, Any], signed: str, conn: Any = None) -> dict[str, Any]:
            columns = seal(row, signed, conn)
            sealed_under.append(str(columns["content_kid"]))
            if len(sealed_under) == 1:  # a destruction commits between the seal and the commit
                other = threading.Thread(
                    target=node.retention.destroy, args=([doomed], "test", dt.datetime.now(dt.UTC))
                )
                other.start()
                other.join(30)
            return columns

        node.content.seal = seal_then_destroy  # type: ignore[method-assign]
        accepted = node.submit(actor, submission, dt.datetime.now(dt.UTC))
        node.content.seal = seal  # type: ignore[method-assign]

        assert len(sealed_under) == 2
        assert sealed_under[0] != sealed_under[1]  # sealed again
        assert not node.content.keks.kids(sealed_under[0][4:11]).count(sealed_under[0])  # retired
        with node.db.read() as conn:
            row = repo.get_message(conn, accepted["id"])
        assert row is not None
        assert row["content_kid"] == sealed_under[1]
        assert node.content.open(row)  # the content opens with the keys left
        assert node.committer.unlocked.retried == 1
    finally:
        node.close()


@pytest.mark.postgres
def test_a_received_batch_is_stored_unlocked_and_again_locked_when_the_head_moved(
    tmp_path: Path, make_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver's batch appends after the known head too. Inbox positions come from the head
    (1 + the sequence of the message's ``envelope.received`` entry): a batch that assumed a head
    another writer moved is not committed with stale positions, but stored again holding the lock
    (not one savepoint per envelope, which is for an envelope's own failure)."""
    my_url = make_pg_database()
    id_dir, my_dir = make_pair(tmp_path, (make_pg_database(), my_url))
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    try:
        actor = id_node.actor_for(
            crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint
        )
        assert actor is not None
        ids = [
            id_node.submit(actor, MessageSubmission.model_validate(rfi()), dt.datetime.now(dt.UTC))["id"]
            for _ in range(4)
        ]
        with id_node.db.read() as conn:
            envelopes = [repo.get_message(conn, mid)["envelope"] for mid in ids]  # type: ignore[index]
        unlocked = my_node.committer.unlocked
        assert my_node.receive(envelopes[:1], dt.datetime.now(dt.UTC))[0].accepted  # the head is known
        before = (unlocked.commits, unlocked.retried)
        assert all(r.accepted for r in my_node.receive(envelopes[1:3], dt.datetime.now(dt.UTC)))
        assert (unlocked.commits, unlocked.retried) == (before[0] + 1, before[1])

        with Database(my_url) as other_process:
            append_locked(other_process, "other")
        with caplog.at_level("WARNING"):
            assert my_node.receive(envelopes[3:], dt.datetime.now(dt.UTC))[0].accepted
        assert unlocked.retried == before[1] + 1
        assert "savepoint per envelope" not in caplog.text

        with my_node.db.read() as conn:
            entries = [e for e in repo.iter_ledger(conn) if e.event == "envelope.received"]
            assert len(entries) == len(ids)  # each stored once
            received = {e.message_id: e.seq for e in entries}
            positions = {mid: repo.get_message(conn, mid)["inbox_seq"] for mid in ids}  # type: ignore[index]
        assert positions == {mid: received[mid] + 1 for mid in ids}
        assert ledger(my_node.db).count("other") == 1
    finally:
        id_node.close()
        my_node.close()


def test_a_destruction_inside_a_transaction_makes_its_later_seals_take_the_new_kek(
    tmp_path: Path, db_urls: tuple[str | None, str | None]
) -> None:
    """A transaction looks a period's live KEK up once; a destruction inside it (a return-or-destroy
    request in a received batch) makes a new one and retires the old after the commit, so a later
    seal of the same transaction must not take the remembered one."""
    id_dir, _ = make_pair(tmp_path, db_urls)
    node = Node(load_settings(id_dir.path))
    cert = id_dir.client("polri-cms").cert.read_bytes()
    actor = node.actor_for(crypto.certificate_info(cert).fingerprint)
    assert actor is not None
    doomed = node.submit(actor, MessageSubmission.model_validate(rfi()), dt.datetime.now(dt.UTC))["id"]
    sealed: list[str] = []

    def destroy_between_two_seals() -> None:
        with node.db.transaction() as conn:
            repo.lock_ledger_head(conn)
            row = repo.get_message(conn, doomed)
            assert row is not None
            sealed.append(row["content_kid"])
            sealed.append(node.content.seal({**row, "id": "first"}, "signed", conn)["content_kid"])
            node.content.destroy(conn, [row], reason="test", at="t", actor="ID")
            sealed.append(node.content.seal({**row, "id": "later"}, "signed", conn)["content_kid"])
            sealed.append(node.content.keks.kids(row["destroy_after"][:7])[-1])  # the new live KEK
            raise Abandoned

    try:
        with pytest.raises(Abandoned):
            destroy_between_two_seals()
    finally:
        node.close()
    stored, first, later, live = sealed
    assert first == stored
    assert later != first
    assert later == live


@pytest.mark.postgres
def test_a_unit_that_says_it_only_appends_but_updates_is_committed_locked_and_reported(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit mislabelled ``appends_only`` would lock a row before the head in an unlocked batch
    (a deadlock waiting to happen): the guard refuses the statement, the batch goes again holding
    the lock, and the mislabelling is logged as an error, not lost among the expected refusals."""
    with Database(pg_url) as db:
        append_locked(db)
        committer = GroupCommitter(db)

        def updating(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
            conn.execute(sa.update(outbox).values(attempts=1))
            return append(conn, head, "updating")

        try:
            with caplog.at_level("DEBUG", logger="exchange.committer"):
                committer.run(updating, appends_only=True)
        finally:
            committer.close()
        assert committer.unlocked.retried == 1
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        assert "row lock in a lock-free transaction" in errors[0].getMessage()
        assert ledger(db) == ["test.entry", "updating"]


@pytest.fixture
def pg_pair(tmp_path: Path, make_pg_database: Callable[[], str]) -> Iterator[tuple[Node, Node, Actor]]:
    """Two nodes on PostgreSQL, and the sending node's client."""
    id_dir, my_dir = make_pair(tmp_path, (make_pg_database(), make_pg_database()))
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    try:
        yield id_node, my_node, actor(id_node, id_dir, "polri-cms")
    finally:
        id_node.close()
        my_node.close()


def submit_some(node: Node, who: Actor, n: int) -> list[str]:
    return [
        node.submit(who, MessageSubmission.model_validate(rfi()), dt.datetime.now(dt.UTC))["id"]
        for _ in range(n)
    ]


@pytest.mark.postgres
def test_a_claim_leases_and_marks_sent_in_its_commits_round_trip(
    pg_pair: tuple[Node, Node, Actor], tmp_path: Path
) -> None:
    """The claim reads the due rows with their envelopes (the BEGIN with it); their lease and the
    messages marked sent read nothing back, and go with the COMMIT: two round trips."""
    id_node, _my_node, polri = pg_pair
    ids = submit_some(id_node, polri, 8)
    with Database(id_node.settings.database_url, pool_size=1) as db:

        def claim_one(now: float) -> repo.Claim:
            with db.transaction() as conn:
                return claim_due(conn, id_node, at=now, limit=1)

        claims = [claim_one(time.time()) for _ in range(7)]  # psycopg prepares at a statement's fifth use
        with round_trips(db, tmp_path) as trips:
            claims.append(claim_one(time.time()))
        assert trips == [2]
    claimed = [c.envelopes[0] for c in claims]
    assert [c.message_id for c in claimed] == ids  # the oldest first, each once
    with id_node.db.read() as conn:
        for c in claimed:
            row = repo.get_message(conn, c.message_id)
            assert row is not None
            assert (c.envelope, c.envelope_sha256, c.created_at) == (
                row["envelope"],
                row["envelope_sha256"],
                row["created_at"],
            )
            assert (row["status"], row["attempts"], c.attempts) == ("sent", 1, 1)
        leases = conn.execute(sa.select(outbox.c.leased_by, outbox.c.attempts)).all()
    assert sorted(leases) == [("w1", 1)] * 8


@pytest.mark.postgres
def test_a_delivery_round_is_settled_in_an_unlocked_batch(pg_pair: tuple[Node, Node, Actor]) -> None:
    id_node, my_node, polri = pg_pair
    worker = DeliveryWorker(id_node, Loopback(my_node))
    submit_some(id_node, polri, 2)
    assert worker.run_once() == 2  # the head is known from here
    unlocked = id_node.committer.unlocked
    before = (unlocked.commits, unlocked.retried)
    ids = submit_some(id_node, polri, 3)
    assert unlocked.commits == before[0] + 3
    assert worker.run_once() == 3
    assert (unlocked.commits, unlocked.retried) == (before[0] + 4, before[1])  # the settling too
    assert {id_node.status(polri, m, dt.datetime.now(dt.UTC))["status"] for m in ids} == {"delivered"}
    with id_node.db.read() as conn:
        assert repo.outbox_size(conn) == 0
    events = ledger(id_node.db)
    assert events.count("receipt.verified") == events.count("message.sent") == 5


@pytest.mark.postgres
def test_a_settling_whose_row_another_process_dequeued_meanwhile_goes_again_locked_and_leaves_it_be(
    pg_pair: tuple[Node, Node, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settling reads which of its rows are still queued, and removes them only at commit. If
    another process dequeues one in between (here: fails it, as the expiry sweep does), that one
    moved the head: the settling's commit is refused, and it runs again holding the lock, where
    the row is gone. The message keeps the other's outcome; it is never both failed and delivered."""
    id_node, my_node, polri = pg_pair
    worker = DeliveryWorker(id_node, Loopback(my_node))
    submit_some(id_node, polri, 1)
    assert worker.run_once() == 1
    ids = submit_some(id_node, polri, 3)
    taken = ids[1]
    dequeue_many = repo.dequeue_many
    reads: list[set[str]] = []

    def dequeued_meanwhile(conn: Any, message_ids: Any) -> set[str]:
        kept = dequeue_many(conn, message_ids)
        reads.append(kept)
        if len(reads) == 1:  # another process fails one of them after this read, before the commit
            with Database(id_node.settings.database_url) as other_process, other_process.transaction() as c:
                c.exec_driver_sql(
                    "SET LOCAL lock_timeout = '5s'"
                )  # (were the head held here: fail, not hang)
                head = repo.lock_ledger_head(c)
                assert repo.dequeue(c, taken)
                repo.set_status(c, [taken], status="failed", status_reason="expired", updated_at="t")
                repo.append_ledger(
                    c, head, [EntryDraft(event="message.delivery_failed", message_id=taken)], "t"
                )
        return kept

    monkeypatch.setattr(repo, "dequeue_many", dequeued_meanwhile)
    retried = id_node.committer.unlocked.retried
    assert worker.run_once() == 2  # settled: the two still queued
    assert reads == [set(ids), set(ids) - {taken}]  # unlocked, then again holding the lock
    assert id_node.committer.unlocked.retried == retried + 1
    status = {m: id_node.status(polri, m, dt.datetime.now(dt.UTC))["status"] for m in ids}
    assert status == {ids[0]: "delivered", taken: "failed", ids[2]: "delivered"}
    with id_node.db.read() as conn:
        verified = [e.message_id for e in repo.iter_ledger(conn) if e.event == "receipt.verified"]
        assert repo.outbox_size(conn) == 0
    assert taken not in verified
    assert ids[0] in verified
    assert ids[2] in verified
    ledger(id_node.db)  # whole: no gap, no fork


@pytest.mark.postgres
def test_a_destruction_while_a_claim_holds_its_rows_waits_for_it_without_deadlock(
    pg_pair: tuple[Node, Node, Actor],
) -> None:
    """A claim locks its outbox rows, then at commit their messages. A destruction re-wraps the
    other messages of the period (their rows) and dequeues the destroyed one: it locks the queued
    messages' outbox rows first, so it waits for the claim instead of holding a message the claim's
    commit needs while waiting for an outbox row the claim holds (PostgreSQL would abort one)."""
    id_node, _my_node, polri = pg_pair
    kept, doomed = submit_some(id_node, polri, 2)  # one period: the destruction re-wraps the first
    claimed, destruction_started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def claim() -> None:
        try:
            with id_node.db.transaction() as conn:
                taken = claim_due(conn, id_node)
                assert [c.message_id for c in taken.envelopes] == [kept, doomed]
                claimed.set()
                assert destruction_started.wait(10)
                time.sleep(0.5)  # the destruction has gone as far as it can meanwhile
        except BaseException as exc:
            errors.append(exc)

    def destroy() -> None:
        try:
            assert claimed.wait(10)
            with id_node.db.transaction() as conn:
                conn.exec_driver_sql("SET LOCAL deadlock_timeout = '100ms'")
                head = repo.lock_ledger_head(conn)
                row = repo.get_message(conn, doomed)
                assert row is not None
                destruction_started.set()
                drafts, _retired = id_node.content.destroy(conn, [row], reason="test", at="t", actor="ID")
                repo.append_ledger(conn, head, drafts, "t")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim), threading.Thread(target=destroy)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    status = {m: id_node.status(polri, m, dt.datetime.now(dt.UTC))["status"] for m in (kept, doomed)}
    assert status == {kept: "sent", doomed: "destroyed"}
    with id_node.db.read() as conn:
        assert [r.message_id for r in conn.execute(sa.select(outbox.c.message_id))] == [kept]
        row = repo.get_message(conn, kept)
        assert row is not None
    assert id_node.content.open(row)  # re-wrapped under the new KEK, and opens
