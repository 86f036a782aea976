"""An agreement for unit tests, built from the shipped defaults with generated party keys."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from typing import Any

from exchange import crypto
from exchange.agreement import Agreement, parse_agreement

CA_PEM = crypto.make_ca("test CA", "test", "unit-test-passphrase").cert_pem.decode()


def agreement_data() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads(files("exchange").joinpath("agreement_defaults.toml").read_text())
    parties = {}
    for party, scheme in (("ID", "POLRI"), ("MY", "ARAHAN")):
        keys = {}
        for use in ("sig", "enc", "ckpt"):
            pem = crypto.new_message_key(use)
            keys[use] = crypto.public_jwk_dict(
                crypto.private_jwk(pem, crypto.message_key_id(party, use, pem))
            )
        parties[party] = {
            "name": party,
            "endpoint": f"https://{party.lower()}.example:8443",
            "node_name": f"{party}-node",
            "node_key_sha256": crypto.public_key_sha256(CA_PEM.encode()),  # any well-formed pin
            "ca_certificate": CA_PEM,
            "scheme": scheme,
            "signing_keys": [keys["sig"]],
            "checkpoint_key": {k: v for k, v in keys["ckpt"].items() if k != "kid"}
            | {"kid": keys["ckpt"]["kid"]},
            "encryption_keys": [keys["enc"]],
        }
    data["parties"] = parties
    return data


def agreement() -> Agreement:
    return parse_agreement(agreement_data())
