"""Attacks on key rotation found by review, each reproduced against two nodes in one process and
each refused now: a forged key set behind an old key id, a fork of versions, a flood of versions,
an expired version slipped in, racing steps, a crash between publishing and destroying, a backdated
receipt by a revoked key, a key set grown full, a receipt of our key set forged or acknowledging
something else."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from joserfc.jwk import OKPKey

from exchange import crypto, envelope
from exchange.auditing import AuditService
from exchange.canonical import sha256_hex
from exchange.config import load_settings
from exchange.db import repo
from exchange.errors import (
    EnvelopeError,
    KeyManagementError,
    LedgerIntegrityError,
    PartnerKeysUnavailable,
    TransportError,
)
from exchange.keys import store
from exchange.keys.announcement import (
    AnnouncementRejected,
    KeySet,
    KeySetReceipt,
    PublicKey,
    Trusted,
    announce,
    sign_receipt,
)
from exchange.keys.registry import KeyRegistry
from exchange.node import Node
from exchange.transport.worker import DeliveryWorker
from tests.integration.conftest import Pair
from tests.integration.test_key_rotation import (
    admin,
    drain,
    events,
    failing_fetch,
    fetch_from,
    sealed_envelope,
    statuses,
    submit,
)
from tests.integration.test_node_flow import Clock, Loopback, now
from tests.support import PASSPHRASE


def _public(key: OKPKey) -> dict[str, str]:
    d = crypto.public_jwk_dict(key)
    return {k: d[k] for k in ("kty", "crv", "x")}


def forge_partner_version(my_node: Node) -> tuple[Trusted, str, OKPKey]:
    """ID's next version as someone holding none of ID's private keys would build it: their key
    behind ID's active signing key id, their own signing and encryption keys, their TLS pin."""
    trusted = my_node.registry.history("ID").versions[-1]
    old = trusted.key_set
    old_kid = old.active("signing").kid
    thief_old = crypto.private_jwk(crypto.new_message_key("sig"), old_kid)
    thief_sig = crypto.private_jwk(crypto.new_message_key("sig"), "ID-sig-evil")
    thief_enc = crypto.private_jwk(crypto.new_message_key("enc"), "ID-enc-evil")
    t = now()
    keys: list[Any] = []
    for k in old.keys:
        if k.kid == old_kid:
            keys.append(k.model_copy(update={"state": "retiring", "jwk": PublicKey(**_public(thief_old))}))
        elif k.purpose == "encryption" and k.state == "active":
            keys.append(k.model_copy(update={"state": "retired"}))
        else:
            keys.append(k)
    for key, purpose in ((thief_sig, "signing"), (thief_enc, "encryption")):
        keys.append(
            {"kid": key.kid, "purpose": purpose, "state": "active", "jwk": _public(key), "valid_from": t}
        )
    forged = KeySet.model_validate(
        {
            "party": "ID",
            "version": old.version + 1,
            "issued_at": t,
            "expires_at": t + dt.timedelta(days=365),
            "previous": trusted.digest,
            "tls_pins": ["ab" * 32],
            "keys": [k if isinstance(k, dict) else k.model_dump() for k in keys],
        }
    )
    return trusted, announce(forged, [thief_old, thief_sig]), thief_enc


def test_a_forged_key_set_behind_the_old_key_id_is_refused_on_the_peer_channel_and_in_the_database(
    nodes: Pair,
) -> None:
    _, _, _, my_node = nodes
    _, forged, _ = forge_partner_version(my_node)
    with pytest.raises(AnnouncementRejected, match="key-changed"):
        my_node.accept_key_sets([forged], now())  # what POST /v1/peer/key-sets does
    assert my_node.partner.encryption.kid != "ID-enc-evil"
    assert [e["reason"] for e in events(my_node, "keys.rejected")] == ["key-changed"]
    with my_node.db.transaction() as conn:  # someone with write access to the table only
        conn.execute(
            sa.text(
                "INSERT INTO key_sets (party, version, digest, announcement, issued_at, recorded_at)"
                " VALUES ('ID', 2, :d, :a, :t, :t)"
            ),
            {"d": "0" * 64, "a": forged, "t": now().isoformat()},
        )
    with pytest.raises(AnnouncementRejected, match="key-changed"):
        KeyRegistry(my_node.db, my_node.agreement, "MY", "ID").history("ID")  # a process starting now


def test_an_expired_version_cannot_be_slipped_in_before_junk_and_a_refused_request_stores_nothing(
    nodes: Pair,
) -> None:
    _, _, id_node, my_node = nodes
    signer = admin(id_node)._private(id_node.keys.signing_kid, "signing")
    trusted = id_node.registry.history("ID").versions[-1]
    t = now()
    expired = KeySet.model_validate(
        {
            **trusted.key_set.model_dump(),
            "version": 2,
            "previous": trusted.digest,
            "issued_at": t - dt.timedelta(days=400),
            "expires_at": t - dt.timedelta(days=35),
        }
    )
    stale = announce(expired, [signer])
    for batch in ([stale], [stale, "junk"]):
        with pytest.raises(AnnouncementRejected):
            my_node.accept_key_sets(batch, now())
    assert KeyRegistry(my_node.db, my_node.agreement, "MY", "ID").history("ID").version == 1
    assert not events(my_node, "keys.accepted")


def test_a_flood_of_versions_is_cut_at_the_daily_allowance(nodes: Pair) -> None:
    _, _, id_node, my_node = nodes
    keys = admin(id_node, expiry_warning_days=400)
    keys.rotate("signing")
    for _ in range(2):
        assert keys.renew_if_expiring()  # three honest versions in all
    batch = id_node.registry.announcements_after("ID", 1)
    with pytest.raises(AnnouncementRejected, match="too-many-versions"):
        my_node.registry.accept_partner(batch, now(), max_per_day=2)
    assert my_node.registry.history("ID").version == 1
    assert my_node.registry.accept_partner(batch, now(), max_per_day=3).version == 4


def test_a_step_racing_another_never_undoes_it(nodes: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, id_node, _ = nodes
    staged = admin(id_node).rotate("encryption")
    real_add_key = store.add_key

    def add_key_while_the_operator_revokes(*args: Any, **kwargs: Any) -> Any:
        record = real_add_key(*args, **kwargs)
        admin(id_node).revoke(staged.kid, reason="compromised", effective_at=now())  # another process
        return record

    monkeypatch.setattr("exchange.keys.rotation.add_key", add_key_while_the_operator_revokes)
    with pytest.raises(KeyManagementError, match="published meanwhile"):
        admin(id_node).rotate("checkpoint")
    monkeypatch.setattr("exchange.keys.rotation.add_key", real_add_key)
    assert id_node.registry.history("ID").current.key(staged.kid).state == "revoked"  # type: ignore[union-attr]


def test_two_commands_writing_the_key_index_at_once_lose_nothing(nodes: Pair) -> None:
    id_dir, _, _, _ = nodes
    key_dir = id_dir.path / "keys"
    made: dict[str, store.KeyRecord] = {}
    threads = [
        threading.Thread(target=lambda p=p: made.__setitem__(p, store.add_key(key_dir, p, PASSPHRASE)))
        for p in ("signing", "checkpoint", "encryption", "signing")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ring = store.read_keyring(key_dir)
    assert all(ring.record(r.kid) is not None for r in made.values())
    assert len(ring.keys) == 3 + 4


class Crash(Exception):
    pass


def test_a_key_left_on_disk_by_a_crash_is_destroyed_by_the_key_loop(
    nodes: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    id_dir, _, id_node, _ = nodes
    key_dir = id_dir.path / "keys"
    victim = id_node.keys.signing_kid
    real = store.destroy_key

    def power_cut(*_args: Any, **_kwargs: Any) -> bool:
        raise Crash("power cut")

    monkeypatch.setattr("exchange.keys.rotation.destroy_key", power_cut)
    with pytest.raises(Crash):
        admin(id_node).revoke(victim, reason="laptop stolen", effective_at=now())
    monkeypatch.setattr("exchange.keys.rotation.destroy_key", real)
    assert list(key_dir.glob(f"*-{victim}.pem"))
    admin(id_node).maintain()
    assert not list(key_dir.glob(f"*-{victim}.pem"))


def test_a_retired_encryption_key_is_not_loaded_for_decryption(nodes: Pair) -> None:
    _, _, id_node, _ = nodes
    old = id_node.keys.encryption_kid
    keys = admin(id_node, key_activation_wait_seconds=0, key_destroy_grace_seconds=0)
    keys.rotate("encryption")
    keys.activate("encryption", force=True)
    assert old in id_node.keys.decryption  # retiring: envelopes sealed for it may be in flight
    id_node.registry.note_encryption_key_used(id_node.keys.encryption_kid, now())
    assert keys.retire_due() == [old]
    assert old not in id_node.keys.decryption


def test_a_receipt_backdated_before_a_revocation_is_refused(nodes: Pair) -> None:
    id_dir, _, id_node, my_node = nodes
    stolen = my_node.keys.signing
    admin(my_node).revoke(str(stolen.kid), reason="laptop stolen", effective_at=now())
    drain(DeliveryWorker(my_node, Loopback(id_node)))
    mid = submit(id_node, id_dir, "polri-cms")
    with id_node.db.read() as conn:
        row = conn.execute(
            sa.text("SELECT envelope, envelope_sha256, created_at FROM messages WHERE id=:i"), {"i": mid}
        ).one()
    item = repo.Claimed(mid, row.envelope, row.envelope_sha256, 1, row.created_at, 0.0)
    worker = DeliveryWorker(id_node, Loopback(my_node))
    for received_at in (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), now()):
        forged = envelope.sign_receipt(
            message_id=mid,
            envelope_sha256=row.envelope_sha256,
            receiver="MY",
            sender="ID",
            received_at=received_at,
            signing_key=stolen,
        )
        with pytest.raises(EnvelopeError, match=r"out of range|key-not-in-force"):
            worker._verify_receipt(item, forged)


def test_a_key_set_never_grows_full_old_keys_leave_it_and_an_emergency_always_fits(
    nodes: Pair,
) -> None:
    _, _, id_node, _ = nodes
    # with no replay window to wait out, retired keys leave the set at the next version
    keys = admin(
        id_node,
        key_activation_wait_seconds=0,
        replay_window_seconds=1,
        delivery_max_wait_seconds=0.001,
        clock_skew_seconds=0,
    )
    for _ in range(64):
        keys.rotate("signing")
        keys.activate("signing", force=True)
        keys.clock = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)  # time passes
        keys.retire_due()
        keys.clock = lambda: dt.datetime.now(dt.UTC)
    assert len(id_node.registry.history("ID").current.keys) < 10
    replacement = keys.revoke(id_node.keys.signing_kid, reason="stolen", effective_at=now())
    assert replacement is not None


def test_a_rotation_that_would_fill_the_key_set_is_refused_and_the_spare_slot_kept_for_revocation(
    nodes: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    id_dir, _, id_node, _ = nodes
    monkeypatch.setattr("exchange.keys.rotation.MAX_KEYS", 5)  # three keys listed, one more, one spare
    keys = admin(id_node, key_activation_wait_seconds=0)
    keys.rotate("signing")
    keys.activate("signing", force=True)
    files = sorted(p.name for p in (id_dir.path / "keys").glob("*.pem"))
    with pytest.raises(KeyManagementError, match="holds 4 keys: retire or revoke old ones"):
        keys.rotate("encryption")
    assert sorted(p.name for p in (id_dir.path / "keys").glob("*.pem")) == files  # no key made for nothing
    assert keys.revoke(id_node.keys.signing_kid, reason="stolen", effective_at=now()) is not None


def test_a_version_deleted_from_the_table_is_not_forgotten_by_a_running_process(
    nodes: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Versions never go away: a row deleted by someone with write access to the table (to bring
    back a key a later version revoked) leaves the running process on the history it trusts, and
    is a security incident, reported once."""
    _, _, id_node, my_node = nodes
    staged = admin(id_node).rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    assert my_node.registry.history("ID").version == 2
    with my_node.db.transaction() as conn:
        conn.execute(sa.text("DELETE FROM key_sets WHERE party = 'ID' AND version = 2"))
    with caplog.at_level("ERROR", logger="exchange.keys"):
        my_node.registry.refresh()
        my_node.registry.refresh()
    assert my_node.registry.history("ID").version == 2
    assert my_node.registry.history("ID").current.key(staged.kid) is not None
    incidents = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY INCIDENT")]
    assert len(incidents) == 1
    assert "version 1 in the database, below the version 2" in incidents[0]


@pytest.mark.parametrize("whose", ["the partner's", "our own"])
def test_a_version_deleted_from_the_table_stops_a_fresh_process_from_starting(
    nodes: Pair, whose: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process started after the row was deleted has no trusted history to compare with: the
    ledger (witnessed by the partner) says which versions were published and accepted, and the
    node refuses to start on a table that lacks one, rather than trust the older key set."""
    id_dir, my_dir, id_node, my_node = nodes
    admin(id_node).rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    node, node_dir = (my_node, my_dir) if whose == "the partner's" else (id_node, id_dir)
    with node.db.transaction() as conn:
        conn.execute(sa.text("DELETE FROM key_sets WHERE party = 'ID' AND version = 2"))
    with caplog.at_level("ERROR"), pytest.raises(KeyManagementError) as refused:
        Node(load_settings(node_dir.path))
    assert "records ID's key set version 2, but the key sets stored go up to version 1 only" in str(
        refused.value
    )
    (incident,) = [r.getMessage() for r in caplog.records if "SECURITY INCIDENT" in r.getMessage()]
    assert incident.endswith(
        "records ID's key set version 2, but the key sets stored go up to version 1"
        " only: a version was deleted"
    )


def test_a_fresh_process_starts_on_an_intact_table_after_rotations(nodes: Pair) -> None:
    id_dir, my_dir, id_node, my_node = nodes
    admin(id_node).rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    for node_dir in (id_dir, my_dir):
        fresh = Node(load_settings(node_dir.path))
        assert fresh.registry.history("ID").version == 2
        fresh.close()


def forked_version_2(id_node: Node, my_node: Node) -> str:
    """Another version 2 of ID's key set than the one MY trusts, validly signed by ID's active key
    (a stolen key, or a node restored from an old backup), adding a signing key of its own."""
    v1 = my_node.registry.history("ID").versions[0]
    other = crypto.private_jwk(crypto.new_message_key("sig"), "ID-sig-other")
    t = now()
    fork = KeySet.model_validate(
        {
            **v1.key_set.model_dump(),
            "version": 2,
            "issued_at": t,
            "expires_at": t + dt.timedelta(days=365),
            "previous": v1.digest,
            "keys": [
                *(k.model_dump() for k in v1.key_set.keys),
                {
                    "kid": other.kid,
                    "purpose": "signing",
                    "state": "next",
                    "jwk": _public(other),
                    "valid_from": t,
                },
            ],
        }
    )
    return announce(fork, [id_node.keys.signing, other])


def test_a_second_different_version_from_the_partner_is_a_fork_and_changes_nothing(nodes: Pair) -> None:
    """ID's version 2 is trusted; another version 2, validly signed by ID's own active key, is
    refused as a fork and ledgered."""
    _, _, id_node, my_node = nodes
    admin(id_node).rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    trusted = my_node.registry.history("ID")
    assert trusted.version == 2
    with pytest.raises(AnnouncementRejected, match="fork"):
        my_node.accept_key_sets([forked_version_2(id_node, my_node)], now())
    after = my_node.registry.history("ID")
    assert (after.version, after.digest) == (trusted.version, trusted.digest)
    assert [e["reason"] for e in events(my_node, "keys.rejected")] == ["fork"]


def test_a_version_replaced_in_the_table_stops_a_fresh_process_from_starting(nodes: Pair) -> None:
    """Someone with write access to the table and the key that version 2 replaced swaps in their
    own version 2, validly signed, its digest column to match: the ledger recorded the digest
    of the version accepted, and a process starting on the swapped table refuses to."""
    _, my_dir, id_node, my_node = nodes
    admin(id_node).rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    fork = forked_version_2(id_node, my_node)
    with my_node.db.transaction() as conn:
        conn.execute(
            sa.text("UPDATE key_sets SET announcement = :a, digest = :d WHERE party = 'ID' AND version = 2"),
            {"a": fork, "d": sha256_hex(fork)},
        )
    with pytest.raises(
        KeyManagementError, match="ID's key set version 2 with another digest than the one stored"
    ):
        Node(load_settings(my_dir.path))
    with pytest.raises(LedgerIntegrityError, match="version 2 with another digest"):
        AuditService(my_node.db, my_node.agreement, my_node.party).verify()


class ReceiptSwap(Loopback):
    """The partner reached through a channel that hands back ``forge(the partner's receipt)``
    instead of the partner's own receipt of our key sets (the partner takes them honestly)."""

    def __init__(self, partner: Node) -> None:
        super().__init__(partner)
        self.forge: Callable[[KeySetReceipt], str] | None = None
        self.sent: list[list[str]] = []  # what each announcement carried
        self.answered: list[str] = []  # the receipt handed back each time

    def announce_keys(self, announcements: list[str]) -> str:
        self.sent.append(list(announcements))
        honest = super().announce_keys(announcements)
        payload = honest.split(".")[1]
        receipt = KeySetReceipt.model_validate_json(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
        answer = honest if self.forge is None else self.forge(receipt)
        self.answered.append(answer)
        return answer


def stranger(kid: str) -> OKPKey:
    """A signing key nobody announced, under ``kid``."""
    return crypto.private_jwk(crypto.new_message_key("sig"), kid)


def same(receipt: KeySetReceipt) -> KeySetReceipt:
    return receipt


def dated(at: dt.datetime) -> Callable[[KeySetReceipt], KeySetReceipt]:
    return lambda receipt: receipt.model_copy(update={"accepted_at": at})


def changed(**update: object) -> Callable[[KeySetReceipt], KeySetReceipt]:
    return lambda receipt: receipt.model_copy(update=update)


def signed_by(
    key: OKPKey, change: Callable[[KeySetReceipt], KeySetReceipt] = same
) -> Callable[[KeySetReceipt], str]:
    """A forger that hands back the partner's receipt, ``change``d, signed by ``key``."""
    return lambda receipt: sign_receipt(change(receipt), key)


def refused_and_pending(id_node: Node, link: ReceiptSwap, reason: str, case: str) -> None:
    """The receipt ``link`` forges is refused with ``reason`` and leaves version 2 unacknowledged."""
    with pytest.raises(AnnouncementRejected) as refused:  # DID NOT RAISE: a receipt ``case`` taken
        id_node.announce_keys(link.announce_keys, now())
    assert refused.value.reason == reason, (case, str(refused.value))
    assert [v for v, _ in id_node.registry.unacknowledged()] == [2], case
    assert [r["acknowledged_at"] for r in id_node.registry.own_rows()] == [None], case
    last = events(id_node, "keys.")[-1]  # the refused receipt itself is ledgered, and why
    assert (last["event"], last["party"], last["version"], last["reason"]) == (
        "keys.rejected",
        "ID",
        2,
        reason,
    )
    assert last["sha256"] == sha256_hex(link.answered[-1]), case


def test_a_receipt_of_our_key_set_by_a_partner_key_lost_since_is_refused_once_no_honest_one_can_be_late(
    nodes: Pair,
) -> None:
    """Our version 2 was recorded before the partner lost a signing key: a receipt by the stolen
    key dated between the two is in force at its own date. It is refused once a receipt the
    partner gave before the loss could no longer be on its way (the longest wait after the loss,
    judged when it arrives), so the thief cannot acknowledge for the partner forever."""
    _, _, id_node, my_node = nodes
    admin(id_node).rotate("signing")  # version 2, recorded now
    time.sleep(0.2)
    lost_at = now() - dt.timedelta(seconds=0.1)
    stolen = my_node.keys.signing
    admin(my_node).revoke(str(stolen.kid), reason="laptop stolen", effective_at=lost_at)
    drain(DeliveryWorker(my_node, Loopback(id_node)))  # ID learns of the revocation
    link = ReceiptSwap(my_node)
    link.forge = signed_by(stolen, dated(lost_at - dt.timedelta(seconds=0.05)))
    wait, second = id_node.settings.longest_wait, dt.timedelta(seconds=1)
    with pytest.raises(AnnouncementRejected) as refused:
        id_node.announce_keys(link.announce_keys, lost_at + wait + second)
    assert refused.value.reason == "bad-receipt"
    assert [v for v, _ in id_node.registry.unacknowledged()] == [2]
    # within the wait it cannot be told from a receipt the partner gave before the loss
    assert id_node.announce_keys(link.announce_keys, lost_at + wait - second) == 2
    assert not id_node.registry.unacknowledged()


def acknowledged_honestly_after(
    id_node: Node, link: ReceiptSwap, announcement: str, refusals: int, ledgered: list[str]
) -> None:
    """Every refused round sent version 2 again and was ledgered as a refusal, none as an
    acknowledgement, and the next honest round is the one acknowledgement, ledgered with the
    partner's own receipt."""
    ledgered = [*ledgered, *["keys.rejected"] * refusals]
    assert [e["event"] for e in events(id_node, "keys.")] == ledgered
    with pytest.raises(KeyManagementError, match="not acknowledged key set version 2"):
        admin(id_node).activate("signing")
    link.forge = None
    assert id_node.announce_keys(link.announce_keys, now()) == 2
    assert link.sent == [[announcement]] * (refusals + 1)  # announced again every time
    assert not id_node.registry.unacknowledged()
    assert [e["event"] for e in events(id_node, "keys.")] == [*ledgered, "keys.acknowledged"]
    acknowledged = events(id_node, "keys.acknowledged")
    assert [(e["version"], e["sha256"]) for e in acknowledged] == [(2, sha256_hex(link.answered[-1]))]


def test_a_receipt_of_our_key_set_signed_by_a_key_not_the_partners_is_refused_and_announced_again(
    nodes: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever sits on the peer channel cannot acknowledge our key set for the partner: a receipt
    of the right version and digest is refused unless a signing key of the partner, in force when
    it was given, signed it. Nothing is recorded or ledgered as acknowledged; the version is
    announced again (by the delivery worker after its backoff) until the partner's own receipt."""
    _, _, id_node, my_node = nodes
    lost_at = now() - dt.timedelta(hours=1)
    stolen = my_node.keys.signing
    admin(my_node).revoke(str(stolen.kid), reason="laptop stolen", effective_at=lost_at)
    drain(DeliveryWorker(my_node, Loopback(id_node)))  # ID learns of the revocation
    assert id_node.partner.history.in_force(str(stolen.kid), now()) is None
    admin(id_node).rotate("signing")
    ((_, announcement),) = id_node.registry.unacknowledged()
    ledgered = [str(e["event"]) for e in events(id_node, "keys.")]
    link = ReceiptSwap(my_node)
    id_node.fetch_partner_key_sets = link.fetch_key_sets  # an unknown key id makes ID look: in vain
    signers: list[tuple[str, OKPKey, Callable[[KeySetReceipt], KeySetReceipt], str]] = [
        (
            "by a stranger, under the partner's signing key id",
            stranger(my_node.keys.signing_kid),
            same,
            "bad-signature",
        ),
        ("by a stranger, under a key id of its own", stranger("MY-sig-evil"), same, "unknown-key"),
        ("by our own signing key (reflected)", id_node.keys.signing, same, "unknown-key"),
        ("by the partner's checkpoint key, not a signing key", my_node.keys.checkpoint, same, "unknown-key"),
        ("by the partner's revoked key, dated now", stolen, same, "bad-receipt"),
        (
            "by the partner's revoked key, backdated before the revocation",
            stolen,
            dated(lost_at - dt.timedelta(minutes=1)),
            "bad-receipt",
        ),
    ]
    for case, key, change, reason in signers:
        link.forge = signed_by(key, change)
        refused_and_pending(id_node, link, reason, case)
    assert my_node.registry.history("ID").version == 2  # the partner did take it, every time
    clock = Clock()
    worker = DeliveryWorker(id_node, link, clock=clock)
    link.forge = signed_by(stranger("MY-sig-evil"))
    caplog.clear()
    with caplog.at_level("ERROR"):
        worker.run_once()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "SECURITY INCIDENT: the receipt of our key set by MY is refused:"
        " unknown-key: receipt signed by unknown key MY-sig-evil"
    ]
    worker.run_once()  # within its backoff the worker does not announce again
    assert len(link.sent) == len(signers) + 1
    assert [v for v, _ in id_node.registry.unacknowledged()] == [2]
    backoff = id_node.settings.delivery_backoff_max_seconds
    clock.now += backoff
    worker.run_once()  # after it, it does: refused again
    assert len(link.sent) == len(signers) + 2
    clock.now += backoff
    worker.run_once()  # each refusal in a row doubles the wait: a hostile partner cannot flood the ledger
    assert len(link.sent) == len(signers) + 2
    clock.now += backoff
    worker.run_once()
    assert len(link.sent) == len(signers) + 3
    clock.now += 4 * backoff - 1
    worker.run_once()
    assert len(link.sent) == len(signers) + 3
    acknowledged_honestly_after(id_node, link, announcement, len(signers) + 3, ledgered)


def test_a_receipt_by_a_key_we_could_not_look_up_is_retried_not_an_incident(nodes: Pair) -> None:
    """A receipt signed by a key id we do not know makes us fetch the partner's key sets; if that
    fetch fails, nothing says the receipt is forged: nothing is ledgered, the delivery round still
    sends its batch, and the version is announced again after the key-fetch interval, when the
    fetch is tried again (a failed fetch does not use up its rate) and a key still unknown is
    refused."""
    id_dir, _, id_node, my_node = nodes
    id_node.settings = id_node.settings.model_copy(update={"key_fetch_interval_seconds": 0.3})
    admin(id_node).rotate("signing")
    link = ReceiptSwap(my_node)
    link.forge = signed_by(stranger("MY-sig-new"))
    fetched: list[int] = []

    def unreachable(after: int) -> list[str]:
        fetched.append(after)
        raise TransportError("connection refused")

    id_node.fetch_partner_key_sets = unreachable
    before = events(id_node, "keys.")
    with pytest.raises(PartnerKeysUnavailable, match="could not fetch the key sets of MY"):
        id_node.announce_keys(link.announce_keys, now())
    assert events(id_node, "keys.") == before
    assert [v for v, _ in id_node.registry.unacknowledged()] == [2]
    clock = Clock()
    worker = DeliveryWorker(id_node, link, clock=clock)
    mid = submit(id_node, id_dir, "polri-cms")
    assert worker.run_once() == 1  # the batch went, though its key set's receipt could not be checked
    assert statuses(id_node, id_dir, "polri-cms", [mid]) == ["delivered"]
    assert events(id_node, "keys.") == before
    assert len(fetched) == 2  # looked again at once: the first failure did not use up the rate
    worker.run_once()
    assert len(link.sent) == 2  # waiting for the key-fetch interval
    settings = id_node.settings
    clock.now += max(settings.delivery_backoff_base_seconds, settings.key_fetch_interval_seconds)
    time.sleep(settings.key_fetch_interval_seconds)  # the fetch rate counts real time

    def reachable(after: int) -> list[str]:
        fetched.append(after)
        return link.fetch_key_sets(after)

    id_node.fetch_partner_key_sets = reachable
    worker.run_once()  # reachable again: the key is looked up, not there, the receipt refused
    assert len(fetched) == 3
    assert events(id_node, "keys.")[-1]["event"] == "keys.rejected"


def test_after_refused_receipts_a_newer_version_is_announced_without_waiting(nodes: Pair) -> None:
    """The wait after refused receipts holds back the version that was refused, not a revocation
    published meanwhile: that goes out at the next round."""
    _, _, id_node, my_node = nodes
    admin(id_node).rotate("signing")
    link = ReceiptSwap(my_node)
    link.forge = signed_by(stranger(my_node.keys.signing_kid))
    clock = Clock()
    worker = DeliveryWorker(id_node, link, clock=clock)
    backoff = id_node.settings.delivery_backoff_max_seconds
    for wait in (0, backoff, 2 * backoff):  # each refusal in a row doubles the wait
        clock.now += wait
        worker.run_once()
    assert len(link.sent) == 3
    clock.now += backoff
    worker.run_once()  # the third refusal waits four times the longest probe interval
    assert len(link.sent) == 3
    link.forge = None
    admin(id_node).revoke(id_node.keys.signing_kid, reason="stolen", effective_at=now())
    worker.run_once()
    assert len(link.sent) == 4
    assert not id_node.registry.unacknowledged()
    worker.run_once()
    assert len(link.sent) == 4  # acknowledged: nothing more to announce


def test_a_receipt_by_the_partners_own_key_for_another_version_or_digest_is_refused(nodes: Pair) -> None:
    """A receipt validly signed by the partner's active signing key acknowledges what it names; if
    that is not what we announced (another version, digest, party or key set, or a time outside
    the round), it is refused as ``bad-receipt`` and acknowledges nothing."""
    _, _, id_node, my_node = nodes
    first = my_node.registry.history("ID").versions[0]
    admin(id_node).rotate("signing")
    ((_, announcement),) = id_node.registry.unacknowledged()
    ledgered = [str(e["event"]) for e in events(id_node, "keys.")]
    recorded = id_node.registry.recorded_at("ID", 2)
    skew = dt.timedelta(seconds=id_node.settings.clock_skew_seconds)
    changes: list[tuple[str, Callable[[KeySetReceipt], KeySetReceipt]]] = [
        ("of the version in force before, with its digest", changed(version=1, digest=first.digest)),
        ("of a version not announced, with the digest announced", changed(version=3)),
        ("of the version announced, with another digest", changed(digest=sha256_hex(announcement + " "))),
        ("of the version announced, with the digest of version 1", changed(digest=first.digest)),
        ("naming us as the party acknowledging", changed(party="ID")),
        ("of the partner's own key set", changed(of="MY")),
        ("dated before the version was stored", dated(recorded - skew - dt.timedelta(seconds=1))),
        ("dated in the future", dated(now() + skew + dt.timedelta(minutes=1))),
    ]
    link = ReceiptSwap(my_node)
    for case, change in changes:
        link.forge = signed_by(my_node.keys.signing, change)
        refused_and_pending(id_node, link, "bad-receipt", case)
    assert my_node.registry.history("ID").version == 2
    acknowledged_honestly_after(id_node, link, announcement, len(changes), ledgered)


def test_a_delivery_receipt_by_a_key_we_could_not_look_up_stays_unsettled_and_is_settled_later(
    nodes: Pair,
) -> None:
    """The partner signs its receipts with a key it activated before we learnt it, and fetching its
    key sets fails: nothing says the receipt is forged, and the partner holds the message. It is
    neither failed nor ledgered as an invalid receipt: it stays leased, goes again when the lease
    ends, and the partner's original receipt is verified once its keys can be fetched."""
    id_dir, _, id_node, my_node = nodes
    partner_keys = admin(my_node, key_activation_wait_seconds=0)
    partner_keys.rotate("signing")
    new_kid = partner_keys.activate("signing", force=True).kid  # we were never told of it
    assert new_kid not in id_node.partner.verification
    fetched: list[int] = []
    id_node.fetch_partner_key_sets = failing_fetch(fetched)
    link = Loopback(my_node)
    clock = Clock()
    worker = DeliveryWorker(id_node, link, clock=clock)
    mid = submit(id_node, id_dir, "polri-cms")
    worker.run_once()
    assert fetched  # the unknown key made us look
    assert statuses(id_node, id_dir, "polri-cms", [mid]) == ["sent"]  # not failed
    assert events(id_node, "receipt.") == []
    with id_node.db.read() as conn:
        assert repo.outbox_size(conn) == 1  # still ours to settle
    id_node.fetch_partner_key_sets = link.fetch_key_sets
    clock.now += max(id_node.settings.delivery_lease_seconds, id_node.settings.key_fetch_interval_seconds)
    drain(worker)
    assert statuses(id_node, id_dir, "polri-cms", [mid]) == ["delivered"]
    verified = events(id_node, "receipt.verified")
    assert [e["signer_kid"] for e in verified] == [new_kid]
    assert len(events(my_node, "envelope.received")) == 1  # the partner took it once, answered twice


def test_a_key_set_endpoint_that_keeps_failing_is_asked_twice_per_interval_not_once_per_batch(
    nodes: Pair,
) -> None:
    """Envelopes under a signing key not known here, from a partner whose key-set endpoint fails
    (or hangs: each attempt may hold a thread for the peer timeout): a blip is looked at again at
    once, but a failing endpoint gets two fetches per interval whatever the number of batches,
    and every batch meanwhile is refused for now (502), none rejected for good."""
    id_dir, _, id_node, my_node = nodes
    keys = admin(id_node, key_activation_wait_seconds=0)
    keys.rotate("signing")
    keys.activate("signing", force=True)  # never announced
    my_node.settings = my_node.settings.model_copy(update={"key_fetch_interval_seconds": 60.0})
    fetched: list[int] = []
    my_node.fetch_partner_key_sets = failing_fetch(fetched)
    mid = submit(id_node, id_dir, "polri-cms")
    sealed = sealed_envelope(id_node, mid)
    for _ in range(5):
        with pytest.raises(PartnerKeysUnavailable):
            my_node.receive([sealed], now())
    assert len(fetched) == 2
    with my_node.db.read() as conn:
        assert repo.get_message(conn, mid) is None
    assert events(my_node, "envelope.") == []
    my_node.settings = my_node.settings.model_copy(update={"key_fetch_interval_seconds": 0.05})
    time.sleep(0.1)  # the interval has passed
    my_node.fetch_partner_key_sets = fetch_from(id_node)
    assert my_node.receive([sealed], now())[0].accepted
