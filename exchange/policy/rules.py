"""Outbound, inbound and release rules. Pure: no I/O, no clock.

Each rule has a stable id (``R-…``); a decision lists every rule evaluated with its outcome, and a
refusal names every rule that refused, so the caller can fix the request in one go and the ledger
can record which rules (under which agreement version) decided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exchange.agreement import Agreement
from exchange.errors import PolicyRefusal, RuleViolation
from exchange.policy.classification import Marking, classify, national_equivalent
from exchange.types import PartyId


@dataclass(frozen=True)
class Actor:
    """A registered local system, as its verified certificate identifies it."""

    client_id: str
    agency: str
    unit: str
    roles: tuple[str, ...]
    clearance: str  # common level
    message_types: tuple[str, ...]  # empty: every type of the agreement
    purposes: tuple[str, ...]  # empty: every purpose of the agreement

    def may_use_type(self, message_type: str) -> bool:
        return not self.message_types or message_type in self.message_types


@dataclass(frozen=True)
class RuleResult:
    """One rule's outcome, as the ledger records it."""

    rule_id: str
    allowed: bool
    reason: str = ""


@dataclass(frozen=True)
class SubmissionDecision:
    """An allowed submission: its marking and the rules that allowed it."""

    marking: Marking
    rules: tuple[RuleResult, ...]


@dataclass(frozen=True)
class ReleaseDecision:
    """Whether a local system may receive a message, and why."""

    allowed: bool
    rules: tuple[RuleResult, ...]
    redacted: tuple[str, ...] = field(default=())


def _decide(checks: Sequence[tuple[str, RuleViolation | None]]) -> tuple[RuleResult, ...]:
    return tuple(
        RuleResult(rule_id, violation is None, violation.reason if violation else "")
        for rule_id, violation in checks
    )


def _refuse_if_any(results: tuple[RuleResult, ...]) -> None:
    refused = [RuleViolation(r.rule_id, r.reason) for r in results if not r.allowed]
    if refused:
        raise PolicyRefusal(refused)


def evaluate_submission(
    agreement: Agreement,
    *,
    party: PartyId,
    actor: Actor,
    message_type: str,
    purposes: Sequence[str],
    scheme: str,
    level: str,
    tlp: str,
    handling_codes: Sequence[str],
    replied_to: Mapping[str, Any] | None,
    in_reply_to: str | None,
) -> SubmissionDecision:
    """Evaluate the outbound rules for a local system's submission.

    ``replied_to`` is the stored metadata (``type``, ``direction``) of the message named by
    ``in_reply_to``, or None if there is no such message.

    Raises:
        PolicyRefusal: naming every rule that refused.
    """
    checks: list[tuple[str, RuleViolation | None]] = []

    def check(rule_id: str, ok: bool, reason: str) -> None:
        checks.append((rule_id, None if ok else RuleViolation(rule_id, reason)))

    spec = agreement.message_types.get(message_type)
    check("R-TYPE-KNOWN", spec is not None, f"{message_type!r} is not a message type of the agreement")
    check(
        "R-CLIENT-TYPE",
        actor.may_use_type(message_type),
        f"client {actor.client_id} is not entitled to send {message_type}",
    )
    if spec is not None:
        outside = [p for p in purposes if p not in spec.purposes]
        check("R-PURPOSE-TYPE", not outside, f"purposes {outside} are not allowed for {message_type}")
    not_client = [p for p in purposes if actor.purposes and p not in actor.purposes]
    check(
        "R-CLIENT-PURPOSE", not not_client, f"client {actor.client_id} may not act for purposes {not_client}"
    )
    own_scheme = agreement.parties[party].scheme
    check(
        "R-CLASS-OWN-SCHEME",
        scheme == own_scheme,
        f"classify in this node's national scheme {own_scheme}, not {scheme!r}",
    )
    marking = classify(agreement, scheme, level)
    if isinstance(marking, RuleViolation):
        checks.append((marking.rule_id, marking))
    else:
        check(
            "R-CLEARANCE-SEND",
            agreement.level_rank(actor.clearance) >= agreement.level_rank(marking.common),
            f"client clearance {actor.clearance} is below the message level {marking.common}",
        )
    check("R-TLP-KNOWN", tlp in agreement.tlp, f"TLP {tlp!r} is not one of {list(agreement.tlp)}")
    unknown_codes = [c for c in handling_codes if c not in agreement.handling_codes]
    check("R-HANDLING-KNOWN", not unknown_codes, f"unknown handling codes {unknown_codes}")
    if spec is not None and spec.replies_to:
        target_ok = (
            replied_to is not None
            and replied_to.get("direction") == "in"
            and replied_to.get("type") in spec.replies_to
        )
        check(
            "R-REPLY-TARGET",
            target_ok,
            f"{message_type} must answer a received {' or '.join(spec.replies_to)}; "
            f"in_reply_to {in_reply_to!r} is not one",
        )
    results = _decide(checks)
    _refuse_if_any(results)
    assert not isinstance(marking, RuleViolation)
    return SubmissionDecision(marking=marking, rules=results)


def evaluate_inbound(agreement: Agreement, *, party: PartyId, message: Mapping[str, Any]) -> tuple[str, str]:
    """Check a verified inbound message against the agreement.

    Returns the common level and this node's national equivalent.

    Raises:
        PolicyRefusal: unknown type, purpose, or a classification not in the sender's scheme.
    """
    checks: list[tuple[str, RuleViolation | None]] = []
    spec = agreement.message_types.get(str(message.get("type")))
    checks.append(("R-TYPE-KNOWN", None if spec else RuleViolation("R-TYPE-KNOWN", "unknown message type")))
    if spec is not None:
        outside = [p for p in message.get("purposes", []) if p not in spec.purposes]
        bad = RuleViolation("R-PURPOSE-TYPE", f"purposes {outside} not allowed") if outside else None
        checks.append(("R-PURPOSE-TYPE", bad))
    cls = message.get("classification") or {}
    sender_scheme = agreement.parties[agreement.partner_of(party)].scheme
    marking = classify(agreement, str(cls.get("scheme")), str(cls.get("level")))
    if isinstance(marking, RuleViolation):
        checks.append((marking.rule_id, marking))
    elif marking.scheme != sender_scheme or marking.common != cls.get("common"):
        checks.append(("R-CLASS-OWN-SCHEME", RuleViolation("R-CLASS-OWN-SCHEME", "marking inconsistent")))
    _refuse_if_any(_decide(checks))
    assert isinstance(marking, Marking)
    own_scheme = agreement.parties[party].scheme
    return marking.common, national_equivalent(agreement, marking.common, own_scheme)


def evaluate_release(
    agreement: Agreement, *, actor: Actor, message_type: str, common_level: str
) -> ReleaseDecision:
    """May this local system receive a message of this type and level? Never raises."""
    results = _decide(
        [
            (
                "R-CLEARANCE-RELEASE",
                None
                if agreement.level_rank(actor.clearance) >= agreement.level_rank(common_level)
                else RuleViolation("R-CLEARANCE-RELEASE", "clearance below the message level"),
            ),
            (
                "R-CLIENT-TYPE",
                None
                if actor.may_use_type(message_type)
                else RuleViolation("R-CLIENT-TYPE", "not entitled to this message type"),
            ),
        ]
    )
    return ReleaseDecision(allowed=all(r.allowed for r in results), rules=results)
