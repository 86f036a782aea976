"""C2SP checkpoints and cosignatures (pure): format, signatures, and forgeries refused."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange import crypto
from exchange.ledger.checkpoint import (
    SIG_ED25519,
    CheckpointError,
    NoteVerifier,
    cosign,
    key_id,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    signed_by_unknown_key,
    verify_checkpoint,
    verify_cosignature,
)

KEY = crypto.private_jwk(crypto.new_message_key("ckpt"), "ckpt")
OTHER = crypto.private_jwk(crypto.new_message_key("ckpt"), "other")
ROOT = hashlib.sha256(b"root").digest()
ORIGIN = "ID-node/ledger"


def test_a_checkpoint_note_has_the_c2sp_shape_and_verifies() -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, KEY)
    body, sig_line = note.split("\n\n")
    assert body.split("\n") == [ORIGIN, "42", base64.b64encode(ROOT).decode()]
    assert sig_line.startswith(f"\u2014 {ORIGIN} ")
    assert sig_line.endswith("\n")
    raw = base64.b64decode(sig_line.strip().split(" ")[2])
    assert raw[:4] == key_id(ORIGIN, crypto.ed25519_raw_public(KEY), 0x01)
    assert len(raw) == 68
    checkpoint = verify_checkpoint(note, origin=ORIGIN, key=crypto.public_only(KEY))
    assert (checkpoint.size, checkpoint.root) == (42, ROOT)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda n: n.replace("\n42\n", "\n43\n"),  # another size under the same signature
        lambda n: n.replace(ORIGIN, "MY-node/ledger", 1),  # another origin
        lambda n: n.split("\n\n")[0] + "\n\n",  # signature removed
        lambda n: n[:-5] + ("A" if n[-5] != "A" else "B") + n[-4:],  # signature bytes changed
        lambda n: n.replace("\n\n", "\n"),  # not a note
    ],
)
def test_a_tampered_checkpoint_is_refused(tamper: object) -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, KEY)
    with pytest.raises(CheckpointError):
        verify_checkpoint(tamper(note), origin=ORIGIN, key=crypto.public_only(KEY))  # type: ignore[operator]


def test_a_checkpoint_signed_by_another_key_is_refused() -> None:
    forged = sign_checkpoint(ORIGIN, 42, ROOT, OTHER)
    with pytest.raises(CheckpointError, match="no valid signature"):
        verify_checkpoint(forged, origin=ORIGIN, key=crypto.public_only(KEY))


def test_a_cosignature_verifies_and_binds_witness_time_and_checkpoint() -> None:
    checkpoint = verify_checkpoint(sign_checkpoint(ORIGIN, 42, ROOT, KEY), origin=ORIGIN, key=KEY)
    line = cosign(checkpoint, witness="MY-node/witness", key=OTHER, timestamp=1_790_000_000)
    raw = base64.b64decode(line.split(" ")[2])
    assert raw[:4] == key_id("MY-node/witness", crypto.ed25519_raw_public(OTHER), 0x04)
    assert int.from_bytes(raw[4:12], "big") == 1_790_000_000
    public = crypto.public_only(OTHER)
    assert verify_cosignature(checkpoint, line, witness="MY-node/witness", key=public) == 1_790_000_000
    later = bytearray(raw)
    later[11] ^= 1  # another timestamp under the same signature
    forged_time = f"\u2014 MY-node/witness {base64.b64encode(bytes(later)).decode()}"
    other_checkpoint = verify_checkpoint(sign_checkpoint(ORIGIN, 43, ROOT, KEY), origin=ORIGIN, key=KEY)
    for bad_checkpoint, bad_line, witness in (
        (checkpoint, forged_time, "MY-node/witness"),
        (other_checkpoint, line, "MY-node/witness"),
        (checkpoint, line, "ID-node/witness"),
    ):
        with pytest.raises(CheckpointError):
            verify_cosignature(bad_checkpoint, bad_line, witness=witness, key=public)
    with pytest.raises(CheckpointError):
        verify_cosignature(checkpoint, line, witness="MY-node/witness", key=crypto.public_only(KEY))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_property_any_text_opens_as_a_note_or_raises_checkpoint_error(text: str) -> None:
    verifier = NoteVerifier.of(ORIGIN, KEY, SIG_ED25519)
    with contextlib.suppress(CheckpointError):
        open_note(text, [verifier])
    with contextlib.suppress(CheckpointError):
        open_checkpoint(text + "\n\n\u2014 " + ORIGIN + " AAAAAAAA\n", verifier)


def test_a_cosignature_covers_the_extension_lines() -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, KEY, extensions=("ext one", "ext two"))
    checkpoint = verify_checkpoint(note, origin=ORIGIN, key=KEY)
    assert checkpoint.extensions == ("ext one", "ext two")
    line = cosign(checkpoint, witness="W/w", key=OTHER, timestamp=5)
    assert verify_cosignature(checkpoint, line, witness="W/w", key=crypto.public_only(OTHER)) == 5
    plain = verify_checkpoint(sign_checkpoint(ORIGIN, 42, ROOT, KEY), origin=ORIGIN, key=KEY)
    with pytest.raises(CheckpointError):
        verify_cosignature(plain, line, witness="W/w", key=crypto.public_only(OTHER))


def test_a_note_signed_only_by_keys_not_held_asks_for_a_key_lookup_and_nothing_else_does() -> None:
    note = sign_checkpoint(ORIGIN, 7, ROOT, KEY)
    assert signed_by_unknown_key(note, origin=ORIGIN, keys=[OTHER])  # a newer key, perhaps: look
    assert not signed_by_unknown_key(note, origin=ORIGIN, keys=[OTHER, KEY])  # held: verify it
    assert not signed_by_unknown_key(note, origin="MY-node/ledger", keys=[OTHER])  # not that log's
    assert not signed_by_unknown_key("not a note", origin=ORIGIN, keys=[OTHER])  # refused as it is
    tampered = note.replace("\n7\n", "\n8\n")  # a known key's bad line: verified, and refused
    assert not signed_by_unknown_key(tampered, origin=ORIGIN, keys=[KEY])
