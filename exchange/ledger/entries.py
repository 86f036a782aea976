"""Ledger entries and their leaf encoding.

A leaf is the RFC 8785 canonical JSON of everything the entry says: format, sequence number (= its
leaf index), time, event, message id, case reference, actor, decision, rule ids and a small ``data``
object of hashes and identifiers. The stored row keeps the leaf itself beside index columns for
searching; a verifier hashes the leaf and checks every index column against it, so nothing outside
the hash can change unseen.

Invariant: an entry holds hashes, identifiers, decisions and rule ids, never message content and
never the identity of a victim, witness or informant; ``data`` values are JSON strings, integers,
booleans, nulls, lists and objects only (no floats), so the encoding is exactly RFC 8785.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exchange.canonical import canonical_json

LEAF_FORMAT = "exchange-ledger-entry/2"


@dataclass(frozen=True)
class EntryDraft:
    """An event to record, before it has a position in the ledger."""

    event: str
    message_id: str | None = None
    case_ref: str | None = None
    actor: str | None = None
    decision: str | None = None
    rules: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerEntry:
    """An entry at its position, as decoded from its leaf."""

    seq: int
    at: str
    event: str
    message_id: str | None
    case_ref: str | None
    actor: str | None
    decision: str | None
    rules: tuple[str, ...]
    data: Mapping[str, Any]
    leaf: bytes


def _check_domain(value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_domain(item, where)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: object keys must be strings")
            _check_domain(item, where)
        return
    raise ValueError(f"{where}: {type(value).__name__} is not allowed in a ledger entry")


def leaf_bytes(seq: int, at: str, draft: EntryDraft) -> bytes:
    """The canonical leaf of ``draft`` at position ``seq`` and time ``at``.

    Raises ``ValueError`` if the draft holds a value outside the ledger's JSON domain.
    """
    _check_domain(dict(draft.data), f"entry {seq} data")
    return canonical_json(
        {
            "format": LEAF_FORMAT,
            "seq": seq,
            "at": at,
            "event": draft.event,
            "message_id": draft.message_id,
            "case_ref": draft.case_ref,
            "actor": draft.actor,
            "decision": draft.decision,
            "rules": list(draft.rules),
            "data": dict(draft.data),
        }
    )


def decode_leaf(leaf: bytes) -> LedgerEntry:
    """The entry a leaf encodes. Raises ``ValueError`` if it is not a ledger leaf: another format,
    a member missing or of another type (``schemas/ledger-leaf.schema.json``)."""
    doc = json.loads(leaf)
    if not isinstance(doc, dict) or doc.get("format") != LEAF_FORMAT:
        raise ValueError("not a ledger leaf")
    texts = ("message_id", "case_ref", "actor", "decision")
    if (
        type(doc.get("seq")) is not int
        or doc["seq"] < 0
        or not isinstance(doc.get("at"), str)
        or not isinstance(doc.get("event"), str)
        or any(not (doc.get(k) is None or isinstance(doc.get(k), str)) for k in texts)
        or not isinstance(doc.get("rules"), list)
        or not all(isinstance(r, str) for r in doc["rules"])
        or not isinstance(doc.get("data"), dict)
    ):
        raise ValueError("not a ledger leaf: a member is missing or of another type")
    return LedgerEntry(
        seq=doc["seq"],
        at=doc["at"],
        event=doc["event"],
        message_id=doc["message_id"],
        case_ref=doc["case_ref"],
        actor=doc["actor"],
        decision=doc["decision"],
        rules=tuple(doc["rules"]),
        data=doc["data"],
        leaf=leaf,
    )


def decode_canonical_leaf(leaf: bytes) -> LedgerEntry:
    """:func:`decode_leaf` of a leaf from elsewhere (a partner's answer), which must also be, byte
    for byte, the leaf :func:`leaf_bytes` makes of what it says (RFC 8785): what a tree holds.

    Raises ``ValueError`` if it is not."""
    entry = decode_leaf(leaf)
    draft = EntryDraft(
        event=entry.event,
        message_id=entry.message_id,
        case_ref=entry.case_ref,
        actor=entry.actor,
        decision=entry.decision,
        rules=entry.rules,
        data=dict(entry.data),
    )
    if leaf_bytes(entry.seq, entry.at, draft) != leaf:
        raise ValueError("not a canonical ledger leaf")
    return entry
