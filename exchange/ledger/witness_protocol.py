"""The C2SP tlog-witness ``add-checkpoint`` wire format (https://c2sp.org/tlog-witness). Pure.

Request body: ``old <size>\\n``, zero to 63 lines of one base64 hash each (an RFC 6962 consistency
proof from the old size), an empty line, then the checkpoint note. A 200 answer is one or more
cosignature lines (each ending in a newline); a 409 answer is the witness's size and a newline,
``Content-Type: text/x.tlog.size``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from exchange.ledger.checkpoint import MAX_NOTE_BYTES, CheckpointError

ADD_CHECKPOINT = "/add-checkpoint"
SIZE_MEDIA_TYPE = "text/x.tlog.size"
MAX_PROOF_LINES = 63
MAX_BODY_BYTES = MAX_NOTE_BYTES + 8 * 1024


@dataclass(frozen=True)
class AddCheckpoint:
    old_size: int
    proof: list[bytes]
    note: str


def _decimal(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (text != "0" and text[0] == "0") or len(text) > 20:
        raise CheckpointError(f"not a decimal size: {text!r}")
    return int(text)


def encode_add_checkpoint(old_size: int, proof: Sequence[bytes], note: str) -> bytes:
    """The request body of add-checkpoint."""
    if old_size < 0 or len(proof) > MAX_PROOF_LINES or (old_size == 0 and proof):
        raise CheckpointError("an add-checkpoint request has 0..63 proof lines, none from size 0")
    lines = [f"old {old_size}\n", *(base64.b64encode(h).decode() + "\n" for h in proof), "\n", note]
    return "".join(lines).encode()


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse an add-checkpoint request body. Raises CheckpointError if it is malformed."""
    if len(body) > MAX_BODY_BYTES:
        raise CheckpointError("the request is too large")
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise CheckpointError("the request is not UTF-8") from exc
    head, sep, note = text.partition("\n\n")
    if not sep or not note:
        raise CheckpointError("no empty line between the proof and the checkpoint")
    lines = head.split("\n")
    if not lines[0].startswith("old "):
        raise CheckpointError("the request does not start with an old size line")
    old_size = _decimal(lines[0][4:])
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise CheckpointError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    try:
        proof = [base64.b64decode(line, validate=True) for line in lines[1:]]
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError("a proof line is not base64") from exc
    if any(len(h) != 32 for h in proof):
        raise CheckpointError("a proof line is not a SHA-256 hash")
    if old_size == 0 and proof:
        raise CheckpointError("the proof must be empty when the old size is 0")
    return AddCheckpoint(old_size, proof, note)


def encode_size(size: int) -> bytes:
    """The body of a 409 answer."""
    return f"{size}\n".encode()


def parse_size(body: bytes) -> int:
    """The witness's size from a 409 answer. Raises CheckpointError if malformed."""
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise CheckpointError("the size answer is not UTF-8") from exc
    if not text.endswith("\n"):
        raise CheckpointError("the size answer does not end in a newline")
    return _decimal(text[:-1])
