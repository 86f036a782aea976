"""The agreement's condition language: a fixed set of operators over named facts. Pure.

A condition is a one-key table (TOML inline table) naming an operator:

    present        [fact, ...]          each fact is set and non-empty
    is_true        fact                 a boolean fact is true
    eq             [fact, value]        a scalar fact equals a literal
    in             [fact, [values]]     a scalar fact is one of the literals
    contains       [set-fact, x]        the set holds x (a scalar fact or a literal)
    intersects     [set-fact, xs]       the set shares a member with xs (a set fact or literals)
    none_of        [set-fact, xs]       the set shares no member with xs
    subset         [set-fact, xs]       every member of the set is in xs
    level_at_least [level-fact, y]      the common level is at least y (a level fact or a level)
    all / any      [condition, ...]     conjunction / disjunction
    not            condition            negation

The first operand is always a fact; a later string operand is a fact when it names one, a literal
otherwise. :func:`compile_condition` checks every fact name and kind, so an agreement with an unknown
fact or operator is refused when it is loaded, never when a message is judged (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Facts = Mapping[str, Any]
Condition = Callable[[Facts], bool]

#: every fact a rule may name, and its kind
FACT_KINDS: dict[str, str] = {
    "message.type": "scalar",
    "message.level": "level",
    "message.declared_level": "level",
    "message.tlp": "scalar",
    "message.handling_codes": "set",
    "message.purposes": "set",
    "message.type_purposes": "set",
    "message.replies_to_types": "set",
    "message.subject_roles": "set",
    "message.categories": "set",
    "message.case_ref": "scalar",
    "message.addressed_to": "set",
    "message.recipients": "set",
    "message.legal_basis": "set",
    "message.classification": "scalar",
    "message.grading": "scalar",
    "message.in_reply_to": "scalar",
    "message.mla_reference": "scalar",
    "message.thread_ref": "scalar",
    "message.intelligence": "bool",
    "recipient.units": "set",
    "actor.client_id": "scalar",
    "actor.unit": "scalar",
    "actor.roles": "set",
    "actor.clearance": "level",
    "actor.message_types": "set",
    "actor.purposes": "set",
    "actor.cases": "set",
    "actor.all_cases": "bool",
    "actor.police": "bool",
    "use.purposes": "set",
    "use.recipient": "scalar",
    "consent.covers_use": "bool",
    "reply.exists": "bool",
    "reply.received": "bool",
    "reply.visible": "bool",
    "reply.same_case": "bool",
    "reply.same_thread": "bool",
    "reply.type": "scalar",
    "thread.visible": "bool",
}


class ConditionError(ValueError):
    """A condition that is not one of the language's forms (unknown operator, fact or kind)."""


class Undefined(Exception):
    """A comparison over a fact that is not known (a missing level). It propagates through ``not``,
    ``all`` and ``any`` so that the engine decides it fail-closed: a check refuses, an obligation
    applies, whatever negations the condition holds."""


#: the vocabulary of the agreement a literal compared with a fact must belong to
FACT_VOCABULARY: dict[str, str] = {
    "message.type": "types",
    "message.replies_to_types": "types",
    "actor.message_types": "types",
    "reply.type": "types",
    "message.tlp": "tlp",
    "message.handling_codes": "handling_codes",
    "message.purposes": "purposes",
    "message.type_purposes": "purposes",
    "actor.purposes": "purposes",
    "use.purposes": "purposes",
    "message.subject_roles": "subject_roles",
    "message.categories": "categories",
    "actor.roles": "roles",
    "actor.unit": "units",
    "message.addressed_to": "units",
    "recipient.units": "units",
    "message.level": "levels",
    "message.declared_level": "levels",
    "actor.clearance": "levels",
    "use.recipient": "third_parties",
}


def literals(spec: Any) -> list[tuple[str, Any]]:
    """Every (fact, literal) pair a condition compares, for checking literals against the agreement."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        return []
    ((op, args),) = spec.items()
    if op in ("all", "any"):
        return [pair for part in args for pair in literals(part)] if isinstance(args, list) else []
    if op == "not":
        return literals(args)
    if op in ("present", "is_true") or not isinstance(args, list) or len(args) != 2:
        return []
    first, second = args
    if isinstance(second, str) and second in FACT_KINDS:
        return []
    values = second if isinstance(second, list) else [second]
    return [(str(first), value) for value in values]


def _fact(name: Any, kinds: Sequence[str], where: str) -> str:
    if not isinstance(name, str) or name not in FACT_KINDS:
        raise ConditionError(f"{where}: {name!r} is not a known fact")
    if FACT_KINDS[name] not in kinds:
        raise ConditionError(f"{where}: {name} is a {FACT_KINDS[name]} fact, not {' or '.join(kinds)}")
    return name


def _operand(value: Any) -> Callable[[Facts], Any]:
    if isinstance(value, str) and value in FACT_KINDS:
        return lambda facts: facts[value]
    if isinstance(value, list | tuple):
        frozen = frozenset(value)
        return lambda _facts: frozen
    return lambda _facts: value


def _is_present(value: Any) -> bool:
    return (
        value is not None and value != "" and not (isinstance(value, frozenset | tuple | list) and not value)
    )


def missing_facts(condition: Mapping[str, Any], facts: Facts) -> list[str]:
    """The facts a ``present`` condition names that are absent (for a refusal's reason)."""
    names = condition.get("present")
    return [n for n in names if not _is_present(facts[n])] if isinstance(names, list) else []


def compile_condition(spec: Any, where: str = "condition") -> Condition:
    """Compile a condition table into a predicate over facts.

    Raises:
        ConditionError: naming where the condition is not well formed.
    """
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConditionError(f"{where}: a condition is a table with exactly one operator")
    ((op, args),) = spec.items()
    here = f"{where}.{op}"
    if op in ("all", "any"):
        if not isinstance(args, list) or not args:
            raise ConditionError(f"{here}: takes a non-empty list of conditions")
        parts = [compile_condition(a, f"{here}[{i}]") for i, a in enumerate(args)]
        if op == "all":
            return lambda facts: all(p(facts) for p in parts)
        return lambda facts: any(p(facts) for p in parts)
    if op == "not":
        inner = compile_condition(args, here)
        return lambda facts: not inner(facts)
    if op == "present":
        if not isinstance(args, list) or not args:
            raise ConditionError(f"{here}: takes a non-empty list of facts")
        names = [_fact(a, ("scalar", "set", "level", "bool"), here) for a in args]
        return lambda facts: all(_is_present(facts[n]) for n in names)
    if op == "is_true":
        name = _fact(args, ("bool",), here)
        return lambda facts: facts[name] is True
    if not isinstance(args, list) or len(args) != 2:
        raise ConditionError(f"{here}: takes [fact, operand]")
    first, second = args
    other = _operand(second)
    if isinstance(second, str) and "." in second and second.split(".")[0] in _NAMESPACES:
        _fact(second, ("scalar", "set", "level", "bool"), here)  # looks like a fact: must be one
    if op == "eq":
        name = _fact(first, ("scalar",), here)
        return lambda facts: bool(facts[name] == other(facts))
    if op == "in":
        name = _fact(first, ("scalar",), here)
        if not isinstance(second, list):
            raise ConditionError(f"{here}: the second operand is a list of values")
        return lambda facts: facts[name] in other(facts)
    if op == "contains":
        name = _fact(first, ("set",), here)
        return lambda facts: other(facts) in facts[name]
    if op in ("intersects", "none_of", "subset"):
        name = _fact(first, ("set",), here)
        if op == "intersects":
            return lambda facts: not facts[name].isdisjoint(other(facts))
        if op == "none_of":
            return lambda facts: facts[name].isdisjoint(other(facts))
        return lambda facts: facts[name] <= other(facts)
    if op == "level_at_least":
        name = _fact(first, ("level",), here)
        rank = _operand(second)

        def at_least(facts: Facts) -> bool:
            have, need = facts[name], rank(facts)
            if have is None or need is None:
                raise Undefined(f"{name} is not known")  # decided fail-closed by the engine
            return bool(facts["$rank"](have) >= facts["$rank"](need))

        return at_least
    raise ConditionError(f"{where}: unknown operator {op!r}")


_NAMESPACES = {k.split(".")[0] for k in FACT_KINDS}
