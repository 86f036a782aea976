"""The published ledger vectors (schemas/vectors/ledger-v1.json) and the Go reference note, checked
by exchange's code and by the independent implementation in tests/independent (which shares no code
with exchange)."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jsonschema import Draft202012Validator

from exchange import crypto
from exchange.ledger.checkpoint import (
    SIG_ED25519,
    CheckpointError,
    NoteSignature,
    NoteVerifier,
    key_id,
    open_checkpoint,
    open_note,
    verify_cosignatures,
)
from tests.independent import tlog

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
VECTORS = json.loads((SCHEMAS / "vectors" / "ledger-v1.json").read_text())
LEAVES = [leaf.encode() for leaf in VECTORS["leaves"]]

# golang.org/x/mod/sumdb/note: the package documentation's example key and note.
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
GO_SIG = (
    "\u2014 PeterNeumann"
    " x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
GO_NOTE = GO_TEXT + "\n" + GO_SIG + "\n"


def unb64(items: list[str]) -> list[bytes]:
    return [base64.b64decode(x) for x in items]


def test_exchange_reproduces_the_published_vectors_byte_for_byte() -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_ledger", SCHEMAS / "vectors" / "generate_ledger.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == VECTORS


def test_leaves_follow_the_published_schema_and_are_their_own_canonical_form() -> None:
    schema = json.loads((SCHEMAS / "ledger-leaf.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for seq, leaf in enumerate(LEAVES):
        doc = json.loads(leaf)
        validator.validate(doc)
        assert doc["seq"] == seq
        # for these values (no floats, BMP keys) RFC 8785 is sorted compact UTF-8 JSON
        assert json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == leaf


def test_independent_merkle_tree_gives_the_same_hashes_roots_and_proofs() -> None:
    assert unb64(VECTORS["leaf_hashes"]) == [tlog.sha256(b"\x00" + x) for x in LEAVES]
    assert base64.b64decode(VECTORS["root"]) == tlog.mth(LEAVES)
    for n, root in VECTORS["roots"].items():
        assert base64.b64decode(root) == tlog.mth(LEAVES[: int(n)])
    for case in VECTORS["inclusion"]:
        i, n, proof = case["index"], case["size"], unb64(case["proof"])
        assert proof == tlog.path(i, LEAVES[:n])  # RFC 6962 PATH, recursive
        tlog.check_inclusion(LEAVES[i], i, n, proof, tlog.mth(LEAVES[:n]))  # RFC 9162 verifier
        with pytest.raises(tlog.Invalid):
            tlog.check_inclusion(LEAVES[i] + b" ", i, n, proof, tlog.mth(LEAVES[:n]))
    for case in VECTORS["consistency"]:
        m, n, proof = case["old_size"], case["new_size"], unb64(case["proof"])
        assert proof == (tlog.proof(m, LEAVES[:n]) if m < n else [])  # RFC 6962 PROOF, recursive
        tlog.check_consistency(m, n, proof, tlog.mth(LEAVES[:m]), tlog.mth(LEAVES[:n]))


def test_independent_note_code_opens_the_checkpoint_and_its_cosignatures() -> None:
    log = tlog.parse_vkey(VECTORS["keys"]["log"]["vkey"])
    witness = tlog.parse_vkey(VECTORS["keys"]["witness"]["vkey"])
    text, signers = tlog.open_note(VECTORS["checkpoint"], [log])
    assert signers == {"TEST-node/ledger": 0}
    assert tlog.parse_checkpoint(text) == ("TEST-node/ledger", 7, tlog.mth(LEAVES), [])
    _, cosigners = tlog.open_note(VECTORS["cosignature"]["cosigned_checkpoint"], [log, witness])
    assert cosigners == {
        "TEST-node/ledger": 0,
        "TEST-witness.example/w1": VECTORS["cosignature"]["timestamp"],
    }
    extended = VECTORS["checkpoint_with_extension"]["cosigned_checkpoint"]
    text, cosigners = tlog.open_note(extended, [witness])  # the cosignature covers the extension line
    assert tlog.parse_checkpoint(text)[3] == ["TEST extension line"]
    assert set(cosigners) == {"TEST-witness.example/w1"}


def test_independent_signing_with_the_published_test_keys_gives_the_same_lines() -> None:
    keys = VECTORS["keys"]
    log_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keys["log"]["TEST_ONLY_ed25519_seed_hex"]))
    witness_key = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(keys["witness"]["TEST_ONLY_ed25519_seed_hex"])
    )
    assert tlog.make_vkey("TEST-node/ledger", 0x01, log_key) == keys["log"]["vkey"]
    assert tlog.make_vkey("TEST-witness.example/w1", 0x04, witness_key) == keys["witness"]["vkey"]
    text = VECTORS["checkpoint"].split("\n\n")[0] + "\n"
    assert (
        tlog.sign_line("TEST-node/ledger", 0x01, log_key, text) + "\n"
        == VECTORS["checkpoint"][len(text) + 1 :]
    )
    cosig = VECTORS["cosignature"]
    assert (
        tlog.sign_line("TEST-witness.example/w1", 0x04, witness_key, text, cosig["timestamp"])
        == cosig["line"]
    )


def test_exchange_opens_the_vectors_with_the_published_verifier_keys() -> None:
    log = NoteVerifier.parse(VECTORS["keys"]["log"]["vkey"])
    witness = NoteVerifier.parse(VECTORS["keys"]["witness"]["vkey"])
    for note in (VECTORS["checkpoint"], VECTORS["cosignature"]["cosigned_checkpoint"]):
        checkpoint = open_checkpoint(note, log)
        assert (checkpoint.size, checkpoint.root) == (7, base64.b64decode(VECTORS["root"]))
    checkpoint = open_checkpoint(VECTORS["checkpoint"], log)
    stamps = verify_cosignatures(checkpoint, VECTORS["cosignature"]["line"] + "\n", [witness])
    assert stamps == {witness.name: VECTORS["cosignature"]["timestamp"]}
    extended = VECTORS["checkpoint_with_extension"]
    checkpoint = open_checkpoint(extended["note"], log)
    assert checkpoint.extensions == ("TEST extension line",)
    assert verify_cosignatures(checkpoint, extended["cosignature"] + "\n", [witness])
    without = open_checkpoint(VECTORS["checkpoint"], log)  # the same tree without the extension line
    with pytest.raises(CheckpointError):
        verify_cosignatures(without, extended["cosignature"] + "\n", [witness])


def _exchange_key(seed: bytes) -> Any:
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    return crypto.private_jwk(pem, "go-example")


def test_the_go_reference_note_verifies_and_signs_identically_in_both_implementations() -> None:
    verifier = NoteVerifier.parse(GO_VKEY)
    assert verifier.key_id.hex() == "c74f20a3"
    assert verifier.vkey == GO_VKEY
    text, signers = open_note(GO_NOTE, [verifier])
    assert text == GO_TEXT
    assert signers == {"PeterNeumann": 0}
    name, private = tlog.parse_skey(GO_SKEY)
    assert tlog.open_note(GO_NOTE, [tlog.parse_vkey(GO_VKEY)]) == (GO_TEXT, {"PeterNeumann": 0})
    assert tlog.sign_line(name, 0x01, private, GO_TEXT) == GO_SIG
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])[1:]
    key = _exchange_key(seed)
    assert key_id("PeterNeumann", crypto.ed25519_raw_public(key), SIG_ED25519).hex() == "c74f20a3"
    line = NoteSignature("PeterNeumann", verifier.key_id, crypto.ed25519_sign(key, GO_TEXT.encode())).line
    assert line == GO_SIG


def _flip(line: str) -> str:
    prefix, b64 = line.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 1
    return f"{prefix} {base64.b64encode(bytes(raw)).decode()}"


def test_a_bad_line_from_a_known_key_is_refused_even_beside_a_good_one() -> None:
    verifier = NoteVerifier.parse(GO_VKEY)
    for note in (
        GO_TEXT + "\n" + GO_SIG + "\n" + _flip(GO_SIG) + "\n",
        GO_TEXT + "\n" + _flip(GO_SIG) + "\n" + GO_SIG + "\n",
    ):
        with pytest.raises(CheckpointError, match="does not verify"):
            open_note(note, [verifier])
        with pytest.raises(tlog.Invalid):
            tlog.open_note(note, [tlog.parse_vkey(GO_VKEY)])
    stranger = "\u2014 PeterNeumann " + base64.b64encode(b"\0\0\0\0" + b"x" * 64).decode()  # unknown key id
    assert open_note(GO_TEXT + "\n" + stranger + "\n" + GO_SIG + "\n", [verifier])[1] == {"PeterNeumann": 0}
    with pytest.raises(CheckpointError, match="no valid signature"):
        open_note(GO_TEXT + "\n" + stranger + "\n", [verifier])


def test_a_mangled_verifier_key_is_refused() -> None:
    """As the Go package's TestNewVerifier: every proper substring and every single-byte change."""
    refused = 0
    for i in range(len(GO_VKEY)):
        for j in range(i + 1, len(GO_VKEY) + 1):
            if (i, j) != (0, len(GO_VKEY)):
                with pytest.raises(CheckpointError):
                    NoteVerifier.parse(GO_VKEY[i:j])
                refused += 1
    for i in range(len(GO_VKEY)):
        mangled = GO_VKEY[:i] + chr(ord(GO_VKEY[i]) + 1) + GO_VKEY[i + 1 :]
        with pytest.raises(CheckpointError):
            NoteVerifier.parse(mangled)
    assert refused > 2000
