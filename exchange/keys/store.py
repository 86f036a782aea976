"""The node's private keys on disk.

Layout of a key directory::

    keyring.json            index: kid, use, file, created_at, public JWK of every key ever made
    sig-<kid>.pem           Ed25519 private key, PKCS#8 encrypted with the passphrase
    enc-<kid>.pem           X25519 private key, PKCS#8 encrypted with the passphrase
    ckpt-<kid>.pem          Ed25519 checkpoint key, PKCS#8 encrypted with the passphrase

Invariants: private keys are never written unencrypted; every file is written atomically and
owner-only; a key's file is named by its kid, so a key made before a crash is found even if the
index was not rewritten. The state of each key (next, active, retiring, retired, revoked) is not
kept here: it is the node's own key set (:mod:`exchange.keys.registry`), signed and announced.
"""

from __future__ import annotations

import datetime as dt
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc.jwk import OKPKey
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from exchange import crypto
from exchange.errors import KeyManagementError
from exchange.files import create_private, erase, private_dir, write_private
from exchange.keys.announcement import KeySet, Purpose
from exchange.types import KeyId, PartyId

KEYRING_FILE = "keyring.json"
USE_OF: dict[Purpose, crypto.MessageKeyUse] = {"signing": "sig", "encryption": "enc", "checkpoint": "ckpt"}


class KeyRecord(BaseModel):
    """Public metadata of one key of the node; ``file`` is None once the private key is destroyed."""

    model_config = ConfigDict(extra="forbid")

    kid: str
    use: crypto.MessageKeyUse
    file: str | None
    created_at: str
    public_jwk: dict[str, str]

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "status" in data:  # rings written before key sets: states moved
            data = {k: v for k, v in data.items() if k != "status"}
        return data


class KeyRing(BaseModel):
    """The index as stored in ``keyring.json``."""

    model_config = ConfigDict(extra="forbid")

    party: PartyId
    keys: list[KeyRecord]

    def record(self, kid: str) -> KeyRecord | None:
        return next((k for k in self.keys if k.kid == kid), None)


@dataclass(frozen=True)
class NodeKeys:
    """The node's decrypted private message keys as its key set in force wants them, in memory only."""

    party: PartyId
    version: int  # of the node's own key set these were loaded for
    signing: OKPKey
    checkpoint: OKPKey  # signs the node's ledger checkpoints and cosigns the partner's
    decryption: dict[KeyId, OKPKey]  # every encryption key still held, so envelopes in flight open
    encryption_kid: KeyId

    @property
    def signing_kid(self) -> KeyId:
        return KeyId(str(self.signing.kid))

    def public_signing_jwk(self) -> dict[str, str]:
        return crypto.public_jwk_dict(self.signing)

    def public_encryption_jwk(self) -> dict[str, str]:
        return crypto.public_jwk_dict(self.decryption[self.encryption_kid])


def read_keyring(key_dir: Path) -> KeyRing:
    """Read ``keyring.json``. Raises KeyManagementError if missing or invalid."""
    try:
        return KeyRing.model_validate_json((key_dir / KEYRING_FILE).read_text())
    except FileNotFoundError as exc:
        raise KeyManagementError(f"no key ring at {key_dir}; run `exchange init`") from exc
    except ValidationError as exc:
        raise KeyManagementError(f"key ring {key_dir / KEYRING_FILE} is invalid: {exc}") from exc


def key_path(key_dir: Path, use: str, kid: str) -> Path:
    """Where the private key ``kid`` of ``use`` (``sig``, ``enc``, ``ckpt``) is kept, encrypted."""
    return key_dir / f"{use}-{kid}.pem"


def load_private_key(key_dir: Path, kid: str, purpose: Purpose, passphrase: str) -> OKPKey:
    """The private key ``kid`` of ``purpose``, decrypted.

    Raises:
        KeyManagementError: its file is not held at ``key_dir``, is damaged, or the passphrase is
            wrong.
    """
    try:
        data = key_path(key_dir, USE_OF[purpose], kid).read_bytes()
    except OSError as exc:
        raise KeyManagementError(f"the private key of {kid} is not held at {key_dir}") from exc
    return crypto.private_jwk(crypto.decrypt_private_pem(data, passphrase), kid)


def create_node_keys(key_dir: Path, party: PartyId, passphrase: str) -> KeyRing:
    """Generate an active signing and encryption key and write them encrypted.

    Raises:
        KeyManagementError: a key ring already exists there.
    """
    if (key_dir / KEYRING_FILE).exists():
        raise KeyManagementError(f"a key ring already exists at {key_dir}")
    private_dir(key_dir)
    now = dt.datetime.now(dt.UTC).isoformat()
    records = []
    uses: tuple[crypto.MessageKeyUse, ...] = ("sig", "enc", "ckpt")
    for use in uses:
        pem = crypto.new_message_key(use)
        kid = crypto.message_key_id(party, use, pem)
        path = key_path(key_dir, use, kid)
        write_private(path, crypto.encrypt_private_pem(pem, passphrase))
        public = crypto.public_jwk_dict(crypto.private_jwk(pem, kid))
        records.append(KeyRecord(kid=kid, use=use, file=path.name, created_at=now, public_jwk=public))
    ring = KeyRing(party=party, keys=records)
    write_private(key_dir / KEYRING_FILE, ring.model_dump_json(indent=2))
    return ring


@contextmanager
def _ring_locked(key_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the key directory's index while it is read, changed and written:
    two commands, or a command and the node's key loop, never lose each other's change."""
    path = key_dir / ".keyring.lock"
    create_private(path)
    with path.open("rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def add_key(key_dir: Path, purpose: Purpose, passphrase: str) -> KeyRecord:
    """Make a new private key for ``purpose``, write it encrypted, then index it. Returns its record."""
    with _ring_locked(key_dir):
        ring = read_keyring(key_dir)
        use = USE_OF[purpose]
        pem = crypto.new_message_key(use)
        kid = crypto.message_key_id(ring.party, use, pem)
        path = key_path(key_dir, use, kid)
        write_private(path, crypto.encrypt_private_pem(pem, passphrase))
        record = KeyRecord(
            kid=kid,
            use=use,
            file=path.name,
            created_at=dt.datetime.now(dt.UTC).isoformat(),
            public_jwk=crypto.public_jwk_dict(crypto.private_jwk(pem, kid)),
        )
        ring.keys.append(record)
        write_private(key_dir / KEYRING_FILE, ring.model_dump_json(indent=2))
    return record


def destroy_key(key_dir: Path, kid: str) -> bool:
    """Overwrite and remove the private key file of ``kid`` (found by the index or, failing that, by
    its name) and mark it destroyed in the index. Idempotent; False if nothing was left."""
    with _ring_locked(key_dir):
        ring = read_keyring(key_dir)
        record = ring.record(kid)
        paths = [key_dir / record.file] if record is not None and record.file else []
        paths += [key_path(key_dir, use, kid) for use in USE_OF.values()]
        erased = any([erase(path) for path in dict.fromkeys(paths)])
        if record is not None and record.file is not None:
            record.file = None
            write_private(key_dir / KEYRING_FILE, ring.model_dump_json(indent=2))
    return erased


def held(key_dir: Path, kid: str) -> bool:
    """True if a private key file of ``kid`` is still on disk."""
    return any(key_path(key_dir, use, kid).exists() for use in USE_OF.values())


def load_node_keys(key_dir: Path, passphrase: str, key_set: KeySet) -> NodeKeys:
    """Decrypt the private keys the node's own ``key_set`` makes active, and every next or
    retiring encryption key still held: envelopes sealed for a retiring key may be in flight, and
    the partner may seal for a next key the moment it learns of its activation, which can be
    before this process has read that version.

    Raises:
        KeyManagementError: no ring, an active key of the set this directory does not hold, a
            damaged file or a wrong passphrase.
    """
    ring = read_keyring(key_dir)
    if ring.party != key_set.party:
        raise KeyManagementError(f"the key ring at {key_dir} is {ring.party}'s, not {key_set.party}'s")

    def load(kid: str, purpose: Purpose) -> OKPKey:
        if not key_path(key_dir, USE_OF[purpose], kid).exists():
            raise KeyManagementError(
                f"the {purpose} key {kid} of key set version {key_set.version} is not held at {key_dir}"
                " (its private key file is missing)"
            )
        return load_private_key(key_dir, kid, purpose, passphrase)

    active_enc = key_set.active("encryption").kid
    decryption = {KeyId(active_enc): load(active_enc, "encryption")}
    for entry in key_set.keys:
        if entry.purpose == "encryption" and entry.state in ("next", "retiring"):
            try:  # optional: another process may be destroying it as it retires
                decryption[KeyId(entry.kid)] = load(entry.kid, "encryption")
            except KeyManagementError:
                continue
    return NodeKeys(
        party=ring.party,
        version=key_set.version,
        signing=load(key_set.active("signing").kid, "signing"),
        checkpoint=load(key_set.active("checkpoint").kid, "checkpoint"),
        decryption=decryption,
        encryption_kid=KeyId(active_enc),
    )


def public_party_keys(ring: KeyRing) -> dict[str, list[dict[str, str]] | dict[str, str]]:
    """The public keys of a new node's ring, as the agreement's party entry lists them."""
    first = {use: next(k for k in ring.keys if k.use == use) for use in ("sig", "enc", "ckpt")}
    return {
        "signing_keys": [dict(first["sig"].public_jwk)],
        "encryption_keys": [dict(first["enc"].public_jwk)],
        "checkpoint_key": dict(first["ckpt"].public_jwk),
    }
