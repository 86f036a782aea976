"""Messages per second and submit-to-verified-receipt latency between two nodes on this machine,
and in the same run the same path as a plain store-and-forward (no signing, encryption or ledger).

    make bench            # or: .venv/bin/python bench/exchange_throughput.py --messages 2000 --clients 8
    .venv/bin/python bench/exchange_throughput.py --postgres postgresql://postgres@127.0.0.1:5432/test

Latency is measured from the sender's own records: the message's creation time (at submission)
to the time its receipt was verified (status delivered); throughput is messages over the time
from the first submission to the last delivery. Load comes from client threads in this process,
on the same 2 cores as both servers.

For the saturated phase, the CPU per message of each side is printed (user + system time from
``/proc``, threads included, over the phase): the sending and receiving processes, every
PostgreSQL process of the machine (with ``--postgres``; SQLite's work is inside the nodes), the
load generator (this process), and how busy the whole machine was.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import machine_speed
import sqlalchemy as sa

from exchange.client import ExchangeClient
from exchange.db.engine import normalise_url
from exchange.demo import free_port, set_up_pair

SUBMISSION = {
    "type": "REQUEST_FOR_INFORMATION",
    "case_ref": "ID-MY/2026/BENCH",
    "purposes": ["TIP_INVESTIGATION"],
    "classification": {"scheme": "POLRI", "level": "RAHASIA"},
    "tlp": "AMBER",
    "handling_codes": ["H0"],
    "legal_basis": ["Polri-PDRM police cooperation agreement"],
    "payload": {"summary": "benchmark " + "x" * 3000, "questions": ["q1", "q2", "q3"]},
}


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> Iterator[tuple[int, int, str, float]]:
    """(pid, parent pid, name, CPU seconds used: user + system, every thread) of each process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        yield (
            int(stat.parent.name),
            int(fields[1]),
            head.split("(", 1)[1],
            (int(fields[11]) + int(fields[12])) / CLOCK_TICK,
        )


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its running descendants (the workers of
    ``exchange serve --workers N``)."""
    table = list(_processes())
    children: dict[int, list[int]] = {}
    for child, parent, _, _ in table:
        children.setdefault(parent, []).append(child)
    used = {p: cpu for p, _, _, cpu in table}
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return sum(used.get(p, 0.0) for p in tree)


def postgres_cpu() -> float:
    """CPU seconds used so far by the PostgreSQL processes of this machine that are still running."""
    return sum(cpu for _, _, name, cpu in _processes() if name == "postgres")


def machine_cpu() -> tuple[float, float, float, float]:
    """(busy, in the kernel, stolen, total) CPU seconds of the whole machine so far, every core
    (kernel: system, irq and softirq time; stolen: time the hypervisor ran something else while
    this machine had work; both counted as busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    kernel = values[2] + values[5] + values[6]  # system, irq, softirq
    return (
        (sum(values) - idle) / CLOCK_TICK,
        kernel / CLOCK_TICK,
        values[7] / CLOCK_TICK,
        sum(values) / CLOCK_TICK,
    )


class CpuMeter:
    """CPU used by each side of one run: the two server processes, PostgreSQL, this process."""

    def __init__(self, sender: int, receiver: int, postgres: bool) -> None:
        self.pids = {"sender": sender, "receiver": receiver}
        self.postgres = postgres

    def snapshot(self) -> dict[str, float]:
        taken = {name: tree_cpu(pid) for name, pid in self.pids.items()}
        if self.postgres:
            taken["PostgreSQL"] = postgres_cpu()
        taken["load generator"] = time.process_time()
        taken["machine busy"], taken["machine kernel"], taken["machine stolen"], taken["machine"] = (
            machine_cpu()
        )
        return taken

    @staticmethod
    def report(before: dict[str, float], after: dict[str, float], messages: int) -> None:
        used = {name: after[name] - before[name] for name in before}
        sides = [n for n in used if not n.startswith("machine")]
        print(
            "  CPU per message: "
            + ", ".join(f"{name} {1000 * used[name] / messages:.2f} ms" for name in sides)
            + f"; the machine {100 * used['machine busy'] / used['machine']:.0f}% busy"
            f" ({100 * used['machine kernel'] / max(used['machine busy'], 1e-9):.0f}% of it in the kernel),"
            f" {100 * used['machine stolen'] / used['machine']:.0f}% stolen by the hypervisor"
            f" ({1000 * used['machine busy'] / messages:.2f} ms of CPU per message in all)"
        )


def load(make_client: Callable[[], ExchangeClient], messages: int, clients: int, rate: float = 0) -> float:
    """Submit ``messages`` from ``clients`` threads, as fast as possible (``rate`` 0: closed loop) or
    paced to ``rate`` messages per second overall (open loop: message i is due at i / rate, the
    threads taking turns, so arrivals are evenly spaced, not in bursts of ``clients``). Returns
    the time of the first one."""
    per = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    start = time.time()
    errors: list[str] = []

    def worker(first: int, n: int) -> None:
        with make_client() as api:
            for k in range(n):
                if rate:
                    time.sleep(max(0.0, start + (first + k * clients) / rate - time.time()))
                r = api.request("POST", "/v1/messages", json=SUBMISSION)
                if r.status_code != 202:
                    errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(per)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} submissions failed, first: {errors[0]}")
    return start


def wait_delivered(
    db: str, table: str, messages: int, after: float, timeout: float = 600
) -> list[tuple[str, str]]:
    """(created, delivered) times of the messages created after ``after``, once all are delivered
    (``db``: the sender's database URL)."""
    engine = sa.create_engine(db)
    deadline = time.monotonic() + timeout
    since = dt.datetime.fromtimestamp(after, dt.UTC).isoformat(timespec="microseconds")
    query = sa.text(
        f"select created_at, updated_at from {table} where status = 'delivered' and created_at >= :since"  # noqa: S608
    ).bindparams(since=since)
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
    print(f"{label:<50} {len(done):>6} msgs  {rate:>8.1f} msg/s  p50 {p50:>7.1f} ms  p99 {p99:>7.1f} ms")
    return {"rate": rate, "p50": p50, "p99": p99}


def phases(
    label: str,
    make_client: Callable[[], ExchangeClient],
    db: str,
    table: str,
    args: argparse.Namespace,
    meter: CpuMeter,
) -> dict[str, dict[str, float]]:
    """Saturation (closed loop, all clients flat out) with the CPU each side used, then latency at
    each paced offered rate."""
    before = meter.snapshot()
    first = load(make_client, args.messages, args.clients)
    accepted = args.messages / (time.time() - first)
    done = wait_delivered(db, table, args.messages, first)
    after = meter.snapshot()
    figures = {"max": summarise(f"{label}, saturated", first, done)}
    print(f"  submissions accepted at {accepted:.1f} msg/s (the API alone, delivery running meanwhile)")
    meter.report(before, after, len(done))
    for rate in args.rate:
        paced_n = max(50, int(rate * 15))
        first = load(make_client, paced_n, args.clients, rate=rate)
        figures[f"{rate:g}"] = summarise(
            f"{label}, offered {rate:g} msg/s", first, wait_delivered(db, table, paced_n, first)
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        help="an offered load for a latency phase (msg/s, evenly spaced); repeat for more (default 40, 200)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes per node (exchange serve --workers N; PostgreSQL only)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="run both nodes on PostgreSQL: two throwaway databases made through this admin URL",
    )
    args = parser.parse_args()
    args.rate = args.rate or [40.0, 200.0]
    if args.workers > 1 and not args.postgres:
        parser.error("--workers above 1 needs --postgres")
    root = Path(tempfile.mkdtemp(prefix="exchange-bench-"))
    with databases(args.postgres) as urls:
        run(root, (urls[0], urls[1]), (urls[2], urls[3]), args)


@contextmanager
def databases(admin_url: str | None) -> Iterator[tuple[str | None, ...]]:
    """Four Nones for SQLite, or four fresh PostgreSQL databases dropped afterwards (two nodes,
    then the two gateways of the plain store-and-forward)."""
    if admin_url is None:
        yield (None, None, None, None)
        return
    engine = sa.create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    names = [f"exchange_bench_{uuid.uuid4().hex[:10]}" for _ in range(4)]
    with engine.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        base = normalise_url(admin_url).rsplit("/", 1)[0]
        yield tuple(f"{base}/{name}" for name in names)
    finally:
        with engine.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def server_pid(node: Any) -> int:
    """The process id of a started demo node's server."""
    assert node.server.process is not None
    return int(node.server.process.pid)


def run(
    root: Path,
    urls: tuple[str | None, str | None],
    plain_urls: tuple[str | None, str | None],
    args: argparse.Namespace,
) -> None:
    polri, pdrm = set_up_pair(root, 'log_level = "warning"', database_urls=urls)
    env = polri.env
    try:
        print(
            f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
            f" {args.messages} messages of ~3.3 KB payload; {args.clients} client threads;"
            f" {args.workers} process(es) per node;"
            f" {'PostgreSQL' if urls[0] else 'SQLite WAL'} on both sides, the plain store-and-forward"
            " too"
        )
        print(machine_speed.describe() + "\n")

        for node in (polri, pdrm):
            node.server.args = ("--workers", str(args.workers))
            node.server.start()
        for node in (polri, pdrm):
            node.server.wait_ready()
        secure = phases(
            "exchange (sign+encrypt+ledger)",
            polri.client,
            urls[0] or f"sqlite:///{polri.dir / 'node.db'}",
            "messages",
            args,
            CpuMeter(server_pid(polri), server_pid(pdrm), postgres=urls[0] is not None),
        )
        for node in (polri, pdrm):
            node.server.stop()

        ports = (free_port(), free_port())
        procs = []
        plain_dbs = [
            url or str(root / f"plain-{n.party}.db") for url, n in zip(plain_urls, (polri, pdrm), strict=True)
        ]
        for (me, other), port, partner_port, plain_db in (
            (((polri, pdrm)), ports[0], ports[1], plain_dbs[0]),
            (((pdrm, polri)), ports[1], ports[0], plain_dbs[1]),
        ):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).with_name("plain_forward.py")),
                        "serve",
                        "--db",
                        plain_db,
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
                key_password=env["EXCHANGE_CLIENT_KEY_PASSPHRASE"],
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
        plain = phases(
            "plain store-and-forward",
            plain_client,
            plain_urls[0] or f"sqlite:///{plain_dbs[0]}",
            "plain_messages",
            args,
            CpuMeter(procs[0].pid, procs[1].pid, postgres=urls[0] is not None),
        )
        for p in procs:
            p.terminate()
            p.wait(30)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(machine_speed.describe("at the end"))
        ratio = secure["max"]["rate"] / plain["max"]["rate"]
        print(f"\nratio secure/plain: saturation throughput {ratio:.2f}x")
        for rate in args.rate:
            ours, theirs = secure[f"{rate:g}"], plain[f"{rate:g}"]
            print(
                f"  offered {rate:g} msg/s: p50 latency {ours['p50'] / theirs['p50']:.2f}x,"
                f" p99 latency {ours['p99'] / theirs['p99']:.2f}x"
            )
    finally:
        for node in (polri, pdrm):
            node.server.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
