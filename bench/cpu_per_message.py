"""CPU time per message on each side of the exchange, in one process, and where it goes.

    .venv/bin/python bench/cpu_per_message.py                       # SQLite
    .venv/bin/python bench/cpu_per_message.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

Two Node objects share this process; the sender's DeliveryWorker hands its batches straight to the
receiver's ``Node.receive`` (no HTTP, no TLS). Three phases are timed with ``time.process_time``
(CPU, not wall clock, so a loaded machine changes the figures little):

- submit: the sender validates, decides, signs, encrypts, seals at rest, ledgers and commits;
- receive: the receiver opens, verifies, parses, decides, seals at rest, receipts and ledgers
  (timed inside ``Node.receive``, so the sender's claim is not counted);
- settle: the sender claims a batch, verifies the receipts and records them (the delivery
  round less the receiver's share).

Process CPU includes the group committer's thread (and SQLite's work, which runs in-process); on
PostgreSQL the server's CPU is not counted. With ``--profile`` each phase is also run under
cProfile and its top functions printed (by own time and by cumulative time). ``--postgres URL``
creates two throwaway databases through URL's server and drops them at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from tests.support import CLIENT_PASSPHRASE, PASSPHRASE, make_pair, rfi  # noqa: E402

BODY = rfi(payload={"summary": "benchmark " + "x" * 3000, "questions": ["q1", "q2", "q3"]})


@contextmanager
def databases(admin_url: str | None) -> Iterator[tuple[str | None, str | None]]:
    """(None, None) for SQLite, or two fresh PostgreSQL databases dropped afterwards."""
    if admin_url is None:
        yield (None, None)
        return
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    names = [f"exchange_bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with engine.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        base = admin_url.rsplit("/", 1)[0]
        yield (f"{base}/{names[0]}", f"{base}/{names[1]}")
    finally:
        with engine.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


class Timed:
    """Accumulates the CPU time spent inside a wrapped callable (optionally under a profiler)."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.profile: cProfile.Profile | None = None

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            if self.profile is not None:
                self.profile.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.profile is not None:
                    self.profile.disable()
                self.cpu += time.process_time() - t0

        return timed


def top(profile: cProfile.Profile, n: int, messages: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"  (profiled CPU time {1000 * total / messages:.2f} ms/msg)", file=out)
    for key in ("tottime", "cumulative"):
        print(f"  -- by {key}", file=out)
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2 if key == "tottime" else 3], reverse=True)  # type: ignore[attr-defined]
        for (file, line, name), (_cc, calls, tt, ct, _callers) in rows[:n]:
            where = f"{Path(file).name}:{line}({name})" if line else name
            share = (tt if key == "tottime" else ct) / total if total else 0
            print(
                f"  {1000 * (tt if key == 'tottime' else ct) / messages:7.3f} ms {100 * share:5.1f}%"
                f"  {calls / messages:6.1f}/msg  {where}",
                file=out,
            )
    return out.getvalue()


def inline_commit(node: Any, unit: Any, appends_only: bool = False) -> None:
    """Run one unit the way the group committer does, in this thread, raising its error."""
    from concurrent.futures import Future

    future: Future[None] = Future()
    node.committer._commit([(unit, future, appends_only)])
    future.result()


def run(
    urls: tuple[str | None, str | None], messages: int, batch: int, profile: bool, n_top: int, repeat: int
) -> None:
    os.environ["EXCHANGE_KEY_PASSPHRASE"] = PASSPHRASE
    os.environ["EXCHANGE_CLIENT_KEY_PASSPHRASE"] = CLIENT_PASSPHRASE
    os.environ["EXCHANGE_DELIVERY_BATCH_SIZE"] = str(batch)
    from exchange import crypto
    from exchange.config import load_settings
    from exchange.messages import MessageSubmission
    from exchange.node import Node, PeerResult
    from exchange.transport.worker import DeliveryWorker

    root = Path(tempfile.mkdtemp(prefix="cpu-bench-"))
    id_dir, my_dir = make_pair(root, urls)
    sender, receiver = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    fingerprint = crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint
    who = sender.actor_for(fingerprint)
    assert who is not None

    submit_t, receive_t, round_t = Timed(), Timed(), Timed()

    class Direct:
        """A PeerTransport handing batches to the receiver in this process."""

        def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
            return receive(envelopes, dt.datetime.now(dt.UTC))  # type: ignore[no-any-return]

        def announce_keys(self, announcements: Sequence[str]) -> str:
            return receiver.accept_key_sets(announcements, dt.datetime.now(dt.UTC))

    receive = receive_t.wrap(receiver.receive)
    worker = DeliveryWorker(sender, Direct())  # type: ignore[arg-type]
    submit = submit_t.wrap(sender.submit)
    deliver = round_t.wrap(worker.run_once)

    def one_pass(n: int) -> None:
        for _ in range(n):
            submit(who, MessageSubmission.model_validate(BODY), dt.datetime.now(dt.UTC))
        while deliver():
            pass

    one_pass(20)  # warm: caches, prepared statements, the key-set announcement
    if profile:  # cProfile sees one thread: commit in the caller's thread, as the committer would
        sender.committer.run = lambda unit, **kw: inline_commit(sender, unit, **kw)  # type: ignore[method-assign]
        receiver.committer.run = lambda unit, **kw: inline_commit(receiver, unit, **kw)  # type: ignore[method-assign]
        submit_t.profile = cProfile.Profile(time.process_time)
        round_t.profile = cProfile.Profile(time.process_time)  # the receiver's share shows as Node.receive
    statements = {"sender": 0, "receiver": 0}

    def count(side: str) -> Callable[..., None]:
        def counted(*_args: Any) -> None:
            statements[side] += 1

        return counted

    for side, node in (("sender", sender), ("receiver", receiver)):
        for engine in {node.db.engine, node.db.reader}:
            sa.event.listen(engine, "before_cursor_execute", count(side))
    figures: list[tuple[float, float, float]] = []
    for _ in range(repeat):
        for t in (submit_t, receive_t, round_t):
            t.cpu = 0.0
        one_pass(messages)
        figures.append((submit_t.cpu, receive_t.cpu, round_t.cpu - receive_t.cpu))
    with sender.db.read() as conn:
        delivered = conn.execute(sa.text("select count(*) from messages where status = 'delivered'")).scalar()
    db = "PostgreSQL" if urls[0] else "SQLite"
    print(
        f"{db}, {repeat} x {messages} messages of {len(str(BODY))} B, delivery batches of {batch};"
        f" delivered {delivered}; the lowest of the {repeat} runs (then every run)"
    )
    best = [min(f[i] for f in figures) for i in range(3)]
    names = ("submit   (sender)  ", "receive  (receiver)", "settle   (sender)  ")
    for i, name in enumerate(names):
        runs = " ".join(f"{1000 * f[i] / messages:.2f}" for f in figures)
        print(f"{name} {1000 * best[i] / messages:6.2f} ms CPU/msg   [{runs}]")
    total = sum(best)
    print(
        f"total               {1000 * total / messages:6.2f} ms CPU/msg"
        f" ({messages / total:.0f} msg/s per core)"
    )
    print(
        "database statements per message (an executemany counts once): "
        + ", ".join(f"{side} {n / (messages * repeat):.1f}" for side, n in statements.items())
    )
    if profile:
        for name, t in (
            ("submit", submit_t),
            ("delivery round (settle, and receive as Node.receive)", round_t),
        ):
            assert t.profile is not None
            print(f"\n== {name}")
            print(top(t.profile, n_top, messages * repeat), end="")
    sender.close()
    receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="delivery batch size")
    parser.add_argument("--postgres", metavar="URL", help="an admin URL; two throwaway databases are made")
    parser.add_argument("--profile", action="store_true", help="print the top functions of each phase")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3, help="runs of --messages; the lowest is reported")
    args = parser.parse_args()
    with databases(args.postgres) as urls:
        run(urls, args.messages, args.batch, args.profile, args.top, args.repeat)


if __name__ == "__main__":
    main()
