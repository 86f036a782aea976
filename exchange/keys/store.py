"""The node's key ring on disk and the partner's public keys.

Layout of a key directory::

    keyring.json            public metadata: kid, use, status, file, created_at
    sig-<kid>.pem           Ed25519 private key, PKCS#8 encrypted with the passphrase
    enc-<kid>.pem           X25519 private key, PKCS#8 encrypted with the passphrase

Invariants: private keys are never written unencrypted; the active signing and encryption keys are
exactly one each; a retired key stays in the ring so that old envelopes still open and old
signatures still verify. Lifecycle transitions (pending, retired, revoked) are the key-rotation
issue's; this module already stores the status.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from joserfc.jwk import OKPKey
from pydantic import BaseModel, ConfigDict, ValidationError

from exchange import crypto
from exchange.agreement import Agreement
from exchange.errors import KeyManagementError
from exchange.files import private_dir, write_private
from exchange.types import KeyId, PartyId

KEYRING_FILE = "keyring.json"
KeyStatus = Literal["pending", "active", "retired", "revoked"]


class KeyRecord(BaseModel):
    """Public metadata of one key in the ring."""

    model_config = ConfigDict(extra="forbid")

    kid: str
    use: crypto.MessageKeyUse
    status: KeyStatus
    file: str
    created_at: str
    public_jwk: dict[str, str]


class KeyRing(BaseModel):
    """The ring as stored in ``keyring.json``."""

    model_config = ConfigDict(extra="forbid")

    party: PartyId
    keys: list[KeyRecord]

    def active(self, use: crypto.MessageKeyUse) -> KeyRecord:
        """The one active key for ``use``. Raises KeyManagementError if none or several."""
        found = [k for k in self.keys if k.use == use and k.status == "active"]
        if len(found) != 1:
            raise KeyManagementError(f"expected exactly one active {use} key, found {len(found)}")
        return found[0]


@dataclass(frozen=True)
class NodeKeys:
    """The node's decrypted private message keys, in memory only."""

    party: PartyId
    signing: OKPKey
    checkpoint: OKPKey  # signs the node's ledger checkpoints and cosigns the partner's
    decryption: dict[KeyId, OKPKey]  # every non-revoked encryption key, so old envelopes open
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
        path = key_dir / f"{use}-{kid}.pem"
        write_private(path, crypto.encrypt_private_pem(pem, passphrase))
        public = crypto.public_jwk_dict(crypto.private_jwk(pem, kid))
        records.append(
            KeyRecord(kid=kid, use=use, status="active", file=path.name, created_at=now, public_jwk=public)
        )
    ring = KeyRing(party=party, keys=records)
    write_private(key_dir / KEYRING_FILE, ring.model_dump_json(indent=2))
    return ring


def load_node_keys(key_dir: Path, passphrase: str) -> NodeKeys:
    """Decrypt the node's active signing key and every usable encryption key.

    Raises:
        KeyManagementError: missing ring or file, wrong passphrase.
    """
    ring = read_keyring(key_dir)

    def load(record: KeyRecord) -> OKPKey:
        try:
            data = (key_dir / record.file).read_bytes()
        except OSError as exc:
            raise KeyManagementError(f"cannot read key {record.kid}: {exc}") from exc
        return crypto.private_jwk(crypto.decrypt_private_pem(data, passphrase), record.kid)

    signing = load(ring.active("sig"))
    checkpoint = load(ring.active("ckpt"))
    decryption = {
        KeyId(r.kid): load(r) for r in ring.keys if r.use == "enc" and r.status in ("active", "retired")
    }
    return NodeKeys(
        party=ring.party,
        signing=signing,
        checkpoint=checkpoint,
        decryption=decryption,
        encryption_kid=KeyId(ring.active("enc").kid),
    )


@dataclass(frozen=True)
class PartnerKeys:
    """Public keys of one party as the agreement pins them."""

    party: PartyId
    verification: dict[KeyId, OKPKey]
    encryption: OKPKey  # the current encryption key: the last one listed
    checkpoint: OKPKey  # verifies the party's checkpoints and cosignatures
    ledger_origin: str
    witness_name: str

    @classmethod
    def from_agreement(cls, agreement: Agreement, party: PartyId) -> PartnerKeys:
        entry = agreement.parties[party]
        verification = {
            KeyId(k.kid): OKPKey.import_key(k.model_dump(), parameters={"kid": k.kid})
            for k in entry.signing_keys
        }
        last = entry.encryption_keys[-1]
        return cls(
            party=party,
            verification=verification,
            encryption=OKPKey.import_key(last.model_dump(), parameters={"kid": last.kid}),
            checkpoint=OKPKey.import_key(entry.checkpoint_key.model_dump()),
            ledger_origin=entry.ledger_origin,
            witness_name=entry.witness_name,
        )


def check_keys_match_agreement(keys: NodeKeys, agreement: Agreement) -> None:
    """Raise KeyManagementError unless the node's active keys are the ones the agreement pins."""
    entry = agreement.parties[keys.party]
    pinned_sig = {k.kid: k.x for k in entry.signing_keys}
    pinned_enc = {k.kid: k.x for k in entry.encryption_keys}
    if pinned_sig.get(keys.signing_kid) != keys.public_signing_jwk()["x"]:
        raise KeyManagementError(
            f"the node's signing key {keys.signing_kid} is not pinned in agreement {agreement.version}"
        )
    if entry.checkpoint_key.x != crypto.public_jwk_dict(keys.checkpoint)["x"]:
        raise KeyManagementError(f"the node's checkpoint key is not pinned in agreement {agreement.version}")
    if pinned_enc.get(keys.encryption_kid) != keys.public_encryption_jwk()["x"]:
        raise KeyManagementError(
            f"the node's encryption key {keys.encryption_kid} is not pinned in agreement {agreement.version}"
        )


def public_party_keys(ring: KeyRing) -> dict[str, list[dict[str, str]] | dict[str, str]]:
    """The non-revoked public keys of a ring, as the agreement's party entry lists them."""
    usable = [k for k in ring.keys if k.status in ("active", "retired")]
    return {
        "signing_keys": [dict(k.public_jwk) for k in usable if k.use == "sig"],
        "encryption_keys": [dict(k.public_jwk) for k in usable if k.use == "enc"],
        "checkpoint_key": dict(ring.active("ckpt").public_jwk),
    }
