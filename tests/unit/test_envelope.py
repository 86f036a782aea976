"""The envelope: round trip, and every attack it must stop, without a server."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwe, jws
from joserfc.jwk import OKPKey
from joserfc.registry import HeaderParameter

from exchange import crypto
from exchange.canonical import canonical_json
from exchange.envelope import jose as envelope_jose
from exchange.envelope import open_envelope, open_stored, seal, sign_receipt, verify_receipt
from exchange.errors import EnvelopeError, ReplayRejected
from exchange.types import KeyId

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
AGREEMENTS = {"2026.1": "a" * 64}


def key(party: str, use: crypto.MessageKeyUse) -> OKPKey:
    pem = crypto.new_message_key(use)
    return crypto.private_jwk(pem, crypto.message_key_id(party, use, pem))


ID_SIG, ID_ENC, MY_SIG, MY_ENC = key("ID", "sig"), key("ID", "enc"), key("MY", "sig"), key("MY", "enc")


def public(k: OKPKey) -> OKPKey:
    return crypto.public_only(k)


def message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": "exchange-message/1",
        "id": "5b0c8a1e-0000-4000-8000-000000000001",
        "type": "REQUEST_FOR_INFORMATION",
        "sender": "ID",
        "recipient": "MY",
        "created_at": NOW.isoformat(),
        "agreement": {"version": "2026.1", "digest": "a" * 64},
        "classification": {"scheme": "POLRI", "level": "RAHASIA", "common": "S"},
        "tlp": "AMBER",
        "handling_codes": ["H0", "H2"],
        "case_ref": "ID-MY/2026/0001",
        "payload": {"summary": "route via Batam", "questions": ["known?"]},
    }
    body.update(overrides)
    return body


def open_as_my(compact: str, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "decryption_keys": {KeyId(str(MY_ENC.kid)): MY_ENC},
        "verification_keys": {KeyId(str(ID_SIG.kid)): public(ID_SIG)},
        "expected_sender": "ID",
        "expected_recipient": "MY",
        "accepted_agreements": AGREEMENTS,
        "now": NOW,
        "clock_skew": dt.timedelta(minutes=5),
        "replay_window": dt.timedelta(days=30),
    }
    kwargs.update(overrides)
    return open_envelope(compact, **kwargs)


def sealed(**overrides: Any) -> str:
    return seal(message(**overrides), signing_key=ID_SIG, recipient_key=public(MY_ENC))


def reason(compact: str, **overrides: Any) -> str:
    with pytest.raises(EnvelopeError) as info:
        open_as_my(compact, **overrides)
    return info.value.reason


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_round_trip_returns_the_message_and_the_header_carries_the_security_fields() -> None:
    compact = sealed()
    opened = open_as_my(compact)
    assert opened.message == message()
    assert opened.signer_kid == ID_SIG.kid
    header = envelope_jose.peek_header(compact)
    assert header["alg"] == "ECDH-ES+A256KW"
    assert header["enc"] == "A256GCM"
    assert header["kid"] == MY_ENC.kid
    assert header["classification"] == message()["classification"]
    assert header["msg_id"] == message()["id"]
    assert header["handling_codes"] == ["H0", "H2"]
    assert "payload" not in header  # content only inside the ciphertext


def test_tampered_ciphertext_is_refused() -> None:
    parts = sealed().split(".")
    ct = bytearray(base64.urlsafe_b64decode(parts[3] + "=="))
    ct[10] ^= 0x01
    parts[3] = base64.urlsafe_b64encode(bytes(ct)).rstrip(b"=").decode()
    assert reason(".".join(parts)) == "decrypt-failed"


def test_header_swapped_between_two_envelopes_is_refused() -> None:
    a, b = (
        sealed(),
        sealed(
            id="5b0c8a1e-0000-4000-8000-000000000002",
            classification={"scheme": "POLRI", "level": "BIASA", "common": "U"},
        ),
    )
    swapped = ".".join([b.split(".")[0], *a.split(".")[1:]])
    assert reason(swapped) == "decrypt-failed"  # the header is the AES-GCM AAD


def test_rewrapped_signed_message_with_a_lowered_classification_header_is_refused() -> None:
    """An attacker who can decrypt (or the recipient itself) re-encrypts the genuine signed message
    under a header that claims a lower classification: the header no longer matches the signature."""
    inner = jwe.decrypt_compact(sealed(), MY_ENC, registry=envelope_jose._JWE_REGISTRY).plaintext
    assert inner is not None
    forged_header = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "kid": MY_ENC.kid,
        "typ": "exchange-envelope+jwe",
        "cty": "JOSE",
        **envelope_jose._header_of(message()),
    }
    forged_header["classification"] = {"scheme": "POLRI", "level": "BIASA", "common": "U"}
    forged = jwe.encrypt_compact(forged_header, inner, public(MY_ENC), registry=envelope_jose._JWE_REGISTRY)
    assert reason(forged) == "header-mismatch"


def test_wrong_decryption_key_under_the_right_kid_is_refused() -> None:
    impostor = crypto.private_jwk(crypto.new_message_key("enc"), str(MY_ENC.kid))
    assert reason(sealed(), decryption_keys={KeyId(str(MY_ENC.kid)): impostor}) == "decrypt-failed"


def test_unknown_recipient_kid_is_refused() -> None:
    other = key("MY", "enc")
    compact = seal(message(), signing_key=ID_SIG, recipient_key=public(other))
    assert reason(compact) == "unknown-recipient-key"


def test_unknown_signing_kid_is_refused() -> None:
    stranger = key("ID", "sig")
    compact = seal(message(), signing_key=stranger, recipient_key=public(MY_ENC))
    assert reason(compact) == "unknown-signing-key"


def test_forged_signature_under_a_trusted_kid_is_refused() -> None:
    forger = crypto.private_jwk(crypto.new_message_key("sig"), str(ID_SIG.kid))
    compact = seal(message(), signing_key=forger, recipient_key=public(MY_ENC))
    assert reason(compact) == "bad-signature"


def test_partner_cannot_sign_as_the_other_party() -> None:
    """MY's own key, even if trusted for verification, cannot make a message from ID."""
    compact = seal(message(), signing_key=MY_SIG, recipient_key=public(MY_ENC))
    verification = {KeyId(str(MY_SIG.kid)): public(MY_SIG)}
    assert reason(compact, verification_keys=verification) == "wrong-sender"


def test_message_addressed_to_another_party_is_refused() -> None:
    assert reason(sealed(recipient="ID")) == "wrong-recipient"


def test_unknown_agreement_version_or_digest_is_refused() -> None:
    assert reason(sealed(agreement={"version": "2025.9", "digest": "a" * 64})) == "unknown-agreement"
    assert reason(sealed(agreement={"version": "2026.1", "digest": "b" * 64})) == "unknown-agreement"


def test_replay_outside_the_window_and_future_messages_are_refused() -> None:
    old = sealed(created_at=(NOW - dt.timedelta(days=31)).isoformat())
    with pytest.raises(ReplayRejected) as info:
        open_as_my(old)
    assert info.value.reason == "expired"
    future = sealed(created_at=(NOW + dt.timedelta(minutes=10)).isoformat())
    assert reason(future) == "future"
    assert open_as_my(sealed(created_at=(NOW + dt.timedelta(minutes=4)).isoformat()))  # inside the skew


def test_stored_envelope_opens_later_without_freshness_checks() -> None:
    old = sealed(created_at=(NOW - dt.timedelta(days=400)).isoformat())
    opened = open_stored(
        old,
        decryption_keys={KeyId(str(MY_ENC.kid)): MY_ENC},
        verification_keys={KeyId(str(ID_SIG.kid)): public(ID_SIG)},
    )
    assert opened.message["id"] == message()["id"]


@pytest.mark.parametrize("garbage", ["", "a.b.c", "a.b.c.d.e", b64({"alg": "none"}) + ".x.y.z.w", "x" * 10])
def test_malformed_input_is_refused_not_crashed(garbage: str) -> None:
    assert reason(garbage) in {"malformed", "unknown-recipient-key"}


def test_inner_jws_must_be_signed_not_none() -> None:
    unsigned = (
        b64({"alg": "none", "kid": ID_SIG.kid, "typ": "exchange-message+jws"}) + "." + b64(message()) + "."
    )
    header = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "kid": MY_ENC.kid,
        "typ": "exchange-envelope+jwe",
        "cty": "JOSE",
        **envelope_jose._header_of(message()),
    }
    compact = jwe.encrypt_compact(header, unsigned, public(MY_ENC), registry=envelope_jose._JWE_REGISTRY)
    assert reason(compact) == "bad-signature"


def test_seal_refuses_a_message_without_the_envelope_fields() -> None:
    body = message()
    del body["classification"]
    with pytest.raises(ValueError, match="classification"):
        seal(body, signing_key=ID_SIG, recipient_key=public(MY_ENC))


def test_receipt_verifies_and_cannot_be_moved_to_another_envelope_or_message() -> None:
    compact = sealed()
    digest = envelope_jose.envelope_digest(compact)
    receipt = sign_receipt(
        message_id=message()["id"],
        envelope_sha256=digest,
        receiver="MY",
        sender="ID",
        received_at=NOW,
        signing_key=MY_SIG,
    )
    keys = {KeyId(str(MY_SIG.kid)): public(MY_SIG)}
    verified = verify_receipt(
        receipt,
        verification_keys=keys,
        expected_message_id=message()["id"],
        expected_envelope_sha256=digest,
        expected_receiver="MY",
    )
    assert verified.received_at == NOW.isoformat(timespec="microseconds")
    for kwargs in (
        {"expected_envelope_sha256": "0" * 64},
        {"expected_message_id": "other"},
        {"expected_receiver": "ID"},
    ):
        args: dict[str, Any] = {
            "verification_keys": keys,
            "expected_message_id": message()["id"],
            "expected_envelope_sha256": digest,
            "expected_receiver": "MY",
            **kwargs,
        }
        with pytest.raises(EnvelopeError) as info:
            verify_receipt(receipt, **args)
        assert info.value.reason == "receipt-mismatch"
    forged = sign_receipt(
        message_id=message()["id"],
        envelope_sha256=digest,
        receiver="MY",
        sender="ID",
        received_at=NOW,
        signing_key=crypto.private_jwk(crypto.new_message_key("sig"), str(MY_SIG.kid)),
    )
    with pytest.raises(EnvelopeError) as info:
        verify_receipt(
            forged,
            verification_keys=keys,
            expected_message_id=message()["id"],
            expected_envelope_sha256=digest,
            expected_receiver="MY",
        )
    assert info.value.reason == "bad-signature"


def test_an_envelope_is_not_accepted_as_a_receipt() -> None:
    signed_message = jws.serialize_compact(
        {"alg": "EdDSA", "kid": MY_SIG.kid, "typ": "exchange-message+jws"},
        b"{}",
        MY_SIG,
        algorithms=["EdDSA"],
    )
    with pytest.raises(EnvelopeError):
        verify_receipt(
            signed_message,
            verification_keys={KeyId(str(MY_SIG.kid)): public(MY_SIG)},
            expected_message_id="x",
            expected_envelope_sha256="0" * 64,
            expected_receiver="MY",
        )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=6),
    codes=st.lists(st.sampled_from(["H0", "H1", "H2", "H3"]), unique=True),
)
def test_property_seal_then_open_returns_the_message(payload: dict[str, Any], codes: list[str]) -> None:
    body = message(payload=payload, handling_codes=codes)
    assert open_as_my(seal(body, signing_key=ID_SIG, recipient_key=public(MY_ENC))).message == body


def _wrap(payload: bytes, *, drop: tuple[str, ...] = (), **extra: Any) -> str:
    """A genuinely signed and encrypted envelope over ``payload`` bytes, with header changes."""
    signed = jws.serialize_compact(
        {"alg": "EdDSA", "kid": ID_SIG.kid, "typ": "exchange-message+jws"},
        payload,
        ID_SIG,
        registry=envelope_jose._JWS_REGISTRY,
    )
    header: dict[str, Any] = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "kid": MY_ENC.kid,
        "typ": "exchange-envelope+jwe",
        "cty": "JOSE",
        **envelope_jose._header_of(message()),
        **extra,
    }
    for name in drop:
        del header[name]
    sealer_knows = {name: HeaderParameter(name, "str") for name in extra if name.startswith("x_")}
    sealer_knows |= {  # the sealer may leave any field out: that is what is tested
        name: HeaderParameter(p.description, p.validate, required=False)
        for name, p in envelope_jose._registry_entries().items()
    }
    registry = jwe.JWERegistry(
        header_registry=sealer_knows,
        algorithms=["ECDH-ES+A256KW", "A256GCM"],
        strict_check_header=False,
    )
    return jwe.encrypt_compact(header, signed, public(MY_ENC), registry=registry)


CANONICAL = canonical_json(message())


def test_the_wrap_helper_builds_an_envelope_that_opens() -> None:
    assert open_as_my(_wrap(CANONICAL)).message == message()


def test_a_signed_payload_with_a_duplicate_member_is_refused() -> None:
    """``{"tlp":"RED",…,"tlp":"AMBER"}``: a first-value parser and a last-value parser would read two
    classifications from the same signed bytes."""
    text = CANONICAL.decode()
    duplicated = text.replace('"tlp":"AMBER"', '"tlp":"RED","tlp":"AMBER"').encode()
    assert duplicated != CANONICAL
    with pytest.raises(EnvelopeError, match="duplicate member") as info:
        open_as_my(_wrap(duplicated))
    assert info.value.reason == "malformed"
    with pytest.raises(EnvelopeError, match="duplicate member"):
        open_stored(
            _wrap(duplicated),
            decryption_keys={KeyId(str(MY_ENC.kid)): MY_ENC},
            verification_keys={KeyId(str(ID_SIG.kid)): public(ID_SIG)},
        )


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps(message()).encode(),  # spaces after separators
        json.dumps(message(), sort_keys=True, indent=1).encode(),
        CANONICAL + b"\n",
        CANONICAL.replace(b'"H0"', b'"\\u0048\\u0030"'),  # the same string, escaped
    ],
)
def test_a_signed_payload_that_is_not_rfc8785_canonical_is_refused(payload: bytes) -> None:
    assert json.loads(payload) == message()
    with pytest.raises(EnvelopeError, match="canonical form") as info:
        open_as_my(_wrap(payload))
    assert info.value.reason == "malformed"


def test_an_unknown_header_parameter_not_in_crit_is_ignored() -> None:
    opened = open_as_my(_wrap(CANONICAL, x_trace="abc", x_hint="1"))
    assert opened.message == message()
    assert opened.header["x_trace"] == "abc"


def test_an_unknown_header_parameter_listed_in_crit_is_refused() -> None:
    assert reason(_wrap(CANONICAL, x_must="1", crit=["x_must"])) == "malformed"
    assert open_as_my(_wrap(CANONICAL, crit=["msg_id"])).message == message()  # understood: accepted


@pytest.mark.parametrize("field", [*envelope_jose.HEADER_FIELDS, "cty"])
def test_a_missing_required_header_field_is_malformed_not_decrypt_failed(field: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        open_as_my(_wrap(CANONICAL, drop=(field,)))
    assert info.value.reason == "malformed"
    assert field in str(info.value) or field == "cty"


def test_a_cty_other_than_jose_is_refused() -> None:
    assert reason(_wrap(CANONICAL, cty="JWT")) == "malformed"


def test_a_receipt_whose_signed_body_is_not_canonical_is_refused() -> None:
    """The same rule as the envelope: a duplicate ``envelope_sha256`` could name two envelopes."""
    digest = envelope_jose.envelope_digest(sealed())
    body = {
        "envelope_sha256": digest,
        "message_id": message()["id"],
        "received_at": NOW.isoformat(timespec="microseconds"),
        "receiver": "MY",
        "sender": "ID",
    }
    canonical = canonical_json(body).decode()
    for payload in (
        canonical.replace('{"envelope_sha256":', '{"envelope_sha256":"' + "0" * 64 + '","envelope_sha256":'),
        json.dumps(body),
    ):
        receipt = jws.serialize_compact(
            {"alg": "EdDSA", "kid": MY_SIG.kid, "typ": "exchange-receipt+jws"},
            payload.encode(),
            MY_SIG,
            registry=envelope_jose._JWS_REGISTRY,
        )
        with pytest.raises(EnvelopeError) as info:
            verify_receipt(
                receipt,
                verification_keys={KeyId(str(MY_SIG.kid)): public(MY_SIG)},
                expected_message_id=message()["id"],
                expected_envelope_sha256=digest,
                expected_receiver="MY",
            )
        assert info.value.reason == "malformed"
