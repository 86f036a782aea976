"""After delivery, through real nodes (SQLite and PostgreSQL, no sockets): content at rest readable by
its sender and by releases after a partner key change; consent both ways; reclassification both
ways; return-or-destroy with its certificate; retention that no backup can undo; overdue requests."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import tomli_w
from joserfc.jwk import OctKey

from exchange import crypto
from exchange.auditing import AuditService
from exchange.config import load_settings
from exchange.db import repo
from exchange.db.engine import sqlite_path
from exchange.envelope.at_rest import metadata_digest, open_at_rest
from exchange.errors import ContentDestroyed, ContentUnavailable, NotFound, PolicyRefusal
from exchange.keys.kek import KekStore
from exchange.node import Node
from exchange.policy import Actor
from tests.integration.test_node_flow import actor, now, pair
from tests.integration.test_rules_flow import client, deliver, submit
from tests.support import PASSPHRASE, NodeDir, response_to, rfi, signed_message, tables_quoting

__all__ = ["pair"]


def events(node: Node) -> list[str]:
    with node.db.read() as conn:
        return [e.event for e in repo.iter_ledger(conn)]


def supervisor(node: Node, nd: NodeDir) -> Actor:
    return client(
        node,
        nd,
        f"{nd.party.lower()}-supervisor",
        "RAHASIA" if nd.party == "ID" else "RAHSIA",
        "--role",
        "SUPERVISOR",
    )


def verified(node: Node) -> None:
    AuditService(node.db, node.agreement, node.party).verify()  # raises on any integrity failure


def test_the_sender_reads_what_it_sent_and_others_may_not(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    accepted = submit(id_node, polri, rfi())
    content = id_node.read(polri, accepted["id"], now())
    assert content["payload"]["summary"] == "Recruiters moving workers via Batam"
    other = client(id_node, id_dir, "polri-other", "RAHASIA")
    with pytest.raises(NotFound):
        id_node.read(other, accepted["id"], now())
    assert "message.read" in events(id_node)


def test_a_partner_key_change_does_not_strand_received_messages(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    accepted = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    path = my_dir.path / "agreement.toml"
    data = tomllib.loads(path.read_text())
    fresh = crypto.private_jwk(crypto.new_message_key("sig"), "ID-sig-rotated")
    data["parties"]["ID"]["signing_keys"] = [crypto.public_jwk_dict(fresh)]  # the partner's keys changed
    path.write_text(tomli_w.dumps(data))
    my_node.close()
    restarted = Node(load_settings(my_dir.path))
    try:
        (item,) = restarted.inbox(actor(restarted, my_dir, "pdrm-d7"), 0, 10, now()).items
        assert item["id"] == accepted["id"]  # released from content at rest, verified when admitted
    finally:
        restarted.close()


@pytest.mark.parametrize("asking", ["MY", "ID"])
def test_consent_round_trip_both_ways(pair, asking: str) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    dirs = {"ID": (id_dir, id_node, "polri-cms"), "MY": (my_dir, my_node, "pdrm-d7")}
    (a_dir, asker, a_client) = dirs[asking]
    (o_dir, origin, o_client) = dirs["ID" if asking == "MY" else "MY"]
    body = rfi(handling_codes=["H2"])
    if origin is my_node:
        body["classification"] = {"scheme": "ARAHAN", "level": "SULIT"}
    original = submit(origin, actor(origin, o_dir, o_client), body)
    deliver(origin, asker)
    reader = actor(asker, a_dir, a_client)
    with pytest.raises(PolicyRefusal) as refused:  # H2: nothing passes on without the originator's consent
        asker.lifecycle.release_onward(
            reader, original["id"], recipient="INTERPOL", purposes=["TIP_INVESTIGATION"], now=now()
        )
    assert {"R-H2-ONWARD", "R-ONWARD-CONSENT"} <= {v.rule_id for v in refused.value.violations}
    request = asker.lifecycle.request_consent(
        reader,
        original["id"],
        recipient="INTERPOL",
        purposes=["TIP_INVESTIGATION"],
        justification="red notice",
        now=now(),
    )
    deliver(asker, origin)
    boss = supervisor(origin, o_dir)
    (pending,) = origin.lifecycle.consent_requests(boss, now(), status="pending")
    assert (pending["id"], pending["recipient"], pending["age_seconds"] >= 0) == (
        request["id"],
        "INTERPOL",
        True,
    )
    assert origin.lifecycle.consent_requests(actor(origin, o_dir, o_client), now()) == []  # not a decider
    expiry = now() + dt.timedelta(days=30)
    origin.lifecycle.decide_consent(
        boss, request["id"], grant=True, conditions="for the red notice only", expires_at=expiry, now=now()
    )
    deliver(origin, asker)
    released = asker.lifecycle.release_onward(
        reader, original["id"], recipient="INTERPOL", purposes=["TIP_INVESTIGATION"], now=now()
    )
    assert released["released_to"] == "INTERPOL"
    with pytest.raises(PolicyRefusal):  # another recipient than the one consented
        asker.lifecycle.release_onward(
            reader, original["id"], recipient="ASEANAPOL", purposes=["TIP_INVESTIGATION"], now=now()
        )
    with pytest.raises(PolicyRefusal):  # after the consent expired
        asker.lifecycle.release_onward(
            reader,
            original["id"],
            recipient="INTERPOL",
            purposes=["TIP_INVESTIGATION"],
            now=expiry + dt.timedelta(seconds=1),
        )
    deliver(asker, origin)  # the release notice
    assert "message.released_onward" in events(origin)
    origin.lifecycle.revoke_consent(boss, request["id"], now())
    deliver(origin, asker)
    with pytest.raises(PolicyRefusal):  # after the consent was revoked
        asker.lifecycle.release_onward(
            reader, original["id"], recipient="INTERPOL", purposes=["TIP_INVESTIGATION"], now=now()
        )
    for node in (id_node, my_node):
        assert {"consent.requested", "consent.decided"} <= set(events(node))
        verified(node)


def test_reclassification_both_ways_keeps_history_and_the_floor(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri, d7 = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    request = submit(id_node, polri, rfi())
    deliver(id_node, my_node)
    id_node.lifecycle.reclassify(
        polri, request["id"], level="TERBATAS", reason="the operation ended", now=now()
    )
    deliver(id_node, my_node)
    status = my_node.status(d7, request["id"], now())
    assert (status["classification"]["level"], status["classification"]["local_equivalent"]) == (
        "TERBATAS",
        "TERHAD",
    )
    answer = submit(my_node, d7, response_to(request["id"]))
    deliver(my_node, id_node)
    my_node.lifecycle.reclassify(
        d7, answer["id"], level="RAHSIA", reason="a source was identified", now=now()
    )
    deliver(my_node, id_node)
    status = id_node.status(polri, answer["id"], now())
    assert (status["classification"]["level"], status["classification"]["local_equivalent"]) == (
        "RAHSIA",
        "RAHASIA",
    )
    with id_node.db.read() as conn:
        assert [(h["from_level"], h["to_level"]) for h in repo.reclassifications_of(conn, answer["id"])] == [
            ("SULIT", "RAHSIA")
        ]
    with pytest.raises(NotFound):  # only the originator reclassifies
        my_node.lifecycle.reclassify(d7, request["id"], level="TERHAD", reason="x", now=now())


def test_a_child_referral_lowered_by_its_originator_stays_protected_at_its_floor(pair) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.test_rules_flow import child_referral

    id_dir, my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    accepted = submit(id_node, polri, child_referral())
    deliver(id_node, my_node)
    id_node.lifecycle.reclassify(
        polri, accepted["id"], level="BIASA", reason="released to the press", now=now()
    )
    deliver(id_node, my_node)
    status = my_node.status(actor(my_node, my_dir, "pdrm-d7"), accepted["id"], now())
    assert status["classification"]["level"] == "BIASA"  # the originator's marking, as it said
    assert (status["classification"]["common"], status["tlp"]) == ("C", "AMBER+STRICT")  # still the floor


def test_return_or_destroy_destroys_and_the_certificate_comes_back(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri, d7 = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    keep = submit(id_node, polri, rfi())
    doomed = submit(id_node, polri, rfi())
    deliver(id_node, my_node)
    why = "Siti Rahayu (born 2012) was named in it by mistake"  # an originator's words may name a victim
    id_node.lifecycle.return_or_destroy(polri, doomed["id"], reason=why, now=now())
    deliver(id_node, my_node)
    with my_node.db.read() as conn:
        (request,) = conn.execute(sa.text("select id from messages where type = 'RETURN_OR_DESTROY_REQUEST'"))
    with pytest.raises(ContentDestroyed) as gone:
        my_node.read(d7, doomed["id"], now())
    # the reader learns that the originator asked, and which request, never the request's words
    assert (
        gone.value.reason == f"destroyed at the originator's request (RETURN_OR_DESTROY_REQUEST {request.id})"
    )
    assert my_node.read(d7, keep["id"], now())["id"] == keep["id"]  # its period's other message re-wrapped
    deliver(my_node, id_node)  # the destruction certificate
    with id_node.db.read() as conn:
        (certified,) = [e for e in repo.iter_ledger(conn) if e.event == "destruction.certified"]
    assert certified.message_id == doomed["id"]
    for node in (id_node, my_node):
        verified(node)
        # the words are sealed in the request (and its copy at the originator), in clear nowhere: not
        # in the destroyed message's row, nor in the ledger that outlives every message
        assert tables_quoting(node, "Siti", "born 2012") == []


def test_a_received_batch_wakes_the_delivery_loop_only_for_an_answer_it_queued(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    woken: list[str] = []
    my_node.wake_delivery = lambda: woken.append("wake")
    doomed = submit(id_node, polri, rfi())
    deliver(id_node, my_node)
    assert woken == []  # a message to release queues nothing to send back
    id_node.lifecycle.return_or_destroy(polri, doomed["id"], reason="the source withdrew", now=now())
    deliver(id_node, my_node)
    assert woken == ["wake"]  # the destruction certificate goes out at once, not at the next poll
    with my_node.db.read() as conn:
        assert repo.outbox_size(conn) == 1


def _copy_database(node: Node, nd: NodeDir, folder: Path) -> Any:
    """A backup of the node's database taken now: the SQLite file, or a pg_dump restored elsewhere."""
    url = node.db.url
    if url.startswith("sqlite"):  # SQLite's online backup: the file and its WAL, consistent
        with sqlite3.connect(nd.path / "node.db") as source, sqlite3.connect(folder / "backup.db") as copy:
            source.backup(copy)
        return sa.create_engine(f"sqlite:///{folder / 'backup.db'}")
    plain = url.replace("+psycopg", "")
    dump = subprocess.run(["pg_dump", "--no-owner", plain], capture_output=True, text=True, check=True).stdout
    return ("pg", dump)


def _contents_in(backup: Any, message_id: str) -> dict[str, Any]:
    if isinstance(backup, tuple):  # a pg_dump: the row is in its COPY data
        line = next(x for x in backup[1].splitlines() if x.startswith(message_id + "\t"))
        return {"raw": line}
    with backup.connect() as conn:
        row = (
            conn.execute(sa.text("select * from messages where id = :i"), {"i": message_id}).mappings().one()
        )
    return dict(row)


def _only(keys: KekStore, kid: str) -> Callable[[str], OctKey]:
    """A KEK lookup that tries one particular key of the directory, whatever the content names."""
    return lambda _named: keys.get(kid)


def test_retention_destroys_so_that_no_backup_can_be_read_with_the_keys_left(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    accepted = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    backup = _copy_database(my_node, my_dir, tmp_path)
    with my_node.db.read() as conn:
        row = repo.get_message(conn, accepted["id"])
    assert row is not None
    later = dt.datetime.fromisoformat(row["destroy_after"]) + dt.timedelta(days=1)
    assert my_node.retention.run(later) >= 1
    assert my_node.retention.run(later) == 0  # idempotent
    with pytest.raises(ContentDestroyed):
        my_node.read(actor(my_node, my_dir, "pdrm-d7"), accepted["id"], now())
    saved = _contents_in(backup, accepted["id"])
    keys = KekStore(my_dir.path / "keys" / "kek", PASSPHRASE)  # everything left in the key directory
    if "content" in saved:
        for kid in [row["content_kid"], *keys.kids()]:
            with pytest.raises(ContentUnavailable):
                open_at_rest(
                    saved["content"],
                    message_id=row["id"],
                    meta=metadata_digest(row),
                    kek=_only(keys, kid),
                )
    else:  # the pg_dump holds the same at-rest JWE; the KEK it names is gone
        assert row["content"] in saved["raw"]
        with pytest.raises(ContentUnavailable):
            keys.get(row["content_kid"])
        for kid in keys.kids():
            with pytest.raises(ContentUnavailable):
                open_at_rest(
                    row["content"],
                    message_id=row["id"],
                    meta=metadata_digest(row),
                    kek=_only(keys, kid),
                )
    with my_node.db.read() as conn:
        (destroyed,) = [e for e in repo.iter_ledger(conn) if e.event == "message.destroyed"]
    assert destroyed.data["envelope_sha256"] == row["envelope_sha256"]
    verified(my_node)


def test_overdue_requests_are_listed_and_ledgered_once(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri, d7 = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    due = now() + dt.timedelta(hours=1)
    urgent = submit(id_node, polri, rfi(priority="URGENT", response_due=due.isoformat()))
    answered = submit(id_node, polri, rfi(priority="URGENT", response_due=due.isoformat()))
    deliver(id_node, my_node)
    submit(my_node, d7, response_to(answered["id"]))
    later = due + dt.timedelta(hours=2)
    overdue = my_node.deadlines.open_requests(later, overdue_only=True)
    assert [r.row["id"] for r in overdue] == [urgent["id"]]
    assert overdue[0].view(later)["overdue_seconds"] >= 7200
    assert my_node.deadlines.run(later) == 1
    assert my_node.deadlines.run(later) == 0  # ledgered once
    assert events(my_node).count("request.overdue") == 1


def test_a_security_incident_is_notified_to_the_originator_with_its_clock(pair) -> None:  # type: ignore[no-untyped-def]
    from exchange.errors import Unauthorised
    from exchange.lifecycle import IncidentNotice

    id_dir, my_dir, id_node, my_node = pair
    sent = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    detected = now() - dt.timedelta(hours=1)
    notice = IncidentNotice(
        kind="UNAUTHORISED_ACCESS",
        message_ids=(sent["id"],),
        detected_at=detected,
        personal_data=True,
        summary="a workstation of the desk was compromised",
    )
    with pytest.raises(Unauthorised):  # only the node's consent deciders notify
        my_node.lifecycle.notify_incident(actor(my_node, my_dir, "pdrm-d7"), notice, now())
    boss = supervisor(my_node, my_dir)
    with pytest.raises(NotFound):  # only about messages received from the partner
        my_node.lifecycle.notify_incident(boss, replace(notice, message_ids=("nope",)), now())
    hidden = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi(tlp="RED", recipients=["someone"]))
    deliver(id_node, my_node)
    with pytest.raises(NotFound) as unseen:  # one the decider may not see answers as one that is not there
        my_node.lifecycle.notify_incident(boss, replace(notice, message_ids=(hidden["id"],)), now())
    assert str(unseen.value) == "name messages received from the partner that this system may see"
    my_node.lifecycle.notify_incident(boss, notice, now())
    deliver(my_node, id_node)
    with id_node.db.read() as conn:
        (entry,) = [e for e in repo.iter_ledger(conn) if e.event == "incident.notified"]
    assert (entry.message_id, entry.data["kind"], entry.data["about"]) == (
        sent["id"],
        "UNAUTHORISED_ACCESS",
        [sent["id"]],
    )
    assert entry.data["notify_by"] == (detected + dt.timedelta(hours=72)).isoformat()  # UU 27/2022
    assert "incident.notified" in events(my_node)


# --- findings of the adversarial review of issue 7, each performed ---------------------------------------


def test_a_destruction_rolled_back_with_its_envelope_retires_no_key(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    keep, doomed = submit(id_node, polri, rfi()), submit(id_node, polri, rfi())
    deliver(id_node, my_node)
    id_node.lifecycle.return_or_destroy(polri, doomed["id"], reason="withdrawn", now=now())
    judge = my_node._judge_checkpoint

    def hostile(conn: Any, message: Any) -> Any:  # whatever fails after the destruction in the savepoint
        if message.type == "RETURN_OR_DESTROY_REQUEST":
            raise OverflowError("a checkpoint size no database holds")
        return judge(conn, message)

    monkeypatch.setattr(my_node, "_judge_checkpoint", hostile)
    deliver(id_node, my_node)
    d7 = actor(my_node, my_dir, "pdrm-d7")
    assert my_node.read(d7, keep["id"], now())["id"] == keep["id"]  # its period's key was not destroyed
    assert my_node.read(d7, doomed["id"], now())["id"] == doomed["id"]  # and nothing was destroyed


def test_a_crash_before_the_keys_are_destroyed_is_mended_by_the_next_run(  # type: ignore[no-untyped-def]
    pair, tmp_path: Path, monkeypatch
) -> None:
    id_dir, my_dir, id_node, my_node = pair
    accepted = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    backup = _copy_database(my_node, my_dir, tmp_path)
    with my_node.db.read() as conn:
        row = repo.get_message(conn, accepted["id"])
    assert row is not None
    later = dt.datetime.fromisoformat(row["destroy_after"]) + dt.timedelta(days=1)
    retire = my_node.content.retire
    monkeypatch.setattr(my_node.content, "retire", lambda kids, db: None)  # the crash: committed, keys kept
    my_node.retention.run(later)
    monkeypatch.setattr(my_node.content, "retire", retire)
    my_node.retention.run(later)  # the next run sweeps what no content needs
    keys = KekStore(my_dir.path / "keys" / "kek", PASSPHRASE)
    with pytest.raises(ContentUnavailable):
        keys.get(row["content_kid"])
    if not isinstance(backup, tuple):
        saved = _contents_in(backup, accepted["id"])
        for kid in keys.kids():
            with pytest.raises(ContentUnavailable):
                open_at_rest(
                    saved["content"], message_id=row["id"], meta=metadata_digest(row), kek=_only(keys, kid)
                )


def test_a_supervisor_acts_for_the_originator_only_within_its_clearance_and_cases(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    sent = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    low = client(id_node, id_dir, "polri-low-boss", "TERBATAS", "--role", "SUPERVISOR")
    elsewhere = client(
        id_node, id_dir, "polri-other-boss", "RAHASIA", "--role", "SUPERVISOR", "--case", "ID-MY/2026/9999"
    )
    for boss in (low, elsewhere):
        with pytest.raises(NotFound):
            id_node.lifecycle.reclassify(boss, sent["id"], level="BIASA", reason="x", now=now())
        with pytest.raises(NotFound):
            id_node.lifecycle.return_or_destroy(boss, sent["id"], reason="x", now=now())
    my_node.lifecycle.request_consent(
        actor(my_node, my_dir, "pdrm-d7"),
        sent["id"],
        recipient="INTERPOL",
        purposes=["TIP_INVESTIGATION"],
        justification="red notice",
        now=now(),
    )
    deliver(my_node, id_node)
    assert id_node.lifecycle.consent_requests(low, now()) == []
    assert len(id_node.lifecycle.consent_requests(supervisor(id_node, id_dir), now())) == 1


def test_a_read_that_races_a_rewrap_reads_again(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    keep, doomed = submit(id_node, polri, rfi()), submit(id_node, polri, rfi())
    deliver(id_node, my_node)
    with my_node.db.read() as conn:
        stale = repo.get_message(conn, keep["id"])  # read before the destruction re-wraps its period
    my_node.retention.destroy([doomed["id"]], "test", now())
    assert stale is not None
    assert my_node.stored_message(stale).id == keep["id"]


def test_a_consent_makes_judicial_use_and_another_purpose_possible(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    sent = submit(
        id_node,
        actor(id_node, id_dir, "polri-cms"),
        rfi(handling_codes=["H1"], purposes=["TIP_INVESTIGATION", "JUDICIAL_EVIDENCE"]),
    )
    deliver(id_node, my_node)
    d7 = actor(my_node, my_dir, "pdrm-d7")
    assert len(my_node.inbox(d7, 0, 10, now()).items) == 1  # by default not a judicial use: released
    judicial = frozenset({"JUDICIAL_EVIDENCE"})
    assert my_node.inbox(d7, 0, 10, now(), judicial).items == []  # H1: refused without consent
    analysis = frozenset({"STRATEGIC_ANALYSIS"})
    assert my_node.inbox(d7, 0, 10, now(), analysis).items == []  # outside the message's purposes
    boss = supervisor(id_node, id_dir)
    for purposes in (["JUDICIAL_EVIDENCE"], ["STRATEGIC_ANALYSIS"]):
        request = my_node.lifecycle.request_consent(
            d7, sent["id"], recipient=None, purposes=purposes, justification="court case", now=now()
        )
        deliver(my_node, id_node)
        id_node.lifecycle.decide_consent(
            boss,
            request["id"],
            grant=True,
            conditions=None,
            expires_at=now() + dt.timedelta(days=1),
            now=now(),
        )
        deliver(id_node, my_node)
    assert len(my_node.inbox(d7, 0, 10, now(), judicial).items) == 1
    assert len(my_node.inbox(d7, 0, 10, now(), analysis).items) == 1


def _asked(id_dir, my_dir, id_node, my_node, justification: str = "red notice") -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Polri sends a request for information; PDRM asks its consent to pass it to Interpol, and the
    request reaches Polri. Returns the message's and the consent request's ids."""
    sent = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    request = my_node.lifecycle.request_consent(
        actor(my_node, my_dir, "pdrm-d7"),
        sent["id"],
        recipient="INTERPOL",
        purposes=["TIP_INVESTIGATION"],
        justification=justification,
        now=now(),
    )
    assert request["justification"] == justification
    deliver(my_node, id_node)
    return sent["id"], request["id"]


def test_a_consent_is_decided_once_and_a_late_decision_changes_nothing(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    _sent, request = _asked(id_dir, my_dir, id_node, my_node)
    boss = supervisor(id_node, id_dir)
    pending = id_node.lifecycle._request_to_decide(boss, request, pending=True)
    id_node.lifecycle.decide_consent(boss, request, grant=False, conditions=None, expires_at=None, now=now())
    with pytest.raises(NotFound):  # a second decision that passed the check before the first committed
        id_node.lifecycle._send_decision(boss, pending, {"status": "granted"}, "GRANTED", now())


def test_a_consent_decision_with_a_naive_expiry_is_malformed() -> None:
    from exchange.catalogue import ConsentDecision

    decision = {"request_id": "r", "message_id": "m", "decision": "GRANTED"}
    with pytest.raises(ValueError, match="timezone"):
        ConsentDecision.model_validate({**decision, "expires_at": "2031-01-01T00:00:00"})
    numeric = ConsentDecision.model_validate({**decision, "expires_at": "1893456000"}).expires_at
    assert numeric is not None
    assert numeric.tzinfo is not None  # a POSIX time is a UTC time, stored normalised


def test_a_message_destroyed_while_queued_leaves_the_outbox(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    queued, other = submit(id_node, polri, rfi()), submit(id_node, polri, rfi())
    id_node.retention.destroy([queued["id"]], "test", now())
    assert deliver(id_node, my_node) == 1  # the other one goes; the round does not fail
    assert id_node.status(polri, queued["id"], now())["status"] == "destroyed"
    assert id_node.status(polri, other["id"], now())["status"] == "delivered"


def test_messages_stored_before_content_at_rest_are_brought_under_it_at_start(pair) -> None:  # type: ignore[no-untyped-def]
    from tests.support import signed_message

    _id_dir, my_dir, id_node, my_node = pair
    compact = signed_message(id_node, now())
    assert my_node.receive([compact], now())[0].accepted
    with my_node.db.transaction() as conn:  # the state migration 0007 leaves an older row in
        (row,) = repo.inbound_after(conn, 0, 10)
        repo.update_message(
            conn,
            row["id"],
            content=None,
            content_kid=None,
            content_sha256=None,
            destroy_after=None,
            envelope=compact,
        )
    my_node.close()
    restarted = Node(load_settings(my_dir.path))
    try:
        (item,) = restarted.inbox(actor(restarted, my_dir, "pdrm-d7"), 0, 10, now()).items
        assert item["id"] == row["id"]
        with restarted.db.read() as conn:
            fresh = repo.get_message(conn, row["id"])
        assert fresh is not None
        assert fresh["envelope"] is None
        assert fresh["destroy_after"] is not None
        assert "message.sealed_at_rest" in events(restarted)
    finally:
        restarted.close()


def test_a_release_notice_outside_the_agreement_is_an_incident_that_quotes_nothing(pair) -> None:  # type: ignore[no-untyped-def]
    """A partner's RELEASE_NOTICE naming a recipient or a use the agreement does not know is free
    text of the partner's: an incident, ledgered without it (the ledger is kept for good)."""
    _id_dir, my_dir, id_node, my_node = pair
    body = rfi()
    body["classification"] = {"scheme": "ARAHAN", "level": "SULIT"}
    original = submit(my_node, actor(my_node, my_dir, "pdrm-d7"), body)
    deliver(my_node, id_node)
    notice = signed_message(
        id_node,
        now(),
        type="RELEASE_NOTICE",
        in_reply_to=original["id"],
        payload={
            "message_id": original["id"],
            "recipient": "Siti Rahayu's uncle",
            "purposes": ["TIP_INVESTIGATION", "asked by Siti's family"],
            "released_at": now().isoformat(),
        },
    )
    (result,) = my_node.receive([notice], now())
    assert result.accepted
    with my_node.db.read() as conn:
        (onward,) = [e for e in repo.iter_ledger(conn) if e.event == "message.released_onward"]
    assert (onward.decision, onward.data["recipient"], onward.data["use"]) == (
        "incident",
        None,
        ["TIP_INVESTIGATION"],
    )
    assert onward.data["outside_the_agreement"] is True
    assert tables_quoting(my_node, "Siti") == []


def test_a_release_notice_after_the_consent_ended_is_an_incident(pair) -> None:  # type: ignore[no-untyped-def]
    """The originator judges a partner's onward release by the consent in force when it was made:
    a release after the consent expired (or was revoked) is an incident, not ledgered as allowed."""
    id_dir, my_dir, id_node, my_node = pair
    body = rfi(handling_codes=["H2"])
    body["classification"] = {"scheme": "ARAHAN", "level": "SULIT"}
    original = submit(my_node, actor(my_node, my_dir, "pdrm-d7"), body)
    deliver(my_node, id_node)
    reader = actor(id_node, id_dir, "polri-cms")
    request = id_node.lifecycle.request_consent(
        reader,
        original["id"],
        recipient="INTERPOL",
        purposes=["TIP_INVESTIGATION"],
        justification="red notice",
        now=now(),
    )
    deliver(id_node, my_node)
    expiry = now() + dt.timedelta(days=30)
    my_node.lifecycle.decide_consent(
        supervisor(my_node, my_dir), request["id"], grant=True, conditions=None, expires_at=expiry, now=now()
    )
    deliver(my_node, id_node)
    id_node.lifecycle.release_onward(
        reader, original["id"], recipient="INTERPOL", purposes=["TIP_INVESTIGATION"], now=now()
    )
    deliver(id_node, my_node)  # a release while the consent was in force
    late = signed_message(
        id_node,
        now(),
        type="RELEASE_NOTICE",
        in_reply_to=original["id"],
        payload={
            "message_id": original["id"],
            "recipient": "INTERPOL",
            "purposes": ["TIP_INVESTIGATION"],
            "released_at": (expiry + dt.timedelta(days=1)).isoformat(),
        },
    )
    (result,) = my_node.receive([late], now())
    assert result.accepted
    with my_node.db.read() as conn:
        onward = [e for e in repo.iter_ledger(conn) if e.event == "message.released_onward"]
    assert [(e.decision, e.data["consented"]) for e in onward] == [("allow", True), ("incident", False)]


def test_an_h2_message_reaches_a_system_outside_the_police_once_the_originator_consents(pair) -> None:  # type: ignore[no-untyped-def]
    """R-H2-POLICE: a registered system outside the police (an immigration case system) does not
    receive an H2 message, but may ask the originator (a 404 would leave it no remedy); once the
    originator consents, the inbox and the content route both release it to that system."""
    from tests.integration.test_rules_flow import client

    id_dir, my_dir, id_node, my_node = pair
    sent = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi(handling_codes=["H2"]))
    deliver(id_node, my_node)
    outside = client(my_node, my_dir, "imigresen-case", "RAHSIA", "--agency", "Imigresen")
    assert not outside.police
    assert my_node.inbox(outside, 0, 10, now()).items == []
    with pytest.raises(NotFound):
        my_node.read(outside, sent["id"], now())
    request = my_node.lifecycle.request_consent(
        outside, sent["id"], recipient=None, purposes=["TIP_INVESTIGATION"], justification="case", now=now()
    )
    deliver(my_node, id_node)
    boss = supervisor(id_node, id_dir)
    id_node.lifecycle.decide_consent(
        boss, request["id"], grant=True, conditions=None, expires_at=now() + dt.timedelta(days=7), now=now()
    )
    deliver(id_node, my_node)
    (item,) = my_node.inbox(outside, 0, 10, now()).items
    assert item["id"] == sent["id"]
    assert my_node.read(outside, sent["id"], now())["id"] == sent["id"]
    id_node.lifecycle.revoke_consent(boss, request["id"], now())
    deliver(id_node, my_node)
    assert my_node.inbox(outside, 0, 10, now()).items == []
    with my_node.db.read() as conn:  # refused, released, refused again on the first grounds: all three
        decided = [e.event for e in repo.iter_ledger(conn) if e.actor == "imigresen-case"]
    assert [e for e in decided if e.startswith(("release", "message.released"))] == [
        "release.refused",
        "message.released",
        "message.released",
        "release.refused",
    ]


def _consent_and_reclassification(id_dir, my_dir, id_node, my_node) -> tuple[str, str, Actor, Actor, Actor]:  # type: ignore[no-untyped-def]
    """Polri sends; PDRM asks consent (granted with conditions); Polri reclassifies: each with words
    that name people. Returns the message, the request, and the three systems that acted."""
    polri, d7 = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    sent, request = _asked(id_dir, my_dir, id_node, my_node, "Siti Aminah testifies in Johor")
    boss = supervisor(id_node, id_dir)
    decided = id_node.lifecycle.decide_consent(
        boss,
        request,
        grant=True,
        conditions="never shown to Budi Santoso",
        expires_at=now() + dt.timedelta(days=30),
        now=now(),
    )
    assert (decided["justification"], decided["conditions"]) == (
        "Siti Aminah testifies in Johor",
        "never shown to Budi Santoso",
    )
    deliver(id_node, my_node)
    id_node.lifecycle.reclassify(polri, sent, level="TERBATAS", reason="Wati Lestari left", now=now())
    deliver(id_node, my_node)
    return sent, request, polri, d7, boss


WORDS = ("Siti Aminah", "Budi Santoso", "Wati Lestari")


def _words_seen(id_node, my_node, sent: str, polri: Actor, d7: Actor, boss: Actor) -> list[Any]:  # type: ignore[no-untyped-def]
    """The words each party's readers see: the decider's and the asker's views of the consent, and
    the reclassification's reason at both ends."""
    (asked,) = id_node.lifecycle.consent_requests(boss, now())
    (ours,) = my_node.lifecycle.consent_requests(d7, now())
    return [
        (asked["justification"], asked["conditions"]),
        (ours["justification"], ours["conditions"]),
        [h["reason"] for h in id_node.status(polri, sent, now())["reclassifications"]],
        [h["reason"] for h in my_node.status(d7, sent, now())["reclassifications"]],
    ]


SEEN = [
    ("Siti Aminah testifies in Johor", "never shown to Budi Santoso"),
    ("Siti Aminah testifies in Johor", "never shown to Budi Santoso"),
    ["Wati Lestari left"],
    ["Wati Lestari left"],
]


def test_consent_and_reclassification_words_are_read_from_sealed_messages_never_kept_in_clear(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    sent, request, polri, d7, boss = _consent_and_reclassification(id_dir, my_dir, id_node, my_node)
    assert _words_seen(id_node, my_node, sent, polri, d7, boss) == SEEN
    for node in (id_node, my_node):  # a justification may name a victim: sealed only, at both ends
        assert tables_quoting(node, *WORDS) == []
    id_node.lifecycle.revoke_consent(boss, request, now())
    deliver(id_node, my_node)
    (revoked,) = my_node.lifecycle.consent_requests(d7, now())
    assert (revoked["status"], revoked["conditions"]) == ("revoked", "never shown to Budi Santoso")
    for node in (id_node, my_node):
        verified(node)


def _partner_reuses_the_ids(id_node: Node, my_node: Node, sent: str, request: str) -> None:
    """The partner sends a consent request and a reclassification notice reusing the ids it knows,
    with words of its own: refused at Polri, but stored (sealed) there."""
    from exchange.control import CONSENT_REQUEST, RECLASSIFICATION_NOTICE

    with id_node.db.read() as conn:
        target = repo.get_message(conn, sent)
        (notice,) = conn.execute(sa.text("select id from messages where type = 'RECLASSIFICATION_NOTICE'"))
        reclassified = id_node.stored_message(dict(repo.get_message(conn, notice.id) or {}))
    assert target is not None
    forged = {  # the partner reuses the ids it knows, with words of its own: refused, but stored
        CONSENT_REQUEST: {
            "request_id": request,
            "message_id": sent,
            "recipient": "INTERPOL",
            "purposes": ["TIP_INVESTIGATION"],
            "justification": "forged words",
        },
        RECLASSIFICATION_NOTICE: {**reclassified.payload, "reason": "forged words"},
    }
    for message_type, payload in forged.items():
        my_node.lifecycle._transaction(
            now(),
            lambda conn, t=message_type, p=payload: (
                None,
                my_node.lifecycle.queue_control(conn, t, target, p, now()),
                [],
            ),
        )
    deliver(my_node, id_node)
    with id_node.db.read() as conn:
        kinds = sa.text(
            "select type, count(*) from messages where direction = 'in' and kind = 'control' group by type"
        )
        received = {str(t): int(n) for t, n in conn.execute(kinds)}  # the genuine one, both forgeries, kept
    assert (received[CONSENT_REQUEST], received[RECLASSIFICATION_NOTICE]) == (2, 1)


def test_words_kept_in_clear_before_migration_0015_are_sealed_at_start(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    sent, request, polri, d7, boss = _consent_and_reclassification(id_dir, my_dir, id_node, my_node)
    _partner_reuses_the_ids(id_node, my_node, sent, request)
    for node in (id_node, my_node):  # the rows as an older version wrote them: words, no references
        with node.db.transaction() as conn:
            conn.execute(
                sa.text(
                    "update consent_requests set justification = 'Siti Aminah testifies in Johor',"
                    " conditions = 'never shown to Budi Santoso', request_control_id = null,"
                    " decision_control_id = null"
                )
            )
            conn.execute(
                sa.text("update reclassifications set reason = 'Wati Lestari left', control_id = null")
            )
        assert tables_quoting(node, *WORDS) == ["consent_requests", "reclassifications"]
        node.close()
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    try:
        for node in (id_node, my_node):
            assert tables_quoting(node, *WORDS) == []
        assert _words_seen(id_node, my_node, sent, polri, d7, boss) == SEEN  # found in the sealed messages
        assert tables_quoting(id_node, "forged words") == []  # (the partner's, refused, sealed too)
        for node in (id_node, my_node):  # nor in the database's files (a page or WAL frame of before)
            path = sqlite_path(node.db.url)
            if path is not None:
                files = [path, path.with_name(path.name + "-wal")]
                written = b"".join(f.read_bytes() for f in files if f.exists())
                assert [w for w in WORDS if w.encode() in written] == []
    finally:
        id_node.close()
        my_node.close()


def test_only_a_decider_of_the_originating_unit_acts_for_the_originator(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    sent, request = _asked(id_dir, my_dir, id_node, my_node)  # sent from the TPPO unit
    other_unit = client(id_node, id_dir, "polri-ppa-boss", "RAHASIA", "--role", "SUPERVISOR", "--unit", "PPA")
    assert id_node.lifecycle.consent_requests(other_unit, now()) == []
    with pytest.raises(NotFound):
        id_node.lifecycle.decide_consent(
            other_unit,
            request,
            grant=True,
            conditions=None,
            expires_at=now() + dt.timedelta(days=1),
            now=now(),
        )
    with pytest.raises(NotFound):
        id_node.lifecycle.reclassify(other_unit, sent, level="BIASA", reason="x", now=now())
    with pytest.raises(NotFound):
        id_node.lifecycle.return_or_destroy(other_unit, sent, reason="x", now=now())
    boss = supervisor(id_node, id_dir)  # of the originating unit
    assert [r["id"] for r in id_node.lifecycle.consent_requests(boss, now())] == [request]
    with id_node.db.transaction() as conn:  # a row of before 0015 whose client was removed: no origin
        repo.update_message(conn, sent, origin_agency=None, origin_unit=None)
    assert id_node.lifecycle.consent_requests(boss, now()) == []  # unknown origin: only its sender acts
    id_node.close()
    id_node = Node(load_settings(id_dir.path))  # the next start reads it from the sealed content
    try:
        with id_node.db.read() as conn:
            row = repo.get_message(conn, sent)
        assert row is not None
        assert (row["origin_agency"], row["origin_unit"]) == ("Polri", "TPPO")
        assert [r["id"] for r in id_node.lifecycle.consent_requests(boss, now())] == [request]
        assert id_node.lifecycle.consent_requests(other_unit, now()) == []
        id_node.lifecycle.reclassify(boss, sent, level="BIASA", reason="the operation ended", now=now())
    finally:
        id_node.close()


def test_a_batch_of_return_or_destroy_requests_rewraps_each_period_once(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from exchange.content import period_of_kid
    from exchange.envelope.at_rest import rewrap

    id_dir, my_dir, id_node, my_node = pair
    polri, d7 = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    keep = submit(id_node, polri, rfi())
    doomed = [submit(id_node, polri, rfi())["id"] for _ in range(6)]
    deliver(id_node, my_node)
    for message_id in doomed:
        id_node.lifecycle.return_or_destroy(polri, message_id, reason="withdrawn", now=now())
    rewrapped: list[str] = []

    def counted(compact: str, **kwargs: Any) -> str:
        rewrapped.append(kwargs["message_id"])
        return rewrap(compact, **kwargs)

    monkeypatch.setattr("exchange.content.rewrap", counted)
    with my_node.db.read() as conn:
        period = period_of_kid(str(repo.get_message(conn, keep["id"])["content_kid"]))  # type: ignore[index]
    kids_before = my_node.content.keks.kids(period)
    deliver(id_node, my_node)  # the six requests in one batch, one transaction
    assert rewrapped == [keep["id"]]  # once, the one message kept; before: 6 + 5 + ... + 1 re-wraps
    assert len(my_node.content.keks.kids(period)) == 1  # one new KEK for the period, the old retired
    assert set(my_node.content.keks.kids(period)).isdisjoint(kids_before)
    assert my_node.read(d7, keep["id"], now())["id"] == keep["id"]
    for message_id in doomed:
        with pytest.raises(ContentDestroyed):
            my_node.read(d7, message_id, now())
    with my_node.db.read() as conn:  # every KEK the destructions retired is gone
        assert set(my_node.content.keks.kids()) == repo.referenced_kids(conn) | {
            my_node.content.keks.kids()[-1]
        }
    verified(my_node)


def test_a_control_message_that_does_not_open_fails_no_listing_and_no_start(pair) -> None:  # type: ignore[no-untyped-def]
    """A database restored from before a destruction holds content under KEKs retired since: the
    words such a message carried show as null, and every other request and the node's start go on."""
    id_dir, my_dir, id_node, my_node = pair
    sent, _request, polri, _d7, boss = _consent_and_reclassification(id_dir, my_dir, id_node, my_node)
    with id_node.db.transaction() as conn:
        conn.execute(
            sa.text(
                "update messages set content = 'eyJhbGciOiJBMjU2S1cifQ.a.b.c.d'"
                " where kind = 'control' and type = 'CONSENT_REQUEST'"
            )
        )
        conn.execute(sa.text("update consent_requests set justification = 'Siti Aminah testifies in Johor'"))
    (asked,) = id_node.lifecycle.consent_requests(boss, now())
    assert (asked["justification"], asked["conditions"]) == (None, "never shown to Budi Santoso")
    assert [h["reason"] for h in id_node.status(polri, sent, now())["reclassifications"]] == [
        "Wati Lestari left"
    ]
    id_node.close()
    restarted = Node(load_settings(id_dir.path))  # the words in clear emptied, the damaged message left
    try:
        assert tables_quoting(restarted, *WORDS) == []
        (asked,) = restarted.lifecycle.consent_requests(boss, now())
        assert asked["justification"] is None
    finally:
        restarted.close()


def test_a_batch_whose_rewrap_fails_is_stored_with_each_destruction_on_its_own(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri, d7 = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    damaged, doomed = submit(id_node, polri, rfi()), submit(id_node, polri, rfi())
    deliver(id_node, my_node)
    with my_node.db.transaction() as conn:  # one content of the period no longer opens
        repo.update_message(conn, damaged["id"], content="eyJhbGciOiJBMjU2S1cifQ.a.b.c.d")
    id_node.lifecycle.return_or_destroy(polri, doomed["id"], reason="withdrawn", now=now())
    fresh = submit(id_node, polri, rfi())
    deliver(id_node, my_node)  # before: the whole batch failed at its end, sent again for ever
    assert [i["id"] for i in my_node.inbox(d7, 0, 10, now()).items if i["id"] == fresh["id"]] == [fresh["id"]]
    assert my_node.read(d7, doomed["id"], now())["id"] == doomed["id"]  # that destruction alone failed
    with pytest.raises(ContentUnavailable):
        my_node.stored_message(repo_row(my_node, damaged["id"]))


def repo_row(node: Node, message_id: str) -> dict[str, Any]:
    with node.db.read() as conn:
        row = repo.get_message(conn, message_id)
    assert row is not None
    return row


def test_conditions_that_say_nothing_are_invalid_input(pair) -> None:  # type: ignore[no-untyped-def]
    from exchange.errors import InvalidInput

    id_dir, my_dir, id_node, my_node = pair
    _sent, request = _asked(id_dir, my_dir, id_node, my_node)
    with pytest.raises(InvalidInput) as invalid:  # before: a 500 (the control message's schema refused it)
        id_node.lifecycle.decide_consent(
            supervisor(id_node, id_dir),
            request,
            grant=True,
            conditions=" ",
            expires_at=now() + dt.timedelta(days=1),
            now=now(),
        )
    assert [e.field for e in invalid.value.errors] == ["conditions"]


def test_words_survive_going_below_migration_0015_and_back(pair) -> None:  # type: ignore[no-untyped-def]
    """A downgrade leaves its placeholder where the words were (they stay sealed): the upgrade's
    next start links each row to the only control message of its request or notice again."""
    from alembic import command

    from exchange.db.engine import alembic_config, upgrade

    id_dir, my_dir, id_node, my_node = pair
    sent, request, polri, d7, boss = _consent_and_reclassification(id_dir, my_dir, id_node, my_node)
    _partner_reuses_the_ids(id_node, my_node, sent, request)  # (refused: never the only candidate)
    for node in (id_node, my_node):
        node.close()
        command.downgrade(alembic_config(node.db.url), "0014")
        upgrade(node.db.url)
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    try:
        assert _words_seen(id_node, my_node, sent, polri, d7, boss) == SEEN
    finally:
        id_node.close()
        my_node.close()


def test_a_sent_message_whose_origin_cannot_be_read_is_settled_once(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    sent, _request = _asked(id_dir, my_dir, id_node, my_node)
    with id_node.db.transaction() as conn:  # of before 0015, its client removed, its content unreadable
        repo.update_message(
            conn, sent, origin_agency=None, origin_unit=None, content="eyJhbGciOiJBMjU2S1cifQ.a.b.c.d"
        )
    id_node.close()
    id_node = Node(load_settings(id_dir.path))
    try:
        with id_node.db.read() as conn:
            assert (repo_row(id_node, sent)["origin_unit"], repo.rows_before_0015(conn)) == ("", False)
        assert id_node.lifecycle.consent_requests(supervisor(id_node, id_dir), now()) == []  # unknown origin
        assert id_node.lifecycle.seal_legacy_rows() == 0  # nothing left for the next start
    finally:
        id_node.close()
