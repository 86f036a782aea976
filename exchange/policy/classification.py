"""National classification schemes and their equivalence through common levels.

Invariants: a level with no counterpart maps **up**, never down (Malaysian SULIT is protected in
Indonesia as RAHASIA); the originator's marking is never rewritten, the receiver only adds its
national equivalent beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.agreement import Agreement
from exchange.errors import RuleViolation


@dataclass(frozen=True)
class Marking:
    """A classification as the originator set it, with its derived common level."""

    scheme: str
    level: str
    common: str


def classify(agreement: Agreement, scheme: str, level: str) -> Marking | RuleViolation:
    """The marking for ``level`` of ``scheme``, or the violation saying why it is not one."""
    known = agreement.schemes.get(scheme)
    if known is None:
        return RuleViolation("R-CLASS-SCHEME", f"unknown classification scheme {scheme!r}")
    common = known.levels.get(level)
    if common is None:
        return RuleViolation(
            "R-CLASS-LEVEL", f"{level!r} is not a level of {scheme}; use one of {sorted(known.levels)}"
        )
    return Marking(scheme=scheme, level=level, common=common)


def national_equivalent(agreement: Agreement, common: str, scheme: str) -> str:
    """The lowest level of ``scheme`` that protects at least ``common``.

    Raises ``ValueError`` if the scheme has no level high enough (an invalid agreement).
    """
    rank = agreement.level_rank(common)
    candidates = [
        (agreement.level_rank(c), name)
        for name, c in agreement.schemes[scheme].levels.items()
        if agreement.level_rank(c) >= rank
    ]
    if not candidates:
        raise ValueError(f"scheme {scheme} has no level protecting {common}")
    return min(candidates)[1]
