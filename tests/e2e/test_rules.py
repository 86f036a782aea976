"""The agreement's rules between two real nodes over mutual TLS: the child-victim case, TLP:RED, a
refused release, and a poisoned envelope rejected alone while the rest of its batch is delivered."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from typing import Any

import httpx
import pytest

from exchange.config import load_settings
from exchange.node import Node
from tests.e2e.harness import Running
from tests.support import PASSPHRASE, forge_envelope, register_client, rfi, signed_json, signed_message

pytestmark = pytest.mark.e2e

CHILD = ("Anak Perempuan Contoh", "Ayah Contoh", "SDN 1 Atambua")


def child_referral() -> dict[str, Any]:
    return {
        "type": "VICTIM_IDENTIFICATION_REFERRAL",
        "case_ref": "ID-MY/2026/0777",
        "purposes": ["VICTIM_IDENTIFICATION", "VICTIM_PROTECTION_REPATRIATION"],
        "classification": {"scheme": "POLRI", "level": "BIASA"},
        "tlp": "CLEAR",
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "data_subjects": [
            {
                "pseudonym": "VCT-0777",
                "role": "VICTIM_CHILD",
                "status": {"ID": "TRAFFICKING_VICTIM", "MY": "ILLEGAL_MIGRANT"},
                "age": {"years": 14, "basis": "CLAIMED"},
            }
        ],
        "payload": {
            "summary": "A girl found on a plantation in Sabah",
            "victims": [
                {"subject": "VCT-0777", "names": [CHILD[0]], "parents": [CHILD[1]], "school": CHILD[2]}
            ],
        },
    }


def test_a_child_victim_is_raised_to_its_floor_and_redacted_by_role(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    analyst = register_client(pdrm.node, "pdrm-analyst", "RAHSIA", "--role", "ANALYST", "--unit", "ANALYSIS")
    d11 = register_client(pdrm.node, "pdrm-d11", "RAHSIA", "--role", "CHILD_PROTECTION", "--unit", "D11")
    with polri.client() as api:
        accepted = api.submit(child_referral())
        api.wait_for_status(accepted["id"], "delivered")
    assert accepted["classification"]["level"] == "RAHASIA"
    assert accepted["classification"]["partner_equivalent"]["level"] == "RAHSIA"
    assert {r["rule"] for r in accepted["raised"]} == {"R-FLOOR-CHILD"}
    assert accepted["tlp"] == "AMBER+STRICT"
    with pdrm.client(analyst) as api:
        (seen,) = [i for i in api.inbox()["items"] if i["id"] == accepted["id"]]
        case = api.request("GET", "/v1/cases/ID-MY/2026/0777").json()
    assert seen["classification"]["local_equivalent"] == "RAHSIA"
    assert not [i for i in CHILD if i in json.dumps(seen)]
    assert seen["payload"]["victims"][0]["names"] == ["VCT-0777"]
    assert [m["id"] for m in case["messages"]] == [accepted["id"]]
    with pdrm.client(d11) as api:
        (whole,) = [i for i in api.inbox()["items"] if i["id"] == accepted["id"]]
    assert all(i in json.dumps(whole) for i in CHILD)


def test_tlp_red_and_a_refused_release(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    terhad = register_client(pdrm.node, "pdrm-terhad", "TERHAD")
    other = register_client(pdrm.node, "pdrm-other", "RAHSIA")
    with polri.client() as api:
        red = api.submit(rfi(tlp="RED", recipients=["pdrm-d7"], case_ref="ID-MY/2026/0778"))
        api.wait_for_status(red["id"], "delivered")
    with pdrm.client() as api:
        assert red["id"] in {i["id"] for i in api.inbox()["items"]}
    for files in (terhad, other):
        with pdrm.client(files) as api:
            assert red["id"] not in {i["id"] for i in api.inbox()["items"]}
            assert api.request("GET", f"/v1/messages/{red['id']}").status_code == 404
            r = api.request("GET", "/v1/cases/ID-MY/2026/0778")
            assert r.status_code == 404
            assert r.headers["content-type"] == "application/problem+json"


def test_a_poisoned_envelope_is_rejected_alone_in_its_batch(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    sender = Node(load_settings(polri.node.path))  # the ID node's keys, as a buggy peer would hold them
    try:
        now = dt.datetime.now(dt.UTC)
        good = [signed_message(sender, now, case_ref="ID-MY/2026/0779") for _ in range(2)]
        full = signed_json(sender, now, case_ref="ID-MY/2026/0779")
        poisoned = forge_envelope(sender, {k: v for k, v in full.items() if k != "legal_basis"}, full)
    finally:
        sender.close()
    ctx = ssl.create_default_context(cafile=str(pdrm.node.ca))
    ctx.load_cert_chain(
        str(polri.node.path / "tls" / "node.pem"),
        str(polri.node.path / "tls" / "node-key.pem"),
        password=PASSPHRASE,
    )
    with httpx.Client(verify=ctx) as http:
        r = http.post(f"{pdrm.node.url}/v1/peer/envelopes", json={"envelopes": [good[0], poisoned, good[1]]})
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected", "accepted"]
    with pdrm.client() as api:
        case = api.request("GET", "/v1/cases/ID-MY/2026/0779").json()
    assert len(case["messages"]) == 2
