"""A party's key-set history with real private keys, for tests of what is verified across rotations."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from joserfc.jwk import OKPKey

from exchange import crypto
from exchange.canonical import canonical_json, sha256_hex
from exchange.keys.announcement import KeyEntry, KeySet, Trusted, announce, announcement_digest
from exchange.ledger.key_history import PartyAnchor
from tests.unit.test_key_announcements import entry as announced_entry

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
FOREVER = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)


def new_key(kind: Literal["sig", "enc", "ckpt"], kid: str) -> OKPKey:
    return crypto.private_jwk(crypto.new_message_key(kind), kid)


def entry(
    key: OKPKey, purpose: str, state: str, valid_from: dt.datetime = EPOCH, **extra: object
) -> KeyEntry:
    return announced_entry(key, purpose, state, valid_from=valid_from, **extra)


@dataclass
class Chain:
    """One party's versions: version 1 as the agreement would pin it, then announcements."""

    party: str
    checkpoint: OKPKey = field(init=False)
    signing: OKPKey = field(init=False)
    encryption: OKPKey = field(init=False)
    sets: list[KeySet] = field(default_factory=list)
    announcements: list[str] = field(default_factory=list)
    first: Trusted | None = None

    def __post_init__(self) -> None:
        self.checkpoint = new_key("ckpt", f"{self.party}-ckpt-1")
        self.signing = new_key("sig", f"{self.party}-sig-1")
        self.encryption = new_key("enc", f"{self.party}-enc-1")
        v1 = KeySet(
            party=self.party,
            version=1,
            issued_at=EPOCH,
            expires_at=FOREVER,
            keys=(
                entry(self.signing, "signing", "active"),
                entry(self.encryption, "encryption", "active"),
                entry(self.checkpoint, "checkpoint", "active"),
            ),
        )
        self.sets.append(v1)
        self.first = Trusted(v1, sha256_hex(canonical_json(v1.model_dump(mode="json", exclude_none=True))))

    @property
    def origin(self) -> str:
        return f"{self.party}-node/ledger"

    @property
    def witness(self) -> str:
        return f"{self.party}-node/witness"

    def anchor(self) -> PartyAnchor:
        assert self.first is not None
        return PartyAnchor(self.party, self.origin, self.witness, self.first)

    def digest(self) -> str:
        assert self.first is not None
        return announcement_digest(self.announcements[-1]) if self.announcements else self.first.digest

    def publish(self, issued_at: dt.datetime, keys: tuple[KeyEntry, ...], signers: list[OKPKey]) -> str:
        key_set = KeySet(
            party=self.party,
            version=len(self.sets) + 1,
            issued_at=issued_at,
            expires_at=FOREVER,
            previous=self.digest(),
            keys=keys,
        )
        announcement = announce(key_set, signers)
        self.sets.append(key_set)
        self.announcements.append(announcement)
        return announcement

    def others(self) -> tuple[KeyEntry, KeyEntry]:
        return entry(self.signing, "signing", "active"), entry(self.encryption, "encryption", "active")

    def rotate_checkpoint(self, announced: dt.datetime, activated: dt.datetime) -> OKPKey:
        """Announce a next checkpoint key at ``announced``, make it active at ``activated`` (the old
        one retired then); returns the new key."""
        old = self.checkpoint
        new = new_key("ckpt", f"{self.party}-ckpt-{len(self.sets) + 1}")
        self.publish(
            announced,
            (*self.others(), entry(old, "checkpoint", "active"), entry(new, "checkpoint", "next", announced)),
            [self.signing],
        )
        self.publish(
            activated,
            (
                *self.others(),
                entry(old, "checkpoint", "retired", valid_until=activated),
                entry(new, "checkpoint", "active", activated),
            ),
            [self.signing],
        )
        self.checkpoint = new
        return new

    def revoke(self, purpose: str, at: dt.datetime, effective: dt.datetime) -> OKPKey:
        """Revoke the active ``purpose`` key (signing or checkpoint) from ``effective``, announced at
        ``at`` with a new active key; returns the new key."""
        old = self.signing if purpose == "signing" else self.checkpoint
        new = new_key(
            "sig" if purpose == "signing" else "ckpt", f"{self.party}-{purpose}-{len(self.sets) + 1}"
        )
        kept = [k for k in self.sets[-1].keys if k.kid != old.kid]
        signers = [self.signing, new] if purpose == "signing" else [self.signing]
        self.publish(
            at,
            (
                *kept,
                entry(old, purpose, "revoked", revoked_at=effective),
                entry(new, purpose, "active", at),
            ),
            signers,
        )
        if purpose == "signing":
            self.signing = new
        else:
            self.checkpoint = new
        return new
