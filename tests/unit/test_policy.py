"""Classification equivalence and the outbound, inbound and release rules (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.errors import PolicyRefusal
from exchange.policy import (
    Actor,
    evaluate_inbound,
    evaluate_release,
    evaluate_submission,
    national_equivalent,
)
from tests.unit.helpers import agreement

AGREEMENT = agreement()
ANALYST = Actor("polri-cms", "Polri", "TPPO", ("INVESTIGATOR",), "S", (), ())


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


@given(st.sampled_from(["POLRI", "ARAHAN"]), st.sampled_from(["POLRI", "ARAHAN"]), st.data())
def test_property_equivalence_never_lowers_a_level(source: str, target: str, data: st.DataObject) -> None:
    level = data.draw(st.sampled_from(sorted(AGREEMENT.schemes[source].levels)))
    common = AGREEMENT.schemes[source].levels[level]
    mapped = national_equivalent(AGREEMENT, common, target)
    assert AGREEMENT.level_rank(AGREEMENT.schemes[target].levels[mapped]) >= AGREEMENT.level_rank(common)


def submit(actor: Actor = ANALYST, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "party": "ID",
        "actor": actor,
        "message_type": "REQUEST_FOR_INFORMATION",
        "purposes": ["TIP_INVESTIGATION"],
        "scheme": "POLRI",
        "level": "RAHASIA",
        "tlp": "AMBER",
        "handling_codes": ["H0"],
        "replied_to": None,
        "in_reply_to": None,
    }
    kwargs.update(overrides)
    return evaluate_submission(AGREEMENT, **kwargs)


def test_allowed_submission_has_marking_and_every_rule_recorded() -> None:
    decision = submit()
    assert (decision.marking.level, decision.marking.common) == ("RAHASIA", "S")
    assert all(r.allowed for r in decision.rules)
    assert {"R-TYPE-KNOWN", "R-CLIENT-TYPE", "R-CLEARANCE-SEND", "R-CLASS-OWN-SCHEME"} <= {
        r.rule_id for r in decision.rules
    }


@pytest.mark.parametrize(
    ("overrides", "actor", "rules"),
    [
        ({"message_type": "GOSSIP"}, ANALYST, {"R-TYPE-KNOWN"}),
        ({"purposes": ["IMMIGRATION_ENFORCEMENT"]}, ANALYST, {"R-PURPOSE-TYPE"}),
        ({"scheme": "ARAHAN", "level": "SULIT"}, ANALYST, {"R-CLASS-OWN-SCHEME"}),
        ({"level": "SULIT"}, ANALYST, {"R-CLASS-LEVEL"}),
        ({"level": "SANGAT RAHASIA"}, ANALYST, {"R-CLEARANCE-SEND"}),
        ({"tlp": "PURPLE"}, ANALYST, {"R-TLP-KNOWN"}),
        ({"handling_codes": ["H9"]}, ANALYST, {"R-HANDLING-KNOWN"}),
        ({}, Actor("x", "Polri", "u", (), "S", ("RESPONSE",), ()), {"R-CLIENT-TYPE"}),
        ({}, Actor("x", "Polri", "u", (), "S", (), ("PREVENTION",)), {"R-CLIENT-PURPOSE"}),
        ({"message_type": "RESPONSE"}, ANALYST, {"R-REPLY-TARGET"}),
        (
            {
                "message_type": "RESPONSE",
                "replied_to": {"direction": "out", "type": "REQUEST_FOR_INFORMATION"},
                "in_reply_to": "m1",
            },
            ANALYST,
            {"R-REPLY-TARGET"},
        ),
        (
            {"tlp": "PURPLE", "level": "SANGAT RAHASIA", "handling_codes": ["H7"]},
            ANALYST,
            {"R-TLP-KNOWN", "R-CLEARANCE-SEND", "R-HANDLING-KNOWN"},
        ),
    ],
)
def test_refusals_name_every_rule_that_refused(
    overrides: dict[str, Any], actor: Actor, rules: set[str]
) -> None:
    with pytest.raises(PolicyRefusal) as info:
        submit(actor, **overrides)
    assert {v.rule_id for v in info.value.violations} == rules
    assert all(v.reason for v in info.value.violations)


def test_a_reply_to_a_received_request_is_allowed() -> None:
    decision = submit(
        message_type="RESPONSE",
        replied_to={"direction": "in", "type": "REQUEST_FOR_INFORMATION"},
        in_reply_to="m1",
    )
    assert any(r.rule_id == "R-REPLY-TARGET" and r.allowed for r in decision.rules)


def test_inbound_keeps_the_originator_marking_and_maps_up() -> None:
    message = {
        "type": "RESPONSE",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "ARAHAN", "level": "SULIT", "common": "C"},
    }
    assert evaluate_inbound(AGREEMENT, party="ID", message=message) == ("C", "RAHASIA")


@pytest.mark.parametrize(
    "classification",
    [
        {"scheme": "ARAHAN", "level": "SULIT", "common": "U"},  # common level lowered beside the marking
        {"scheme": "POLRI", "level": "RAHASIA", "common": "S"},  # not the sender's scheme
        {"scheme": "ARAHAN", "level": "SECRET-ISH", "common": "C"},
    ],
)
def test_inbound_refuses_inconsistent_markings(classification: dict[str, str]) -> None:
    message = {"type": "RESPONSE", "purposes": ["TIP_INVESTIGATION"], "classification": classification}
    with pytest.raises(PolicyRefusal):
        evaluate_inbound(AGREEMENT, party="ID", message=message)


@pytest.mark.parametrize(
    ("clearance", "types", "level", "allowed"),
    [
        ("S", (), "S", True),
        ("R", (), "S", False),
        ("TS", ("REQUEST_FOR_INFORMATION",), "C", False),
        ("C", ("RESPONSE",), "C", True),
    ],
)
def test_release_needs_clearance_and_type_entitlement(
    clearance: str, types: tuple[str, ...], level: str, allowed: bool
) -> None:
    actor = Actor("c", "PDRM", "D7", (), clearance, types, ())
    assert (
        evaluate_release(AGREEMENT, actor=actor, message_type="RESPONSE", common_level=level).allowed
        is allowed
    )
