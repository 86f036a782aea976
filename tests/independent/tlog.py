"""RFC 6962 / 9162 Merkle trees and C2SP signed notes, checkpoints and cosignatures, from the specs.

Deliberately written apart from ``exchange.ledger``: proofs are *generated* with the recursive
definitions of RFC 6962 §2.1 (PATH, PROOF, SUBPROOF), verified with the iterative algorithms of
RFC 9162 §2.1.3.2 / §2.1.4.2, and notes are parsed as the signed-note text describes them.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class Invalid(Exception):
    """Whatever does not verify."""


# --- RFC 6962 §2.1 -----------------------------------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) over leaf *data* (not hashes)."""
    n = len(leaves)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf m."""
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, leaves[:k], b), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]): the consistency proof from size m."""
    return subproof(m, leaves, True)


# --- RFC 9162 §2.1.3.2 and §2.1.4.2 ------------------------------------------------------------


def node(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def check_inclusion(leaf_data: bytes, index: int, size: int, audit: list[bytes], root: bytes) -> None:
    if index >= size:
        raise Invalid("index beyond the tree")
    fn, sn, r = index, size - 1, sha256(b"\x00" + leaf_data)
    for p in audit:
        if sn == 0:
            raise Invalid("path too long")
        if fn % 2 == 1 or fn == sn:
            r = node(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn //= 2
                    sn //= 2
        else:
            r = node(r, p)
        fn //= 2
        sn //= 2
    if sn != 0 or r != root:
        raise Invalid("inclusion proof does not verify")


def check_consistency(
    first: int, second: int, consistency: list[bytes], first_hash: bytes, second_hash: bytes
) -> None:
    if first == second:
        if consistency or first_hash != second_hash:
            raise Invalid("equal sizes")
        return
    if not 0 < first < second or not consistency:
        raise Invalid("bad sizes or empty proof")
    items = list(consistency)
    if first & (first - 1) == 0:
        items = [first_hash, *items]
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn //= 2
        sn //= 2
    fr = sr = items[0]
    for c in items[1:]:
        if sn == 0:
            raise Invalid("proof too long")
        if fn % 2 == 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn //= 2
                    sn //= 2
        else:
            sr = node(sr, c)
        fn //= 2
        sn //= 2
    if sn != 0 or fr != first_hash or sr != second_hash:
        raise Invalid("consistency proof does not verify")


# --- C2SP signed-note ---------------------------------------------------------------------------

DASH = "\u2014"


@dataclass(frozen=True)
class Verifier:
    name: str
    hash: bytes  # 4-byte key id
    kind: int  # 0x01 Ed25519 note signature, 0x04 cosignature/v1
    key: Ed25519PublicKey


def key_hash(name: str, kind: int, public: bytes) -> bytes:
    return sha256(name.encode() + b"\n" + bytes([kind]) + public)[:4]


def parse_vkey(vkey: str) -> Verifier:
    name, hash_hex, material = vkey.split("+", 2)
    raw = base64.b64decode(material, validate=True)
    if len(hash_hex) != 8 or raw[0] not in (0x01, 0x04) or len(raw) != 33:
        raise Invalid("unsupported vkey")
    if key_hash(name, raw[0], raw[1:]) != bytes.fromhex(hash_hex):
        raise Invalid("vkey hash mismatch")
    return Verifier(name, bytes.fromhex(hash_hex), raw[0], Ed25519PublicKey.from_public_bytes(raw[1:]))


def make_vkey(name: str, kind: int, private: Ed25519PrivateKey) -> str:
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    material = base64.b64encode(bytes([kind]) + public).decode()
    return f"{name}+{key_hash(name, kind, public).hex()}+{material}"


def parse_skey(skey: str) -> tuple[str, Ed25519PrivateKey]:
    """The Go note package's ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>``."""
    parts = skey.split("+", 4)
    if parts[:2] != ["PRIVATE", "KEY"] or len(parts) != 5:
        raise Invalid("not a signer key")
    raw = base64.b64decode(parts[4])
    return parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:])


def note_parts(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """Text and (name, raw signature) pairs: the text ends at the last blank line."""
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise Invalid("not a note")
    text, sigs = note[: cut + 1], note[cut + 2 : -1].split("\n")
    parsed = []
    for line in sigs:
        if not line.startswith(DASH + " "):
            raise Invalid("bad signature line")
        name, b64 = line[2:].split(" ")
        parsed.append((name, base64.b64decode(b64, validate=True)))
    return text, parsed


def cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def open_note(note: str, verifiers: list[Verifier]) -> tuple[str, dict[str, int]]:
    """Go's note.Open semantics: unknown signatures ignored, a known one that fails is fatal, at
    least one known one must verify. Returns the text and {name: timestamp (0 for plain)}."""
    text, sigs = note_parts(note)
    good: dict[str, int] = {}
    for name, raw in sigs:
        match = [v for v in verifiers if v.name == name and v.hash == raw[:4]]
        if not match:
            continue
        v = match[0]
        try:
            if v.kind == 0x01:
                v.key.verify(raw[4:], text.encode())
                good[name] = 0
            else:
                (timestamp,) = struct.unpack(">Q", raw[4:12])
                v.key.verify(raw[12:], cosigned_message(text, timestamp))
                good[name] = timestamp
        except (InvalidSignature, struct.error) as exc:
            raise Invalid(f"bad signature by known key {name}") from exc
    if not good:
        raise Invalid("no known signature")
    return text, good


def sign_line(name: str, kind: int, private: Ed25519PrivateKey, text: str, timestamp: int = 0) -> str:
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if kind == 0x01:
        raw = key_hash(name, kind, public) + private.sign(text.encode())
    else:
        raw = key_hash(name, kind, public) + struct.pack(">Q", timestamp)
        raw += private.sign(cosigned_message(text, timestamp))
    return f"{DASH} {name} {base64.b64encode(raw).decode()}"


def parse_checkpoint(text: str) -> tuple[str, int, bytes, list[str]]:
    lines = text.split("\n")[:-1]
    return lines[0], int(lines[1]), base64.b64decode(lines[2]), lines[3:]
