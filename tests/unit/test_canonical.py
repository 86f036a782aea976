"""canonical_json is the rfc8785 library's output byte for byte, and fails where it fails."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.canonical import canonical_json
from exchange.ledger.events import LedgerEvent

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    st.text(alphabet=st.characters(codec="ascii")),
)
keys = st.one_of(
    st.text(), st.text(alphabet=st.characters(codec="ascii")), st.sampled_from(["\ue000", "\U0001f600"])
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


def library(value: Any) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError):
        return ValueError


def ours(value: Any) -> bytes | type[Exception]:
    try:
        return canonical_json(value)
    except ValueError:
        return ValueError


@settings(max_examples=400)
@given(values)
def test_same_bytes_or_same_failure_as_the_library(value: Any) -> None:
    assert ours(value) == library(value)


@pytest.mark.parametrize(
    "value",
    [
        {"\U0001f600": 1, "\ue000": 2},  # UTF-16 order differs from code-point order
        {"b": 1.0, "a": [1e21, -0.0, 5e-324]},
        2**53 - 1,
        2**53,
        -(2**53),
        "\ud800",  # a lone surrogate
        {1: "a"},
        {"a": {1, 2}},
        ("x", ['\x00\x1f"\\\u2028\x7f'], {"k": None, "j": True}),
        float("nan"),
        {"event": LedgerEvent.SUBMITTED, "list": [LedgerEvent.RECEIVED]},
        {LedgerEvent.SUBMITTED: 1},
    ],
)
def test_edge_cases(value: Any) -> None:
    assert ours(value) == library(value)
