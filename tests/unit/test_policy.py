"""The rule engine, pure: every rule of the default terms in both outcomes, with its id asserted;
floors, redaction and fail-closed behaviour; properties over generated messages."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.agreement import Action, parse_agreement
from exchange.errors import ConfigurationError
from exchange.messages import Catalogue, Message, MessageSubmission, Origin, draft_from_submission
from exchange.policy import Actor, Consent, ReplyContext, Use, decide, national_equivalent, redacted_payload
from tests.unit.helpers import agreement, agreement_data

AGREEMENT = agreement()
CATALOGUE = Catalogue.for_agreement(AGREEMENT)
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
ACTIONS_WITH_FLOORS: tuple[Action, ...] = ("submit", "receive")
EVERY_TYPE = frozenset(AGREEMENT.message_types)
EVERY_PURPOSE = frozenset(AGREEMENT.purposes)
VICTIM_STATUS = {"ID": "TRAFFICKING_VICTIM", "MY": "ILLEGAL_MIGRANT"}


def actor(**overrides: Any) -> Actor:
    values: dict[str, Any] = {
        "client_id": "pdrm-analyst",
        "agency": "PDRM",
        "unit": "ATIPSOM",
        "roles": frozenset({"INVESTIGATOR"}),
        "clearance": "S",
        "message_types": EVERY_TYPE,
        "purposes": EVERY_PURPOSE,
        "cases": None,
        "party": "MY",
        "police": True,
    }
    values.update(overrides)
    return Actor(**values)


def body(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "type": "REQUEST_FOR_INFORMATION",
        "case_ref": "ID-MY/2026/0001",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "AMBER",
        "handling_codes": ["H0"],
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "payload": {"summary": "Recruiters via Batam", "questions": ["Known to PDRM?"]},
    }
    values.update(overrides)
    return values


def message(**overrides: Any) -> Message:
    return draft_from_submission(
        MessageSubmission.model_validate(body(**overrides)),
        agreement=AGREEMENT,
        catalogue=CATALOGUE,
        sender="ID",
        origin=Origin(agency="Polri", unit="TPPO"),
        now=NOW,
        checkpoint=None,
    )


CHILD = {
    "pseudonym": "VCT-001",
    "role": "VICTIM_CHILD",
    "status": VICTIM_STATUS,
    "age": {"years": 14, "basis": "DOCUMENTED"},
}
ADULT = {
    "pseudonym": "VCT-002",
    "role": "VICTIM_ADULT",
    "status": VICTIM_STATUS,
    "age": {"years": 30, "basis": "CLAIMED"},
}
INFORMANT = {"pseudonym": "INF-007", "role": "INFORMANT", "handler_ref": "HDL-0042"}
SUSPECT = {"pseudonym": "SUS-001", "role": "SUSPECT"}


def referral(*subjects: dict[str, Any], names: dict[str, str] | None = None, **overrides: Any) -> Message:
    """A victim identification referral naming each subject with a recognisable identity."""
    names = names or {s["pseudonym"]: f"NAME-OF-{s['pseudonym']}" for s in subjects}
    victims = [
        {"subject": p, "names": [n], "parents": [f"PARENT-OF-{p}"], "school": f"SCHOOL-OF-{p}"}
        for p, n in names.items()
    ]
    return message(
        type="VICTIM_IDENTIFICATION_REFERRAL",
        purposes=["VICTIM_IDENTIFICATION"],
        classification={"scheme": "POLRI", "level": "BIASA"},
        data_subjects=list(subjects),
        payload={"summary": "Found at a plantation", "victims": victims},
        **overrides,
    )


def refused(decision: Any) -> set[str]:
    return {r.rule_id for r in decision.refusals}


# --- classification equivalence -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("common", "scheme", "expected"),
    [
        ("C", "POLRI", "RAHASIA"),  # SULIT has no Indonesian counterpart: mapped up, never down
        ("S", "ARAHAN", "RAHSIA"),
        ("R", "ARAHAN", "TERHAD"),
        ("R", "POLRI", "TERBATAS"),
        ("TS", "POLRI", "SANGAT RAHASIA"),
        ("U", "ARAHAN", "UNCLASSIFIED"),
    ],
)
def test_national_equivalents(common: str, scheme: str, expected: str) -> None:
    assert national_equivalent(AGREEMENT, common, scheme) == expected


# --- every check rule, both outcomes -----------------------------------------------------------

SUBMIT_CASES: list[tuple[str, dict[str, Any], dict[str, Any], ReplyContext | None, set[str]]] = [
    ("complete", {}, {}, None, set()),
    ("incomplete", {"tlp": None, "legal_basis": [], "classification": None}, {}, None, {"R-COMPLETE"}),
    (
        "graded intelligence",
        {
            "type": "SPONTANEOUS_INTELLIGENCE",
            "grading": {"source": "B", "information": 2},
            "payload": {"summary": "Route via Tawau"},
        },
        {},
        None,
        set(),
    ),
    (
        "ungraded intelligence",
        {"type": "SPONTANEOUS_INTELLIGENCE", "payload": {"summary": "Route via Tawau"}},
        {},
        None,
        {"R-GRADING"},
    ),
    ("red with recipients", {"tlp": "RED", "recipients": ["pdrm-d7"]}, {}, None, set()),
    ("red without recipients", {"tlp": "RED"}, {}, None, {"R-TLP-RED-RECIPIENTS"}),
    ("addressed to partner units", {"addressed_to": ["ATIPSOM", "NCB"]}, {}, None, set()),
    ("addressed to own units", {"addressed_to": ["TPPO"]}, {}, None, {"R-ADDRESS-UNITS"}),
    (
        "purpose outside the type",
        {
            "type": "VICTIM_REPATRIATION",
            "purposes": ["STRATEGIC_ANALYSIS"],
            "payload": {
                "subject": "VCT-002",
                "victim": {"subject": "VCT-002"},
                "handover_point": "Entikong",
                "handover_at": "2026-12-01T09:00:00+07:00",
                "escort": "Polda Kalbar",
                "receiving_agency": "BP2MI",
            },
            "data_subjects": [ADULT],
        },
        {},
        None,
        {"R-PURPOSE-TYPE"},
    ),
    ("type not entitled", {}, {"message_types": frozenset({"RESPONSE"})}, None, {"R-CLIENT-TYPE"}),
    ("no types at all (fail closed)", {}, {"message_types": frozenset()}, None, {"R-CLIENT-TYPE"}),
    ("purpose not entitled", {}, {"purposes": frozenset({"PREVENTION"})}, None, {"R-CLIENT-PURPOSE"}),
    (
        "above own clearance",
        {"classification": {"scheme": "POLRI", "level": "SANGAT RAHASIA"}},
        {},
        None,
        {"R-CLEARANCE-SEND"},
    ),
    ("case allowed", {}, {"cases": frozenset({"ID-MY/2026/0001"})}, None, set()),
    ("case not allowed", {}, {"cases": frozenset({"ID-MY/2026/0999"})}, None, {"R-NEED-TO-KNOW-CASE"}),
    (
        "evidence for court with MLA",
        {
            "type": "EVIDENCE_TRANSFER",
            "purposes": ["JUDICIAL_EVIDENCE"],
            "mla_reference": "MLA/2026/17",
            "payload": {
                "summary": "Ledger",
                "items": [{"description": "Ledger", "kind": "DOCUMENT", "sha256": "a" * 64}],
            },
        },
        {},
        None,
        set(),
    ),
    (
        "evidence for court without MLA",
        {
            "type": "EVIDENCE_TRANSFER",
            "purposes": ["JUDICIAL_EVIDENCE"],
            "payload": {
                "summary": "Ledger",
                "items": [{"description": "Ledger", "kind": "DOCUMENT", "sha256": "a" * 64}],
            },
        },
        {},
        None,
        {"R-EVIDENCE-MLA"},
    ),
    (
        "reply to a visible received request",
        {
            "type": "RESPONSE",
            "in_reply_to": "m-1",
            "payload": {"outcome": "REFUSED", "refusal_reasons": ["NOT_HELD"]},
        },
        {},
        ReplyContext(True, True, True, True, True, "REQUEST_FOR_INFORMATION", True),
        set(),
    ),
    (
        "reply to nothing",
        {"type": "RESPONSE", "payload": {"outcome": "REFUSED", "refusal_reasons": ["NOT_HELD"]}},
        {},
        ReplyContext(),
        {"R-REPLY-TARGET"},
    ),
    (
        "reply to a message the client may not see",
        {
            "type": "RESPONSE",
            "in_reply_to": "m-1",
            "payload": {"outcome": "REFUSED", "refusal_reasons": ["NOT_HELD"]},
        },
        {},
        ReplyContext(True, True, False, True, True, "REQUEST_FOR_INFORMATION", False),
        {"R-REPLY-TARGET", "R-REPLY-VISIBLE"},  # as for one that does not exist: existence not told
    ),
    (
        "reply to a message that does not exist",
        {
            "type": "RESPONSE",
            "in_reply_to": "m-404",
            "payload": {"outcome": "REFUSED", "refusal_reasons": ["NOT_HELD"]},
        },
        {},
        ReplyContext(),
        {"R-REPLY-TARGET", "R-REPLY-VISIBLE"},
    ),
    (
        "reply that changes the case",
        {
            "type": "RESPONSE",
            "in_reply_to": "m-1",
            "payload": {"outcome": "REFUSED", "refusal_reasons": ["NOT_HELD"]},
        },
        {},
        ReplyContext(True, True, True, False, True, "REQUEST_FOR_INFORMATION", True),
        {"R-REPLY-VISIBLE"},
    ),
    ("joining a visible thread", {"thread_id": "t-1"}, {}, ReplyContext(thread_visible=True), set()),
    ("joining a thread it may not see", {"thread_id": "t-1"}, {}, ReplyContext(), {"R-THREAD-VISIBLE"}),
]


@pytest.mark.parametrize(
    ("name", "fields", "who", "reply", "expected"), SUBMIT_CASES, ids=[c[0] for c in SUBMIT_CASES]
)
def test_submit_rules(
    name: str, fields: dict[str, Any], who: dict[str, Any], reply: ReplyContext | None, expected: set[str]
) -> None:
    decision = decide(
        "submit", agreement=AGREEMENT, message=message(**fields), actor=actor(**who), reply=reply, now=NOW
    )
    assert refused(decision) == expected, name
    assert decision.allowed is (not expected)
    if expected:
        error = decision.refusal()
        assert {v.rule_id for v in error.violations} == expected
        assert all(v.remedy and v.rule_version.startswith(v.rule_id + "@") for v in error.violations)


RELEASE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], frozenset[str] | None, set[str]]] = [
    ("cleared", {}, {}, None, set()),
    ("clearance below the level", {}, {"clearance": "C"}, None, {"R-CLEARANCE"}),
    ("type not entitled", {}, {"message_types": frozenset({"RESPONSE"})}, None, {"R-CLIENT-TYPE"}),
    ("case restricted elsewhere", {}, {"cases": frozenset({"X/1/2"})}, None, {"R-NEED-TO-KNOW-CASE"}),
    ("addressed to its unit", {"addressed_to": ["ATIPSOM"]}, {}, None, set()),
    ("addressed to another unit", {"addressed_to": ["NCB"]}, {}, None, {"R-ADDRESSED-UNIT"}),
    ("use within the purposes", {}, {}, frozenset({"TIP_INVESTIGATION"}), set()),
    ("use outside the purposes", {}, {}, frozenset({"STRATEGIC_ANALYSIS"}), {"R-PURPOSE-USE"}),
    (
        "no purpose in common (fail closed)",
        {},
        {"purposes": frozenset({"PREVENTION"})},
        None,
        {"R-PURPOSE-USE"},
    ),
    ("red to a named recipient", {"tlp": "RED", "recipients": ["pdrm-analyst"]}, {}, None, set()),
    ("red to a named unit", {"tlp": "RED", "recipients": ["ATIPSOM"]}, {}, None, set()),
    ("red to anyone else", {"tlp": "RED", "recipients": ["pdrm-d11"]}, {}, None, {"R-TLP-RED"}),
    ("amber+strict to police", {"tlp": "AMBER+STRICT"}, {}, None, set()),
    ("amber+strict outside police", {"tlp": "AMBER+STRICT"}, {"police": False}, None, {"R-TLP-AMBER-STRICT"}),
    (
        "H1 for judicial use without consent",
        {"handling_codes": ["H1"], "purposes": ["JUDICIAL_EVIDENCE"]},
        {},
        frozenset({"JUDICIAL_EVIDENCE"}),
        {"R-H1-JUDICIAL"},
    ),
    ("H1 for investigation", {"handling_codes": ["H1"]}, {}, None, set()),
]


@pytest.mark.parametrize(
    ("name", "fields", "who", "use", "expected"), RELEASE_CASES, ids=[c[0] for c in RELEASE_CASES]
)
def test_release_rules(
    name: str, fields: dict[str, Any], who: dict[str, Any], use: frozenset[str] | None, expected: set[str]
) -> None:
    subject = message(**fields)
    reader = actor(**who)
    wanted = Use(use if use is not None else reader.purposes & frozenset(subject.purposes))
    decision = decide("release", agreement=AGREEMENT, message=subject, actor=reader, use=wanted, now=NOW)
    assert refused(decision) == expected, name


@pytest.mark.parametrize("role", ["IMMIGRATION_ENFORCEMENT", "PROSECUTION"])
def test_non_punishment_no_victim_data_for_immigration_or_prosecution(role: str) -> None:
    victim = referral(ADULT)
    decision = decide(
        "release",
        agreement=AGREEMENT,
        message=victim,
        actor=actor(roles=frozenset({role})),
        use=Use(frozenset({"VICTIM_IDENTIFICATION"})),
        now=NOW,
    )
    assert refused(decision) == {"R-NON-PUNISHMENT"}
    suspect_only = message(data_subjects=[SUSPECT])
    allowed = decide(
        "release",
        agreement=AGREEMENT,
        message=suspect_only,
        actor=actor(roles=frozenset({role})),
        use=Use(frozenset({"TIP_INVESTIGATION"})),
        now=NOW,
    )
    assert allowed.allowed


ONWARD_CASES: list[tuple[str, dict[str, Any], bool, set[str]]] = [
    ("no consent", {}, False, {"R-ONWARD-CONSENT"}),
    ("consent for that recipient", {}, True, set()),
    ("H2 without consent", {"handling_codes": ["H2"]}, False, {"R-H2-ONWARD", "R-ONWARD-CONSENT"}),
    ("red is never forwarded", {"tlp": "RED", "recipients": ["pdrm-analyst"]}, True, {"R-TLP-NO-FORWARD"}),
    ("amber+strict is never forwarded", {"tlp": "AMBER+STRICT"}, True, {"R-TLP-NO-FORWARD"}),
]


@pytest.mark.parametrize(
    ("name", "fields", "consented", "expected"), ONWARD_CASES, ids=[c[0] for c in ONWARD_CASES]
)
def test_onward_rules(name: str, fields: dict[str, Any], consented: bool, expected: set[str]) -> None:
    subject = message(**fields)
    use = Use(frozenset({"TIP_INVESTIGATION"}), recipient="INTERPOL")
    consents = (
        [Consent(subject.id, "INTERPOL", frozenset({"TIP_INVESTIGATION"}), NOW + dt.timedelta(days=1))]
        if consented
        else []
    )
    decision = decide(
        "onward", agreement=AGREEMENT, message=subject, actor=actor(), use=use, consents=consents, now=NOW
    )
    assert refused(decision) == expected, name


@pytest.mark.parametrize("authority", ["IMMIGRATION_ID", "IMMIGRATION_MY"])
def test_a_victim_s_data_never_goes_on_to_an_immigration_authority_even_with_consent(authority: str) -> None:
    """Non-punishment: the rule looked only at the caller's roles, so an investigator holding the
    originator's consent could pass an adult victim's identity to immigration."""
    subject = referral(ADULT, handling_codes=["H0"])
    use = Use(frozenset({"VICTIM_IDENTIFICATION"}), recipient=authority)
    consent = Consent(subject.id, authority, frozenset({"VICTIM_IDENTIFICATION"}), NOW + dt.timedelta(days=1))
    decision = decide(
        "onward", agreement=AGREEMENT, message=subject, actor=actor(), use=use, consents=[consent], now=NOW
    )
    assert "R-NON-PUNISHMENT" in refused(decision)
    to_police = Use(frozenset({"VICTIM_IDENTIFICATION"}), recipient="INTERPOL")
    interpol = Consent(
        subject.id, "INTERPOL", frozenset({"VICTIM_IDENTIFICATION"}), NOW + dt.timedelta(days=1)
    )
    allowed = decide(
        "onward",
        agreement=AGREEMENT,
        message=subject,
        actor=actor(),
        use=to_police,
        consents=[interpol],
        now=NOW,
    )
    assert "R-NON-PUNISHMENT" not in refused(allowed)


def test_an_h2_message_reaches_a_local_system_outside_the_police_only_with_consent() -> None:
    """H2: any release outside the receiving police (a ministry's or immigration's system
    registered as a client) needs the originator's consent, as a third party would."""
    subject = message(handling_codes=["H2"], tlp="AMBER")
    ministry = actor(client_id="kpppa-case", agency="Kementerian PPPA", police=False)
    use = Use(frozenset({"TIP_INVESTIGATION"}))
    refusal = decide("release", agreement=AGREEMENT, message=subject, actor=ministry, use=use, now=NOW)
    assert "R-H2-POLICE" in refused(refusal)
    consent = Consent(subject.id, None, frozenset({"TIP_INVESTIGATION"}), NOW + dt.timedelta(days=1))
    consented = decide(
        "release", agreement=AGREEMENT, message=subject, actor=ministry, use=use, consents=[consent], now=NOW
    )
    assert "R-H2-POLICE" not in refused(consented)
    police = decide("release", agreement=AGREEMENT, message=subject, actor=actor(), use=use, now=NOW)
    assert police.allowed
    h0 = decide("release", agreement=AGREEMENT, message=message(), actor=ministry, use=use, now=NOW)
    assert "R-H2-POLICE" not in refused(h0)


def test_a_consent_covers_only_its_recipient_and_only_until_it_expires_or_is_revoked() -> None:
    subject = message()
    use = Use(frozenset({"TIP_INVESTIGATION"}), recipient="INTERPOL")
    later = NOW + dt.timedelta(days=2)
    for consent, when in [
        (Consent(subject.id, "ASEANAPOL", frozenset({"TIP_INVESTIGATION"}), later), NOW),  # another recipient
        (Consent(subject.id, "INTERPOL", frozenset({"TIP_INVESTIGATION"}), NOW), NOW),  # expired
        (Consent(subject.id, "INTERPOL", frozenset({"TIP_INVESTIGATION"}), later, revoked_at=NOW), NOW),
        (Consent("another-message", "INTERPOL", frozenset({"TIP_INVESTIGATION"}), later), NOW),
    ]:
        decision = decide(
            "onward",
            agreement=AGREEMENT,
            message=subject,
            actor=actor(),
            use=use,
            consents=[consent],
            now=when,
        )
        assert "R-ONWARD-CONSENT" in refused(decision)


# --- floors ----------------------------------------------------------------------------------------

FLOOR_CASES: list[tuple[str, list[dict[str, Any]], str, str, set[str], set[str]]] = [
    ("child victim", [CHILD], "C", "AMBER+STRICT", {"H0", "H2"}, {"R-FLOOR-CHILD"}),
    (
        "age unknown",
        [{**CHILD, "role": "AGE_UNKNOWN", "pseudonym": "UNK-001"}],
        "C",
        "AMBER+STRICT",
        {"H0", "H2"},
        {"R-FLOOR-CHILD"},
    ),
    ("adult victim", [ADULT], "R", "AMBER", {"H0"}, {"R-FLOOR-VICTIM-WITNESS"}),
    (
        "witness",
        [{"pseudonym": "WIT-001", "role": "WITNESS"}],
        "R",
        "AMBER",
        {"H0"},
        {"R-FLOOR-VICTIM-WITNESS"},
    ),
    ("informant", [INFORMANT], "S", "AMBER", {"H0"}, {"R-FLOOR-INFORMANT"}),
    ("suspect only", [SUSPECT], "U", "AMBER", {"H0"}, set()),
    (
        "an 'adult' victim aged 16 counts as a child",
        [{**ADULT, "age": {"years": 16, "basis": "ESTIMATED"}}],
        "C",
        "AMBER+STRICT",
        {"H0", "H2"},
        {"R-FLOOR-CHILD"},
    ),
]


@pytest.mark.parametrize(
    ("name", "subjects", "level", "tlp", "handling", "rules"), FLOOR_CASES, ids=[c[0] for c in FLOOR_CASES]
)
def test_floors_raise_the_marking_and_say_why(
    name: str, subjects: list[dict[str, Any]], level: str, tlp: str, handling: set[str], rules: set[str]
) -> None:
    subject = message(
        classification={"scheme": "POLRI", "level": "BIASA"},
        data_subjects=subjects,
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": s["pseudonym"]} for s in subjects],
        },
    )
    for action in ACTIONS_WITH_FLOORS:
        decision = decide(action, agreement=AGREEMENT, message=subject, actor=actor(), now=NOW)
        assert (decision.level, decision.tlp, set(decision.handling_codes)) == (level, tlp, handling), name
        assert {c.rule_id for c in decision.changes} == rules
        assert all(c.reason for c in decision.changes)


def test_an_operational_plan_is_at_least_secret() -> None:
    plan = message(
        type="REQUEST_FOR_ASSISTANCE",
        classification={"scheme": "POLRI", "level": "TERBATAS"},
        payload={
            "assistance": "RESCUE",
            "summary": "Rescue at a plantation",
            "operation_plan": "Dawn, 2 teams",
        },
    )
    decision = decide("submit", agreement=AGREEMENT, message=plan, actor=actor(), now=NOW)
    assert (decision.level, [c.rule_id for c in decision.changes]) == ("S", ["R-FLOOR-OPERATIONAL-PLAN"])


def test_the_highest_floor_wins_and_a_higher_level_is_never_lowered() -> None:
    both = message(data_subjects=[CHILD, INFORMANT], classification={"scheme": "POLRI", "level": "BIASA"})
    assert decide("submit", agreement=AGREEMENT, message=both, actor=actor(), now=NOW).level == "S"
    secret = message(
        data_subjects=[CHILD],
        classification={"scheme": "POLRI", "level": "SANGAT RAHASIA"},
        tlp="RED",
        recipients=["pdrm-analyst"],
    )
    decision = decide("submit", agreement=AGREEMENT, message=secret, actor=actor(clearance="TS"), now=NOW)
    assert (decision.level, decision.tlp) == ("TS", "RED")
    assert {c.kind for c in decision.changes} == {"handling"}  # only H2 added: nothing lowered


# --- redaction ---------------------------------------------------------------------------------------


def release(subject: Message, reader: Actor, purposes: set[str] | None = None) -> tuple[Any, str]:
    use = Use(frozenset(purposes) if purposes else reader.purposes & frozenset(subject.purposes))
    decision = decide("release", agreement=AGREEMENT, message=subject, actor=reader, use=use, now=NOW)
    return decision, json.dumps(redacted_payload(subject, decision))


def test_a_child_victim_is_pseudonymised_for_an_analyst_and_whole_for_child_protection() -> None:
    child = referral(CHILD)
    decision, seen = release(child, actor(roles=frozenset({"ANALYST"})))
    assert decision.allowed
    for identity in ("NAME-OF-VCT-001", "PARENT-OF-VCT-001", "SCHOOL-OF-VCT-001"):
        assert identity not in seen
    assert "VCT-001" in seen
    assert {r.pointer for r in decision.redactions} == {
        "payload/victims/0/names",
        "payload/victims/0/parents",
        "payload/victims/0/school",
    }
    assert {r.rule for r in decision.redactions} == {"R-REDACT-CHILD@1"}
    for role in ("CHILD_PROTECTION", "VICTIM_SERVICES"):
        decision, seen = release(child, actor(roles=frozenset({role}), unit="D11"))
        assert not decision.redactions
        assert "NAME-OF-VCT-001" in seen


def test_adult_victims_are_pseudonymised_for_analysis_and_fugitive_location_only() -> None:
    adult = message(
        type="REQUEST_FOR_INFORMATION",
        purposes=["TIP_INVESTIGATION", "STRATEGIC_ANALYSIS"],
        data_subjects=[ADULT],
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": "VCT-002", "names": ["NAME-ADULT"]}],
        },
    )
    _, seen = release(adult, actor(), {"TIP_INVESTIGATION"})
    assert "NAME-ADULT" in seen
    decision, seen = release(adult, actor(), {"STRATEGIC_ANALYSIS"})
    assert "NAME-ADULT" not in seen
    assert [r.rule for r in decision.redactions] == ["R-REDACT-ADULT-VICTIM@1"]


def test_an_unattributed_identity_is_treated_as_a_child_victim() -> None:
    orphan = message(
        classification={"scheme": "POLRI", "level": "BIASA"},
        data_subjects=[SUSPECT],
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": "NOT-LISTED", "names": ["NAME-X"]}],
        },
    )
    assert "VICTIM_CHILD" in orphan.subject_roles
    submitted = decide("submit", agreement=AGREEMENT, message=orphan, actor=actor(), now=NOW)
    assert submitted.level == "C"
    assert submitted.changes[0].rule_id == "R-FLOOR-CHILD"
    decision, seen = release(orphan, actor(roles=frozenset({"ANALYST"})))
    assert "NAME-X" not in seen
    assert [r.replacement for r in decision.redactions] == ["REDACTED"]


def test_an_informant_is_replaced_by_the_handler_reference_before_sealing_and_on_release() -> None:
    tip = message(
        data_subjects=[INFORMANT],
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": "INF-007", "names": ["NAME-INF"], "phone_numbers": ["+60 12 345"]}],
        },
    )
    decision = decide("submit", agreement=AGREEMENT, message=tip, actor=actor(), now=NOW)
    sealed = json.dumps(redacted_payload(tip, decision))
    assert "NAME-INF" not in sealed
    assert "+60 12 345" not in sealed
    assert "HDL-0042" in sealed
    decision, seen = release(tip, actor(roles=frozenset({"CHILD_PROTECTION"})))
    assert "NAME-INF" not in seen


def test_redaction_reaches_any_depth_and_a_relative_is_protected_as_the_victim() -> None:
    deep = message(
        type="VICTIM_REPATRIATION",
        purposes=["VICTIM_PROTECTION_REPATRIATION"],
        data_subjects=[CHILD],
        payload={
            "subject": "VCT-001",
            "victim": {"subject": "VCT-001", "names": ["NAME-CHILD"]},
            "handover_point": "HANDOVER-ENTIKONG",
            "handover_at": "2026-12-01T09:00:00+07:00",
            "escort": "Polda Kalbar",
            "receiving_agency": "BP2MI",
            "family_tracing": {
                "required": True,
                "status": "IN_PROGRESS",
                "relatives": [
                    {
                        "subject": "VCT-001",
                        "relationship": "MOTHER",
                        "names": ["MOTHER-DEEP"],
                        "address": "HOME-DEEP",
                    }
                ],
            },
        },
    )
    decision, seen = release(deep, actor(roles=frozenset({"INVESTIGATOR"})))
    for identity in ("NAME-CHILD", "MOTHER-DEEP", "HOME-DEEP", "HANDOVER-ENTIKONG", "2026-12-01T09:00"):
        assert identity not in seen
    assert "payload/family_tracing/relatives/0/names" in {r.pointer for r in decision.redactions}


# --- the agreement: rules are data, fail closed -------------------------------------------------------


def _with_rules(rules: list[dict[str, Any]]) -> dict[str, Any]:
    data = agreement_data()
    data["rules"] = rules
    return data


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ({"when": {"eq": ["message.colour", "RED"]}}, "not a known fact"),
        ({"when": {"resembles": ["message.tlp", "RED"]}}, "unknown operator"),
        ({"when": {"contains": ["message.tlp", "RED"]}}, "scalar fact, not set"),
        ({"then": {"raise_level": "ULTRA"}, "require": None}, "unknown level"),
    ],
)
def test_an_agreement_with_a_malformed_rule_is_refused_when_loaded(
    rule: dict[str, Any], complaint: str
) -> None:
    data = agreement_data()
    broken = {**data["rules"][0], **rule}
    broken = {k: v for k, v in broken.items() if v is not None}
    data["rules"] = [broken, *data["rules"][1:]]
    with pytest.raises(ConfigurationError, match=complaint):
        parse_agreement(data)


def test_an_action_without_a_check_rule_is_refused_not_allowed() -> None:
    data = agreement_data()
    with pytest.raises(ConfigurationError, match="no check rule for the release action"):
        parse_agreement(_with_rules([r for r in data["rules"] if "release" not in r["on"]]))
    with pytest.raises(ConfigurationError, match="rules"):
        parse_agreement(_with_rules([]))


def test_changing_a_rule_is_an_edit_to_the_agreement() -> None:
    data = agreement_data()
    for rule in data["rules"]:
        if rule["id"] == "R-FLOOR-CHILD":
            rule["then"]["raise_level"] = "S"
            rule["version"] = 2
    edited = parse_agreement(data)
    child = referral(CHILD)
    decision = decide("submit", agreement=edited, message=child, actor=actor(), now=NOW)
    assert decision.level == "S"
    assert "R-FLOOR-CHILD@2" in decision.evaluated


# --- properties ----------------------------------------------------------------------------------------

ROLES = ["SUSPECT", "VICTIM_ADULT", "VICTIM_CHILD", "AGE_UNKNOWN", "WITNESS", "INFORMANT"]
POLRI_LEVELS = list(AGREEMENT.schemes["POLRI"].levels)
AGES: list[tuple[int | None, str]] = [
    (9, "DOCUMENTED"),
    (17, "CLAIMED"),
    (30, "ESTIMATED"),
    (None, "UNKNOWN"),
    (45, "UNKNOWN"),
]


def _subject(pseudonym: str, role: str, age: tuple[int | None, str]) -> dict[str, Any]:
    subject: dict[str, Any] = {"pseudonym": pseudonym, "role": role}
    if role in ("VICTIM_ADULT", "VICTIM_CHILD", "AGE_UNKNOWN"):
        subject.update(status=VICTIM_STATUS, age={"years": age[0], "basis": age[1]})
    if role == "INFORMANT":
        subject["handler_ref"] = f"HDL-{pseudonym}"
    return subject


def _counts_as(role: str, age: tuple[int | None, str], listed: bool) -> str:
    """The role the domain rules protect a person as, worked out here from the generator's data
    alone (not from the engine's index): an unlisted subject or an adult victim of unknown or child
    age is protected as a child."""
    if not listed:
        return "VICTIM_CHILD"
    if role == "VICTIM_ADULT":
        years, basis = age
        if years is None or basis == "UNKNOWN":
            return "AGE_UNKNOWN"
        return "VICTIM_CHILD" if years < 18 else role
    return role


@dataclass(frozen=True)
class Generated:
    message: Message
    identities: list[tuple[str, str]]  # (a value of a protected category, the role it counts as)


@st.composite
def generated(draw: st.DrawFn) -> Generated:
    count = draw(st.integers(1, 4))
    roles = draw(st.lists(st.sampled_from(ROLES), min_size=count, max_size=count))
    ages = draw(st.lists(st.sampled_from(AGES), min_size=count, max_size=count))
    listed = draw(st.lists(st.booleans(), min_size=count, max_size=count))  # unlisted: unattributable
    subjects = [_subject(f"SUB-{i:03d}", r, a) for i, (r, a) in enumerate(zip(roles, ages, strict=True))]
    identities: list[tuple[str, str]] = []
    persons = []
    for i, (subject, keep) in enumerate(zip(subjects, listed, strict=True)):
        values = {k: f"IDENTITY-{k.upper()}-{i}" for k in ("name", "address", "phone", "passport", "photo")}
        persons.append(
            {
                "subject": subject["pseudonym"] if keep else f"GHOST-{i:03d}",
                "names": [values["name"]],
                "address": values["address"],
                "phone_numbers": [values["phone"]],
                "photographs": [values["photo"]],
                "documents": [{"kind": "PASSPORT", "number": values["passport"], "issuing_country": "IDN"}],
            }
        )
        counts = _counts_as(roles[i], ages[i], keep)
        identities += [(v, counts) for v in values.values()]
    where = draw(st.sampled_from(["top", "deep"]))
    tlp = draw(st.sampled_from(["CLEAR", "GREEN", "AMBER"]))
    level = draw(st.sampled_from(POLRI_LEVELS))
    codes = draw(st.lists(st.sampled_from(["H0", "H1", "H3"]), unique=True))
    common = {
        "classification": {"scheme": "POLRI", "level": level},
        "tlp": tlp,
        "handling_codes": codes,
        "data_subjects": [s for s, keep in zip(subjects, listed, strict=True) if keep],
    }
    if where == "top":
        return Generated(
            message(**common, payload={"summary": "s", "questions": ["q"], "persons": persons}), identities
        )
    victim = persons[0]
    del identities[5:]  # only the first person is in this payload: the victim repatriated
    relatives = [  # a relative's details belong to the victim they are traced for
        {
            "subject": victim["subject"],
            "relationship": "MOTHER",
            "names": [f"RELATIVE-{i}"],
            "address": f"RELATIVE-ADDRESS-{i}",
        }
        for i in range(count - 1)
    ]
    identities += [(str(v), identities[0][1]) for r in relatives for v in (r["names"][0], r["address"])]
    payload = {
        "subject": victim["subject"],
        "victim": victim,
        "handover_point": "HANDOVER-POINT-X",
        "handover_at": "2026-12-01T09:00:00+07:00",
        "escort": "e",
        "receiving_agency": "r",
        "family_tracing": {"required": True, "status": "IN_PROGRESS", "relatives": relatives},
    }
    identities.append(("HANDOVER-POINT-X", identities[0][1]))
    return Generated(
        message(
            type="VICTIM_REPATRIATION", purposes=["VICTIM_PROTECTION_REPATRIATION"], **common, payload=payload
        ),
        identities,
    )


@settings(max_examples=150, deadline=None)
@given(generated(), st.sampled_from(ACTIONS_WITH_FLOORS))
def test_property_no_rule_ever_lowers_a_marking(case: Generated, action: Action) -> None:
    subject = case.message
    decision = decide(action, agreement=AGREEMENT, message=subject, actor=actor(clearance="TS"), now=NOW)
    assert subject.marking is not None
    assert AGREEMENT.level_rank(decision.level or "") >= AGREEMENT.level_rank(subject.marking.common)
    assert AGREEMENT.tlp_rank(decision.tlp or "") >= AGREEMENT.tlp_rank(subject.tlp or "")
    assert set(decision.handling_codes) >= set(subject.handling_codes)


@settings(max_examples=200, deadline=None)
@given(
    generated(),
    st.sets(st.sampled_from(["INVESTIGATOR", "ANALYST", "CHILD_PROTECTION", "VICTIM_SERVICES"]), min_size=1),
    st.sampled_from(["TIP_INVESTIGATION", "STRATEGIC_ANALYSIS", "VICTIM_PROTECTION_REPATRIATION"]),
)
def test_property_a_release_never_shows_what_the_recipient_may_not_see(
    case: Generated, roles: set[str], purpose: str
) -> None:
    subject = case.message
    reader = actor(roles=frozenset(roles), clearance="TS")
    use = Use(frozenset({purpose}) & frozenset(subject.purposes) or frozenset(subject.purposes))
    decision = decide("release", agreement=AGREEMENT, message=subject, actor=reader, use=use, now=NOW)
    if not decision.allowed:
        return
    seen = json.dumps(redacted_payload(subject, decision))
    hidden = {"INFORMANT"}  # from the domain rules, not from the engine
    if not roles & {"CHILD_PROTECTION", "VICTIM_SERVICES"}:
        hidden |= {"VICTIM_CHILD", "AGE_UNKNOWN"}
    if use.purposes & {"STRATEGIC_ANALYSIS", "FUGITIVE_LOCATION"} or "ANALYST" in roles:
        hidden.add("VICTIM_ADULT")
    for value, counts_as in case.identities:
        if counts_as in hidden:
            assert value not in seen, (value, counts_as)
        elif counts_as == "SUSPECT":
            assert value in seen, (value, counts_as)  # nothing is hidden that need not be


# --- findings of the adversarial review, each performed -------------------------------------------------


def test_an_adult_victim_of_unknown_age_is_protected_as_a_child() -> None:
    unknown = {**ADULT, "age": {"basis": "UNKNOWN"}}
    subject = referral(unknown)
    submitted = decide("submit", agreement=AGREEMENT, message=subject, actor=actor(), now=NOW)
    assert (submitted.level, submitted.tlp) == ("C", "AMBER+STRICT")
    assert "H2" in submitted.handling_codes
    _, seen = release(subject, actor(roles=frozenset({"ANALYST"})))
    assert "NAME-OF-VCT-002" not in seen


def test_financial_data_of_an_informant_and_a_child_is_protected() -> None:
    trail = message(
        type="FINANCIAL_TRAIL",
        purposes=["TIP_INVESTIGATION"],
        grading={"source": "B", "information": 2},
        data_subjects=[INFORMANT, CHILD],
        payload={
            "summary": "s",
            "accounts": [
                {
                    "holder": "INF-007",
                    "institution": "Bank",
                    "country": "MY",
                    "account_number": "INFORMANT-ACCT-999",
                },
                {
                    "holder": "VCT-001",
                    "institution": "Bank",
                    "country": "ID",
                    "account_number": "CHILD-ACCT-123",
                },
            ],
        },
    )
    sealed = json.dumps(
        redacted_payload(trail, decide("submit", agreement=AGREEMENT, message=trail, actor=actor(), now=NOW))
    )
    assert "INFORMANT-ACCT-999" not in sealed
    _, seen = release(trail, actor(roles=frozenset({"INVESTIGATOR"})))
    assert "CHILD-ACCT-123" not in seen


def test_an_evidence_photograph_without_a_subject_is_protected_as_a_child_s() -> None:
    evidence = message(
        type="EVIDENCE_TRANSFER",
        purposes=["TIP_INVESTIGATION"],
        payload={
            "summary": "s",
            "items": [
                {
                    "description": "a photograph",
                    "kind": "PHOTOGRAPH",
                    "sha256": "a" * 64,
                    "content": "PHOTO-BYTES",
                }
            ],
        },
    )
    _, seen = release(evidence, actor(roles=frozenset({"ANALYST"})))
    assert "PHOTO-BYTES" not in seen


def test_analysts_see_adult_victims_pseudonymised_whatever_purpose_they_declare() -> None:
    adult = message(
        data_subjects=[ADULT],
        payload={
            "summary": "s",
            "questions": ["q"],
            "persons": [{"subject": "VCT-002", "names": ["NAME-ADULT"]}],
        },
    )
    _, seen = release(adult, actor(roles=frozenset({"ANALYST"})), {"TIP_INVESTIGATION"})
    assert "NAME-ADULT" not in seen


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (("R-NON-PUNISHMENT", "require", {"none_of": ["actor.roles", ["IMMIGRATION_ENFORCMENT"]]}), "roles"),
        (("R-TLP-RED", "when", {"eq": ["message.tlp", "Red"]}), "tlp"),
        (("R-FLOOR-CHILD", "when", {"intersects": ["message.subject_roles", ["CHILD"]]}), "subject_roles"),
        (("R-CLEARANCE", "require", {"level_at_least": ["actor.clearance", "SECRET"]}), "levels"),
        (
            (
                "R-REDACT-CHILD",
                "then",
                {"redact": {"subject_roles": ["VICTIM_CHILD"], "categories": ["person_identity"]}},
            ),
            "data category",
        ),
    ],
)
def test_a_misspelt_literal_in_a_rule_is_refused_not_silently_ignored(
    edit: tuple[str, str, Any], complaint: str
) -> None:
    rule_id, key, value = edit
    data = agreement_data()
    for rule in data["rules"]:
        if rule["id"] == rule_id:
            rule[key] = value
    with pytest.raises(ConfigurationError, match=complaint):
        parse_agreement(data)


def test_an_unknown_level_under_a_negation_still_fails_closed() -> None:
    data = agreement_data()
    for rule in data["rules"]:
        if rule["id"] == "R-CLEARANCE":
            rule["require"] = {"not": {"not": {"level_at_least": ["actor.clearance", "message.level"]}}}
    edited = parse_agreement(data)
    decision = decide(
        "release",
        agreement=edited,
        message=message(),
        actor=actor(clearance=None),
        use=Use(frozenset({"TIP_INVESTIGATION"})),
        now=NOW,
    )
    assert "R-CLEARANCE" in refused(decision)


@pytest.mark.parametrize(("field", "value"), [("control_tlp", "Amber"), ("control_handling_codes", ["H7"])])
def test_the_markings_of_control_messages_are_the_agreement_s_own(field: str, value: object) -> None:
    data = agreement_data()
    data[field] = value
    with pytest.raises(ConfigurationError, match=field):
        parse_agreement(data)
