"""Agreement versions over time, without a database: which later version may follow which, which
version is in force when, and which version a message signed at a given time may name."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from exchange.agreement import Agreement, parse_agreement
from exchange.agreement_history import FIXED, GROWING, AgreementHistory, successor_problems
from exchange.errors import ConfigurationError
from exchange.ledger.checkpoint import SIG_COSIGNATURE_V1, NoteVerifier
from tests.unit.helpers import agreement_data

T0 = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
SKEW = dt.timedelta(minutes=5)
FIRST_DATA = agreement_data()
FIRST = parse_agreement(FIRST_DATA)
NEW = "VICTIM_SUPPORT"  # the purpose every later version here adds


def later(
    version: str = "2027-01",
    effective: dt.datetime | None = T0,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> Agreement:
    """A later version of FIRST: a new purpose usable in requests, a longer retention, and ``change``."""
    data = copy.deepcopy(FIRST_DATA)
    data["version"] = version
    if effective is not None:
        data["effective_from"] = effective.isoformat()
    data["purposes"][NEW] = "support of an identified victim"
    data["message_types"]["REQUEST_FOR_INFORMATION"]["purposes"].append(NEW)
    data["message_types"]["REQUEST_FOR_INFORMATION"]["retention_days"] = 3650
    if change is not None:
        change(data)
    return parse_agreement(data)


def test_a_later_version_may_change_rules_retention_and_add_to_every_vocabulary() -> None:
    def more(data: dict[str, Any]) -> None:
        data["rules"][0]["version"] += 1
        data["rules"][0]["reason"] = "reworded by the joint committee"
        data["handling_codes"]["H9"] = "a new handling code"
        data["third_parties"]["UNODC"] = {"name": "UN Office on Drugs and Crime"}
        data["organisations"]["ID"]["units"]["DITRESKRIMUM"] = "a new unit"

    assert successor_problems(FIRST, later(change=more)) == []


@pytest.mark.parametrize("field", sorted(FIXED))
def test_what_stored_data_and_trust_rest_on_cannot_change(field: str) -> None:
    def edit(data: dict[str, Any]) -> None:
        if field == "parties":
            data["parties"]["MY"]["endpoint"] = "https://elsewhere.example:8443"
        elif field == "common_levels":
            data["common_levels"] = [*data["common_levels"][:-1], "TOP"]
            for scheme in data["schemes"].values():
                scheme["levels"] = {
                    k: ("TOP" if v == FIRST.common_levels[-1] else v) for k, v in scheme["levels"].items()
                }
        elif field == "schemes":
            scheme = data["schemes"][FIRST.parties["ID"].scheme]
            scheme["name"] = scheme["name"] + " (renamed)"
        elif field == "party_schemes":
            data["party_schemes"] = {"ID": data["party_schemes"]["MY"], "MY": data["party_schemes"]["ID"]}
        elif field == "tlp":
            data["tlp"] = [*data["tlp"], "BLACK"]
        elif field == "child_age":
            data["child_age"] = FIRST.child_age - 2
        elif field == "max_envelope_bytes":
            data["max_envelope_bytes"] = FIRST.max_envelope_bytes // 2
        elif field == "witnesses":
            key = NoteVerifier("oversight", SIG_COSIGNATURE_V1, b"\1" * 32).vkey
            data["witnesses"] = [{"name": "oversight", "key": key, "url": "https://oversight.example"}]

    problems = successor_problems(FIRST, later(change=edit))
    assert [p for p in problems if p.startswith(f"{field}:")], problems
    also = {"common_levels": {"schemes"}}.get(field, set())  # the schemes map onto the common levels
    assert {p.split(":")[0] for p in problems} == {field, *also}, problems


EXTRA: dict[str, Any] = {  # one value of each growing vocabulary that nothing else names
    "purposes": ("EXTRA_PURPOSE", "a purpose of the earlier version"),
    "handling_codes": ("H9", "a handling code of the earlier version"),
    "roles": ("EXTRA_ROLE", "a role of the earlier version"),
    "third_parties": ("EXTRA_BODY", {"name": "a third party of the earlier version"}),
    "message_types": (
        "EXTRA_TYPE",
        {"schema": "request_for_information.schema.json", "purposes": ["TIP_INVESTIGATION"]},
    ),
    "priorities": ("FLASH", None),
}


@pytest.mark.parametrize("vocabulary", GROWING)
def test_a_vocabulary_only_grows(vocabulary: str) -> None:
    name, value = EXTRA[vocabulary]

    def extend(data: dict[str, Any]) -> None:
        if isinstance(data[vocabulary], list):
            data[vocabulary].append(name)
        else:
            data[vocabulary][name] = value

    previous = later("2027-01", T0, extend)
    assert successor_problems(previous, later("2027-02", T0 + dt.timedelta(days=1), extend)) == []
    problems = successor_problems(previous, later("2027-02", T0 + dt.timedelta(days=1)))
    assert problems == [f"{vocabulary}: {[name]} of version '2027-01' are missing; a vocabulary only grows"]


def test_a_message_type_keeps_its_schema_and_kind_and_a_unit_stays() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["message_types"]["REQUEST_FOR_INFORMATION"]["kind"] = "control"
        del data["organisations"]["MY"]["units"][next(iter(data["organisations"]["MY"]["units"]))]

    problems = successor_problems(FIRST, later(change=edit))
    assert "message_types.REQUEST_FOR_INFORMATION: its schema and kind cannot change" in problems
    assert any(p.startswith("organisations.MY.units:") for p in problems), problems


def test_a_later_version_names_a_new_version_and_when_it_takes_effect_after_the_one_before() -> None:
    assert any(p.startswith("effective_from:") for p in successor_problems(FIRST, later(effective=None)))
    assert any(p.startswith("version:") for p in successor_problems(FIRST, later(version=FIRST.version)))
    second = later()
    assert successor_problems(second, later("2027-02", T0)) != []  # not after the one before
    assert successor_problems(second, later("2027-02", T0 + dt.timedelta(days=1))) == []


def test_the_history_orders_versions_by_when_they_take_effect_and_refuses_one_that_does_not_follow() -> None:
    second, third = later("2027-01", T0), later("2027-02", T0 + dt.timedelta(days=30))
    history = AgreementHistory.of([third, FIRST, second, second])
    assert [t.version for t in history.versions] == [FIRST.version, "2027-01", "2027-02"]
    assert history.accepted == {t.version: t.agreement.digest for t in history.versions}
    with pytest.raises(ConfigurationError, match="cannot follow"):
        AgreementHistory.of([FIRST, later("2027-03", T0, lambda d: d["tlp"].append("BLACK"))])
    other = later("2027-01", T0, lambda d: d.update(title="another document under the same version"))
    with pytest.raises(ConfigurationError, match="two digests"):
        AgreementHistory.of([FIRST, second, other])


def test_the_version_in_force_switches_at_its_effective_from() -> None:
    second, third = later("2027-01", T0), later("2027-02", T0 + dt.timedelta(days=30))
    history = AgreementHistory.of([FIRST, second, third])
    tick = dt.timedelta(microseconds=1)
    assert history.in_force(T0 - tick).agreement is FIRST
    assert history.in_force(T0).agreement is second
    assert history.in_force(T0 + dt.timedelta(days=30)).agreement is third
    assert history.switches_after(T0 - tick) == T0
    assert history.switches_after(T0) == T0 + dt.timedelta(days=30)
    assert history.switches_after(T0 + dt.timedelta(days=30)) is None
    early = AgreementHistory.of([later("2027-01", T0)])  # a node's only version is in force from the start
    assert early.in_force(T0 - dt.timedelta(days=365)).version == "2027-01"


def test_a_message_is_judged_by_the_version_in_force_when_it_was_signed_give_or_take_the_skew() -> None:
    history = AgreementHistory.of([FIRST, later("2027-01", T0)])
    old, new = FIRST.version, "2027-01"
    tick = dt.timedelta(seconds=1)
    # sealed before the switch, delivered after it: still its version
    assert history.was_in_force(old, T0 - tick, SKEW)
    # a sender whose clock is a little behind, or that switches a little late
    assert history.was_in_force(old, T0 + SKEW - tick, SKEW)
    # the old version long after the switch: a partner that never installed the new one, or a
    # sender picking the looser terms
    assert not history.was_in_force(old, T0 + SKEW, SKEW)
    # the new version before it takes effect: only within the skew
    assert history.was_in_force(new, T0 - SKEW, SKEW)
    assert not history.was_in_force(new, T0 - SKEW - tick, SKEW)
    assert not history.was_in_force("1999-unknown", T0, SKEW)


def test_a_message_type_keeps_its_purposes_and_the_types_it_answers() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["message_types"]["RESPONSE"]["replies_to"] = []
        data["message_types"]["REQUEST_FOR_INFORMATION"]["purposes"].remove(NEW)

    previous = later("2027-01", T0)
    problems = successor_problems(previous, later("2027-02", T0 + dt.timedelta(days=1), edit))
    answered = sorted(FIRST.message_types["RESPONSE"].replies_to)
    assert f"message_types.RESPONSE.replies_to: {answered} are missing; they are only added to" in problems
    assert (
        f"message_types.REQUEST_FOR_INFORMATION.purposes: ['{NEW}'] are missing; they are only added to"
        in problems
    )


def test_each_version_knows_when_it_was_superseded() -> None:
    history = AgreementHistory.of([FIRST, later("2027-01", T0), later("2027-02", T0 + dt.timedelta(days=30))])
    assert history.superseded_at(FIRST.version) == T0
    assert history.superseded_at("2027-01") == T0 + dt.timedelta(days=30)
    assert history.superseded_at("2027-02") is None
    assert history.superseded_at("1999-unknown") is None
