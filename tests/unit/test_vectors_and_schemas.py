"""The published envelope format: vectors open with two independent JOSE libraries, and what the
code produces validates against the published JSON Schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws
from referencing import Registry, Resource

from exchange.catalogue import DATA_CATEGORIES, write_schemas
from exchange.envelope import envelope_digest, open_stored, peek_header
from exchange.envelope.receipt import verify_receipt
from exchange.messages import Catalogue, parse_signed
from exchange.types import KeyId
from tests.unit.helpers import agreement as unit_agreement

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
VECTOR = json.loads((SCHEMAS / "vectors" / "envelope-v1.json").read_text())


def validator(name: str, *, formats: bool = False) -> Any:
    resources = [
        (json.loads(p.read_text())["$id"], Resource.from_contents(json.loads(p.read_text())))
        for p in SCHEMAS.glob("*.schema.json")
    ]
    schema = json.loads((SCHEMAS / name).read_text())
    cls = validator_for(schema)
    cls.check_schema(schema)
    checker = cls.FORMAT_CHECKER if formats else None  # ("format" asserted, as a strict partner would)
    return cls(schema, registry=Registry().with_resources(resources), format_checker=checker)


def test_vector_opens_with_joserfc_through_our_code() -> None:
    from joserfc.jwk import OKPKey

    keys = VECTOR["keys"]
    dk = OKPKey.import_key(keys["recipient_encryption_private"])
    vk = OKPKey.import_key(keys["sender_signing_public"])
    opened = open_stored(
        VECTOR["envelope"],
        decryption_keys={KeyId(str(dk.kid)): dk},
        verification_keys={KeyId(str(vk.kid)): vk},
    )
    assert opened.message == VECTOR["expected_message"]
    assert envelope_digest(VECTOR["envelope"]) == VECTOR["envelope_sha256"]
    rk = OKPKey.import_key(keys["recipient_signing_public"])
    receipt = verify_receipt(
        VECTOR["receipt"],
        verification_keys={KeyId(str(rk.kid)): rk},
        expected_message_id=VECTOR["expected_message"]["id"],
        expected_envelope_sha256=VECTOR["envelope_sha256"],
        expected_receiver="MY",
    )
    assert receipt.sender == "ID"


def test_vector_opens_with_an_independent_library_jwcrypto() -> None:
    keys = VECTOR["keys"]
    token = jc_jwe.JWE()
    token.deserialize(VECTOR["envelope"], key=jc_jwk.JWK(**keys["recipient_encryption_private"]))
    inner = jc_jws.JWS()
    inner.deserialize(token.payload.decode())
    inner.verify(jc_jwk.JWK(**keys["sender_signing_public"]), alg="EdDSA")
    assert json.loads(inner.payload) == VECTOR["expected_message"]
    assert json.loads(token.objects["protected"])["msg_id"] == VECTOR["expected_message"]["id"]


def test_vector_refuses_a_flipped_bit_in_jwcrypto_too() -> None:
    parts = VECTOR["envelope"].split(".")
    parts[3] = ("A" if parts[3][0] != "A" else "B") + parts[3][1:]
    token = jc_jwe.JWE()
    with pytest.raises(jc_jwe.InvalidJWEData):
        token.deserialize(".".join(parts), key=jc_jwk.JWK(**VECTOR["keys"]["recipient_encryption_private"]))


def test_vector_header_and_message_validate_against_the_published_schemas() -> None:
    validator("envelope-header.schema.json").validate(peek_header(VECTOR["envelope"]))
    validator("message.schema.json").validate(VECTOR["expected_message"])
    receipt_body = json.loads(jc_jws.base64url_decode(VECTOR["receipt"].split(".")[1]))
    validator("receipt.schema.json").validate(receipt_body)


def test_every_payload_schema_is_a_valid_2020_12_schema() -> None:
    for path in (SCHEMAS / "messages").glob("*.schema.json"):
        Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_the_published_message_schemas_are_generated_from_the_catalogue(tmp_path: Path) -> None:
    (tmp_path / "messages").mkdir()
    for written in write_schemas(tmp_path):
        published = SCHEMAS / written.relative_to(tmp_path)
        assert published.read_text() == written.read_text(), (
            f"run: python -m exchange.catalogue schemas ({published})"
        )
    assert {p.name for p in (SCHEMAS / "messages").glob("*.json")} == {
        p.name for p in (tmp_path / "messages").glob("*.json")
    }


def test_every_category_in_the_schemas_is_one_of_the_catalogue_and_every_type_has_a_schema() -> None:
    agreement = unit_agreement()
    catalogue = Catalogue.for_agreement(agreement)  # raises if a type names a schema it has not
    parse_signed(VECTOR["expected_message"], agreement=agreement, catalogue=catalogue)
    for spec in agreement.message_types.values():
        assert (SCHEMAS / "messages" / spec.schema_file).is_file()
    for path in (SCHEMAS / "messages").glob("*.schema.json"):
        found = re.findall(r'"x-exchange-category": "([a-z-]+)"', path.read_text())
        assert set(found) <= set(DATA_CATEGORIES), path.name


ANSWER = {"outcome": "ANSWERED", "answers": [{"question": 0, "answer": "yes"}]}
TRANSFER = {"from_account": 0, "to_account": 0, "amount": "10.00", "currency": "IDR", "on": "2026-01-02"}
TRAIL = {
    "summary": "transfers",
    "accounts": [{"holder": "SUBJ-1", "institution": "bank", "country": "ID"}],
    "transfers": [TRANSFER],
}


@pytest.mark.parametrize(
    ("message_type", "payload"),
    [
        ("RESPONSE", ANSWER),
        ("RESPONSE", {**ANSWER, "answers": [{"question": "7", "answer": "yes"}]}),
        ("RESPONSE", {**ANSWER, "answers": [{"question": True, "answer": "yes"}]}),
        ("FINANCIAL_TRAIL", TRAIL),
        ("FINANCIAL_TRAIL", {**TRAIL, "transfers": [{**TRANSFER, "on": 0}]}),
        ("FINANCIAL_TRAIL", {**TRAIL, "transfers": [{**TRANSFER, "on": "2026-01-02T00:00:00"}]}),
        ("FINANCIAL_TRAIL", {**TRAIL, "transfers": [{**TRANSFER, "from_account": "0"}]}),
    ],
)
def test_a_payload_is_accepted_exactly_when_the_published_schema_accepts_it(
    message_type: str, payload: dict[str, Any]
) -> None:
    """What the sender validates is the JSON it signs: a value of the wrong JSON type is an error
    here as it is for a partner validating against the published schema, never converted here
    and then signed as it came."""
    agreement = unit_agreement()
    catalogue = Catalogue.for_agreement(agreement)
    published = validator("messages/" + agreement.message_types[message_type].schema_file, formats=True)
    refused_here = catalogue.payload_errors(message_type, payload)
    refused_there = list(published.iter_errors(payload))
    assert bool(refused_here) == bool(refused_there), (refused_here, refused_there)


def test_an_integral_float_for_an_integer_is_refused_though_json_schema_calls_it_an_integer() -> None:
    """7.0 is an integer to JSON Schema 2020-12 but not to every parser of the partner's: the
    sender asks for 7 (stricter than the published schema, never looser)."""
    catalogue = Catalogue.for_agreement(unit_agreement())
    (error,) = catalogue.payload_errors("RESPONSE", {**ANSWER, "answers": [{"question": 7.0, "answer": "y"}]})
    assert error.field == "payload/answers/0/question"


def test_a_stored_payload_is_read_as_it_was_admitted() -> None:
    """A message admitted before the strict check (an integer sent as "7") stays readable: only
    what is submitted or received from now on is judged strictly."""
    catalogue = Catalogue.for_agreement(unit_agreement())
    lax = {**ANSWER, "answers": [{"question": "7", "answer": "yes"}]}
    assert catalogue.payload_errors("RESPONSE", lax)
    assert catalogue.payload_errors("RESPONSE", lax, strict=False) == []
