"""Key-set announcements, TUF style: every acceptance rule is a row of a table, and a revoked key is
trusted only for what it signed before its revocation."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from joserfc.jwk import OKPKey

from exchange import crypto
from exchange.keys.announcement import (
    AnnouncementRejected,
    KeyEntry,
    KeySet,
    Trusted,
    accept,
    announce,
    announcement_digest,
    key_ended,
    key_in_force,
    walk,
)

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)


def signing_key(name: str) -> OKPKey:
    return crypto.private_jwk(crypto.new_message_key("sig"), name)


def entry(key: OKPKey, purpose: str, state: str, **extra: object) -> KeyEntry:
    public = crypto.public_jwk_dict(key)
    return KeyEntry.model_validate(
        {
            "kid": key.kid,
            "purpose": purpose,
            "state": state,
            "valid_from": T0,
            "jwk": {k: public[k] for k in ("kty", "crv", "x")},
            **extra,
        }
    )


@dataclass
class Chain:
    """Versions 1..n of a party's key set, signing key rotated at every version."""

    signers: list[OKPKey] = field(default_factory=list)
    sets: list[KeySet] = field(default_factory=list)
    announcements: list[str] = field(default_factory=list)
    enc: OKPKey = field(default_factory=lambda: crypto.private_jwk(crypto.new_message_key("enc"), "enc-1"))
    ckpt: OKPKey = field(default_factory=lambda: signing_key("ckpt-1"))

    def key_set(
        self,
        version: int,
        *,
        previous: str | None,
        extra: tuple[KeyEntry, ...] = (),
        expires: dt.datetime = NOW + dt.timedelta(days=365),
        party: str = "ID",
    ) -> KeySet:
        keys = [entry(k, "signing", "retired") for k in self.signers[:-1]]
        keys.append(entry(self.signers[-1], "signing", "active"))
        keys += [entry(self.enc, "encryption", "active"), entry(self.ckpt, "checkpoint", "active"), *extra]
        return KeySet(
            party=party,
            version=version,
            issued_at=T0 + dt.timedelta(days=version),
            expires_at=expires,
            previous=previous,
            keys=tuple(keys),
        )

    def grow(self, n: int) -> Chain:
        for version in range(1, n + 1):
            self.signers.append(signing_key(f"sig-{version}"))
            previous = announcement_digest(self.announcements[-1]) if self.announcements else None
            key_set = self.key_set(version, previous=previous)
            signers = [self.signers[-1]] + ([self.signers[-2]] if version > 1 else [])
            self.sets.append(key_set)
            self.announcements.append(announce(key_set, signers))
        return self

    def trusted(self, version: int = 1) -> Trusted:
        return Trusted(self.sets[version - 1], announcement_digest(self.announcements[version - 1]))


def next_version(chain: Chain, **kwargs: object) -> tuple[KeySet, OKPKey, OKPKey]:
    """Version n+1 with a new signing key: (its key set, the old signing key, the new one)."""
    old = chain.signers[-1]
    new = signing_key(f"sig-{len(chain.signers) + 1}")
    chain.signers.append(new)
    defaults: dict[str, object] = {"previous": announcement_digest(chain.announcements[-1])}
    defaults.update(kwargs)
    version = int(defaults.pop("version", len(chain.sets) + 1))  # type: ignore[call-overload]
    key_set = chain.key_set(version, **defaults)  # type: ignore[arg-type]
    return key_set, old, new


def signed(by: str, **kwargs: object) -> Callable[[Chain], str]:
    """Version n+1 signed by ``by``: a comma list of ``old``, ``new`` and ``stranger``."""

    def make(chain: Chain) -> str:
        key_set, old, new = next_version(chain, **kwargs)
        keys = {"old": old, "new": new, "stranger": signing_key("stranger")}
        return announce(key_set, [keys[name] for name in by.split(",")])

    return make


def next_key_staged(by: str) -> Callable[[Chain], str]:
    """Version n+1 keeps the active signing key and stages a ``next`` one, signed by ``by``."""

    def make(chain: Chain) -> str:
        staged = signing_key(f"sig-next-{len(chain.signers)}")
        key_set = chain.key_set(
            len(chain.sets) + 1,
            previous=announcement_digest(chain.announcements[-1]),
            extra=(entry(staged, "signing", "next"),),
        )
        keys = {"active": chain.signers[-1], "next": staged}
        return announce(key_set, [keys[name] for name in by.split(",")])

    return make


def forged(change: str) -> Callable[[Chain], str]:
    """Version n+1 built by someone who holds none of the party's private keys: ``swap`` puts their
    key behind the old active kid, ``retired`` slips their signing key in as already retired."""

    def make(chain: Chain) -> str:
        old = chain.signers[-1]
        thief = crypto.private_jwk(crypto.new_message_key("sig"), str(old.kid))  # the old kid, another key
        extra = signing_key("thief-sig")
        previous = announcement_digest(chain.announcements[-1])
        if change == "swap":
            chain.signers[-1] = thief
            key_set = chain.key_set(len(chain.sets) + 1, previous=previous)
            return announce(key_set, [thief])
        key_set = chain.key_set(
            len(chain.sets) + 1, previous=previous, extra=(entry(extra, "signing", "retired"),)
        )
        return announce(key_set, [old])

    return make


def dropped(purpose: str) -> Callable[[Chain], str]:
    """Version n+1 without the party's active ``purpose`` key (a new one in its place)."""

    def make(chain: Chain) -> str:
        if purpose == "encryption":
            chain.enc = crypto.private_jwk(crypto.new_message_key("enc"), "enc-other")
        key_set = chain.key_set(len(chain.sets) + 1, previous=announcement_digest(chain.announcements[-1]))
        return announce(key_set, [chain.signers[-1]])

    return make


def altered(change: str) -> Callable[[Chain], str]:
    """Version n+1, signed by both keys as it should be, but ``naive``: its issue time without a
    time zone (or, ``naive-key``, a key's start); ``earlier``: issued before the version it follows.
    Stored, either would have broken every later check of a key (or the audit) for good."""

    def make(chain: Chain) -> str:
        key_set, old, new = next_version(chain)
        if change == "naive":
            key_set = key_set.model_copy(update={"issued_at": key_set.issued_at.replace(tzinfo=None)})
        elif change == "naive-key":
            first = key_set.keys[0].model_copy(update={"valid_from": T0.replace(tzinfo=None)})
            key_set = key_set.model_copy(update={"keys": (first, *key_set.keys[1:])})
        else:
            key_set = key_set.model_copy(
                update={"issued_at": chain.sets[-1].issued_at - dt.timedelta(hours=1)}
            )
        return announce(key_set, [old, new])

    return make


def header(protected: bytes) -> Callable[[Chain], str]:
    """A general JWS whose one protected header is ``protected`` (not a JSON object)."""
    encoded = base64.urlsafe_b64encode(protected).decode().rstrip("=")
    return lambda chain: json.dumps(
        {
            "payload": json.loads(chain.announcements[-1])["payload"],
            "signatures": [{"protected": encoded, "signature": "AA"}],
        }
    )


Case = tuple[str, Callable[[Chain], str], str | None]
CASES: list[Case] = [
    ("both signatures", signed("old,new"), None),
    ("missing the old signature", signed("new"), "missing-old-signature"),
    ("missing the new signature (no proof of possession)", signed("old"), "missing-new-signature"),
    ("a signature by an unknown key instead of the old one", signed("stranger,new"), "missing-old-signature"),
    ("a staged next key signed by itself too", next_key_staged("active,next"), None),
    ("a staged next key without its own signature", next_key_staged("active"), "missing-new-signature"),
    ("another key behind the old signing key id (no old private key)", forged("swap"), "key-changed"),
    ("a signing key slipped in as already retired", forged("retired"), "bad-transition"),
    ("the active encryption key dropped", dropped("encryption"), "bad-transition"),
    ("the same key signing twice", signed("old,old,new"), "duplicate-signature"),
    ("a skipped version", signed("old,new", version=3), "skipped-version"),
    ("the trusted version replayed", lambda c: c.announcements[0], "replay"),
    ("an expired set", signed("old,new", expires=NOW - dt.timedelta(seconds=1)), "expired"),
    ("a set that names another predecessor", signed("old,new", previous="0" * 64), "mix-and-match"),
    ("another party's set", signed("old,new", party="MY"), "wrong-party"),
    ("not a JWS at all", lambda c: '{"payload": 1}', "malformed"),
    ("an issue time without a time zone", altered("naive"), "malformed"),
    ("a key's start without a time zone", altered("naive-key"), "malformed"),
    ("issued before the version it follows", altered("earlier"), "issued-before"),
    ("a protected header that is a list", header(b"[]"), "malformed"),
    ("a protected header nested beyond the parser's depth", header(b"[" * 100_000), "malformed"),
]


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_announcement_acceptance(name: str, make: Callable[[Chain], str], reason: str | None) -> None:
    chain = Chain().grow(1)
    announcement = make(chain)
    if reason is None:
        trusted = accept(chain.trusted(1), announcement, NOW)
        assert trusted.key_set.version == 2
        assert trusted.digest == announcement_digest(announcement)
        return
    with pytest.raises(AnnouncementRejected) as refused:
        accept(chain.trusted(1), announcement, NOW)
    assert refused.value.reason == reason, name


def test_an_old_version_is_a_rollback_and_a_partner_behind_walks_every_version() -> None:
    chain = Chain().grow(4)
    with pytest.raises(AnnouncementRejected) as refused:
        accept(chain.trusted(3), chain.announcements[1], NOW)
    assert refused.value.reason == "rollback"
    history = walk(chain.trusted(1), chain.announcements[1:], NOW)
    assert [t.key_set.version for t in history] == [1, 2, 3, 4]
    with pytest.raises(AnnouncementRejected, match="skipped-version"):  # it cannot jump from 1 to 4
        accept(chain.trusted(1), chain.announcements[3], NOW)


def test_a_revoked_key_is_trusted_only_for_what_it_signed_before_its_revocation() -> None:
    chain = Chain().grow(1)
    old = chain.signers[-1]
    revoked_at = T0 + dt.timedelta(days=10)
    revoked = entry(old, "signing", "revoked", revoked_at=revoked_at)
    new = signing_key("sig-2")
    chain.signers = [new]
    emergency = chain.key_set(2, previous=announcement_digest(chain.announcements[0]), extra=(revoked,))
    trusted = accept(chain.trusted(1), announce(emergency, [old, new]), NOW)
    history = [chain.sets[0], trusted.key_set]
    assert key_in_force(history, str(old.kid), T0 + dt.timedelta(days=5)) is not None  # before: still valid
    assert key_in_force(history, str(old.kid), revoked_at + dt.timedelta(seconds=1)) is None  # after: refused
    assert key_in_force(history, str(new.kid), NOW) is not None
    assert key_in_force(history, "nobody", NOW) is None


def test_a_key_ends_at_the_earliest_end_of_validity_or_revocation_any_version_gives_it() -> None:
    """What the receipt-time bound (``key-superseded``) counts from: a retiring key's end of
    validity, a revoked key's revocation time, the earlier of the two, still known once a later
    version drops the key."""
    chain = Chain().grow(1)
    old = chain.signers[-1]
    chain.signers = [signing_key("sig-2")]
    link = "0" * 64  # the chain of announcements is not what is tested here
    until, revoked_at = T0 + dt.timedelta(days=12), T0 + dt.timedelta(days=10)
    retiring = chain.key_set(2, previous=link, extra=(entry(old, "signing", "retiring", valid_until=until),))
    revoked = entry(old, "signing", "revoked", valid_until=until, revoked_at=revoked_at)
    versions = [
        chain.sets[0],
        retiring,
        chain.key_set(3, previous=link, extra=(revoked,)),
        chain.key_set(4, previous=link),
    ]
    assert [key_ended(versions[:n], str(old.kid)) for n in (1, 2, 3, 4)] == [
        None,
        until,
        revoked_at,
        revoked_at,
    ]
    assert key_ended(versions, str(chain.signers[0].kid)) is None  # the active one
    assert key_ended(versions, "nobody") is None


def test_a_key_set_must_have_one_active_key_per_purpose() -> None:
    chain = Chain().grow(1)
    keys = [k for k in chain.sets[0].keys if k.purpose != "checkpoint"]
    with pytest.raises(ValueError, match="active checkpoint"):
        KeySet(party="ID", version=1, issued_at=T0, expires_at=NOW, keys=tuple(keys))


def test_a_partner_away_walks_through_versions_expired_since_but_not_to_an_expired_last_one() -> None:
    chain = Chain()
    chain.signers.append(signing_key("sig-1"))
    chain.sets.append(chain.key_set(1, previous=None))
    chain.announcements.append(announce(chain.sets[0], [chain.signers[0]]))
    for version, expires in ((2, NOW - dt.timedelta(days=1)), (3, NOW + dt.timedelta(days=30))):
        key_set, old, new = next_version(chain, expires=expires)
        chain.sets.append(key_set)
        chain.announcements.append(announce(key_set, [old, new]))
        assert key_set.version == version
    history = walk(chain.trusted(1), chain.announcements[1:], NOW)  # version 2 expired since: passed
    assert [t.key_set.version for t in history] == [1, 2, 3]
    with pytest.raises(AnnouncementRejected, match="expired"):  # but never stop on an expired set
        walk(chain.trusted(1), chain.announcements[1:2], NOW)


def test_a_revoked_key_never_comes_back_and_keeps_its_revocation_time() -> None:
    chain = Chain().grow(1)
    old = chain.signers[-1]
    revoked = entry(old, "signing", "revoked", revoked_at=T0 + dt.timedelta(days=3))
    new = signing_key("sig-2")
    chain.signers = [new]
    v2 = chain.key_set(2, previous=announcement_digest(chain.announcements[0]), extra=(revoked,))
    a2 = announce(v2, [old, new])
    history = walk(chain.trusted(1), [a2], NOW)
    for state, extra in (("active", {}), ("revoked", {"revoked_at": T0 + dt.timedelta(days=30)})):
        back = entry(old, "signing", state, **extra)
        v3 = chain.key_set(3, previous=announcement_digest(a2), extra=(back,) if state == "revoked" else ())
        if state == "active":  # the revoked key as the active one again
            chain.signers = [old]
            v3 = chain.key_set(3, previous=announcement_digest(a2))
        with pytest.raises(AnnouncementRejected, match="bad-transition"):
            accept(history[-1], announce(v3, [new, old]), NOW, known={k.kid: k for k in v2.keys})
        chain.signers = [new]
