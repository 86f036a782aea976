"""The agreement's rules, pure: classification equivalence, the condition language, redaction and
the engine that decides submit, receive, release and onward release."""

from exchange.policy.classification import Marking, classify, national_equivalent
from exchange.policy.engine import (
    Actor,
    Change,
    Consent,
    Decision,
    Policy,
    Redaction,
    Refusal,
    ReplyContext,
    Use,
    decide,
    redacted_payload,
)

__all__ = [
    "Actor",
    "Change",
    "Consent",
    "Decision",
    "Marking",
    "Policy",
    "Redaction",
    "Refusal",
    "ReplyContext",
    "Use",
    "classify",
    "decide",
    "national_equivalent",
    "redacted_payload",
]
