"""Messages per second and submit-to-verified-receipt latency between two nodes on this machine,
and in the same run the same path as a plain store-and-forward (no signing, encryption or ledger).

    make bench            # or: .venv/bin/python bench/exchange_throughput.py --messages 2000 --clients 8

Latency is measured from the sender's own records: the message's creation time (at submission)
to the time its receipt was verified (status delivered); throughput is messages over the time
from the first submission to the last delivery. Load comes from client threads in this process,
on the same 2 cores as both servers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from exchange.client import ExchangeClient
from exchange.demo import DemoNode, exchange_cli, free_port

SUBMISSION = {
    "type": "REQUEST_FOR_INFORMATION",
    "case_ref": "ID-MY/2026/BENCH",
    "purposes": ["TIP_INVESTIGATION"],
    "classification": {"scheme": "POLRI", "level": "RAHASIA"},
    "tlp": "AMBER",
    "handling_codes": ["H0"],
    "payload": {"summary": "benchmark " + "x" * 3000, "questions": ["q1", "q2", "q3"]},
}


def load(make_client: Callable[[], ExchangeClient], messages: int, clients: int) -> float:
    """Submit ``messages`` from ``clients`` threads; returns the wall time of the first submission."""
    per = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    start = time.time()
    errors: list[str] = []

    def worker(n: int) -> None:
        with make_client() as api:
            for _ in range(n):
                r = api.request("POST", "/v1/messages", json=SUBMISSION)
                if r.status_code != 202:
                    errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} submissions failed, first: {errors[0]}")
    return start


def wait_delivered(db: Path, table: str, messages: int, timeout: float = 600) -> list[tuple[str, str]]:
    engine = sa.create_engine(f"sqlite:///{db}")
    deadline = time.monotonic() + timeout
    query = sa.text(f"select created_at, updated_at from {table} where status = 'delivered'")  # noqa: S608
    while True:
        with engine.connect() as conn:
            done = [(r[0], r[1]) for r in conn.execute(query)]
        if len(done) >= messages or time.monotonic() > deadline:
            engine.dispose()
            return done
        time.sleep(0.2)


def summarise(label: str, first_submit: float, done: list[tuple[str, str]]) -> dict[str, float]:
    lat = sorted(
        (dt.datetime.fromisoformat(u) - dt.datetime.fromisoformat(c)).total_seconds() * 1000 for c, u in done
    )
    last = max(dt.datetime.fromisoformat(u).timestamp() for _, u in done)
    rate = len(done) / (last - first_submit)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"{label:<34} {len(done):>6} msgs  {rate:>8.1f} msg/s  p50 {p50:>7.1f} ms  p99 {p99:>7.1f} ms")
    return {"rate": rate, "p50": p50, "p99": p99}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="exchange-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env["EXCHANGE_KEY_PASSPHRASE"] = secrets.token_urlsafe(24)
    polri = DemoNode(root, "ID", "Polri", "polri-cms", "RAHASIA", env)
    pdrm = DemoNode(root, "MY", "PDRM", "pdrm-d7", "RAHSIA", env)
    try:
        for node in (polri, pdrm):
            node.init()
        exchange_cli(
            "agreement",
            "compose",
            "--party",
            str(polri.dir / "party.toml"),
            "--party",
            str(pdrm.dir / "party.toml"),
            "--out",
            str(root / "agreement.toml"),
            env=env,
        )
        for node in (polri, pdrm):
            node.setup(root / "agreement.toml")
            (node.dir / "node.toml").write_text(
                (node.dir / "node.toml").read_text() + 'log_level = "warning"\n'
            )
        print(
            f"machine: {os.cpu_count()} cores; {args.messages} messages of ~3.3 KB payload; "
            f"{args.clients} client threads; SQLite WAL on both sides\n"
        )

        for node in (polri, pdrm):
            node.server.start()
        for node in (polri, pdrm):
            node.server.wait_ready()
        first = load(polri.client, args.messages, args.clients)
        secure = summarise(
            "exchange (sign+encrypt+ledger)",
            first,
            wait_delivered(polri.dir / "node.db", "messages", args.messages),
        )
        for node in (polri, pdrm):
            node.server.stop()

        ports = (free_port(), free_port())
        procs = []
        for (me, other), port, partner_port in (
            (((polri, pdrm)), ports[0], ports[1]),
            (((pdrm, polri)), ports[1], ports[0]),
        ):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).with_name("plain_forward.py")),
                        "serve",
                        "--db",
                        str(root / f"plain-{me.party}.db"),
                        "--port",
                        str(port),
                        "--partner",
                        f"https://127.0.0.1:{partner_port}",
                        "--node-dir",
                        str(me.dir),
                        "--partner-dir",
                        str(other.dir),
                        "--passphrase",
                        env["EXCHANGE_KEY_PASSPHRASE"],
                    ],
                    env=env,
                )
            )
        plain_url = f"https://127.0.0.1:{ports[0]}"

        def plain_client() -> ExchangeClient:
            return ExchangeClient(
                plain_url,
                ca_file=polri.dir / "tls" / "ca.pem",
                cert_file=polri.dir / "clients" / "polri-cms.pem",
                key_file=polri.dir / "clients" / "polri-cms-key.pem",
                key_password=env["EXCHANGE_KEY_PASSPHRASE"],
            )

        deadline = time.monotonic() + 30
        while True:
            try:
                with plain_client() as c:
                    c.request("GET", "/docs")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        first = load(plain_client, args.messages, args.clients)
        plain = summarise(
            "plain store-and-forward",
            first,
            wait_delivered(root / f"plain-{polri.party}.db", "plain_messages", args.messages),
        )
        for p in procs:
            p.terminate()
            p.wait(30)
        print(
            f"\nratio secure/plain: throughput {secure['rate'] / plain['rate']:.2f}x, "
            f"p50 latency {secure['p50'] / plain['p50']:.2f}x, "
            f"p99 latency {secure['p99'] / plain['p99']:.2f}x"
        )
    finally:
        for node in (polri, pdrm):
            node.server.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
