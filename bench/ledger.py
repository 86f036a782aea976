"""Ledger figures: appends per second (SQLite and PostgreSQL, one entry and 100 entries per
transaction), time to verify a million-entry ledger from scratch, proofs at a million entries.

    .venv/bin/python bench/ledger.py [--entries 1000000] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from exchange.auditing import verify_ledger_entries
from exchange.db import repo
from exchange.db.engine import Database, upgrade
from exchange.ledger import EntryDraft, verify_rows
from exchange.ledger.merkle import consistency_proof, inclusion_proof

AT = "2026-11-23T12:00:00.000000+00:00"


def draft(i: int) -> EntryDraft:
    return EntryDraft(
        event="message.submitted",
        message_id=str(uuid.UUID(int=i)),
        case_ref="ID-MY/2026/0042",
        actor="polri-cms",
        decision="allow",
        rules=("R-TYPE-KNOWN", "R-CLIENT-TYPE", "R-CLEARANCE-SEND"),
        data={"type": "REQUEST_FOR_INFORMATION", "level": "S", "envelope_sha256": f"{i:064x}"},
    )


def appends(db: Database, total: int, per_txn: int) -> float:
    start = time.perf_counter()
    for base in range(0, total, per_txn):
        with db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            repo.append_ledger(conn, head, [draft(base + i) for i in range(per_txn)], AT)
    return total / (time.perf_counter() - start)


def append_figures(label: str, url: str) -> None:
    upgrade(url)
    with Database(url) as db:
        single = appends(db, 2000, 1)
        batched = appends(db, 50_000, 100)
    print(
        f"{label:<11} appends: {single:>8,.0f}/s one per transaction, {batched:>8,.0f}/s 100 per transaction"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="exchange-ledger-bench-"))
    append_figures("SQLite", f"sqlite:///{root / 'appends.db'}")
    admin = sa.create_engine(
        args.pg.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    name = f"exchange_bench_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        append_figures("PostgreSQL", args.pg.rsplit("/", 1)[0] + f"/{name}")
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL appends: skipped ({exc.orig})")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = f"sqlite:///{root / 'million.db'}"
    upgrade(url)
    with Database(url) as db:
        start = time.perf_counter()
        print(f"building a {args.entries:,}-entry ledger…", flush=True)
        for base in range(0, args.entries, 10_000):
            with db.transaction() as conn:
                head = repo.lock_ledger_head(conn)
                repo.append_ledger(
                    conn, head, [draft(base + i) for i in range(min(10_000, args.entries - base))], AT
                )
        print(f"built a {args.entries:,}-entry ledger in {time.perf_counter() - start:.0f} s")
        with db.read() as conn:
            head = repo.read_ledger_head(conn)
            start = time.perf_counter()
            checked = verify_ledger_entries(url, size=head.size, root=head.root, marks={})
            print(
                f"verify {checked:,} entries from scratch (SQLite, {os.cpu_count()} processes):"
                f" {time.perf_counter() - start:.2f} s"
            )
            start = time.perf_counter()
            verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)
            print(f"  the same in one process: {time.perf_counter() - start:.2f} s")
            source = repo.SqlSubtrees(conn)
            rng = random.Random(3)
            proofs = {
                "inclusion": lambda: inclusion_proof(source, rng.randrange(head.size), head.size),
                "consistency": lambda: consistency_proof(source, rng.randint(1, head.size), head.size),
            }
            for label, make in proofs.items():
                times, sizes = [], []
                for _ in range(500):
                    t = time.perf_counter()
                    sizes.append(len(make()))
                    times.append((time.perf_counter() - t) * 1000)
                times.sort()
                print(
                    f"{label} proof at {head.size:,} (SQLite): {max(sizes)} hashes ({max(sizes) * 32} B) max,"
                    f" p50 {statistics.median(times):.2f} ms, p99 {times[int(len(times) * 0.99)]:.2f} ms"
                )


if __name__ == "__main__":
    main()
