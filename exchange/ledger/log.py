"""The ledger as an RFC 6962 Merkle log: appending (the right frontier) and verifying a whole log.

The tree's leaves are the entries' canonical leaves in sequence order (leaf index = seq). Appending
keeps only the right frontier (the complete subtrees of the greedy decomposition of the size, at
most log2(n) hashes) and reports every complete subtree it finishes, which the store keeps for
proofs. :func:`verify_rows` recomputes everything from the stored leaves. Pure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from hmac import compare_digest

import orjson

from exchange.errors import LedgerIntegrityError
from exchange.ledger.merkle import EMPTY_ROOT, leaf_hash, node_hash


@dataclass
class Frontier:
    """The right edge of a tree: ``(level, hash)`` of its maximal complete subtrees, left to right."""

    size: int
    nodes: list[tuple[int, bytes]]

    @classmethod
    def empty(cls) -> Frontier:
        return cls(0, [])

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; returns ``(level, index, hash)`` of every complete subtree it finishes."""
        position = self.size
        done = [(0, position, leaf)]
        self.nodes.append((0, leaf))
        while len(self.nodes) >= 2 and self.nodes[-1][0] == self.nodes[-2][0]:
            (level, right), (_, left) = self.nodes.pop(), self.nodes.pop()
            parent = (level + 1, node_hash(left, right))
            self.nodes.append(parent)
            done.append((level + 1, position >> (level + 1), parent[1]))
        self.size += 1
        return done

    def root(self, right: bytes | None = None) -> bytes:
        """The root of the tree; with ``right``, of the tree followed by that (smaller) subtree."""
        return _fold([h for _, h in self.nodes], right)

    def to_json(self) -> str:
        return json.dumps([[level, h.hex()] for level, h in self.nodes])

    @classmethod
    def from_json(cls, size: int, text: str) -> Frontier:
        nodes = [(int(level), bytes.fromhex(h)) for level, h in json.loads(text)]
        if sum(1 << level for level, _ in nodes) != size:
            raise LedgerIntegrityError("the ledger head's frontier does not match its size")
        return cls(size, nodes)


#: A stored row as the verifier reads it: the index columns, the leaf, and the stored leaf hash.
Row = tuple[int, str, str, str | None, str | None, str | None, str | None, str, str, bytes | None]


def rules_column(rules: Sequence[str]) -> str:
    """How rule ids are stored for searching: space-separated, with a space at both ends."""
    return " " + " ".join(rules) + " " if rules else ""


def _fold(nodes: Sequence[bytes], right: bytes | None) -> bytes:
    """Right-fold hashes of consecutive aligned subtrees (left to right) into one root."""
    if right is None:
        if not nodes:
            return EMPTY_ROOT
        right, nodes = nodes[-1], nodes[:-1]
    for h in reversed(nodes):
        right = hashlib.sha256(b"\x01" + h + right).digest()
    return right


def verify_range(
    rows: Iterable[Row], *, start: int, stop: int, marks: Iterable[int] = ()
) -> tuple[bytes, dict[int, bytes]]:
    """Check the entries ``[start, stop)`` (``start`` a multiple of a power of two >= the range):
    each is present in order, its columns agree with its leaf and its leaf with its stored hash.

    Returns the range's Merkle hash and, for each mark ``m`` in ``(start, stop]``, the hash of
    ``[start, m)``: enough to rebuild the root at any checkpoint size from the parts.

    Raises:
        LedgerIntegrityError: naming the first entry that is missing, out of place or altered.
    """
    wanted = {m for m in marks if start < m <= stop}
    partial: dict[int, bytes] = {}
    sha256 = hashlib.sha256
    stack: list[bytes] = []
    expected = start
    for seq, at, event, message_id, case_ref, actor, decision, rules, leaf, stored_hash in rows:
        if seq != expected:
            raise LedgerIntegrityError(
                f"entry {expected} is missing (found entry {seq} in its place)", seq=expected
            )
        raw = leaf.encode()
        try:
            doc = orjson.loads(raw)
            same = (
                doc["seq"] == seq
                and doc["at"] == at
                and doc["event"] == event
                and doc["message_id"] == message_id
                and doc["case_ref"] == case_ref
                and doc["actor"] == actor
                and doc["decision"] == decision
                and rules_column(doc["rules"]) == rules
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            same = False
        if not same:
            raise LedgerIntegrityError(f"entry {seq} was altered (its columns disagree with its leaf)", seq)
        computed = sha256(b"\x00" + raw).digest()
        if stored_hash is None or not compare_digest(computed, stored_hash):
            raise LedgerIntegrityError(
                f"entry {seq} was altered (its leaf does not match its stored hash)", seq
            )
        stack.append(computed)  # Frontier.append, inlined: this loop runs a million times
        k = expected - start
        while k & 1:
            right = stack.pop()
            stack[-1] = sha256(b"\x01" + stack[-1] + right).digest()
            k >>= 1
        expected += 1
        if expected in wanted:
            partial[expected] = _fold(stack, None)
    if expected != stop:
        raise LedgerIntegrityError(
            f"the ledger ends at entry {expected - 1} but its head records {stop} entries: entry {expected}"
            " onwards is missing",
            seq=expected,
        )
    return _fold(stack, None), partial


def combine_ranges(
    parts: Sequence[tuple[int, int, bytes, Mapping[int, bytes]]],
    *,
    size: int,
    root: bytes,
    checkpoints: Mapping[int, bytes] | None = None,
) -> None:
    """Rebuild the root and every checkpoint root from consecutive verified ranges
    ``(start, stop, hash, partials)`` of equal power-of-two length (the last may be shorter).

    Raises:
        LedgerIntegrityError: a checkpoint or the head's root is not what the entries give.
    """
    frontier = Frontier.empty()  # over whole chunks: they merge exactly as leaves do
    marks = dict(checkpoints or {})
    last: bytes | None = None
    for start, stop, digest, partials in parts:
        for size_at, partial in sorted(partials.items()):
            if size_at in marks:
                got = frontier.root(partial)
                if not compare_digest(got, marks.pop(size_at)):
                    raise LedgerIntegrityError(
                        f"the checkpoint at size {size_at} does not match the ledger: an entry up to"
                        f" {size_at - 1} was altered",
                        seq=size_at - 1,
                    )
        if stop - start == parts[0][1] - parts[0][0]:
            frontier.append(digest)
        else:
            last = digest
    if marks:
        raise LedgerIntegrityError(f"checkpoints at sizes {sorted(marks)} lie beyond the ledger's end")
    if not compare_digest(frontier.root(last), root):
        raise LedgerIntegrityError(
            "the ledger's entries do not reproduce its recorded root: a leaf was altered"
        )


def verify_rows(
    rows: Iterable[Row], *, size: int, root: bytes, checkpoints: Mapping[int, bytes] | None = None
) -> int:
    """Recompute the Merkle tree from stored rows in one pass; check every column against its leaf,
    the recorded head, and the root at every checkpoint size. Returns the number of entries checked.

    Raises:
        LedgerIntegrityError: naming the first entry that is missing, out of place or altered, the
            first checkpoint whose root the ledger does not reproduce, or a truncated tail.
    """
    if size == 0:
        for row in rows:
            raise LedgerIntegrityError(f"entry {row[0]} lies beyond the ledger's recorded end", seq=row[0])
        combine_ranges([], size=0, root=root, checkpoints=checkpoints)
        return 0
    digest, partial = verify_range(rows, start=0, stop=size, marks=(checkpoints or {}).keys())
    combine_ranges([(0, size, digest, partial)], size=size, root=root, checkpoints=checkpoints)
    return size


__all__ = ["Frontier", "Row", "combine_ranges", "leaf_hash", "rules_column", "verify_range", "verify_rows"]
