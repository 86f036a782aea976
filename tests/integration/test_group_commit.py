"""Group commit: concurrent submissions share transactions, none is lost, a failing unit is isolated."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest
import sqlalchemy as sa
from joserfc.jwk import OctKey

from exchange import crypto
from exchange.config import load_settings
from exchange.db import engine, idempotency_keys, repo
from exchange.db.committer import Unit
from exchange.db.schema import messages
from exchange.idempotency import IdempotentSubmission
from exchange.ledger import EntryDraft, verify_rows
from exchange.messages import MessageSubmission
from exchange.node import Node
from tests.integration.conftest import Pair
from tests.support import make_pair, rfi


def test_concurrent_submissions_are_all_committed_with_a_verifiable_ledger(
    tmp_path: Path, db_urls: tuple[str | None, str | None]
) -> None:
    id_dir, _ = make_pair(tmp_path, db_urls)
    node = Node(load_settings(id_dir.path))
    actor = node.actor_for(crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint)
    assert actor is not None
    submission = MessageSubmission.model_validate(rfi())
    ids: list[str] = []
    lock = threading.Lock()

    def submitter() -> None:
        for _ in range(25):
            accepted = node.submit(actor, submission, dt.datetime.now(dt.UTC))
            with lock:
                ids.append(accepted["id"])

    threads = [threading.Thread(target=submitter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with node.db.read() as conn:
        stored = {r.id for r in conn.execute(sa.select(messages.c.id))}
        head = repo.read_ledger_head(conn)
        assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 200
        assert repo.outbox_size(conn) == 200
    assert stored == set(ids)
    assert len(ids) == 200
    node.close()


def test_a_failing_unit_fails_alone(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def good(i: int) -> None:
        barrier.wait()
        drafts = [EntryDraft(event=f"ok{i}")]
        node.committer.run(lambda conn, head: repo.append_ledger(conn, head, drafts, "t"))

    def bad() -> None:
        def unit(conn: sa.Connection, head: repo.LedgerHead) -> repo.LedgerHead:
            repo.append_ledger(conn, head, [EntryDraft(event="half-written")], "t")
            raise ValueError("this unit fails after writing")

        barrier.wait()
        try:
            node.committer.run(unit)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(5)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1
    with node.db.read() as conn:
        events = sorted(e.event for e in repo.iter_ledger(conn))
        head = repo.read_ledger_head(conn)
        verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)
    assert events == [f"ok{i}" for i in range(5)]
    node.close()


def test_a_unit_after_close_restarts_the_committer(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    node.committer.close()
    node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="after")], "t"))
    with node.db.read() as conn:
        assert [e.event for e in repo.iter_ledger(conn)] == ["after"]
    node.close()


def test_a_unit_failing_alone_in_its_batch_leaves_nothing(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="first")], "t"))

    def unit(conn: sa.Connection, head: repo.LedgerHead) -> repo.LedgerHead:
        repo.append_ledger(conn, head, [EntryDraft(event="half-written")], "t")
        raise ValueError("this unit fails after writing")

    with pytest.raises(ValueError, match="fails after writing"):
        node.committer.run(unit)  # nothing else pending: a batch of one, without a savepoint
    node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="next")], "t"))
    with node.db.read() as conn:
        head = repo.read_ledger_head(conn)
        verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)
        assert [e.event for e in repo.iter_ledger(conn)] == ["first", "next"]
    node.close()


def _appending(name: str, runs: Counter[str], fail: bool = False) -> Unit:
    def unit(conn: sa.Connection, head: repo.LedgerHead) -> repo.LedgerHead:
        runs[name] += 1
        new = repo.append_ledger(conn, head, [EntryDraft(event=name)], "t")
        if fail:
            raise ValueError(f"{name} fails after writing")
        return new

    return unit


def test_a_batch_is_one_transaction_without_savepoints_writing_the_head_once(nodes: Pair) -> None:
    _, _, node, _ = nodes
    statements: list[str] = []
    sa.event.listen(node.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].lower()))
    runs: Counter[str] = Counter()
    futures: list[Future[None]] = [Future() for _ in range(3)]
    node.committer._commit([(_appending(n, runs), f, False) for n, f in zip("abc", futures, strict=True)])
    assert [f.result() for f in futures] == [None, None, None]
    assert runs == {"a": 1, "b": 1, "c": 1}
    assert not [s for s in statements if "savepoint" in s]
    assert len([s for s in statements if s.startswith("update ledger_head")]) == 1
    with node.db.read() as conn:
        head = repo.read_ledger_head(conn)
        verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)
        assert [e.event for e in repo.iter_ledger(conn)] == ["a", "b", "c"]


def test_a_failing_unit_undoes_its_batch_whose_units_then_commit_alone(nodes: Pair) -> None:
    _, _, node, _ = nodes
    runs: Counter[str] = Counter()
    units = [_appending("a", runs), _appending("bad", runs, fail=True), _appending("b", runs)]
    futures: list[Future[None]] = [Future() for _ in units]
    node.committer._commit([(unit, future, False) for unit, future in zip(units, futures, strict=True)])
    assert futures[0].result() is None
    assert futures[2].result() is None
    with pytest.raises(ValueError, match="bad fails after writing"):
        futures[1].result()
    assert runs == {"a": 2, "bad": 2, "b": 1}  # the batch stopped at "bad" and was undone; each alone
    with node.db.read() as conn:
        head = repo.read_ledger_head(conn)
        verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)
        assert [e.event for e in repo.iter_ledger(conn)] == ["a", "b"]


def test_a_row_the_database_refuses_at_commit_fails_its_unit_with_the_databases_error(nodes: Pair) -> None:
    """A unit's rows go in just before the commit (on PostgreSQL all in one round trip, outside
    SQLAlchemy's execute): a row refused there fails that unit with SQLAlchemy's IntegrityError,
    as a statement run at once would, writes nothing of it, and the next unit commits. The error
    does not quote the row's values (they may be a message's case reference or markings)."""
    _, _, node, _ = nodes

    def refused(conn: sa.Connection, head: repo.LedgerHead) -> repo.LedgerHead:
        new = repo.append_ledger(conn, head, [EntryDraft(event="with-a-refused-row")], "t")
        idempotency_keys.insert(  # no such message: the foreign key refuses it
            conn,
            client_id="c",
            key="k-0001",
            request_sha256="0" * 64,
            message_id="none",
            response='{"case_ref": "CANARY-CASE-REF"}',
            at="t",
        )
        return new

    with pytest.raises(sa.exc.IntegrityError) as refusal:
        node.committer.run(refused)
    assert "CANARY" not in str(refusal.value)
    node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="next")], "t"))
    with node.db.read() as conn:
        head = repo.read_ledger_head(conn)
        verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)
        assert [e.event for e in repo.iter_ledger(conn)] == ["next"]


def test_a_unit_alone_writes_its_rows_in_one_statement_each_just_before_the_commit(nodes: Pair) -> None:
    """A lone unit's inserts are deferred as a batch's are: they follow everything else it runs."""
    _, _, node, _ = nodes
    statements: list[str] = []
    sa.event.listen(node.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].lower()))

    def unit(conn: sa.Connection, head: repo.LedgerHead) -> repo.LedgerHead:
        new = repo.append_ledger(conn, head, [EntryDraft(event="a"), EntryDraft(event="b")], "t")
        conn.execute(sa.text("SELECT 1 AS last_read"))
        return new

    node.committer.run(unit)
    read = next(i for i, s in enumerate(statements) if "last_read" in s)
    inserts = [i for i, s in enumerate(statements) if s.startswith("insert into ledger_entries")]
    assert len(inserts) == 1
    assert inserts[0] > read


def test_an_append_inside_a_savepoint_is_refused(nodes: Pair) -> None:
    _, _, node, _ = nodes

    def nested() -> None:
        with node.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            with conn.begin_nested():
                repo.append_ledger(conn, head, [EntryDraft(event="nested")], "t")

    with pytest.raises(RuntimeError, match="inside a savepoint"):
        nested()
    with node.db.read() as conn:
        assert repo.read_ledger_head(conn).size == 0


def _batched(node: Node, size: int) -> None:
    """Make ``node``'s committer commit the next ``size`` units as one batch, whatever their timing
    (each caller blocks until the batch is committed, as with the real queue)."""
    batch: list[tuple[Unit, Future[None], bool]] = []
    full = threading.Barrier(size, action=lambda: node.committer._commit(batch))

    def run(unit: Unit, *, appends_only: bool = False) -> None:
        future: Future[None] = Future()
        batch.append((unit, future, appends_only))
        full.wait()
        future.result()

    node.committer.run = run  # type: ignore[method-assign]


def test_a_batch_inserts_each_tables_rows_in_one_statement_and_looks_the_live_kek_up_once(
    nodes: Pair,
) -> None:
    id_dir, _, node, _ = nodes
    actor = node.actor_for(crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint)
    assert actor is not None
    statements: list[str] = []
    sa.event.listen(node.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].lower()))
    live, looked_up = node.content.keks.live, []

    def counted_live(period: str) -> OctKey:
        looked_up.append(period)
        return live(period)

    node.content.keks.live = counted_live  # type: ignore[method-assign]
    _batched(node, 3)
    answers: list[dict[str, object]] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(
                node.submit(actor, MessageSubmission.model_validate(rfi()), dt.datetime.now(dt.UTC))
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inserts = Counter(s.split()[2] for s in statements if s.startswith("insert into"))
    assert inserts["messages"] == inserts["outbox"] == inserts["ledger_entries"] == 1
    assert len(looked_up) == 1  # the period's live KEK, once for the batch's three messages
    assert not engine._MEMOS  # forgotten with the transaction
    with node.db.read() as conn:
        stored = {r.id for r in conn.execute(sa.select(messages.c.id))}
        head = repo.read_ledger_head(conn)
        assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 3
        assert repo.outbox_size(conn) == 3
    assert stored == {a["id"] for a in answers}


def test_one_idempotency_key_twice_in_one_batch_stores_one_message_and_replays_it(nodes: Pair) -> None:
    """The second unit cannot see the first one's key (inserted at commit): the batch fails on the
    key's uniqueness, and alone the second finds the first's key and replays its answer."""
    id_dir, _, node, _ = nodes
    actor = node.actor_for(crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint)
    assert actor is not None
    idempotent = IdempotentSubmission(node)
    _batched(node, 2)
    results: list[tuple[dict[str, object], bool]] = []
    submission = MessageSubmission.model_validate(rfi())
    threads = [
        threading.Thread(
            target=lambda: results.append(
                idempotent.submit(actor, submission, "same-key-0001", dt.datetime.now(dt.UTC))
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(replay for _, replay in results) == [False, True]
    assert results[0][0] == results[1][0]
    with node.db.read() as conn:
        assert [r.id for r in conn.execute(sa.select(messages.c.id))] == [results[0][0]["id"]]
        assert repo.outbox_size(conn) == 1
        head = repo.read_ledger_head(conn)
        assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 1
