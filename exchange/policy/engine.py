"""The rule engine: (action, actor, typed message, agreement, consents, now) -> Decision. Pure.

The agreement's rules are compiled once per agreement (:class:`Policy`). :func:`decide` evaluates
every rule whose ``on`` names the action, in two passes: obligations first (floors raise the level
and tighten the TLP, never lower anything; redactions list the paths to replace), then checks over
the raised marking. A Decision names every rule evaluated (``id@version``), every refusal with its
reason and remedy, and every change with the rule that made it.

Guarantees: the decided level is never below the message's own, the decided TLP never less
restrictive, no handling code is removed; a check whose facts are missing refuses (fail closed);
an agreement without a check rule for an action is refused when loaded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exchange.agreement import Action, Agreement, Rule
from exchange.errors import PolicyRefusal, RuleViolation
from exchange.policy.conditions import Condition, Facts, Undefined, compile_condition, missing_facts
from exchange.policy.redaction import pointer, replace_values
from exchange.types import PartyId

if TYPE_CHECKING:  # the engine reads messages; exchange.messages builds them with the policy's help
    from exchange.messages import Message

REDACTED = "REDACTED"  # what replaces a value whose subject is unknown


@dataclass(frozen=True)
class Actor:
    """A registered local system, as its verified certificate identifies it.

    ``message_types``, ``purposes`` and ``cases`` are what it is entitled to (already expanded from
    ``ALL``); ``cases`` None means every case. An empty set entitles to nothing.
    """

    client_id: str
    agency: str
    unit: str
    roles: frozenset[str]
    clearance: str  # a common level
    message_types: frozenset[str]
    purposes: frozenset[str]
    cases: frozenset[str] | None
    party: PartyId
    police: bool


@dataclass(frozen=True)
class Use:
    """What a release is for: the purposes declared, and the third party of an onward release."""

    purposes: frozenset[str]
    recipient: str | None = None


@dataclass(frozen=True)
class Consent:
    """The originator's consent to one use of one message (issued by the consent protocol)."""

    message_id: str
    recipient: str | None  # a third party, or None for a use by the receiving police itself
    purposes: frozenset[str]
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None

    def covers(self, message_id: str, use: Use, now: dt.datetime) -> bool:
        live = now < self.expires_at and (self.revoked_at is None or now < self.revoked_at)
        return (
            live
            and self.message_id == message_id
            and self.recipient == use.recipient
            and (bool(use.purposes) and use.purposes <= self.purposes)
        )


@dataclass(frozen=True)
class ReplyContext:
    """What the node knows of the message a submission answers and the thread it joins."""

    exists: bool = False
    received: bool = False
    visible: bool = False
    same_case: bool = False
    same_thread: bool = False
    type: str | None = None
    thread_visible: bool = False


@dataclass(frozen=True)
class Refusal:
    rule: str  # id@version
    rule_id: str
    reason: str
    remedy: str


@dataclass(frozen=True)
class Change:
    """One change an obligation made: ``kind`` is level, tlp or handling."""

    rule: str
    rule_id: str
    kind: str
    before: str
    after: str
    reason: str


@dataclass(frozen=True)
class Redaction:
    """A value to replace: where (``payload/...``), by what, under which rule."""

    path: tuple[str | int, ...]
    replacement: str
    rule: str
    handler: bool = False  # replaced by the handler reference (an informant's identity)

    @property
    def pointer(self) -> str:
        return pointer(self.path)


@dataclass(frozen=True)
class Decision:
    """The engine's answer: allow, refuse, or allow with changes."""

    action: Action
    evaluated: tuple[str, ...]
    refusals: tuple[Refusal, ...]
    changes: tuple[Change, ...]
    redactions: tuple[Redaction, ...]
    level: str | None
    tlp: str | None
    handling_codes: tuple[str, ...]
    agreement_version: str
    agreement_digest: str
    applied: tuple[str, ...] = field(default=())  # obligations that applied

    @property
    def allowed(self) -> bool:
        return not self.refusals

    @property
    def decision(self) -> str:
        return "deny" if self.refusals else ("allow+changes" if self.changes or self.redactions else "allow")

    def refusal(self) -> PolicyRefusal:
        """The refusal to raise (naming every rule that refused). Raises ValueError if allowed."""
        if not self.refusals:
            raise ValueError("the decision allows")
        return PolicyRefusal(
            [RuleViolation(r.rule_id, r.reason, rule_version=r.rule, remedy=r.remedy) for r in self.refusals]
        )

    def ledger_data(self) -> dict[str, Any]:
        """What the ledger keeps of the decision: rule refs, changes, paths; never a value."""
        data: dict[str, Any] = {
            "agreement": {"version": self.agreement_version, "digest": self.agreement_digest},
            "decision": self.decision,
        }
        if self.refusals:
            data["refused"] = [r.rule for r in self.refusals]
        if self.changes:
            data["changes"] = [{"rule": c.rule, c.kind: [c.before, c.after]} for c in self.changes]
        if self.redactions:
            data["redacted"] = [r.pointer for r in self.redactions]
        return data


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    ref: str
    when: Condition | None
    require: Condition | None


class Policy:
    """An agreement's rules, compiled once and grouped by action."""

    def __init__(self, agreement: Agreement) -> None:
        self.agreement = agreement
        self.version, self.digest = agreement.version, agreement.digest
        self.by_action: dict[str, list[_Compiled]] = {}
        for rule in agreement.rules:
            compiled = _Compiled(
                rule,
                rule.ref,
                compile_condition(rule.when) if rule.when is not None else None,
                compile_condition(rule.require) if rule.require is not None else None,
            )
            for action in rule.on:
                self.by_action.setdefault(action, []).append(compiled)
        self.refs = {action: tuple(c.ref for c in rules) for action, rules in self.by_action.items()}

    _cache: dict[int, Policy] = {}  # noqa: RUF012 - compiled once per agreement object held

    @classmethod
    def of(cls, agreement: Agreement) -> Policy:
        policy = cls._cache.get(id(agreement))
        if policy is None or policy.agreement is not agreement:
            if len(cls._cache) > 64:
                cls._cache.clear()
            policy = cls._cache[id(agreement)] = cls(agreement)
        return policy


def _holds(condition: Condition | None, facts: Facts, *, unknown: bool) -> bool:
    """A condition's value; ``unknown`` when it compares a fact that is not known (fail closed:
    True for a rule's applicability, False for what a check requires)."""
    if condition is None:
        return True
    try:
        return condition(facts)
    except Undefined:
        return unknown


def _facts(
    agreement: Agreement,
    actor: Actor | None,
    message: Message,
    use: Use | None,
    consent: bool,
    reply: ReplyContext,
) -> dict[str, Any]:
    spec = agreement.message_types.get(message.type)
    marking = message.marking
    facts: dict[str, Any] = {
        "$rank": agreement.level_rank,
        "message.type": message.type,
        "message.level": marking.common if marking else None,
        "message.declared_level": marking.common if marking else None,
        "message.tlp": message.tlp,
        "message.handling_codes": frozenset(message.handling_codes),
        "message.purposes": frozenset(message.purposes),
        "message.type_purposes": frozenset(spec.purposes) if spec else frozenset(),
        "message.replies_to_types": frozenset(spec.replies_to) if spec else frozenset(),
        "message.subject_roles": message.subject_roles,
        "message.categories": message.categories,
        "message.case_ref": message.case_ref,
        "message.addressed_to": frozenset(message.addressed_to),
        "message.recipients": frozenset(message.recipients),
        "message.legal_basis": frozenset(message.legal_basis),
        "message.classification": marking.level if marking else None,
        "message.grading": message.grading,
        "message.in_reply_to": message.in_reply_to,
        "message.mla_reference": message.mla_reference,
        "message.thread_ref": message.thread_ref if message.thread_ref != message.id else None,
        "message.intelligence": bool(spec and spec.intelligence),
        "recipient.units": agreement.units_of(message.recipient),
        "use.purposes": use.purposes if use else frozenset(),
        "use.recipient": use.recipient if use else None,
        "consent.covers_use": consent,
        "reply.exists": reply.exists,
        "reply.received": reply.received,
        "reply.visible": reply.visible,
        "reply.same_case": reply.same_case,
        "reply.same_thread": reply.same_thread,
        "reply.type": reply.type,
        "thread.visible": reply.thread_visible,
    }
    empty: frozenset[str] = frozenset()
    facts.update(
        {
            "actor.client_id": actor.client_id if actor else None,
            "actor.unit": actor.unit if actor else None,
            "actor.roles": actor.roles if actor else empty,
            "actor.clearance": actor.clearance if actor else None,
            "actor.message_types": actor.message_types if actor else empty,
            "actor.purposes": actor.purposes if actor else empty,
            "actor.cases": (actor.cases or empty) if actor else empty,
            "actor.all_cases": bool(actor and actor.cases is None),
            "actor.police": bool(actor and actor.police),
        }
    )
    return facts


def decide(
    action: Action,
    *,
    agreement: Agreement,
    message: Message,
    actor: Actor | None = None,
    use: Use | None = None,
    consents: Sequence[Consent] = (),
    reply: ReplyContext | None = None,
    now: dt.datetime,
    assume_consent: bool = False,
) -> Decision:
    """Evaluate every rule of ``agreement`` for ``action`` on ``message`` (see the module docstring).

    ``actor`` is the local system (None for ``receive``: the partner node); ``use`` what a release
    is for; ``consents`` the originator's consents held for the message. ``assume_consent``: as if
    the originator had consented to the use (what a consent would open; never to release).
    """
    consent = assume_consent or (use is not None and any(c.covers(message.id, use, now) for c in consents))
    facts = _facts(agreement, actor, message, use, consent, reply or ReplyContext())
    policy = Policy.of(agreement)
    compiled = policy.by_action.get(action, [])
    changes: list[Change] = []
    redactions: dict[tuple[str | int, ...], Redaction] = {}
    applied: list[str] = []
    level, tlp = facts["message.level"], facts["message.tlp"]
    handling = set(message.handling_codes)
    subjects: dict[str, Any] | None = None
    for item in compiled:
        then = item.rule.then
        if then is None or not _holds(item.when, facts, unknown=True):
            continue
        ref = item.ref
        applied.append(ref)
        if then.raise_level is not None and (
            level is None or agreement.level_rank(then.raise_level) > agreement.level_rank(level)
        ):
            changes.append(Change(ref, item.rule.id, "level", str(level), then.raise_level, item.rule.reason))
            level = then.raise_level
        if then.raise_tlp is not None and (
            tlp is None or agreement.tlp_rank(then.raise_tlp) > agreement.tlp_rank(tlp)
        ):
            changes.append(Change(ref, item.rule.id, "tlp", str(tlp), then.raise_tlp, item.rule.reason))
            tlp = then.raise_tlp
        for code in then.add_handling:
            if code not in handling:
                handling.add(code)
                changes.append(Change(ref, item.rule.id, "handling", "", code, item.rule.reason))
        for spec, handler in ((then.redact, False), (then.replace_with_handler, True)):
            if spec is None or not message.protected:
                continue
            if subjects is None:
                subjects = {s.pseudonym: s for s in message.data_subjects}
            for value in message.protected:
                if (
                    value.category not in spec.categories
                    or value.role not in spec.subject_roles
                    or value.path in redactions
                ):
                    continue
                subject = subjects.get(value.subject) if value.subject else None
                replacement = (
                    (subject.handler_ref if handler else subject.pseudonym) if subject else None
                ) or REDACTED
                redactions[value.path] = Redaction(value.path, replacement, ref, handler)
    facts["message.level"], facts["message.tlp"] = level, tlp
    facts["message.handling_codes"] = frozenset(handling)
    refusals: list[Refusal] = []
    for item in compiled:
        if item.require is None or not _holds(item.when, facts, unknown=True):
            continue
        if not _holds(item.require, facts, unknown=False):
            rule = item.rule
            missing = missing_facts(rule.require or {}, facts)
            reason = rule.reason + (f" (missing: {', '.join(missing)})" if missing else "")
            refusals.append(Refusal(item.ref, rule.id, reason, rule.remedy))
    return Decision(
        action=action,
        evaluated=policy.refs.get(action, ()),
        refusals=tuple(refusals),
        changes=tuple(changes),
        redactions=tuple(redactions[v.path] for v in message.protected if v.path in redactions),
        level=level,
        tlp=tlp,
        handling_codes=tuple(sorted(handling)),
        agreement_version=policy.version,
        agreement_digest=policy.digest,
        applied=tuple(applied),
    )


def redacted_payload(message: Message, decision: Decision) -> dict[str, Any]:
    """The payload with every redaction of ``decision`` applied (a copy; the message is unchanged)."""
    if not decision.redactions:
        return dict(message.payload)
    return replace_values(message.payload, [(r.path, r.replacement) for r in decision.redactions])
