"""The Merkle ledger in SQL: proofs from stored subtrees, append-only rows, concurrent writers."""

from __future__ import annotations

import itertools
import multiprocessing
import random

import pytest
import sqlalchemy as sa

from exchange.db import repo
from exchange.db.engine import Database, upgrade
from exchange.ledger import EntryDraft, verify_rows
from exchange.ledger.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)


def append(db: Database, n: int, tag: str = "e") -> None:
    with db.transaction() as conn:
        head = repo.lock_ledger_head(conn)
        repo.append_ledger(conn, head, [EntryDraft(event=f"{tag}{i}", case_ref="C/1") for i in range(n)], "t")


def test_proofs_from_stored_subtrees_verify_against_stored_heads(db_url: str) -> None:
    with Database(db_url) as db:
        roots = {}
        for batch in (1, 2, 5, 13, 40):  # several appends: subtrees completed across batches
            append(db, batch)
            with db.read() as conn:
                head = repo.read_ledger_head(conn)
            roots[head.size] = head.root
        with db.read() as conn:
            source = repo.SqlSubtrees(conn)
            leaves = [leaf_hash(e.leaf) for e in repo.iter_ledger(conn)]
            sizes = sorted(roots)
            for size in sizes:
                assert root_hash(source, size) == roots[size]
                for index in (0, size // 2, size - 1):
                    verify_inclusion(
                        leaves[index], index, size, inclusion_proof(source, index, size), roots[size]
                    )
            for old, new in itertools.pairwise(sizes):
                verify_consistency(old, new, consistency_proof(source, old, new), roots[old], roots[new])
            head = repo.read_ledger_head(conn)
            assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 61


def test_the_database_refuses_to_change_or_remove_ledger_rows(db_url: str) -> None:
    with Database(db_url) as db:
        append(db, 3)
        statements = [
            "update ledger_entries set decision = 'deny' where seq = 1",
            "delete from ledger_entries where seq = 2",
            "update ledger_subtrees set hash = hash where level = 1",
            "delete from ledger_subtrees",
        ]
        if db.dialect == "postgresql":
            statements += ["truncate ledger_entries", "truncate ledger_subtrees"]
        for statement in statements:
            with pytest.raises(sa.exc.DatabaseError, match="append-only"), db.transaction() as conn:
                conn.execute(sa.text(statement))
        with db.read() as conn:
            head = repo.read_ledger_head(conn)
            assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 3


def _writer(url: str, worker: int, batches: int) -> None:
    rng = random.Random(worker)
    with Database(url) as db:
        for b in range(batches):
            with db.transaction() as conn:
                head = repo.lock_ledger_head(conn)
                drafts = [
                    EntryDraft(event="concurrent", actor=f"w{worker}", data={"b": b, "i": i})
                    for i in range(rng.randint(1, 6))
                ]
                repo.append_ledger(conn, head, drafts, "t")


@pytest.mark.postgres
def test_eight_writer_processes_append_thousands_with_no_gap_and_no_fork(make_pg_database: object) -> None:
    url = make_pg_database()  # type: ignore[operator]
    upgrade(url)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, w, 160)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    with Database(url) as db, db.read() as conn:
        head = repo.read_ledger_head(conn)
        seqs = [r[0] for r in conn.execute(sa.text("select seq from ledger_entries order by seq"))]
        assert seqs == list(range(head.size))  # no gap, no duplicate position
        assert head.size > 2000
        assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == head.size
        writers = {r[0] for r in conn.execute(sa.text("select distinct actor from ledger_entries"))}
        assert writers == {f"w{w}" for w in range(8)}
