"""The tlog-witness wire format: round trips, the spec's example, and garbage refused cleanly."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.ledger.checkpoint import CheckpointError, split_note
from exchange.ledger.witness_protocol import (
    encode_add_checkpoint,
    encode_size,
    parse_add_checkpoint,
    parse_size,
)

# The example request body of https://c2sp.org/tlog-witness (add-checkpoint).
SPEC_EXAMPLE = (
    "old 20852014\n"
    "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
    "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
    "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
    "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
    "\n"
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "\u2014 example.com/behind-the-sofa "
    "Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    "\u2014 example.com/behind-the-sofa "
    "opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+49/V6267UEjw6QUXTS5Rovnzv++qbSzm9Q=\n"
)


def test_the_spec_example_parses_and_reencodes_byte_for_byte() -> None:
    request = parse_add_checkpoint(SPEC_EXAMPLE.encode())
    assert request.old_size == 20852014
    assert [base64.b64encode(h).decode()[:6] for h in request.proof] == [
        "PlRNCr",
        "jrJZDm",
        "5+pKlU",
        "/6WVhP",
    ]
    text, signatures = split_note(request.note)
    assert text.split("\n")[:2] == ["example.com/behind-the-sofa", "20852163"]
    assert len(signatures) == 2
    assert encode_add_checkpoint(request.old_size, request.proof, request.note) == SPEC_EXAMPLE.encode()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"old 1\n",
        b"old 01\n\nx\n",
        b"old -1\n\nx\n",
        b"old 0\nAAAA\n\nx\n",
        b"old 0\n" + base64.b64encode(b"\0" * 32) + b"\n\nx\n",  # a proof from size 0
        b"new 1\n\nx\n",
        b"old 1\n" + (base64.b64encode(b"\0" * 32) + b"\n") * 64 + b"\nx\n",  # 64 proof lines
        b"\xff\xfe",
    ],
)
def test_malformed_requests_are_refused(body: bytes) -> None:
    with pytest.raises(CheckpointError):
        parse_add_checkpoint(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_property_any_bytes_parse_or_raise_checkpoint_error(body: bytes) -> None:
    with contextlib.suppress(CheckpointError):
        parse_add_checkpoint(body)


def test_sizes_round_trip_and_nothing_else_is_a_size() -> None:
    assert parse_size(encode_size(42)) == 42
    assert encode_size(0) == b"0\n"
    for bad in (b"42", b"042\n", b"-1\n", b"4 2\n", b"\n", b"\xff\n"):
        with pytest.raises(CheckpointError):
            parse_size(bad)
