"""The Merkle core against the RFC 6962 reference vectors, exhaustively to size 64, and the attacks:
every single-bit change, a missing or extra hash, a wrong position."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.ledger.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# Certificate Transparency reference test data (RFC 6962 reference implementation, merkle_tree_test).
LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = {
    (0, 1): [],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
REFERENCE = MemoryTree(leaf_hash(d) for d in LEAVES)


def naive_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 §2.1, independent of the subtree store."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


def test_roots_match_the_reference_vectors() -> None:
    assert (
        root_hash(REFERENCE, 0)
        == EMPTY_ROOT
        == bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    )
    assert [root_hash(REFERENCE, n).hex() for n in range(1, 9)] == ROOTS


@pytest.mark.parametrize(("index", "size"), list(INCLUSION))
def test_inclusion_proofs_match_the_reference_vectors(index: int, size: int) -> None:
    proof = inclusion_proof(REFERENCE, index, size)
    assert [p.hex() for p in proof] == INCLUSION[(index, size)]
    verify_inclusion(leaf_hash(LEAVES[index]), index, size, proof, bytes.fromhex(ROOTS[size - 1]))


@pytest.mark.parametrize(("old", "new"), list(CONSISTENCY))
def test_consistency_proofs_match_the_reference_vectors(old: int, new: int) -> None:
    proof = consistency_proof(REFERENCE, old, new)
    assert [p.hex() for p in proof] == CONSISTENCY[(old, new)]
    verify_consistency(old, new, proof, bytes.fromhex(ROOTS[old - 1]), bytes.fromhex(ROOTS[new - 1]))


TREE64 = MemoryTree(leaf_hash(i.to_bytes(4, "big")) for i in range(64))
ROOT64 = [root_hash(TREE64, n) for n in range(65)]


def flips(proof: list[bytes]) -> list[list[bytes]]:
    """Every single-bit change of a proof."""
    out = []
    for i, element in enumerate(proof):
        for bit in range(256):
            changed = bytearray(element)
            changed[bit // 8] ^= 1 << (bit % 8)
            out.append([*proof[:i], bytes(changed), *proof[i + 1 :]])
    return out


def test_every_inclusion_proof_to_size_64_verifies_and_every_bit_flip_fails() -> None:
    for size in range(1, 65):
        for index in range(size):
            leaf = leaf_hash(index.to_bytes(4, "big"))
            proof = inclusion_proof(TREE64, index, size)
            verify_inclusion(leaf, index, size, proof, ROOT64[size])
            for bad in flips(proof):
                with pytest.raises(ProofError):
                    verify_inclusion(leaf, index, size, bad, ROOT64[size])


def test_every_consistency_proof_to_size_64_verifies_and_every_bit_flip_fails() -> None:
    for new in range(1, 65):
        for old in range(1, new + 1):
            proof = consistency_proof(TREE64, old, new)
            verify_consistency(old, new, proof, ROOT64[old], ROOT64[new])
            for bad in flips(proof):
                with pytest.raises(ProofError):
                    verify_consistency(old, new, bad, ROOT64[old], ROOT64[new])


@pytest.mark.parametrize(("index", "size"), [(0, 1), (3, 7), (5, 8), (0, 64), (63, 64), (31, 33)])
def test_inclusion_proof_with_a_hash_too_many_or_too_few_or_a_wrong_position_fails(
    index: int, size: int
) -> None:
    leaf = leaf_hash(index.to_bytes(4, "big"))
    proof = inclusion_proof(TREE64, index, size)
    for bad_proof in ([*proof, ROOT64[1]], proof[:-1] if proof else [ROOT64[1]], [ROOT64[size], *proof]):
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, bad_proof, ROOT64[size])
    # (A proof and a root do not pin the tree size on their own; the signed checkpoint binds size and root.)
    for bad_index, bad_size in ((index + 1, size), (size, size), (-1, size)):
        with pytest.raises(ProofError):
            verify_inclusion(leaf, bad_index, bad_size, proof, ROOT64[size])


def test_an_interior_node_cannot_pass_as_a_leaf() -> None:
    """Second preimage by level confusion: the two child hashes of a size-2 tree, offered as the data
    of a single leaf, do not reproduce its root, because leaves and nodes are hashed apart."""
    h0, h1 = leaf_hash(b"a"), leaf_hash(b"b")
    root = node_hash(h0, h1)
    with pytest.raises(ProofError):
        verify_inclusion(leaf_hash(h0 + h1), 0, 1, [], root)


@pytest.mark.parametrize(("old", "new"), [(1, 2), (3, 7), (4, 8), (6, 8), (32, 64), (33, 64)])
def test_consistency_proof_with_a_hash_too_many_or_too_few_or_wrong_sizes_fails(old: int, new: int) -> None:
    proof = consistency_proof(TREE64, old, new)
    for bad_proof in ([*proof, ROOT64[1]], proof[:-1], [ROOT64[old], *proof]):
        with pytest.raises(ProofError):
            verify_consistency(old, new, bad_proof, ROOT64[old], ROOT64[new])
    for bad_old, bad_new in ((0, new), (new, old), (old, old)):
        with pytest.raises(ProofError):
            verify_consistency(bad_old, bad_new, proof, ROOT64[old], ROOT64[new])


def test_a_forked_log_fails_consistency() -> None:
    forked = MemoryTree(leaf_hash(i.to_bytes(4, "big")) for i in range(40))
    forked.append(leaf_hash(b"rewritten history"))
    for i in range(41, 64):
        forked.append(leaf_hash(i.to_bytes(4, "big")))
    proof = consistency_proof(forked, 32, 64)
    with pytest.raises(ProofError):
        verify_consistency(32, 64, proof, ROOT64[32], ROOT64[64])  # the honest new root
    with pytest.raises(ProofError):
        verify_consistency(40, 40, [], ROOT64[40], root_hash(forked, 41))  # equal size, other root


@given(st.lists(st.binary(max_size=16), min_size=1, max_size=200), st.data())
def test_property_subtree_store_agrees_with_the_rfc_definition(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MemoryTree(leaf_hash(d) for d in leaves)
    n = len(leaves)
    size = data.draw(st.integers(1, n))
    assert root_hash(tree, size) == naive_root(leaves[:size])
    index = data.draw(st.integers(0, size - 1))
    verify_inclusion(
        leaf_hash(leaves[index]), index, size, inclusion_proof(tree, index, size), naive_root(leaves[:size])
    )
    old = data.draw(st.integers(1, size))
    verify_consistency(
        old, size, consistency_proof(tree, old, size), naive_root(leaves[:old]), naive_root(leaves[:size])
    )


def test_proofs_read_a_logarithmic_number_of_subtrees() -> None:
    tree = MemoryTree(leaf_hash(i.to_bytes(4, "big")) for i in range(100_003))
    rng = random.Random(7)
    for _ in range(50):
        size = rng.randint(2, tree.size)
        tree.reads = 0
        inclusion_proof(tree, rng.randrange(size), size)
        assert tree.reads <= 2 * size.bit_length()
        tree.reads = 0
        consistency_proof(tree, rng.randint(1, size), size)
        assert tree.reads <= 2 * size.bit_length()
