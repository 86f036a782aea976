"""Signed checkpoints (C2SP tlog-checkpoint over C2SP signed-note) and witness cosignatures
(C2SP tlog-cosignature, ``cosignature/v1``). Pure: keys, text and time in, values out.

A checkpoint note::

    <origin>\\n<size>\\n<base64 root>\\n\\n— <origin> <base64(key id || Ed25519 signature)>\\n

The key id is ``SHA-256(name || "\\n" || 0x01 || public key)[:4]``; the signature covers the body (the
first three lines with their newlines). A cosignature line is
``— <witness name> <base64(key id || u64 timestamp || signature)>`` with key id algorithm byte 0x04,
over ``"cosignature/v1\\ntime <timestamp>\\n" || body``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from joserfc.jwk import OKPKey

from exchange import crypto
from exchange.errors import ExchangeError

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
EM_DASH = "\u2014"


class CheckpointError(ExchangeError):
    """A checkpoint or cosignature is malformed, unsigned, or signed by the wrong key."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: origin, tree size, root hash, and the note as signed."""

    origin: str
    size: int
    root: bytes
    note: str

    @property
    def body(self) -> str:
        return checkpoint_body(self.origin, self.size, self.root)


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    """The three checkpoint lines, each ending in a newline."""
    if not origin or "\n" in origin or size < 0 or len(root) != 32:
        raise CheckpointError("a checkpoint needs an origin line, a size and a 32-byte root")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def key_id(name: str, public_key: bytes, algorithm: int) -> bytes:
    """The 4-byte signed-note key id."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([algorithm]) + public_key).digest()[:4]


def sign_checkpoint(origin: str, size: int, root: bytes, key: OKPKey) -> str:
    """A signed checkpoint note; the key name is the origin."""
    body = checkpoint_body(origin, size, root)
    raw = key_id(origin, crypto.ed25519_raw_public(key), SIG_ED25519) + crypto.ed25519_sign(
        key, body.encode()
    )
    return f"{body}\n{EM_DASH} {origin} {base64.b64encode(raw).decode()}\n"


def _split(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    body, sep, rest = note.partition("\n\n")
    if not sep or not rest.endswith("\n"):
        raise CheckpointError("not a signed note: no blank line or no final newline")
    signatures = []
    for line in rest[:-1].split("\n"):
        prefix = f"{EM_DASH} "
        if not line.startswith(prefix) or line.count(" ") != 2:
            raise CheckpointError("a signature line is malformed")
        name, b64 = line[len(prefix) :].split(" ")
        try:
            signatures.append((name, base64.b64decode(b64, validate=True)))
        except ValueError as exc:
            raise CheckpointError("a signature is not base64") from exc
    return body + "\n", signatures


def parse_body(body: str) -> tuple[str, int, bytes]:
    """Origin, size and root of a checkpoint body. Raises CheckpointError if malformed."""
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise CheckpointError("a checkpoint body has three lines")
    origin, size_text, root_b64 = lines[0], lines[1], lines[2]
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise CheckpointError("the checkpoint size is not a decimal number")
    try:
        root = base64.b64decode(root_b64, validate=True)
    except ValueError as exc:
        raise CheckpointError("the checkpoint root is not base64") from exc
    if len(root) != 32:
        raise CheckpointError("the checkpoint root is not 32 bytes")
    return origin, int(size_text), root


def verify_checkpoint(note: str, *, origin: str, key: OKPKey) -> Checkpoint:
    """Verify a checkpoint signed by the log ``origin`` with ``key``.

    Raises:
        CheckpointError: malformed, another origin, or no valid signature by that key.
    """
    body, signatures = _split(note)
    found_origin, size, root = parse_body(body)
    if found_origin != origin:
        raise CheckpointError(f"the checkpoint is for {found_origin!r}, not {origin!r}")
    kid = key_id(origin, crypto.ed25519_raw_public(key), SIG_ED25519)
    for name, raw in signatures:
        if name == origin and raw[:4] == kid and crypto.ed25519_verify(key, raw[4:], body.encode()):
            return Checkpoint(origin, size, root, note)
    raise CheckpointError(f"the checkpoint carries no valid signature by {origin}")


def _cosigned_message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def cosign(checkpoint: Checkpoint, *, witness: str, key: OKPKey, timestamp: int) -> str:
    """A cosignature line by ``witness`` (without the final newline)."""
    raw = (
        key_id(witness, crypto.ed25519_raw_public(key), SIG_COSIGNATURE_V1)
        + struct.pack(">Q", timestamp)
        + crypto.ed25519_sign(key, _cosigned_message(checkpoint.body, timestamp))
    )
    return f"{EM_DASH} {witness} {base64.b64encode(raw).decode()}"


def verify_cosignature(checkpoint: Checkpoint, line: str, *, witness: str, key: OKPKey) -> int:
    """Verify a cosignature line by ``witness`` over ``checkpoint``; returns its timestamp.

    Raises:
        CheckpointError: malformed, another witness, or not a valid signature by ``key``.
    """
    _, signatures = _split(f"x\n\n{line}\n")
    name, raw = signatures[0]
    if name != witness or len(raw) != 4 + 8 + 64:
        raise CheckpointError(f"not a cosignature by {witness}")
    if raw[:4] != key_id(witness, crypto.ed25519_raw_public(key), SIG_COSIGNATURE_V1):
        raise CheckpointError("the cosignature's key id is not the witness key")
    (timestamp,) = struct.unpack(">Q", raw[4:12])
    if not crypto.ed25519_verify(key, raw[12:], _cosigned_message(checkpoint.body, timestamp)):
        raise CheckpointError(f"the cosignature by {witness} does not verify")
    return int(timestamp)
