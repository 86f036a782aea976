"""Regenerate envelope-v1.json: fresh TEST-ONLY keys, one sealed envelope and one receipt.

    .venv/bin/python schemas/vectors/generate.py

The keys in the vector file are published test vectors, never used by any node.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from exchange import crypto
from exchange.envelope import envelope_digest, seal, sign_receipt


def main() -> None:
    keys = {}
    for name, party, use in (
        ("sender_signing", "ID", "sig"),
        ("recipient_encryption", "MY", "enc"),
        ("recipient_signing", "MY", "sig"),
    ):
        pem = crypto.new_message_key(use)  # type: ignore[arg-type]
        keys[name] = crypto.private_jwk(pem, "TEST-" + crypto.message_key_id(party, use, pem))  # type: ignore[arg-type]
    created = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
    message = {
        "format": "exchange-message/2",
        "id": "00000000-0000-4000-8000-00000000c0de",
        "type": "REQUEST_FOR_INFORMATION",
        "sender": "ID",
        "recipient": "MY",
        "created_at": created.isoformat(timespec="microseconds"),
        "agreement": {"version": "2026.2", "digest": "0" * 64},
        "case_ref": "ID-MY/2026/TEST",
        "thread_id": "00000000-0000-4000-8000-00000000c0de",
        "in_reply_to": None,
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA", "common": "S"},
        "tlp": "AMBER",
        "handling_codes": ["H0", "H2"],
        "legal_basis": ["Palermo Protocol art. 10"],
        "priority": "ROUTINE",
        "response_due": None,
        "grading": None,
        "origin": {"agency": "Polri", "unit": "TPPO"},
        "addressed_to": ["ATIPSOM"],
        "recipients": [],
        "data_subjects": [{"pseudonym": "SUS-0001", "role": "SUSPECT"}],
        "mla_reference": None,
        "checkpoint": None,
        "payload": {
            "summary": "Test vector: no real data",
            "questions": ["Is this a test?"],
            "persons": [{"subject": "SUS-0001", "aliases": ["Test Alias"]}],
        },
    }
    public_recipient = crypto.public_jwk_dict(keys["recipient_encryption"])
    from joserfc.jwk import OKPKey

    compact = seal(
        message, signing_key=keys["sender_signing"], recipient_key=OKPKey.import_key(public_recipient)
    )
    receipt = sign_receipt(
        message_id=message["id"],
        envelope_sha256=envelope_digest(compact),
        receiver="MY",
        sender="ID",
        received_at=created + dt.timedelta(seconds=1),
        signing_key=keys["recipient_signing"],
    )
    vector = {
        "description": "TEST VECTOR ONLY. Keys are public test keys, never used by a node.",
        "keys": {
            "sender_signing_private": keys["sender_signing"].as_dict(private=True),
            "sender_signing_public": crypto.public_jwk_dict(keys["sender_signing"]),
            "recipient_encryption_private": keys["recipient_encryption"].as_dict(private=True),
            "recipient_encryption_public": public_recipient,
            "recipient_signing_public": crypto.public_jwk_dict(keys["recipient_signing"]),
        },
        "envelope": compact,
        "envelope_sha256": envelope_digest(compact),
        "expected_message": message,
        "receipt": receipt,
    }
    out = Path(__file__).with_name("envelope-v1.json")
    out.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
