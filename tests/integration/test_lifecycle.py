"""After delivery, through real nodes (SQLite and PostgreSQL, no sockets): content at rest readable by
its sender and by releases after a partner key change; consent both ways; reclassification both
ways; return-or-destroy with its certificate; retention that no backup can undo; overdue requests."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import tomllib
from collections.abc import Callable
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
from exchange.envelope.at_rest import metadata_digest, open_at_rest
from exchange.errors import ContentDestroyed, ContentUnavailable, NotFound, PolicyRefusal
from exchange.keys.kek import KekStore
from exchange.node import Node
from exchange.policy import Actor
from tests.integration.test_node_flow import actor, now, pair
from tests.integration.test_rules_flow import client, deliver, submit
from tests.support import PASSPHRASE, NodeDir, response_to, rfi

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
    id_node.lifecycle.return_or_destroy(polri, doomed["id"], reason="the source withdrew", now=now())
    deliver(id_node, my_node)
    with pytest.raises(ContentDestroyed) as gone:
        my_node.read(d7, doomed["id"], now())
    assert "the source withdrew" in gone.value.reason
    assert my_node.read(d7, keep["id"], now())["id"] == keep["id"]  # its period's other message re-wrapped
    deliver(my_node, id_node)  # the destruction certificate
    with id_node.db.read() as conn:
        (certified,) = [e for e in repo.iter_ledger(conn) if e.event == "destruction.certified"]
    assert certified.message_id == doomed["id"]
    for node in (id_node, my_node):
        verified(node)


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
