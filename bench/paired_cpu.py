"""CPU per delivered message of two versions of the code, measured side by side: a paired A/B.

    git worktree add /tmp/base <commit>
    .venv/bin/python bench/paired_cpu.py --base /tmp/base --postgres postgresql://postgres@127.0.0.1:5432/test

This machine's speed drifts by more than most changes are worth: the same commit measured twice a
few minutes apart differs by 10-30% (other tenants of the host). Two runs one after the other
therefore compare the machine, not the code. Here both versions run at once, each as a pair of
nodes (sender and receiver, one process each) on its own databases, and each round loads both
pairs at the same time (``--clients`` threads each, ``--messages`` submissions, until all are
delivered): whatever the machine does to one, it does to the other. For each round the CPU
(user + system, from ``/proc``) of each sender and each receiver per delivered message is printed,
with the ratio of the new version to the base, and the median ratio over the rounds.

``--base`` and ``--new`` are the roots of two checkouts (``--new``: this one); each pair is set up
(``exchange init``, ``db upgrade``...) and served by its own checkout's ``exchange`` package
(``PYTHONPATH``; this script runs from ``/`` so that neither checkout is the working directory,
which Python would put first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exchange_throughput import databases, load, server_pid, tree_cpu, wait_delivered  # noqa: E402

from exchange.demo import DemoNode, set_up_pair  # noqa: E402

VERSIONS = ("base", "new")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="root of the checkout to compare against")
    parser.add_argument(
        "--new", type=Path, default=ROOT, help="root of the checkout measured (default: this one)"
    )
    parser.add_argument("--messages", type=int, default=300, help="submissions per pair per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8, help="client threads per pair")
    parser.add_argument(
        "--postgres", metavar="URL", help="run every node on PostgreSQL (throwaway databases)"
    )
    args = parser.parse_args()
    for tree in (args.base, args.new):
        if not (tree / "exchange" / "__init__.py").is_file():
            parser.error(f"{tree} is not a checkout of this project (no exchange/__init__.py)")
    os.chdir("/")
    root = Path(tempfile.mkdtemp(prefix="exchange-paired-"))
    with databases(args.postgres) as urls:
        pairs: dict[str, tuple[DemoNode, DemoNode, str]] = {}
        for i, (name, tree) in enumerate(zip(VERSIONS, (args.base, args.new), strict=True)):
            os.environ["PYTHONPATH"] = str(tree.resolve())  # its CLI (set-up, migrations) and servers
            sender, receiver = set_up_pair(
                root / name, 'log_level = "error"', database_urls=(urls[2 * i], urls[2 * i + 1])
            )
            pairs[name] = (sender, receiver, urls[2 * i] or f"sqlite:///{sender.dir / 'node.db'}")
        try:
            run(pairs, args)
        finally:
            for sender, receiver, _ in pairs.values():
                sender.server.stop()
                receiver.server.stop()


def run(pairs: dict[str, tuple[DemoNode, DemoNode, str]], args: argparse.Namespace) -> None:
    for sender, receiver, _ in pairs.values():
        sender.server.start()
        receiver.server.start()
    for sender, receiver, _ in pairs.values():
        sender.server.wait_ready()
        receiver.server.wait_ready()
    pids = {name: (server_pid(s), server_pid(r)) for name, (s, r, _) in pairs.items()}

    def deliver(name: str, messages: int) -> None:
        sender, _, db = pairs[name]
        first = load(sender.client, messages, args.clients)
        if len(wait_delivered(db, "messages", messages, first)) < messages:
            raise SystemExit(f"{name}: not every message was delivered")

    for name in pairs:  # warm both: connections, caches, the first checkpoint
        deliver(name, 100)
    used: dict[str, dict[str, list[float]]] = {name: {"sender": [], "receiver": []} for name in pairs}
    print(f"{args.rounds} rounds of {args.messages} messages per pair, both pairs loaded at once")
    for _ in range(args.rounds):
        before = {name: [tree_cpu(pid) for pid in pids[name]] for name in pairs}
        threads = [threading.Thread(target=deliver, args=(name, args.messages)) for name in pairs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in pairs:
            after = [tree_cpu(pid) for pid in pids[name]]
            for side, start, end in zip(("sender", "receiver"), before[name], after, strict=True):
                used[name][side].append(1000 * (end - start) / args.messages)
    for side in ("sender", "receiver"):
        for name in VERSIONS:
            figures = used[name][side]
            print(
                f"{side:<8} {name:<4} ms CPU/msg  "
                + " ".join(f"{x:5.2f}" for x in figures)
                + f"   median {statistics.median(figures):.3f}"
            )
        ratios = [n / b for n, b in zip(used["new"][side], used["base"][side], strict=True)]
        print(
            f"{side:<8} new/base        "
            + " ".join(f"{x:5.2f}" for x in ratios)
            + f"   median {statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
