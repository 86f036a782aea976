"""Key rotation between two nodes in one process (the partner reached through a loopback transport):
announcement before use, acknowledgement before activation, in-flight messages kept, revocation
enforced by signing time, unknown keys fetched, a restart in the middle of a rotation resumed."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from exchange import crypto
from exchange.config import load_settings
from exchange.db import repo
from exchange.db.schema import key_sets
from exchange.errors import KeyManagementError, PartnerKeysUnavailable, TransportError
from exchange.keys.announcement import AnnouncementRejected
from exchange.keys.registry import KeyRegistry
from exchange.keys.rotation import PURPOSES, KeyAdmin
from exchange.messages import MessageSubmission
from exchange.node import Node
from exchange.transport.worker import DeliveryWorker
from tests.integration.conftest import Pair
from tests.integration.test_node_flow import Loopback, actor, now
from tests.support import PASSPHRASE, rfi, signed_message, tables_quoting


def admin(node: Node, **settings: object) -> KeyAdmin:
    return KeyAdmin(node.settings.model_copy(update=settings), node.registry)


def events(node: Node, prefix: str) -> list[dict[str, object]]:
    with node.db.read() as conn:
        return [{"event": e.event, **e.data} for e in repo.iter_ledger(conn) if e.event.startswith(prefix)]


def submit(node: Node, nd, name: str) -> str:  # type: ignore[no-untyped-def]
    return str(node.submit(actor(node, nd, name), MessageSubmission.model_validate(rfi()), now())["id"])


def statuses(node: Node, nd, name: str, ids: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    who = actor(node, nd, name)
    return [node.status(who, mid, now())["status"] for mid in ids]


def sealed_envelope(node: Node, message_id: str) -> str:
    """The transport JWE ``node`` sealed for ``message_id`` (kept until it is delivered)."""
    with node.db.read() as conn:
        query = sa.text("SELECT envelope FROM messages WHERE id = :id")
        return str(conn.execute(query, {"id": message_id}).scalar_one())


def failing_fetch(fetched: list[int]) -> Callable[[int], list[str]]:
    """A fetch of the partner's key sets that fails, noting each call's ``after`` in ``fetched``."""

    def fetch(after: int) -> list[str]:
        fetched.append(after)
        raise TransportError("connection refused")

    return fetch


def fetch_from(partner: Node) -> Callable[[int], list[str]]:
    """A fetch of ``partner``'s key sets that works (the partner's peer endpoint, in this process)."""
    return lambda after: list(partner.registry.announcements_after(partner.party, after))


def drain(worker: DeliveryWorker) -> None:
    for _ in range(10):
        if worker.run_once() == 0:
            return


def test_a_signing_key_is_announced_acknowledged_then_activated_and_in_flight_messages_still_count(
    nodes: Pair,
) -> None:
    id_dir, _, id_node, my_node = nodes
    old_kid = id_node.keys.signing_kid
    before = submit(id_node, id_dir, "polri-cms")  # sealed under the old key, not yet sent
    keys = admin(id_node)
    staged = keys.rotate("signing")
    assert staged.state == "next"
    assert id_node.registry.history("ID").version == 2
    with pytest.raises(KeyManagementError, match="not acknowledged key set version 2"):
        keys.activate("signing")
    worker = DeliveryWorker(id_node, Loopback(my_node))
    drain(worker)  # the announcement goes first, then the message
    assert my_node.registry.history("ID").version == 2
    assert [r["acknowledged_at"] is not None for r in id_node.registry.own_rows()] == [True]
    active = keys.activate("signing")
    assert active.kid == staged.kid
    assert id_node.keys.signing_kid == staged.kid
    in_flight = submit(id_node, id_dir, "polri-cms")  # another in flight, signed by the new key
    old_entry = id_node.registry.history("ID").current.key(old_kid)
    assert old_entry is not None
    assert old_entry.state == "retiring"
    assert old_entry.valid_until is not None
    drain(worker)
    assert statuses(id_node, id_dir, "polri-cms", [before, in_flight]) == ["delivered", "delivered"]
    received = {e["signer_kid"] for e in events(my_node, "envelope.received")}
    assert received == {old_kid, staged.kid}
    kinds = [e["event"] for e in events(id_node, "keys.")]
    assert kinds == ["keys.rotated", "keys.acknowledged", "keys.activated", "keys.acknowledged"]
    assert [e["event"] for e in events(my_node, "keys.")] == ["keys.accepted", "keys.accepted"]


def test_out_of_order_steps_are_refused_with_a_clear_message(nodes: Pair) -> None:
    _, _, id_node, _ = nodes
    keys = admin(id_node)
    with pytest.raises(KeyManagementError, match=r"no next encryption key.*rotate --purpose encryption"):
        keys.activate("encryption")
    keys.rotate("encryption")
    with pytest.raises(KeyManagementError, match="already next: activate it"):
        keys.rotate("encryption")
    with pytest.raises(KeyManagementError, match="--force is allowed only from"):
        keys.activate("encryption", force=True)
    with pytest.raises(KeyManagementError, match="is not a key of this node"):
        keys.revoke("MY-sig-0000", reason="lost", effective_at=now())
    with pytest.raises(KeyManagementError, match="in the future"):
        keys.revoke(id_node.keys.signing_kid, reason="lost", effective_at=now() + dt.timedelta(days=1))
    with pytest.raises(KeyManagementError, match="needs a --reason"):
        keys.revoke(id_node.keys.signing_kid, reason=" ", effective_at=now())
    forced = admin(id_node, key_activation_wait_seconds=0).activate("encryption", force=True)
    assert forced.state == "active"
    activated = events(id_node, "keys.activated")
    assert activated[-1]["forced"] is True
    assert activated[-1]["kid"] == forced.kid


def test_an_encryption_key_rotates_and_the_old_one_is_destroyed_after_the_partner_used_the_new(
    nodes: Pair,
) -> None:
    id_dir, my_dir, id_node, my_node = nodes
    old = my_node.keys.encryption_kid
    early = submit(id_node, id_dir, "polri-cms")  # sealed for MY's old encryption key
    keys = admin(my_node, key_destroy_grace_seconds=0)
    new = keys.rotate("encryption")
    my_worker = DeliveryWorker(my_node, Loopback(id_node))
    drain(my_worker)  # announces to ID
    keys.activate("encryption")
    drain(my_worker)
    assert id_node.partner.encryption.kid == new.kid
    assert keys.retire_due() == []  # the partner has not used the new key yet
    late = submit(id_node, id_dir, "polri-cms")  # sealed for the new key
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    assert statuses(id_node, id_dir, "polri-cms", [early, late]) == ["delivered", "delivered"]
    assert keys.retire_due() == [old]
    assert not list((my_dir.path / "keys").glob(f"enc-{old}.pem"))
    ring = json.loads((my_dir.path / "keys" / "keyring.json").read_text())
    assert next(k for k in ring["keys"] if k["kid"] == old)["file"] is None
    reader = actor(my_node, my_dir, "pdrm-d7")
    for mid in (early, late):  # content at rest does not depend on transport keys
        assert my_node.read(reader, mid, now())["payload"]


@pytest.mark.parametrize("change", ["rotate then activate", "revoke"])
def test_an_envelope_for_an_encryption_key_another_process_just_made_active_opens_at_once(
    nodes: Pair, change: str
) -> None:
    """The partner seals for a new encryption key as soon as it learns of it; a process of ours
    that has not yet read that version must open the envelope, not refuse it for good."""
    id_dir, my_dir, id_node, my_node = nodes
    old = my_node.keys.encryption_kid
    my_node.registry.refresh_seconds = 3600  # this process would not read the key sets again soon
    other = Node(load_settings(my_dir.path))  # the process where the administrator works
    try:
        keys = admin(other)
        other_worker = DeliveryWorker(other, Loopback(id_node))
        if change == "revoke":
            new = keys.revoke(old, reason="laptop lost", effective_at=now())
            assert new is not None
        else:
            new = keys.rotate("encryption")
            drain(other_worker)
            my_node.registry.refresh()  # this process has read the version staging the next key
            assert new.kid in my_node.keys.decryption
            keys.activate("encryption")
        drain(other_worker)  # ID learns the new active key
        assert id_node.partner.encryption.kid == new.kid
        assert my_node.registry.history("MY").current.active("encryption").kid == old  # stale
        sent = submit(id_node, id_dir, "polri-cms")  # sealed for the new key
        drain(DeliveryWorker(id_node, Loopback(my_node)))
        assert statuses(id_node, id_dir, "polri-cms", [sent]) == ["delivered"]
        assert events(my_node, "envelope.rejected") == []
        assert my_node.read(actor(my_node, my_dir, "pdrm-d7"), sent, now())["payload"]
    finally:
        other.close()


def test_a_partner_signing_key_another_process_accepted_counts_at_once_in_this_one(nodes: Pair) -> None:
    """ID's new signing key is announced to one process of MY; another, which has not yet read
    the key sets again and may not fetch them from ID, opens a message it signed and verifies it."""
    id_dir, my_dir, id_node, my_node = nodes
    my_node.registry.refresh_seconds = 3600
    my_node.fetch_partner_key_sets = None  # this process can only learn from the shared table
    other = Node(load_settings(my_dir.path))  # the process that takes ID's announcements
    try:
        keys = admin(id_node)
        to_other = DeliveryWorker(id_node, Loopback(other))
        new = keys.rotate("signing")
        drain(to_other)
        keys.activate("signing")
        drain(to_other)
        assert my_node.registry.history("ID").version == 1  # stale
        sent = submit(id_node, id_dir, "polri-cms")  # signed by the new key
        drain(DeliveryWorker(id_node, Loopback(my_node)))
        assert statuses(id_node, id_dir, "polri-cms", [sent]) == ["delivered"]
        assert {e["signer_kid"] for e in events(my_node, "envelope.received")} == {new.kid}
        assert events(my_node, "envelope.rejected") == []
    finally:
        other.close()


def test_a_retiring_signing_key_is_accepted_only_as_long_as_what_it_signed_before_its_end_may_wait(
    nodes: Pair,
) -> None:
    """A signature is judged at its signing time, which is the signer's word: a stolen retiring key
    could sign with a time before its end of validity anywhere in the replay window (30 days). A key
    the partner ended is accepted only until the longest a message may wait (delivery_max_wait
    plus the skew) after that end, as a superseded agreement version is."""
    _, _, id_node, my_node = nodes
    old_kid, old_key = id_node.keys.signing_kid, id_node.keys.signing
    keys = admin(id_node)
    keys.rotate("signing")
    worker = DeliveryWorker(id_node, Loopback(my_node))
    drain(worker)
    keys.activate("signing")
    drain(worker)  # the partner learns the old key is retiring, and until when
    entry = my_node.partner.history.entry(old_kid)
    assert entry is not None
    assert entry.state == "retiring"
    assert entry.valid_until is not None
    wait = my_node.settings.longest_wait
    signed_at = entry.valid_until - dt.timedelta(seconds=1)  # "just before its end"
    second = dt.timedelta(seconds=1)

    def backdated() -> str:
        return signed_message(id_node, signed_at, signing_key=old_key)

    assert my_node.receive([backdated()], entry.valid_until + wait - second)[0].accepted is True
    assert my_node.receive([backdated()], entry.valid_until + wait + second)[0].accepted is False
    assert [e["reason"] for e in events(my_node, "envelope.rejected")] == ["key-superseded"]
    assert id_node.keys.signing_kid != old_kid


def test_a_key_revoked_while_active_is_accepted_for_what_it_signed_before_only_as_long_as_that_may_wait(
    nodes: Pair,
) -> None:
    """The thief of an active key signs with a time just before the revocation time: accepted while
    a message signed then could still be on its way, refused (``key-superseded``) after."""
    _, _, id_node, my_node = nodes
    stolen_kid, stolen = id_node.keys.signing_kid, id_node.keys.signing
    lost_at = now() - dt.timedelta(seconds=1)
    admin(id_node).revoke(stolen_kid, reason="laptop stolen", effective_at=lost_at)
    drain(DeliveryWorker(id_node, Loopback(my_node)))  # the revocation is announced
    assert my_node.partner.history.ended(stolen_kid) == lost_at
    wait, second = my_node.settings.longest_wait, dt.timedelta(seconds=1)

    def backdated() -> str:
        return signed_message(id_node, lost_at - second, signing_key=stolen)

    assert my_node.receive([backdated()], lost_at + wait - second)[0].accepted is True
    assert my_node.receive([backdated()], lost_at + wait + second)[0].accepted is False
    assert [e["reason"] for e in events(my_node, "envelope.rejected")] == ["key-superseded"]


def test_a_revoked_signing_key_is_refused_for_what_it_signed_after_the_revocation_time(nodes: Pair) -> None:
    id_dir, _, id_node, my_node = nodes
    compromised = id_node.keys.signing_kid
    before = submit(id_node, id_dir, "polri-cms")
    time.sleep(0.05)
    lost_at = now()
    time.sleep(0.05)
    after = submit(id_node, id_dir, "polri-cms")  # signed by the key after it was lost
    replacement = admin(id_node).revoke(compromised, reason="laptop stolen", effective_at=lost_at)
    assert replacement is not None
    assert id_node.keys.signing_kid == replacement.kid
    assert not list((id_dir.path / "keys").glob(f"sig-{compromised}.pem"))
    fresh = submit(id_node, id_dir, "polri-cms")
    drain(DeliveryWorker(id_node, Loopback(my_node)))  # the revocation is announced first
    assert statuses(id_node, id_dir, "polri-cms", [before, after, fresh]) == [
        "delivered",
        "failed",
        "delivered",
    ]
    refused = events(my_node, "envelope.rejected")
    assert [e["reason"] for e in refused] == ["key-not-in-force"]
    revoked = events(id_node, "keys.revoked")[0]
    assert revoked["reason"] == "laptop stolen"
    assert revoked["replaced_by"] == replacement.kid


def test_an_unknown_key_makes_the_node_fetch_the_partner_key_sets_once_and_walk_every_version(
    nodes: Pair,
) -> None:
    id_dir, _, id_node, my_node = nodes
    keys = admin(id_node, key_activation_wait_seconds=0)
    keys.rotate("signing")
    keys.activate("signing", force=True)  # versions 2 and 3, never announced
    fetched: list[int] = []

    def fetch(after: int) -> list[str]:
        fetched.append(after)
        return list(id_node.registry.announcements_after("ID", after))

    my_node.fetch_partner_key_sets = fetch
    mid = submit(id_node, id_dir, "polri-cms")
    sealed = sealed_envelope(id_node, mid)
    assert my_node.receive([sealed], now())[0].accepted  # fetched, walked 1 -> 2 -> 3, then verified
    assert fetched == [1]
    assert my_node.registry.history("ID").version == 3
    keys.rotate("signing")
    keys.activate("signing", force=True)  # version 5: the node fetches at most once per interval
    second = submit(id_node, id_dir, "polri-cms")
    sealed = sealed_envelope(id_node, second)
    assert not my_node.receive([sealed], now())[0].accepted
    assert fetched == [1]


def test_a_node_restarted_in_the_middle_of_a_rotation_resumes_it(nodes: Pair) -> None:
    id_dir, _, id_node, my_node = nodes
    link = Loopback(my_node)
    link.down = True
    staged = admin(id_node).rotate("checkpoint")
    DeliveryWorker(id_node, link).run_once()  # the partner is away: not announced
    assert id_node.registry.unacknowledged()
    id_node.close()
    restarted = Node(load_settings(id_dir.path))
    try:
        link.down = False
        drain(DeliveryWorker(restarted, link))
        assert not restarted.registry.unacknowledged()
        activated = admin(restarted).activate("checkpoint")
        assert activated.kid == staged.kid == restarted.keys.checkpoint.kid
    finally:
        restarted.close()


def test_every_process_of_a_node_picks_up_a_rotation_without_a_restart(nodes: Pair) -> None:
    id_dir, _, id_node, _ = nodes
    other = Node(load_settings(id_dir.path, key_refresh_seconds=0.2))  # a second process of ID
    try:
        keys = admin(id_node, key_activation_wait_seconds=0)
        staged = keys.rotate("signing")
        keys.activate("signing", force=True)
        time.sleep(0.3)
        assert other.keys.signing_kid == staged.kid
    finally:
        other.close()


def test_a_key_set_edited_in_the_database_is_not_trusted(nodes: Pair) -> None:
    _, _, id_node, my_node = nodes
    admin(id_node).rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    with my_node.db.transaction() as conn:
        stored = conn.execute(sa.select(key_sets.c.announcement).where(key_sets.c.party == "ID")).scalar_one()
        document = json.loads(stored)
        document["signatures"] = document["signatures"][:1]  # drop the proof of possession
        conn.execute(
            key_sets.update().where(key_sets.c.party == "ID").values(announcement=json.dumps(document))
        )
    fresh = KeyRegistry(my_node.db, my_node.agreement, "MY", "ID")  # as a process starting now reads it
    with pytest.raises(AnnouncementRejected, match="missing-new-signature"):
        fresh.history("ID")


def test_a_replaced_signing_key_retires_after_its_window_and_an_expiring_key_set_is_renewed(
    nodes: Pair,
) -> None:
    id_dir, _, id_node, my_node = nodes
    keys = admin(id_node, key_activation_wait_seconds=0, delivery_max_wait_seconds=0.2, clock_skew_seconds=0)
    old = id_node.keys.signing_kid
    keys.rotate("signing")
    keys.activate("signing", force=True)
    assert keys.maintain() == 0  # still retiring: messages it signed may be in flight
    time.sleep(0.3)
    assert keys.retire_due() == [old]
    assert not list((id_dir.path / "keys").glob(f"sig-{old}.pem"))
    version = id_node.registry.history("ID").version
    assert not admin(id_node).renew_if_expiring()  # a year left
    assert admin(id_node, expiry_warning_days=400).renew_if_expiring()
    renewed = id_node.registry.history("ID")
    assert renewed.version == version + 1
    assert renewed.current.expires_at > renewed.sets[-2].expires_at
    drain(DeliveryWorker(id_node, Loopback(my_node)))  # the partner walks every version, expired or not
    assert my_node.registry.history("ID").version == renewed.version
    assert [e["event"] for e in events(id_node, "keys.")][-3:-1] == ["keys.retired", "keys.renewed"]


def test_no_private_key_reaches_the_database_the_ledger_or_the_log(
    nodes: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    id_dir, _, id_node, my_node = nodes
    caplog.set_level(logging.DEBUG)
    keys = admin(id_node, key_activation_wait_seconds=0)
    for purpose in PURPOSES:
        keys.rotate(purpose)
    secrets = {PASSPHRASE}
    for pem in (id_dir.path / "keys").glob("*.pem"):
        private = crypto.private_jwk(crypto.decrypt_private_pem(pem.read_bytes(), PASSPHRASE), "k")
        secrets.add(str(private.as_dict(private=True)["d"]))
    assert len(secrets) == 7  # the passphrase, three active keys, three next ones
    for purpose in PURPOSES:
        keys.activate(purpose, force=True)
    keys.revoke(id_node.keys.signing_kid, reason="drill", effective_at=now())
    submit(id_node, id_dir, "polri-cms")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    for node in (id_node, my_node):
        assert tables_quoting(node, "PRIVATE KEY", *secrets) == []
    logged = caplog.text
    assert "PRIVATE KEY" not in logged
    assert not [s for s in secrets if s in logged]


def partner_pins(node: Node) -> tuple[str, ...]:
    return node.partner.tls_pins


def test_a_node_key_change_is_announced_by_its_pin_and_refused_out_of_order(nodes: Pair) -> None:
    id_dir, _, id_node, my_node = nodes
    keys = admin(id_node)
    old_pin = id_node.registry.history("ID").current.tls_pins[0]
    with pytest.raises(KeyManagementError, match="no new node key is announced"):
        keys.activate_tls()
    new_pin = keys.rotate_tls()
    assert id_node.registry.history("ID").current.tls_pins == (old_pin, new_pin)
    assert (id_dir.path / "tls" / "node-next.pem").is_file()
    with pytest.raises(KeyManagementError, match="already under way"):
        keys.rotate_tls()
    with pytest.raises(KeyManagementError, match="has not acknowledged"):
        keys.activate_tls()
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    assert partner_pins(my_node) == (old_pin, new_pin)  # the partner admits both meanwhile
    assert admin(id_node, key_destroy_grace_seconds=0).drop_old_tls_pins() is False  # none replaced yet
    assert keys.activate_tls() == new_pin
    assert crypto.public_key_sha256((id_dir.path / "tls" / "node.pem").read_bytes()) == new_pin
    assert id_node.registry.history("ID").current.tls_pins == (new_pin, old_pin)
    assert admin(id_node, key_destroy_grace_seconds=0).drop_old_tls_pins() is True
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    assert partner_pins(my_node) == (new_pin,)


def test_an_envelope_by_a_key_we_could_not_look_up_is_neither_admitted_nor_rejected(nodes: Pair) -> None:
    """The partner seals with a signing key it activated before we learnt it, and its key sets
    cannot be fetched: the batch is refused as a whole for now (PartnerKeysUnavailable: 502 to
    the partner, which sends it again), nothing stored or ledgered; once the fetch works, the same
    envelope is admitted."""
    id_dir, _, id_node, my_node = nodes
    keys = admin(id_node, key_activation_wait_seconds=0)
    keys.rotate("signing")
    keys.activate("signing", force=True)  # never announced
    fetched: list[int] = []
    my_node.fetch_partner_key_sets = failing_fetch(fetched)
    mid = submit(id_node, id_dir, "polri-cms")
    sealed = sealed_envelope(id_node, mid)
    with my_node.db.read() as conn:
        before = repo.read_ledger_head(conn).size
    with pytest.raises(PartnerKeysUnavailable):
        my_node.receive([sealed], now())
    assert fetched == [1]
    with my_node.db.read() as conn:
        assert repo.read_ledger_head(conn).size == before  # no rejection, no incident
        assert repo.get_message(conn, mid) is None
    my_node.fetch_partner_key_sets = fetch_from(id_node)
    assert my_node.receive([sealed], now())[0].accepted  # a failed fetch did not use up its rate
    assert [e["event"] for e in events(my_node, "envelope.")] == ["envelope.received"]


def test_an_envelope_by_a_key_we_hold_as_next_but_could_not_look_up_is_not_refused_for_good(
    nodes: Pair,
) -> None:
    """We hold the partner's new signing key as ``next``; it activated it (a version we never got)
    and signs with it. Whether it was in force needs that version: if the fetch fails the batch
    is refused for now (502), nothing stored; once the fetch works the envelope is admitted."""
    id_dir, _, id_node, my_node = nodes
    keys = admin(id_node, key_activation_wait_seconds=0)
    keys.rotate("signing")
    my_node.accept_key_sets(id_node.registry.announcements_after("ID", 1), now())  # version 2
    keys.activate("signing", force=True)  # version 3, never announced
    assert id_node.keys.signing_kid in my_node.partner.verification  # held, but as next
    fetched: list[int] = []
    my_node.fetch_partner_key_sets = failing_fetch(fetched)
    mid = submit(id_node, id_dir, "polri-cms")
    sealed = sealed_envelope(id_node, mid)
    with pytest.raises(PartnerKeysUnavailable):
        my_node.receive([sealed], now())
    assert fetched == [2]
    assert events(my_node, "envelope.") == []
    my_node.fetch_partner_key_sets = fetch_from(id_node)
    assert my_node.receive([sealed], now())[0].accepted


class ArrivedEarlier(Loopback):
    """The partner's API took the time a batch arrived (``arrived``) before it handled it."""

    def __init__(self, partner: Node, arrived: dt.datetime) -> None:
        super().__init__(partner)
        self.arrived = arrived

    def send(self, envelopes):  # type: ignore[no-untyped-def]
        return self.partner.receive(envelopes, self.arrived)


def test_a_signing_key_activated_while_a_batch_was_handled_dates_its_receipt_from_when_it_came_in_force(
    nodes: Pair,
) -> None:
    """The API takes a batch's arrival time before opening it. If the signing key was activated
    meanwhile (by another process, or this one's reload), the receipt signed by the new key cannot
    be dated at the arrival: the partner would find the key not yet in force then and fail the
    message for good. Likewise a submission's time and the key signing it. (Found by the e2e test
    rotating every key under traffic.)"""
    id_dir, _my_dir, id_node, my_node = nodes
    keys = admin(my_node)
    keys.rotate("signing")
    drain(DeliveryWorker(my_node, Loopback(id_node)))  # the partner acknowledged the next key
    mid = submit(id_node, id_dir, "polri-cms")
    arrived = now()
    time.sleep(0.01)
    new_kid = keys.activate("signing").kid  # in force from after ``arrived``
    drain(DeliveryWorker(my_node, Loopback(id_node)))  # the partner has the version activating it
    worker = DeliveryWorker(id_node, ArrivedEarlier(my_node, arrived))
    assert worker.run_once() == 1
    assert statuses(id_node, id_dir, "polri-cms", [mid]) == ["delivered"]
    received = [e for e in events(my_node, "envelope.received") if e.get("signer_kid")]
    assert received
    activated = my_node.registry.history("MY").in_force_from(new_kid)
    assert activated is not None
    assert activated > arrived
    with id_node.db.read() as conn:
        receipt_at = repo.get_message(conn, mid)["receipt_at"]  # type: ignore[index]
    assert dt.datetime.fromisoformat(receipt_at) >= activated
    # a submission dated before the sender's own new signing key came into force goes the same way
    sender = admin(id_node)
    sender.rotate("signing")
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    before = now()
    time.sleep(0.01)
    sender.activate("signing")
    late = id_node.submit(
        actor(id_node, id_dir, "polri-cms"), MessageSubmission.model_validate(rfi()), before
    )
    drain(DeliveryWorker(id_node, Loopback(my_node)))
    assert statuses(id_node, id_dir, "polri-cms", [late["id"]]) == ["delivered"]
