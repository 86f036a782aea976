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

from exchange.crypto import constant_time_equal
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

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        root = self.nodes[-1][1]
        for _, h in reversed(self.nodes[:-1]):
            root = node_hash(h, root)
        return root

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


def verify_rows(
    rows: Iterable[Row], *, size: int, root: bytes, checkpoints: Mapping[int, bytes] | None = None
) -> int:
    """Recompute the Merkle tree from stored rows; check every column against its leaf, the recorded
    head, and the root at every checkpoint size. Returns the number of entries checked.

    Raises:
        LedgerIntegrityError: naming the first entry that is missing, out of place or altered, the
            first checkpoint whose root the ledger does not reproduce, or a truncated tail.
    """
    wanted = dict(checkpoints or {})
    sha256 = hashlib.sha256
    stack: list[bytes] = []  # the right frontier's hashes; merges follow the bits of the count

    def current_root() -> bytes:
        if not stack:
            return EMPTY_ROOT
        root = stack[-1]
        for h in reversed(stack[:-1]):
            root = sha256(b"\x01" + h + root).digest()
        return root

    expected = 0
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
        stack.append(computed)
        k = expected
        while k & 1:
            right = stack.pop()
            stack[-1] = sha256(b"\x01" + stack[-1] + right).digest()
            k >>= 1
        expected += 1
        if expected in wanted and not constant_time_equal(current_root(), wanted.pop(expected)):
            raise LedgerIntegrityError(
                f"the checkpoint at size {expected} does not match the ledger: an entry up to {expected - 1}"
                " was altered",
                seq=expected - 1,
            )
    if expected != size:
        raise LedgerIntegrityError(
            f"the ledger holds {expected} entries but its head records {size}: entry {expected} onwards is"
            " missing",
            seq=expected,
        )
    if wanted:
        raise LedgerIntegrityError(f"checkpoints at sizes {sorted(wanted)} lie beyond the ledger's end")
    if not constant_time_equal(current_root(), root):
        raise LedgerIntegrityError(
            "the ledger's entries do not reproduce its recorded root: a leaf was altered"
        )
    return expected


__all__ = ["Frontier", "Row", "leaf_hash", "rules_column", "verify_rows"]
