"""The agreement's rules as pure functions: (message, actor, agreement) -> decision."""

from exchange.policy.classification import Marking, classify, national_equivalent
from exchange.policy.rules import (
    Actor,
    ReleaseDecision,
    RuleResult,
    SubmissionDecision,
    evaluate_inbound,
    evaluate_release,
    evaluate_submission,
)

__all__ = [
    "Actor",
    "Marking",
    "ReleaseDecision",
    "RuleResult",
    "SubmissionDecision",
    "classify",
    "evaluate_inbound",
    "evaluate_release",
    "evaluate_submission",
    "national_equivalent",
]
