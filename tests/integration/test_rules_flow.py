"""The agreement's rules through real nodes (SQLite and PostgreSQL, no sockets): poisoned envelopes
rejected alone, floors re-evaluated on receipt, addressing, replies and threads, case views, and no
identity in any ledger entry, log line or audit answer."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import sqlalchemy as sa

from exchange.auditing import AuditService, EntryFilter
from exchange.db import repo
from exchange.errors import InvalidInput, NotFound, PolicyRefusal
from exchange.ledger import verify_rows
from exchange.messages import MessageSubmission
from exchange.node import Node
from exchange.observability import metrics
from exchange.policy import Actor
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_node_flow import Loopback, actor, now, pair
from tests.support import (
    NodeDir,
    forge_envelope,
    register_client,
    response_to,
    rfi,
    signed_json,
    signed_message,
)

__all__ = ["pair"]  # the fixture, shared with the message-path tests

VICTIM_STATUS = {"ID": "TRAFFICKING_VICTIM", "MY": "ILLEGAL_MIGRANT"}
CHILD_IDENTITY = ("Dewi Lestari Anak", "Bapak Lestari", "SDN 5 Kupang", "B9876543")


def child_referral(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "VICTIM_IDENTIFICATION_REFERRAL",
        "case_ref": "ID-MY/2026/0001",
        "purposes": ["VICTIM_IDENTIFICATION"],
        "classification": {"scheme": "POLRI", "level": "BIASA"},
        "tlp": "GREEN",
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "data_subjects": [
            {
                "pseudonym": "VCT-0001",
                "role": "VICTIM_CHILD",
                "status": VICTIM_STATUS,
                "age": {"years": 13, "basis": "DOCUMENTED"},
            }
        ],
        "payload": {
            "summary": "A child found in a Johor restaurant",
            "victims": [
                {
                    "subject": "VCT-0001",
                    "names": [CHILD_IDENTITY[0]],
                    "parents": [CHILD_IDENTITY[1]],
                    "school": CHILD_IDENTITY[2],
                    "documents": [
                        {"kind": "PASSPORT", "number": CHILD_IDENTITY[3], "issuing_country": "IDN"}
                    ],
                }
            ],
        },
    }
    body.update(overrides)
    return body


def deliver(sender: Node, receiver: Node) -> int:
    return DeliveryWorker(sender, Loopback(receiver)).run_once()


def submit(node: Node, who: Actor, body: dict[str, Any]) -> dict[str, Any]:
    return node.submit(who, MessageSubmission.model_validate(body), now())


def client(node: Node, nd: NodeDir, name: str, clearance: str, *extra: str) -> Actor:
    register_client(nd, name, clearance, *extra)
    return actor(node, nd, name)


# --- poisoned envelopes ----------------------------------------------------------------------------

SIGNED_FIELDS = [
    "format",
    "id",
    "type",
    "sender",
    "recipient",
    "created_at",
    "agreement",
    "case_ref",
    "thread_id",
    "in_reply_to",
    "purposes",
    "classification",
    "tlp",
    "handling_codes",
    "legal_basis",
    "grading",
    "priority",
    "response_due",
    "origin",
    "addressed_to",
    "recipients",
    "data_subjects",
    "mla_reference",
    "checkpoint",
    "payload",
]


def _signed(node: Node) -> dict[str, Any]:
    return signed_json(node, now())


def _rejections(node: Node) -> list[dict[str, Any]]:
    with node.db.read() as conn:
        return [dict(e.data) for e in repo.iter_ledger(conn) if e.event == "envelope.rejected"]


@pytest.mark.parametrize("missing", SIGNED_FIELDS)
def test_a_signed_message_missing_a_field_is_rejected_alone(pair, missing: str) -> None:  # type: ignore[no-untyped-def]
    _id_dir, _my_dir, id_node, my_node = pair
    full = _signed(id_node)
    poisoned = forge_envelope(id_node, {k: v for k, v in full.items() if k != missing}, full)
    batch = [signed_message(id_node, now()), poisoned, signed_message(id_node, now())]
    results = my_node.receive(batch, now())
    assert [r.accepted for r in results] == [True, False, True]
    (rejection,) = _rejections(my_node)
    header_field = missing in {
        "id",
        "type",
        "sender",
        "recipient",
        "classification",
        "tlp",
        "handling_codes",
        "agreement",
        "created_at",
    }
    assert rejection["reason"] in ({"header-mismatch", "malformed"} if header_field else {"malformed"})


@pytest.mark.parametrize(
    "change",
    [
        {"payload": {"summary": "no questions"}},
        {"payload": {"summary": "s", "questions": ["q"], "persons": [{"subject": "lowercase!"}]}},
        {"payload": {"summary": "s", "questions": ["q"], "surprise": True}},
        {"type": "NOT_A_TYPE"},
        {"purposes": ["FUN"]},
        {"classification": {"scheme": "POLRI", "level": "RAHASIA", "common": "U"}},
        {"classification": {"scheme": "ARAHAN", "level": "SULIT", "common": "C"}},
        {"data_subjects": [{"pseudonym": "VCT-1", "role": "VICTIM_CHILD"}]},
        {"created_at": "2026-11-23T10:00:00"},
        {"extra_field": "from a newer version"},
    ],
)
def test_an_off_schema_signed_message_is_rejected_alone(pair, change: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    _id_dir, _my_dir, id_node, my_node = pair
    full = _signed(id_node)
    bad = {**full, **change}
    results = my_node.receive([forge_envelope(id_node, bad, bad), signed_message(id_node, now())], now())
    assert [r.accepted for r in results] == [False, True]
    assert [r["reason"] for r in _rejections(my_node)] == ["malformed"]


def test_a_poisoned_envelope_in_an_outbox_batch_does_not_hold_the_others(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    good = [submit(id_node, polri, rfi())["id"] for _ in range(3)]
    full = _signed(id_node)
    poisoned = forge_envelope(id_node, {k: v for k, v in full.items() if k != "payload"}, full)
    with id_node.db.transaction() as conn:  # a bad envelope queued among them (a buggy sender)
        row = repo.get_message(conn, good[0])
        assert row is not None
        row.update(id=full["id"], envelope=poisoned, envelope_sha256="0" * 64, inbox_seq=None)
        repo.insert_message(conn, row)
        repo.enqueue(conn, full["id"], now().timestamp() - 10)
    assert deliver(id_node, my_node) == 4
    statuses = {mid: id_node.status(polri, mid, now())["status"] for mid in good}
    assert set(statuses.values()) == {"delivered"}
    assert id_node.status(polri, full["id"], now())["status"] == "failed"


# --- floors on both sides ---------------------------------------------------------------------------


def test_a_child_victim_referral_is_raised_on_submit_and_each_reason_given(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, _my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    accepted = submit(id_node, polri, child_referral())
    assert accepted["classification"]["level"] == "RAHASIA"
    assert accepted["classification"]["partner_equivalent"] == {"scheme": "ARAHAN", "level": "RAHSIA"}
    assert (accepted["tlp"], "H2" in accepted["handling_codes"]) == ("AMBER+STRICT", True)
    assert {(r["rule"], r["kind"]) for r in accepted["raised"]} == {
        ("R-FLOOR-CHILD", "level"),
        ("R-FLOOR-CHILD", "tlp"),
        ("R-FLOOR-CHILD", "handling"),
    }
    assert all(r["reason"] for r in accepted["raised"])


def test_the_receiver_protects_an_under_classified_message_at_its_floor_and_ledgers_it(pair) -> None:  # type: ignore[no-untyped-def]
    _id_dir, my_dir, id_node, my_node = pair
    # a partner that did not apply the floor: a child victim sealed as BIASA, TLP:GREEN
    sloppy = signed_message(id_node, now(), **child_referral())
    (result,) = my_node.receive([sloppy], now())
    assert result.accepted
    with my_node.db.read() as conn:
        (row,) = [r for r in repo.inbound_after(conn, 0, 10)]
        incidents = [e for e in repo.iter_ledger(conn) if e.event == "policy.incident"]
    assert (row["level"], row["common_level"], row["local_level"]) == ("BIASA", "C", "SULIT")
    assert row["tlp"] == "AMBER+STRICT"
    assert "H2" in row["handling_codes"]
    (incident,) = incidents
    assert incident.rules == ("R-FLOOR-CHILD@1",)
    analyst = client(my_node, my_dir, "pdrm-low", "TERHAD")
    assert my_node.inbox(analyst, 0, 10, now()).items == []  # TERHAD is below the floor's SULIT


# --- release: redaction, TLP, addressing, purpose ------------------------------------------------------


def test_release_redacts_a_child_for_an_analyst_but_not_for_child_protection(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    submit(id_node, actor(id_node, id_dir, "polri-cms"), child_referral())
    deliver(id_node, my_node)
    analyst = client(my_node, my_dir, "pdrm-analyst", "RAHSIA", "--role", "ANALYST", "--unit", "ANALYSIS")
    protector = client(my_node, my_dir, "pdrm-d11", "RAHSIA", "--role", "CHILD_PROTECTION", "--unit", "D11")
    (seen,) = my_node.inbox(analyst, 0, 10, now()).items
    text = json.dumps(seen)
    assert not [i for i in CHILD_IDENTITY if i in text]
    assert seen["payload"]["victims"][0]["names"] == ["VCT-0001"]
    assert {r["path"] for r in seen["redacted"]} == {
        "payload/victims/0/names",
        "payload/victims/0/parents",
        "payload/victims/0/school",
        "payload/victims/0/documents",
    }
    assert seen["classification"] == {
        "scheme": "POLRI",
        "level": "RAHASIA",
        "common": "S",
        "local_equivalent": "RAHSIA",
    }
    (whole,) = my_node.inbox(protector, 0, 10, now()).items
    assert all(i in json.dumps(whole) for i in CHILD_IDENTITY)
    assert whole["redacted"] == []
    with my_node.db.read() as conn:
        released = [e for e in repo.iter_ledger(conn) if e.event == "message.released"]
    assert [e.data.get("redacted", []) for e in released] == [[r["path"] for r in seen["redacted"]], []]


def test_tlp_red_reaches_only_its_named_recipient_and_refusals_are_ledgered(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi(tlp="RED", recipients=["pdrm-d7"]))
    deliver(id_node, my_node)
    named = actor(my_node, my_dir, "pdrm-d7")
    other = client(my_node, my_dir, "pdrm-other", "RAHSIA")
    assert len(my_node.inbox(named, 0, 10, now()).items) == 1
    page = my_node.inbox(other, 0, 10, now())
    assert (page.items, page.next_cursor) == ([], 1)
    with my_node.db.read() as conn:
        refused = [e for e in repo.iter_ledger(conn) if e.event == "release.refused"]
    (entry,) = refused
    assert (entry.actor, entry.data["refused"]) == ("pdrm-other", ["R-TLP-RED@1"])


def test_a_message_addressed_to_a_unit_is_released_only_to_that_unit(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi(addressed_to=["NCB"]))
    deliver(id_node, my_node)
    ncb = client(my_node, my_dir, "pdrm-ncb", "RAHSIA", "--unit", "NCB")
    assert my_node.inbox(actor(my_node, my_dir, "pdrm-d7"), 0, 10, now()).items == []
    assert len(my_node.inbox(ncb, 0, 10, now()).items) == 1


def test_a_release_for_a_purpose_outside_the_message_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    d7 = actor(my_node, my_dir, "pdrm-d7")
    assert my_node.inbox(d7, 0, 10, now(), frozenset({"STRATEGIC_ANALYSIS"})).items == []
    assert len(my_node.inbox(d7, 0, 10, now(), frozenset({"TIP_INVESTIGATION"})).items) == 1


# --- replies and threads --------------------------------------------------------------------------------


def test_a_reply_needs_a_message_the_client_may_see_in_its_case_and_thread(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    request = submit(id_node, actor(id_node, id_dir, "polri-cms"), rfi())
    deliver(id_node, my_node)
    low = client(my_node, my_dir, "pdrm-terhad", "TERHAD")
    d7 = actor(my_node, my_dir, "pdrm-d7")
    with pytest.raises(PolicyRefusal) as unseen:  # a TERHAD system answering a RAHSIA request
        submit(
            my_node, low, response_to(request["id"], classification={"scheme": "ARAHAN", "level": "TERHAD"})
        )
    with pytest.raises(PolicyRefusal) as missing:  # the same answer to a message that is not there
        submit(
            my_node,
            low,
            response_to("no-such-message", classification={"scheme": "ARAHAN", "level": "TERHAD"}),
        )
    # the refusal does not tell a message the client may not see from one that does not exist
    assert [(v.rule_id, v.reason) for v in unseen.value.violations] == [
        (v.rule_id, v.reason) for v in missing.value.violations
    ]
    assert {v.rule_id for v in unseen.value.violations} == {"R-REPLY-TARGET", "R-REPLY-VISIBLE"}
    with pytest.raises(PolicyRefusal) as refused:  # moving the answer to another case
        submit(my_node, d7, response_to(request["id"], case_ref="ID-MY/2026/0999"))
    assert {v.rule_id for v in refused.value.violations} == {"R-REPLY-VISIBLE"}
    with pytest.raises(PolicyRefusal) as refused:  # answering something that does not exist
        submit(my_node, d7, response_to("no-such-message"))
    assert {v.rule_id for v in refused.value.violations} == {"R-REPLY-TARGET", "R-REPLY-VISIBLE"}
    with pytest.raises(PolicyRefusal) as refused:  # joining a thread it may not see, by id
        submit(
            my_node,
            low,
            rfi(thread_id=request["thread_id"], classification={"scheme": "ARAHAN", "level": "TERHAD"}),
        )
    assert {v.rule_id for v in refused.value.violations} == {"R-THREAD-VISIBLE"}
    answered = submit(my_node, d7, response_to(request["id"]))
    assert answered["thread_id"] == request["thread_id"]


# --- case views -----------------------------------------------------------------------------------------


def test_a_case_lists_its_messages_in_each_client_s_view(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    polri = actor(id_node, id_dir, "polri-cms")
    first = submit(id_node, polri, rfi())
    red = submit(id_node, polri, rfi(tlp="RED", recipients=["pdrm-d7"]))
    deliver(id_node, my_node)
    d7 = actor(my_node, my_dir, "pdrm-d7")
    other = client(my_node, my_dir, "pdrm-other", "RAHSIA")
    reply = submit(my_node, d7, response_to(first["id"]))
    case = "ID-MY/2026/0001"
    assert [m["id"] for m in my_node.case(d7, case, now())["messages"]] == [
        first["id"],
        red["id"],
        reply["id"],
    ]
    assert [m["id"] for m in my_node.case(other, case, now())["messages"]] == [first["id"]]
    assert {m["direction"] for m in id_node.case(polri, case, now())["messages"]} == {"out"}
    with pytest.raises(NotFound):
        my_node.case(other, "ID-MY/2026/0999", now())


# --- no identity outside the encrypted store ---------------------------------------------------------------


def test_identities_appear_in_no_ledger_leaf_log_line_row_or_audit_answer(  # type: ignore[no-untyped-def]
    pair, caplog: pytest.LogCaptureFixture
) -> None:
    id_dir, my_dir, id_node, my_node = pair
    caplog.set_level(logging.DEBUG)
    informant = {"pseudonym": "INF-0001", "role": "INFORMANT", "handler_ref": "HDL-0042"}
    body = child_referral()
    body["data_subjects"].append(informant)
    body["payload"]["victims"].append({"subject": "INF-0001", "names": ["Informant Secret Name"]})
    submit(id_node, actor(id_node, id_dir, "polri-cms"), body)
    sloppy = signed_message(id_node, now(), **child_referral(case_ref="ID-MY/2026/0002"))
    deliver(id_node, my_node)
    my_node.receive([sloppy], now())
    for who in ("pdrm-d7", "pdrm-cp"):
        if who == "pdrm-cp":
            client(my_node, my_dir, who, "RAHSIA", "--role", "CHILD_PROTECTION", "--unit", "D11")
        my_node.inbox(actor(my_node, my_dir, who), 0, 10, now())
    identities = [*CHILD_IDENTITY, "Informant Secret Name"]
    for node in (id_node, my_node):
        with node.db.read() as conn:
            leaves = [e.leaf.decode() for e in repo.iter_ledger(conn)]
            rows = [
                {k: v for k, v in r.items() if k not in ("envelope",)}
                for r in repo.messages_in_case(conn, "ID-MY/2026/0001", 100)
            ]
        audit = AuditService(node.db, node.agreement, node.party)
        answers = json.dumps(audit.entries(EntryFilter(), -1, 1000), default=str)
        for text in (*leaves, json.dumps(rows, default=str), answers, caplog.text):
            assert not [i for i in identities if i in text]
    # the informant's identity never left Indonesia: replaced by the handler reference before sealing
    (received,) = my_node.inbox(actor(my_node, my_dir, "pdrm-cp"), 0, 1, now()).items
    assert received["payload"]["victims"][1]["names"] == ["HDL-0042"]


# --- findings of the adversarial review, each performed -------------------------------------------------


def test_a_reply_is_released_only_to_the_unit_that_asked(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir, id_node, my_node = pair
    asker = actor(id_node, id_dir, "polri-cms")  # unit TPPO
    other = client(id_node, id_dir, "polri-analysis", "RAHASIA", "--unit", "ANALYSIS")
    request = submit(id_node, asker, rfi())
    deliver(id_node, my_node)
    submit(my_node, actor(my_node, my_dir, "pdrm-d7"), response_to(request["id"]))
    deliver(my_node, id_node)
    assert id_node.inbox(other, 0, 10, now()).items == []
    (answer,) = id_node.inbox(asker, 0, 10, now()).items
    assert answer["in_reply_to"] == request["id"]


def test_a_reply_the_partner_addresses_is_narrowed_never_widened(pair) -> None:  # type: ignore[no-untyped-def]
    """The partner addressed its answer to one unit only (PPA, the women and children unit): it
    is released to the asking unit only if that unit is among those, never to the asking unit
    instead of them."""
    id_dir, my_dir, id_node, my_node = pair
    asker = actor(id_node, id_dir, "polri-cms")  # unit TPPO
    ppa = client(id_node, id_dir, "polri-ppa", "RAHASIA", "--unit", "PPA")
    pdrm = actor(my_node, my_dir, "pdrm-d7")
    for addressed, seen_by_asker in ((["PPA"], False), (["PPA", "TPPO"], True)):
        request = submit(id_node, asker, rfi())
        deliver(id_node, my_node)
        submit(my_node, pdrm, response_to(request["id"], addressed_to=addressed))
        deliver(my_node, id_node)
        with id_node.db.read() as conn:
            (row,) = [r for r in repo.inbound_after(conn, 0, 100) if r["in_reply_to"] == request["id"]]
        assert row["addressed_to"] == (["TPPO"] if seen_by_asker else ["(no such unit)"])
        assert [i["in_reply_to"] for i in id_node.inbox(ppa, 0, 100, now()).items] == []
    assert len(id_node.inbox(asker, 0, 100, now()).items) == 1


def test_a_hostile_checkpoint_note_or_a_failing_envelope_never_aborts_the_batch(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _id_dir, _my_dir, id_node, my_node = pair
    hostile = signed_message(id_node, now(), "ID-node/ledger\n\u00b2\nAAAA\n\n\u2014 x y\n")
    results = my_node.receive(
        [signed_message(id_node, now()), hostile, signed_message(id_node, now())], now()
    )
    assert [r.accepted for r in results] == [True, True, True]  # the note is an incident, not a crash
    with my_node.db.read() as conn:
        assert [e.data["reason"] for e in repo.iter_ledger(conn) if e.event == "checkpoint.incident"] == [
            "invalid"
        ]
    seal = my_node.content.seal
    doomed = signed_message(id_node, now(), case_ref="ID-MY/2026/0666")

    def failing(row: dict[str, Any], signed: str, conn: Any = None) -> dict[str, Any]:
        if row["case_ref"] == "ID-MY/2026/0666":
            raise RuntimeError("disk trouble for this one")
        return dict(seal(row, signed, conn))

    monkeypatch.setattr(my_node.content, "seal", failing)
    results = my_node.receive([signed_message(id_node, now()), doomed, signed_message(id_node, now())], now())
    assert [r.accepted for r in results] == [True, False, True]
    assert "internal" in [r["reason"] for r in _rejections(my_node)]
    with my_node.db.read() as conn:  # tried without savepoints first: nothing of that written twice
        assert len(repo.inbound_after(conn, 0, 10)) == 3 + 2
        head = repo.read_ledger_head(conn)
        verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root)


def _statements(node: Node) -> list[str]:
    statements: list[str] = []
    sa.event.listen(node.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].lower()))
    return statements


def test_a_plain_batch_is_stored_without_savepoints_one_insert_per_table(pair) -> None:  # type: ignore[no-untyped-def]
    _id_dir, _my_dir, id_node, my_node = pair
    statements = _statements(my_node)
    results = my_node.receive([signed_message(id_node, now()) for _ in range(4)], now())
    assert [r.accepted for r in results] == [True] * 4
    assert not [s for s in statements if "savepoint" in s]
    assert len([s for s in statements if s.startswith("insert into messages")]) == 1
    with my_node.db.read() as conn:
        assert [r["inbox_seq"] for r in repo.inbound_after(conn, 0, 10)] == [1, 3, 5, 7]  # received, receipt
        head = repo.read_ledger_head(conn)
        assert verify_rows(repo.ledger_rows(conn), size=head.size, root=head.root) == 8


def test_a_batch_carrying_one_id_twice_takes_a_savepoint_per_envelope(pair) -> None:  # type: ignore[no-untyped-def]
    """The second envelope must see what the first stored: one is received, the copy redelivered."""
    _id_dir, _my_dir, id_node, my_node = pair
    statements = _statements(my_node)
    twice = signed_message(id_node, now())
    results = my_node.receive([twice, twice], now())
    assert [r.accepted for r in results] == [True, True]
    assert results[0].receipt == results[1].receipt
    assert [s for s in statements if s.startswith("savepoint")]
    with my_node.db.read() as conn:
        assert len(repo.inbound_after(conn, 0, 10)) == 1
        assert [e.event for e in repo.iter_ledger(conn)] == [
            "envelope.received",
            "receipt.issued",
            "envelope.redelivered",
        ]


def test_a_batch_stored_again_with_savepoints_logs_and_counts_its_incidents_once(  # type: ignore[no-untyped-def]
    pair, monkeypatch, caplog
) -> None:
    """The first attempt, without savepoints, fails on one envelope and is undone: what it would
    have logged and counted is not, so the incident of the envelope with a hostile checkpoint note
    is logged and counted once, by the attempt that committed."""
    _id_dir, _my_dir, id_node, my_node = pair
    hostile = signed_message(id_node, now(), "ID-node/ledger\n\u00b2\nAAAA\n\n\u2014 x y\n")
    doomed = signed_message(id_node, now(), case_ref="ID-MY/2026/0666")
    seal = my_node.content.seal

    def failing(row: dict[str, Any], signed: str, conn: Any = None) -> dict[str, Any]:
        if row["case_ref"] == "ID-MY/2026/0666":
            raise RuntimeError("disk trouble for this one")
        return dict(seal(row, signed, conn))

    monkeypatch.setattr(my_node.content, "seal", failing)
    counted = metrics.REGISTRY.get_sample_value("exchange_security_incidents_total", {"kind": "checkpoint"})
    with caplog.at_level("WARNING", logger="exchange.node"):
        results = my_node.receive([hostile, doomed], now())
    assert [r.accepted for r in results] == [True, False]
    said = [r.getMessage() for r in caplog.records]
    assert any("stored again one savepoint per envelope" in m for m in said)
    assert len([m for m in said if m.startswith("SECURITY INCIDENT")]) == 1
    after = metrics.REGISTRY.get_sample_value("exchange_security_incidents_total", {"kind": "checkpoint"})
    assert after == (counted or 0) + 1


def test_an_unreadable_stored_message_is_refused_alone_and_the_inbox_goes_on(pair) -> None:  # type: ignore[no-untyped-def]
    _id_dir, my_dir, id_node, my_node = pair
    my_node.receive([signed_message(id_node, now()) for _ in range(3)], now())
    with my_node.db.transaction() as conn:
        first, second, _ = repo.inbound_after(conn, 0, 10)
        repo.update_message(conn, first["id"], content=second["content"])  # another message's content
    page = my_node.inbox(actor(my_node, my_dir, "pdrm-d7"), 0, 10, now())
    assert [i["id"] for i in page.items] == [second["id"], _["id"]]
    assert page.next_cursor == _["inbox_seq"]
    with my_node.db.read() as conn:
        refused = [e for e in repo.iter_ledger(conn) if e.event == "release.refused"]
    assert [(e.message_id, e.data["reason"]) for e in refused] == [(first["id"], "unreadable")]


def test_personal_data_of_no_listed_subject_is_refused_on_submit(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir, id_node, _my_node = pair
    informant = {"pseudonym": "INF-0001", "role": "INFORMANT", "handler_ref": "HDL-0042"}
    typo = rfi(
        data_subjects=[informant],
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": "INF-001", "names": ["Informant Name"]}],
        },
    )
    with pytest.raises(InvalidInput) as info:
        submit(id_node, actor(id_node, id_dir, "polri-cms"), typo)
    assert [e.field for e in info.value.errors] == ["payload/persons/0/names"]


def test_one_inbox_pull_examines_a_bounded_number_of_messages(pair) -> None:  # type: ignore[no-untyped-def]
    _id_dir, my_dir, id_node, my_node = pair
    my_node.receive(
        [signed_message(id_node, now(), tlp="RED", recipients=["someone"]) for _ in range(10)], now()
    )
    my_node.settings = my_node.settings.model_copy(update={"inbox_scan_max": 4})
    stranger = client(my_node, my_dir, "pdrm-stranger", "RAHSIA")
    page = my_node.inbox(stranger, 0, 1, now())
    with my_node.db.read() as conn:
        fourth = repo.inbound_after(conn, 0, 10)[3]
    assert (page.items, page.next_cursor) == ([], fourth["inbox_seq"])
    with my_node.db.read() as conn:
        assert sum(e.event == "release.refused" for e in repo.iter_ledger(conn)) == 4


def test_an_informant_s_identity_arriving_in_clear_is_a_policy_incident(pair) -> None:  # type: ignore[no-untyped-def]
    _id_dir, _my_dir, id_node, my_node = pair
    informant = {"pseudonym": "INF-0001", "role": "INFORMANT", "handler_ref": "HDL-0042"}
    careless = signed_message(
        id_node,
        now(),
        classification={"scheme": "POLRI", "level": "RAHASIA"},
        data_subjects=[informant],
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": "INF-0001", "names": ["Informant Name"]}],
        },
    )
    assert my_node.receive([careless], now())[0].accepted
    with my_node.db.read() as conn:
        (incident,) = [e for e in repo.iter_ledger(conn) if e.event == "policy.incident"]
    assert incident.data["unreplaced_identities"] == ["payload/persons/0/names"]
    assert "Informant Name" not in incident.leaf.decode()


def test_a_refusal_on_the_same_grounds_is_ledgered_once_however_often_it_is_asked(pair) -> None:  # type: ignore[no-untyped-def]
    """A client pulling the same page (or asking for the same content) again and again cannot grow
    the ledger, which is kept for good: a refusal that repeats the client's latest refusal of that
    message on the same grounds is not ledgered again. Another client's refusal, a refusal on new
    grounds (another declared use) and every release are."""
    _id_dir, my_dir, id_node, my_node = pair
    my_node.receive(
        [signed_message(id_node, now(), tlp="RED", recipients=["someone"]) for _ in range(3)], now()
    )
    my_node.receive([signed_message(id_node, now())], now())
    stranger = client(my_node, my_dir, "pdrm-stranger", "RAHSIA")
    other = client(my_node, my_dir, "pdrm-other", "RAHSIA")

    def entries(event: str, who: str) -> list[Any]:
        with my_node.db.read() as conn:
            return [e for e in repo.iter_ledger(conn) if e.event == event and e.actor == who]

    for _ in range(4):
        assert len(my_node.inbox(stranger, 0, 10, now()).items) == 1
    assert len(entries("release.refused", "pdrm-stranger")) == 3  # once per message
    assert len(entries("message.released", "pdrm-stranger")) == 4  # each disclosure
    red = entries("release.refused", "pdrm-stranger")[0].message_id
    for _ in range(3):
        with pytest.raises(NotFound):
            my_node.read(stranger, red, now())
    assert len(entries("release.refused", "pdrm-stranger")) == 3
    my_node.inbox(other, 0, 10, now())
    assert len(entries("release.refused", "pdrm-other")) == 3
    for _ in range(2):
        my_node.inbox(stranger, 0, 10, now(), frozenset({"STRATEGIC_ANALYSIS"}))  # a use not asked before
    refused = entries("release.refused", "pdrm-stranger")
    assert len(refused) >= 6  # the three refused again for this use, once
    assert {tuple(e.data["use"]) for e in refused[3:]} == {("STRATEGIC_ANALYSIS",)}
    assert len({e.message_id for e in refused[3:]}) == len(refused[3:])


def test_envelopes_that_do_not_open_are_ledgered_once_per_reason_and_batch(pair) -> None:  # type: ignore[no-untyped-def]
    """Nothing ties an envelope that does not open or verify to the partner: five hundred of them
    in one batch are one ledger entry per reason (the first digest, how many, the digest of all
    their digests), not five hundred entries in a ledger kept for good. Each is answered rejected,
    and the batch's valid envelope is admitted; a lone one is ledgered as before."""
    from exchange.canonical import sha256_hex
    from exchange.envelope import envelope_digest

    _id_dir, _my_dir, id_node, my_node = pair

    def flipped() -> str:  # a genuine envelope whose tag was altered on the way: it does not decrypt
        head, _, tag = signed_message(id_node, now()).rpartition(".")
        return f"{head}.{'A' if tag[0] != 'A' else 'B'}{tag[1:]}"

    junk = [f"junk-{i}" for i in range(500)]
    altered = [flipped() for _ in range(3)]
    results = my_node.receive([*junk, signed_message(id_node, now()), *altered], now())
    assert [r.accepted for r in results] == [False] * 500 + [True] + [False] * 3
    with my_node.db.read() as conn:
        assert len(repo.inbound_after(conn, 0, 10)) == 1
    digests = {
        "malformed": [envelope_digest(j) for j in junk],
        "decrypt-failed": [envelope_digest(a) for a in altered],
    }
    assert _rejections(my_node) == [
        {
            "envelope_sha256": d[0],
            "reason": reason,
            "envelopes": len(d),
            "envelopes_sha256": sha256_hex("\n".join(d)),
        }
        for reason, d in digests.items()
    ]
    lone = flipped()
    my_node.receive([lone], now())
    assert _rejections(my_node)[-1] == {"envelope_sha256": envelope_digest(lone), "reason": "decrypt-failed"}
