"""Merkle core at one million entries: build, verify from scratch, proof sizes and generation times.

    .venv/bin/python bench/merkle_proofs.py [--entries 1000000]

Figures are for the pure core over complete-subtree hashes held in memory (the shape of the SQL
subtree table); "reads" counts subtree lookups, which a SQL store turns into indexed row reads.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from exchange.ledger.merkle import (
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)


def root_from_leaf_hashes(leaves: list[bytes]) -> bytes:
    """Recompute a root from leaf hashes with a stack: what an auditor does from scratch."""
    stack: list[tuple[int, bytes]] = []
    for h in leaves:
        size, node = 1, h
        while stack and stack[-1][0] == size:
            left = stack.pop()[1]
            node, size = node_hash(left, node), size * 2
        stack.append((size, node))
    root = stack.pop()[1]
    while stack:
        root = node_hash(stack.pop()[1], root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=2000)
    args = parser.parse_args()
    n = args.entries
    data = [i.to_bytes(8, "big") * 8 for i in range(n)]  # 64-byte leaves

    t = time.perf_counter()
    hashes = [leaf_hash(d) for d in data]
    t_leaves = time.perf_counter() - t
    t = time.perf_counter()
    root = root_from_leaf_hashes(hashes)
    t_root = time.perf_counter() - t
    print(
        f"verify {n:,} entries from scratch: leaf hashes {t_leaves:.2f} s + tree {t_root:.2f} s "
        f"= {t_leaves + t_root:.2f} s (excluding reading and encoding rows)"
    )

    t = time.perf_counter()
    tree = MemoryTree(hashes)
    print(f"append {n:,} leaves to the subtree store: {time.perf_counter() - t:.2f} s")
    assert root_hash(tree, n) == root

    rng = random.Random(1)
    inc_times, inc_reads, inc_sizes = [], [], []
    for _ in range(args.proofs):
        i = rng.randrange(n)
        tree.reads = 0
        t = time.perf_counter()
        proof = inclusion_proof(tree, i, n)
        inc_times.append(time.perf_counter() - t)
        inc_reads.append(tree.reads)
        inc_sizes.append(len(proof))
        verify_inclusion(hashes[i], i, n, proof, root)
    con_times, con_reads, con_sizes = [], [], []
    for _ in range(args.proofs):
        m = rng.randint(1, n)
        tree.reads = 0
        t = time.perf_counter()
        proof = consistency_proof(tree, m, n)
        con_times.append(time.perf_counter() - t)
        con_reads.append(tree.reads)
        con_sizes.append(len(proof))
        if _ < 20:
            verify_consistency(m, n, proof, root_hash(tree, m), root)

    def report(label: str, times: list[float], reads: list[int], sizes: list[int]) -> None:
        times_us = sorted(x * 1e6 for x in times)
        print(
            f"{label:<22} {max(sizes):>3} hashes ({max(sizes) * 32} bytes) max; reads {max(reads)} max; "
            f"time p50 {statistics.median(times_us):.0f} us, p99 {times_us[int(len(times_us) * 0.99)]:.0f} us"
        )

    report("inclusion proof", inc_times, inc_reads, inc_sizes)
    report("consistency proof", con_times, con_reads, con_sizes)


if __name__ == "__main__":
    main()
