"""The partner's half of a message's history, as the audit API shows it: each entry rebuilt from its
canonical leaf, never from what the partner's answer says beside it, and an answer that is not
ledger leaves about that message refused whole."""

from __future__ import annotations

import pytest

from exchange.auditing import partner_history
from exchange.errors import LedgerIntegrityError
from exchange.ledger import EntryDraft, leaf_bytes


def _leaf(seq: int, message_id: str, event: str = "envelope.received") -> str:
    return leaf_bytes(
        seq, "2026-11-25T00:00:00+00:00", EntryDraft(event=event, message_id=message_id)
    ).decode()


def test_the_partner_s_entries_are_what_their_leaves_say() -> None:
    leaf = _leaf(7, "m1")
    claimed = {"leaf": leaf, "event": "message.destroyed", "seq": 1, "leaf_hash": "0" * 64}  # a lie beside it
    (shown,) = partner_history([claimed], "m1")
    assert (shown["seq"], shown["event"], shown["message_id"]) == (7, "envelope.received", "m1")
    assert shown["leaf"] == leaf
    assert shown["leaf_hash"] != "0" * 64


@pytest.mark.parametrize(
    "answer",
    [
        {"entries": []},  # not a list
        [{"event": "message.destroyed"}],  # no leaf
        [{"leaf": "not a leaf"}],
        [{"leaf": 7}],
        ["a string"],
        [{"leaf": _leaf(1, "m2")}],  # about another message
        [{"leaf": _leaf(1, "m1").replace('"seq":1', '"seq":-1')}],  # members of another type
        [{"leaf": _leaf(1, "m1").replace('"rules":[]', '"rules":"R-X"')}],
        [{"leaf": _leaf(1, "m1").replace('"actor":null', '"actor":{}')}],
        [{"leaf": _leaf(1, "m1").replace('"seq":1', '"seq":1.7')}],
        [{"leaf": _leaf(1, "m1").replace(",", ", ", 1)}],  # not canonical: not what the tree hashed
        [{"leaf": "[" * 100_000}],  # nested past the parser's depth
    ],
)
def test_an_answer_that_is_not_leaves_about_the_message_is_refused(answer: object) -> None:
    with pytest.raises(LedgerIntegrityError):
        partner_history(answer, "m1")
