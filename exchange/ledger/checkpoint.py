"""Signed notes (C2SP signed-note), checkpoints (C2SP tlog-checkpoint) and witness cosignatures
(C2SP tlog-cosignature, ``cosignature/v1``). Pure: keys, text and time in, values out.

A checkpoint note::

    <origin>\\n<size>\\n<base64 root>\\n[<extension line>\\n ...]\\n— <origin> <base64(key id || sig)>\\n

- The note text (the *body*) is everything up to the last blank line, final newline included; each
  signature line is ``— <key name> <base64(4-byte key id || signature)>``.
- Key id: ``SHA-256(name || "\\n" || type || public key)[:4]``; type 0x01 is an Ed25519 signature over
  the body, 0x04 a timestamped cosignature: ``u64 timestamp || Ed25519 signature`` over
  ``"cosignature/v1\\ntime <timestamp>\\n" || body`` (extension lines included, as the spec requires).
- A verifier key (*vkey*) is ``<name>+<hex key id>+<base64(type || 32-byte public key)>``
  (golang.org/x/mod/sumdb/note), the form auditors and third-party witnesses are configured with.

Verification follows the signed-note rules: signatures by unknown keys (name and key id) are ignored;
a signature by a known key must verify, or the whole note is refused, even if another line by the
same key verifies; at least one known signature must verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from joserfc.jwk import OKPKey

from exchange import crypto
from exchange.errors import ExchangeError, KeyManagementError

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
EM_DASH = "\u2014"
MAX_SIGNATURES = 100  # signed-note: verifiers must accept at least 16
MAX_NOTE_BYTES = 64 * 1024


class CheckpointError(ExchangeError):
    """A note, checkpoint or cosignature is malformed, unsigned, or signed by the wrong key."""


def key_id(name: str, public_key: bytes, algorithm: int) -> bytes:
    """The 4-byte signed-note key id."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([algorithm]) + public_key).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise CheckpointError(f"a key name must be non-empty, without spaces or '+': {name!r}")


@dataclass(frozen=True)
class NoteVerifier:
    """A public key able to verify one signature type under one key name."""

    name: str
    algorithm: int  # SIG_ED25519 or SIG_COSIGNATURE_V1
    public_key: bytes  # 32 raw Ed25519 bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.algorithm not in (SIG_ED25519, SIG_COSIGNATURE_V1) or len(self.public_key) != 32:
            raise CheckpointError("only Ed25519 (0x01) and cosignature/v1 (0x04) keys of 32 bytes")

    @classmethod
    def of(cls, name: str, key: OKPKey, algorithm: int) -> NoteVerifier:
        """The verifier of ``key`` (an Ed25519 OKP key, private or public) under ``name``."""
        return cls(name, algorithm, crypto.ed25519_raw_public(key))

    @classmethod
    def parse(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<hex key id>+<base64(type || key)>``. Raises CheckpointError if the text is
        malformed, the type unsupported, or the key id not that of the name and key."""
        parts = vkey.split("+", 2)  # the base64 key material may itself hold '+'
        if len(parts) != 3 or len(parts[1]) != 8:
            raise CheckpointError(f"not a verifier key: {vkey!r}")
        name, hex_id, b64 = parts
        try:
            wanted = bytes.fromhex(hex_id)
            raw = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise CheckpointError(f"not a verifier key: {vkey!r}") from exc
        if hex_id != hex_id.lower() or not raw:
            raise CheckpointError(f"not a verifier key: {vkey!r}")
        verifier = cls(name, raw[0], raw[1:])
        if verifier.key_id != wanted:
            raise CheckpointError(f"the key id of {vkey!r} is not that of its name and key")
        return verifier

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key, self.algorithm)

    @property
    def vkey(self) -> str:
        """The verifier key text: ``<name>+<hex key id>+<base64(type || key)>``."""
        material = base64.b64encode(bytes([self.algorithm]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{material}"

    def _verify(self, body: str, signature: bytes) -> int | None:
        """None if ``signature`` (after the key id) is not valid over ``body``; else its timestamp
        (0 for a plain Ed25519 signature)."""
        try:
            key = crypto.ed25519_public_key(self.public_key)
        except KeyManagementError:
            return None
        if self.algorithm == SIG_ED25519:
            ok = len(signature) == 64 and crypto.ed25519_verify(key, signature, body.encode())
            return 0 if ok else None
        if len(signature) != 8 + 64:
            return None
        (timestamp,) = struct.unpack(">Q", signature[:8])
        if timestamp >= 1 << 63:
            return None
        ok = crypto.ed25519_verify(key, signature[8:], _cosigned_message(body, timestamp))
        return int(timestamp) if ok else None


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, key id, and the signature bytes after the key id."""

    name: str
    key_id: bytes
    signature: bytes

    @property
    def line(self) -> str:
        """The signature line, without its final newline."""
        return f"{EM_DASH} {self.name} {base64.b64encode(self.key_id + self.signature).decode()}"


def split_note(note: str) -> tuple[str, list[NoteSignature]]:
    """The text (final newline included) and the signature lines of a signed note.

    Raises:
        CheckpointError: not a signed note (control characters, no blank line, no final newline, a
            malformed or too short signature line, too many signatures, too large).
    """
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise CheckpointError("the note is too large")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise CheckpointError("a signed note holds no control characters but newlines")
    text, sep, rest = note.rpartition("\n\n")
    if not sep or not text or not rest.endswith("\n"):
        raise CheckpointError("not a signed note: no blank line before the signatures, or no final newline")
    lines = rest[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"the note carries more than {MAX_SIGNATURES} signatures")
    return text + "\n", [parse_signature_line(line) for line in lines]


def parse_signature_line(line: str) -> NoteSignature:
    """Parse ``— <name> <base64>`` (no newline). Raises CheckpointError if malformed."""
    prefix = f"{EM_DASH} "
    parts = line[len(prefix) :].split(" ")
    if not line.startswith(prefix) or len(parts) != 2:
        raise CheckpointError("a signature line is malformed")
    name, b64 = parts
    _check_name(name)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError("a signature is not base64") from exc
    if len(raw) < 5:
        raise CheckpointError("a signature is too short")
    return NoteSignature(name, raw[:4], raw[4:])


def open_note(note: str, verifiers: Sequence[NoteVerifier]) -> tuple[str, dict[str, int]]:
    """Verify a signed note: returns its text and, for each verifier key name whose signature
    verified, its timestamp (0 for a plain signature).

    Raises:
        CheckpointError: malformed; a signature by a known key (name and key id) that does not
            verify; or no signature by a known key at all.
    """
    text, signatures = split_note(note)
    return text, verify_signatures(text, signatures, verifiers)


def verify_signatures(
    text: str, signatures: Sequence[NoteSignature], verifiers: Sequence[NoteVerifier]
) -> dict[str, int]:
    """Check ``signatures`` over ``text`` (see :func:`open_note`)."""
    verified = known_signatures(text, signatures, verifiers)
    if not verified:
        names = ", ".join(sorted({v.name for v in verifiers})) or "nobody"
        raise CheckpointError(f"the note carries no valid signature by {names}")
    return verified


def known_signatures(
    text: str, signatures: Sequence[NoteSignature], verifiers: Sequence[NoteVerifier]
) -> dict[str, int]:
    """Like :func:`verify_signatures`, but none being known is not an error (returns ``{}``);
    a bad signature by a known key still is."""
    known = {(v.name, v.key_id): v for v in verifiers}
    verified: dict[str, int] = {}
    for sig in signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue  # an unknown key: ignored, as the signed-note spec requires
        timestamp = verifier._verify(text, sig.signature)
        if timestamp is None:
            raise CheckpointError(f"a signature by {sig.name} does not verify: the note is refused")
        verified[sig.name] = max(timestamp, verified.get(sig.name, 0))
    return verified


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: origin, tree size, root hash, extension lines, and the note as given."""

    origin: str
    size: int
    root: bytes
    note: str
    extensions: tuple[str, ...] = ()

    @property
    def body(self) -> str:
        return checkpoint_body(self.origin, self.size, self.root, self.extensions)


def checkpoint_body(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The checkpoint lines (origin, size, base64 root, extension lines), each ending in a newline."""
    if not origin or "\n" in origin or size < 0 or len(root) != 32:
        raise CheckpointError("a checkpoint needs an origin line, a size and a 32-byte root")
    if any(not line or "\n" in line for line in extensions):
        raise CheckpointError("an extension line is a non-empty line")
    tail = "".join(f"{line}\n" for line in extensions)
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n{tail}"


def parse_body(body: str) -> tuple[str, int, bytes, tuple[str, ...]]:
    """Origin, size, root and extension lines of a checkpoint body. Raises CheckpointError."""
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
        raise CheckpointError("a checkpoint body is three or more non-empty lines")
    origin, size_text, root_b64 = lines[0], lines[1], lines[2]
    if not size_text.isascii() or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
        raise CheckpointError("the checkpoint size is not a decimal number")
    if len(size_text) > 18:  # below 2**63: every size a database can hold
        raise CheckpointError("the checkpoint size is out of range")
    try:
        root = base64.b64decode(root_b64, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError("the checkpoint root is not base64") from exc
    if len(root) != 32:
        raise CheckpointError("the checkpoint root is not 32 bytes")
    return origin, int(size_text), root, tuple(lines[3:-1])


def sign_checkpoint(origin: str, size: int, root: bytes, key: OKPKey, extensions: Sequence[str] = ()) -> str:
    """A signed checkpoint note; the key name is the origin."""
    body = checkpoint_body(origin, size, root, extensions)
    raw = key_id(origin, crypto.ed25519_raw_public(key), SIG_ED25519) + crypto.ed25519_sign(
        key, body.encode()
    )
    return f"{body}\n{EM_DASH} {origin} {base64.b64encode(raw).decode()}\n"


def open_checkpoint(note: str, log: NoteVerifier) -> Checkpoint:
    """Verify a checkpoint note signed by the log key ``log`` (whose name is the origin).

    Raises:
        CheckpointError: malformed, another origin, no valid signature by the log key, or a bad one.
    """
    text, _ = open_note(note, [log])
    origin, size, root, extensions = parse_body(text)
    if origin != log.name:
        raise CheckpointError(f"the checkpoint is for {origin!r}, not {log.name!r}")
    return Checkpoint(origin, size, root, note, extensions)


def verify_checkpoint(note: str, *, origin: str, key: OKPKey) -> Checkpoint:
    """Verify a checkpoint signed by the log ``origin`` with ``key`` (see :func:`open_checkpoint`)."""
    return open_checkpoint(note, NoteVerifier.of(origin, key, SIG_ED25519))


def verify_checkpoint_any(note: str, *, origin: str, keys: Sequence[OKPKey]) -> Checkpoint:
    """Verify a checkpoint signed by the log ``origin`` with any one of ``keys`` (a key history: the
    note's signature line names which). Raises CheckpointError if none verifies it."""
    error = CheckpointError("no checkpoint key to verify it with")
    for key in keys:
        try:
            return verify_checkpoint(note, origin=origin, key=key)
        except CheckpointError as exc:
            error = exc
    raise error


def signed_by_unknown_key(note: str, *, origin: str, keys: Sequence[OKPKey]) -> bool:
    """True when the note is signed under ``origin`` only by keys other than ``keys`` (the log's
    key may be newer than the ones held here: look its key set up before judging). False when a
    line names one of ``keys`` (verify it), or the note does not parse or carries no line under
    ``origin`` (nothing to look up: it is refused as it is). Nothing is verified here."""
    try:
        _, signatures = split_note(note)
    except CheckpointError:
        return False
    held = {NoteVerifier.of(origin, key, SIG_ED25519).key_id for key in keys}
    by_origin = [sig.key_id for sig in signatures if sig.name == origin]
    return bool(by_origin) and not held.intersection(by_origin)


def _cosigned_message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def cosign(checkpoint: Checkpoint, *, witness: str, key: OKPKey, timestamp: int) -> str:
    """A cosignature line by ``witness`` over the whole body (without the final newline)."""
    raw = (
        key_id(witness, crypto.ed25519_raw_public(key), SIG_COSIGNATURE_V1)
        + struct.pack(">Q", timestamp)
        + crypto.ed25519_sign(key, _cosigned_message(checkpoint.body, timestamp))
    )
    return f"{EM_DASH} {witness} {base64.b64encode(raw).decode()}"


def verify_cosignatures(
    checkpoint: Checkpoint, lines: str, witnesses: Sequence[NoteVerifier]
) -> dict[str, int]:
    """Verify newline-terminated cosignature lines over ``checkpoint`` (a witness's answer); returns
    each known witness's timestamp. Lines by unknown keys are ignored.

    Raises:
        CheckpointError: malformed, a bad line by a known witness key, or no known witness at all.
    """
    if not lines.endswith("\n"):
        raise CheckpointError("cosignature lines end in a newline")
    signatures = [parse_signature_line(line) for line in lines[:-1].split("\n")]
    if len(signatures) > MAX_SIGNATURES:
        raise CheckpointError(f"more than {MAX_SIGNATURES} cosignatures")
    if any(w.algorithm != SIG_COSIGNATURE_V1 for w in witnesses):
        raise CheckpointError("witness keys are cosignature/v1 keys")
    return verify_signatures(checkpoint.body, signatures, witnesses)


def verify_cosignature(checkpoint: Checkpoint, line: str, *, witness: str, key: OKPKey) -> int:
    """Verify a cosignature line by ``witness`` over ``checkpoint``; returns its timestamp.

    Raises:
        CheckpointError: malformed, another witness, or not a valid signature by ``key``.
    """
    verifier = NoteVerifier.of(witness, key, SIG_COSIGNATURE_V1)
    stamps = verify_cosignatures(checkpoint, line.rstrip("\n") + "\n", [verifier])
    if "\n" in line.rstrip("\n"):
        raise CheckpointError("one cosignature line expected")
    return stamps[witness]


def checkpoint_with(note: str, lines: Mapping[str, str] | Sequence[str]) -> str:
    """The note with cosignature lines appended (a cosigned checkpoint, as a log serves it)."""
    extra = lines.values() if isinstance(lines, Mapping) else lines
    return note + "".join(f"{line.rstrip(chr(10))}\n" for line in extra)
