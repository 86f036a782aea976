"""RFC 6962 / RFC 9162 Merkle trees: hashes, proofs from stored subtrees, strict verifiers. Pure.

- ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``; the root of
  the empty tree is ``SHA-256("")``.
- A tree is read through :class:`SubtreeSource`: the hash of the *complete* subtree of ``2**level``
  leaves starting at leaf ``index * 2**level``. Those hashes never change once the subtree is full, so
  a log can store them as it appends; :func:`range_hash` composes any range the proofs need from
  O(log n) of them, and proofs therefore cost O(log n) reads.
- The verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2 exactly: positional hashing, and a proof that is
  one hash too long or too short fails. They return normally or raise :class:`ProofError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Protocol

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not verify, or was requested for positions outside the tree."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class SubtreeSource(Protocol):
    """Read access to the hashes of complete subtrees of a tree."""

    def subtree(self, level: int, index: int) -> bytes:
        """Hash of leaves ``[index * 2**level, (index + 1) * 2**level)``, a complete subtree."""
        ...


def range_hash(source: SubtreeSource, start: int, end: int) -> bytes:
    """MTH of leaves ``[start, end)``, for ranges that are nodes of an RFC 6962 tree (``start`` a
    multiple of a power of two at least ``end - start``), from O(log n) complete subtrees."""
    if not 0 <= start < end:
        raise ProofError(f"empty or negative range [{start}, {end})")
    parts: list[bytes] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length() - 1
        while start + (1 << level) > end:
            level -= 1
        parts.append(source.subtree(level, start >> level))
        start += 1 << level
    root = parts[-1]
    for part in reversed(parts[:-1]):
        root = node_hash(part, root)
    return root


def root_hash(source: SubtreeSource, size: int) -> bytes:
    """The root of the tree's first ``size`` leaves."""
    return EMPTY_ROOT if size == 0 else range_hash(source, 0, size)


def inclusion_proof(source: SubtreeSource, index: int, size: int) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(index, D[0:size]). Raises ProofError if ``index`` is not in the tree."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:  # walk down; siblings are collected top-down, returned bottom-up
        k = _split(hi - lo)
        if m < k:
            proof.append(range_hash(source, lo + k, hi))
            hi = lo + k
        else:
            proof.append(range_hash(source, lo, lo + k))
            lo, m = lo + k, m - k
    return proof[::-1]


def consistency_proof(source: SubtreeSource, old_size: int, new_size: int) -> list[bytes]:
    """RFC 6962 §2.1.2 PROOF(old_size, D[0:new_size]). Raises ProofError unless 0 < old <= new."""
    if not 0 < old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    proof: list[bytes] = []
    lo, hi, m, complete = 0, new_size, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(range_hash(source, lo + k, hi))
            hi = lo + k
        else:
            proof.append(range_hash(source, lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(range_hash(source, lo, hi))
    return proof[::-1]


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _check_hashes(proof: Sequence[bytes]) -> None:
    if any(len(p) != HASH_SIZE for p in proof):
        raise ProofError("a proof element is not a SHA-256 hash")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2: ``leaf`` (a leaf hash) is at ``index`` in the tree of ``size`` with ``root``.

    Raises:
        ProofError: the proof does not verify (wrong hash, order, position or length).
    """
    _check_hashes(proof)
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is too short")
    if not _eq(r, root):
        raise ProofError("the inclusion proof does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """RFC 9162 §2.1.4.2: the tree of ``old_size`` with ``old_root`` is a prefix of the tree of
    ``new_size`` with ``new_root``.

    Raises:
        ProofError: the proof does not verify, or the sizes are not 0 < old <= new.
    """
    _check_hashes(proof)
    if not 0 < old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if not _eq(old_root, new_root):
            raise ProofError("equal sizes with different roots: the log forked")
        return
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if not (_eq(fr, old_root) and _eq(sr, new_root)):
        raise ProofError("the consistency proof does not lead to both roots")


class MemoryTree:
    """A tree held in memory as complete-subtree hashes per level: the reference SubtreeSource, and
    the shape a SQL store takes (one row per complete subtree). Appending is amortised O(1)."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        self.reads = 0
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; returns the (level, index, hash) of every subtree it completed."""
        completed = [(0, self.size, leaf)]
        self.levels[0].append(leaf)
        level = 0
        while len(self.levels[level]) % 2 == 0:
            pair = self.levels[level][-2:]
            if len(self.levels) == level + 1:
                self.levels.append([])
            parent = node_hash(pair[0], pair[1])
            completed.append((level + 1, len(self.levels[level + 1]), parent))
            self.levels[level + 1].append(parent)
            level += 1
        return completed

    def subtree(self, level: int, index: int) -> bytes:
        self.reads += 1
        try:
            return self.levels[level][index]
        except IndexError as exc:
            raise ProofError(f"no complete subtree at level {level}, index {index}") from exc
