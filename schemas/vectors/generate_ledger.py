"""Regenerate ledger-v1.json: leaves, a tree, inclusion and consistency proofs, checkpoints and a
cosignature, made by exchange's own code from fixed TEST-ONLY keys (so the output is reproducible).

    .venv/bin/python schemas/vectors/generate_ledger.py

The two keys are derived from public strings: they are published test vectors, never used by a node.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from exchange import crypto
from exchange.ledger import EntryDraft, leaf_bytes
from exchange.ledger.checkpoint import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    NoteVerifier,
    checkpoint_with,
    cosign,
    sign_checkpoint,
    verify_checkpoint,
)
from exchange.ledger.merkle import MemoryTree, consistency_proof, inclusion_proof, leaf_hash, root_hash

OUT = Path(__file__).with_name("ledger-v1.json")
ORIGIN = "TEST-node/ledger"
WITNESS = "TEST-witness.example/w1"
TIMESTAMP = 1_795_000_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_key(label: str) -> tuple[Any, str]:
    """A TEST-ONLY Ed25519 key from a public label, and its seed in hex."""
    seed = hashlib.sha256(f"exchange TEST-ONLY vector key: {label}".encode()).digest()
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    return crypto.private_jwk(pem, f"TEST-{label}"), seed.hex()


def build() -> dict[str, Any]:
    log_key, log_seed = test_key("log")
    witness_key, witness_seed = test_key("witness")
    drafts = [
        EntryDraft("message.submitted", "00000000-0000-4000-8000-00000000c0de", "ID-MY/2026/TEST", "polri-cms",
                   "allow", ("R-TYPE-KNOWN", "R-PURPOSE-TYPE"), {"type": "REQUEST_FOR_INFORMATION", "level": "S"}),
        EntryDraft("message.sent", "00000000-0000-4000-8000-00000000c0de", data={"attempts": 1}),
        EntryDraft("receipt.verified", "00000000-0000-4000-8000-00000000c0de", actor="MY",
                   data={"receipt_sha256": "0" * 64}),
        EntryDraft("envelope.rejected", actor="MY", decision="deny",
                   data={"envelope_sha256": "1" * 64, "reason": "bad-signature"}),
        EntryDraft("message.released", "00000000-0000-4000-8000-00000000beef", "ID-MY/2026/TEST",
                   "pdrm-d7", "allow", ("R-CLEARANCE-RELEASE",), {"redacted": [], "level": "C"}),
        EntryDraft("checkpoint.incident", actor="MY", decision="deny",
                   data={"origin": "MY-node/ledger", "size": 4, "reason": "fork", "note_sha256": "2" * 64}),
        EntryDraft("submission.refused", case_ref="ID-MY/2026/TEST", actor="polri-cms", decision="deny",
                   rules=("R-CLASSIFICATION-FLOOR",), data={"type": "RESPONSE", "agreement": "2026.1"}),
    ]
    at = "2026-11-23T08:00:00.000000+00:00"
    leaves = [leaf_bytes(i, at, d) for i, d in enumerate(drafts)]
    tree = MemoryTree(leaf_hash(x) for x in leaves)
    size = len(leaves)
    root = root_hash(tree, size)
    note = sign_checkpoint(ORIGIN, size, root, log_key)
    checkpoint = verify_checkpoint(note, origin=ORIGIN, key=log_key)
    line = cosign(checkpoint, witness=WITNESS, key=witness_key, timestamp=TIMESTAMP)
    extended = sign_checkpoint(ORIGIN, size, root, log_key, extensions=("TEST extension line",))
    extended_cp = verify_checkpoint(extended, origin=ORIGIN, key=log_key)
    extended_line = cosign(extended_cp, witness=WITNESS, key=witness_key, timestamp=TIMESTAMP)
    return {
        "description": (
            "TEST-ONLY ledger vectors (schemas/ledger.md): leaves are RFC 8785 JSON (ledger-leaf.schema.json),"
            " leaf hash SHA-256(0x00 || leaf), RFC 9162 tree, proofs and roots in standard base64; a C2SP"
            " checkpoint signed by the log key and cosigned (cosignature/v1) by the witness key. The private"
            " seeds are published test vectors: never use them."
        ),
        "keys": {
            "log": {
                "name": ORIGIN,
                "vkey": NoteVerifier.of(ORIGIN, log_key, SIG_ED25519).vkey,
                "TEST_ONLY_ed25519_seed_hex": log_seed,
            },
            "witness": {
                "name": WITNESS,
                "vkey": NoteVerifier.of(WITNESS, witness_key, SIG_COSIGNATURE_V1).vkey,
                "TEST_ONLY_ed25519_seed_hex": witness_seed,
            },
        },
        "leaves": [x.decode() for x in leaves],
        "leaf_hashes": [b64(leaf_hash(x)) for x in leaves],
        "tree_size": size,
        "root": b64(root),
        "roots": {str(n): b64(root_hash(tree, n)) for n in range(1, size + 1)},
        "inclusion": [
            {"index": i, "size": n, "proof": [b64(h) for h in inclusion_proof(tree, i, n)]}
            for i, n in ((0, 1), (0, 7), (3, 7), (6, 7), (4, 6), (5, 6))
        ],
        "consistency": [
            {"old_size": m, "new_size": n, "proof": [b64(h) for h in consistency_proof(tree, m, n)]}
            for m, n in ((1, 7), (3, 7), (4, 7), (6, 7), (2, 5), (7, 7))
        ],
        "checkpoint": note,
        "cosignature": {"timestamp": TIMESTAMP, "line": line, "cosigned_checkpoint": checkpoint_with(note, [line])},
        "checkpoint_with_extension": {
            "note": extended,
            "cosignature": extended_line,
            "cosigned_checkpoint": checkpoint_with(extended, [extended_line]),
        },
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
