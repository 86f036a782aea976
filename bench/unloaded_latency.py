"""Submit-to-verified-receipt latency of one message at a time (no other load), and where it goes.

    .venv/bin/python bench/unloaded_latency.py                      # SQLite
    .venv/bin/python bench/unloaded_latency.py --postgres postgresql://postgres@127.0.0.1:5432/test

Each message is submitted alone and the next one only once the receipt of the previous was
verified. The stages come from the two nodes' own ledgers (one clock: both nodes on this machine):

- submit: the client's request, from sending it to the 202 (sign, encrypt, store, commit);
- to partner: the sender's ``message.submitted`` entry to the receiver's ``envelope.received``
  (wake the delivery loop, claim, HTTPS, open and verify);
- back: ``envelope.received`` to the sender's ``receipt.verified`` (the receiver's commit, the
  answer, the receipt verified);
- settle: ``receipt.verified`` to the message's status ``delivered``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))

import machine_speed
from exchange_throughput import SUBMISSION, databases

from exchange.demo import set_up_pair

#: how often this process looks for the receipt: the stages are read from the nodes' ledgers, so a
#: slower poll changes none of them, and leaves the two cores to the nodes and PostgreSQL
POLL_SECONDS = 0.025


def _ledger_times(engine: sa.Engine, event: str, message_id: str) -> float | None:
    with engine.connect() as conn:
        at = conn.execute(
            sa.text("select at from ledger_entries where event = :e and message_id = :m"),
            {"e": event, "m": message_id},
        ).scalar()
    return dt.datetime.fromisoformat(at).timestamp() if at else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--postgres", metavar="URL", help="both nodes on PostgreSQL (throwaway databases)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="exchange-latency-"))
    with databases(args.postgres) as urls:
        polri, pdrm = set_up_pair(root, 'log_level = "warning"', database_urls=(urls[0], urls[1]))
        dbs = [
            sa.create_engine(url or f"sqlite:///{node.dir / 'node.db'}")
            for url, node in zip(urls[:2], (polri, pdrm), strict=True)
        ]
        try:
            for node in (polri, pdrm):
                node.server.start()
            for node in (polri, pdrm):
                node.server.wait_ready()
            print(
                f"machine: {os.cpu_count()} cores, load average"
                f" {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
                f" {'PostgreSQL' if urls[0] else 'SQLite WAL'} on both sides; one message at a time"
            )
            print(machine_speed.describe() + "\n")
            names = ("submit", "to partner", "back", "settle", "total")
            stages: dict[str, list[float]] = {k: [] for k in names}
            with polri.client() as api:
                for n in range(args.messages + 5):  # the first 5 warm connections and caches
                    sent = time.time()
                    accepted = api.request("POST", "/v1/messages", json=SUBMISSION)
                    answered = time.time()
                    if accepted.status_code != 202:
                        raise SystemExit(f"submission failed: {accepted.text}")
                    mid = accepted.json()["id"]
                    deadline = time.monotonic() + 30
                    while (verified := _ledger_times(dbs[0], "receipt.verified", mid)) is None:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"message {mid} was not delivered in 30 s")
                        time.sleep(POLL_SECONDS)
                    with dbs[0].connect() as conn:
                        while True:
                            row = conn.execute(
                                sa.text("select status, created_at, updated_at from messages where id = :m"),
                                {"m": mid},
                            ).one()
                            if row.status == "delivered":
                                break
                            time.sleep(POLL_SECONDS)
                            conn.rollback()
                    submitted = _ledger_times(dbs[0], "message.submitted", mid)
                    received = _ledger_times(dbs[1], "envelope.received", mid)
                    assert submitted is not None
                    assert received is not None
                    created = dt.datetime.fromisoformat(row.created_at).timestamp()
                    delivered = dt.datetime.fromisoformat(row.updated_at).timestamp()
                    if n < 5:
                        continue
                    stages["submit"].append(answered - sent)
                    stages["to partner"].append(received - submitted)
                    stages["back"].append(verified - received)
                    stages["settle"].append(delivered - verified)
                    stages["total"].append(delivered - created)
            for name, values in stages.items():
                ms = sorted(v * 1000 for v in values)
                print(
                    f"{name:<12} p50 {statistics.median(ms):>7.1f} ms   p90 {ms[int(len(ms) * 0.9)]:>7.1f} ms"
                    f"   max {ms[-1]:>7.1f} ms"
                )
        finally:
            for node in (polri, pdrm):
                node.server.kill()
            for engine in dbs:
                engine.dispose()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
