"""Two real nodes (``exchange serve`` under uvicorn) over mutual TLS on loopback."""

from __future__ import annotations

import datetime as dt
import ssl
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from exchange import crypto, envelope
from exchange.client import ExchangeClient
from exchange.config import load_settings
from exchange.errors import ExchangeError
from exchange.node import Node
from tests.e2e.harness import Running
from tests.support import (
    PASSPHRASE,
    ClientFiles,
    register_client,
    response_to,
    rfi,
    signed_message,
)

pytestmark = pytest.mark.e2e


def wait_status(
    client: ExchangeClient, message_id: str, wanted: str, timeout: float = 30
) -> dict[str, object]:
    return client.wait_for_status(message_id, wanted, timeout)


def test_a_request_crosses_and_the_reply_comes_back(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    with polri.client() as id_api, pdrm.client() as my_api:
        accepted = id_api.submit(rfi())
        delivered = wait_status(id_api, accepted["id"], "delivered")
        assert delivered["receipt"] is not None
        inbox = my_api.inbox()
        item = next(i for i in inbox["items"] if i["id"] == accepted["id"])
        assert item["payload"] == rfi()["payload"]
        reply = my_api.submit(response_to(accepted["id"]))
        wait_status(my_api, reply["id"], "delivered")
        cursor = 0
        got = []
        while True:
            page = id_api.inbox(after=cursor)
            if not page["items"]:
                break
            got += page["items"]
            cursor = page["next_cursor"]
        assert any(i["id"] == reply["id"] and i["in_reply_to"] == accepted["id"] for i in got)


def test_bad_input_gets_problem_json_naming_each_field(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    with polri.client() as api:
        r = api.request("POST", "/v1/messages", json={"type": "REQUEST_FOR_INFORMATION", "case_ref": "x"})
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
        fields = {e["field"] for e in r.json()["errors"]}
        assert {"case_ref", "payload"} <= fields
        bare = {
            k: v for k, v in rfi().items() if k not in ("purposes", "classification", "tlp", "legal_basis")
        }
        r = api.request("POST", "/v1/messages", json=bare)
        assert r.status_code == 403
        (complete,) = r.json()["violations"]
        assert complete["rule"] == "R-COMPLETE"
        for missing in ("message.classification", "message.tlp", "message.purposes", "message.legal_basis"):
            assert missing in complete["reason"]
        r = api.request(
            "POST",
            "/v1/messages",
            json=rfi(classification={"scheme": "POLRI", "level": "SANGAT RAHASIA"}, tlp="RED"),
        )
        assert r.status_code == 403
        violations = r.json()["violations"]
        assert {v["rule"] for v in violations} == {"R-CLEARANCE-SEND", "R-TLP-RED-RECIPIENTS"}
        assert all(v["remedy"] and v["version"] == v["rule"] + "@1" for v in violations)
        r = api.request("POST", "/v1/messages", json=rfi(handling_codes=["H9"]))
        assert r.status_code == 422
        assert [e["field"] for e in r.json()["errors"]] == ["handling_codes"]
        r = api.request(
            "POST", "/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/problem+json"
        r = api.request("GET", "/v1/messages/does-not-exist")
        assert r.status_code == 404
        assert r.json()["type"].endswith("/not-found")
        big = rfi(payload={"summary": "x" * 2_000_000, "questions": ["q"]})
        r = api.request("POST", "/v1/messages", json=big)
        assert r.status_code == 413


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key), password=PASSPHRASE)
    return ctx


def test_a_client_from_the_wrong_ca_or_without_a_certificate_fails_the_handshake(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    polri, _ = nodes
    rogue_ca = crypto.make_ca("rogue CA", "rogue", PASSPHRASE)
    rogue = crypto.issue_certificate(
        rogue_ca,
        PASSPHRASE,
        kind="client",
        common_name="polri-cms",
        organisation="rogue",
        passphrase=PASSPHRASE,
    )
    (tmp_path / "rogue.pem").write_bytes(rogue.cert_pem)
    (tmp_path / "rogue-key.pem").write_bytes(rogue.key_pem)
    for ctx in (
        _context(polri.node.ca, tmp_path / "rogue.pem", tmp_path / "rogue-key.pem"),
        _context(polri.node.ca),
    ):
        with httpx.Client(verify=ctx) as http, pytest.raises(httpx.TransportError):
            http.get(f"{polri.node.url}/healthz")


def test_an_unregistered_certificate_from_the_right_ca_gets_403(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    from tests.support import cli

    cli(
        "pki",
        "issue-client",
        "--dir",
        str(polri.node.path),
        "--name",
        "stranger",
        "--out",
        str(polri.node.path / "x"),
    )
    stranger = ClientFiles(
        "stranger", polri.node.path / "x" / "stranger.pem", polri.node.path / "x" / "stranger-key.pem"
    )
    with polri.client(stranger) as api:
        r = api.request("GET", "/v1/inbox")
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/problem+json"
        assert "not registered" in r.json()["detail"]


def test_a_removed_client_is_refused_from_then_on(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    from tests.support import cli

    files = register_client(polri.node, "temp-system", "TERBATAS")
    with polri.client(files) as api:
        assert api.request("GET", "/v1/inbox").status_code == 200
        cli("clients", "remove", "--dir", str(polri.node.path), "--id", "temp-system")
        assert api.request("GET", "/v1/inbox").status_code == 403


def test_peer_endpoints_accept_only_the_partner_node(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    # a registered local client of MY cannot pose as the ID node
    with pdrm.client() as api:
        r = api.request("POST", "/v1/peer/envelopes", json={"envelopes": ["x.y.z.w.v"]})
        assert r.status_code == 403
        # nor witness checkpoints or read the ledger's message history as the partner would
        r = api.request("POST", "/v1/peer/witness/add-checkpoint", content=b"old 0\n\nx\n")
        assert r.status_code == 403
        assert api.request("GET", "/v1/peer/audit/messages/some-id").status_code == 403
    # nor can MY's own node certificate call MY's peer endpoint
    own_node = _context(
        pdrm.node.ca, pdrm.node.path / "tls" / "node.pem", pdrm.node.path / "tls" / "node-key.pem"
    )
    with httpx.Client(verify=own_node) as http:
        assert http.post(f"{pdrm.node.url}/v1/peer/envelopes", json={"envelopes": ["a"]}).status_code == 403
        assert http.get(f"{pdrm.node.url}/v1/peer/audit/messages/some-id").status_code == 403
    # the ID node certificate is admitted, and garbage gets one opaque "rejected"
    id_node = _context(
        pdrm.node.ca, polri.node.path / "tls" / "node.pem", polri.node.path / "tls" / "node-key.pem"
    )
    with httpx.Client(verify=id_node) as http:
        # the partner node is no auditor and no local system of this node
        assert http.get(f"{pdrm.node.url}/v1/audit/entries").status_code == 403
        assert http.get(f"{pdrm.node.url}/v1/inbox").status_code == 403
        r = http.post(f"{pdrm.node.url}/v1/peer/envelopes", json={"envelopes": ["x.y.z.w.v"]})
        assert r.status_code == 200
        _witness_protocol_answers(http, pdrm, polri)
        assert r.json() == {"results": [{"status": "rejected"}]}


def test_a_redelivered_envelope_is_stored_once_with_the_same_receipt(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    sender = Node(load_settings(polri.node.path))  # the ID node's keys: the envelope as its worker sends it
    try:
        compact = signed_message(sender, dt.datetime.now(dt.UTC))
    finally:
        sender.close()
    id_node = _context(
        pdrm.node.ca, polri.node.path / "tls" / "node.pem", polri.node.path / "tls" / "node-key.pem"
    )
    with httpx.Client(verify=id_node) as http:  # delivered, then again as after a lost answer
        first = http.post(f"{pdrm.node.url}/v1/peer/envelopes", json={"envelopes": [compact]}).json()
        again = http.post(f"{pdrm.node.url}/v1/peer/envelopes", json={"envelopes": [compact]}).json()
    assert first["results"][0]["status"] == "accepted"
    assert again["results"][0]["receipt"] == first["results"][0]["receipt"]
    mid = envelope.peek_header(compact)["msg_id"]
    assert pdrm.count_messages(mid) == 1


def test_with_the_partner_stopped_messages_wait_and_go_when_it_returns(
    nodes: tuple[Running, Running],
) -> None:
    polri, pdrm = nodes
    assert pdrm.process.stop()
    with polri.client() as api:
        accepted = api.submit(rfi())
        time.sleep(1.0)
        status = api.status(accepted["id"])
        assert status["status"] in {"queued", "sent"}
        assert status["attempts"] >= 1
        pdrm.process.start()
        pdrm.process.wait_ready()
        wait_status(api, accepted["id"], "delivered")
    assert pdrm.count_messages(accepted["id"]) == 1


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_a_kill_in_the_middle_of_delivery_loses_nothing_and_duplicates_nothing(
    nodes: tuple[Running, Running], victim: str
) -> None:
    polri, pdrm = nodes
    with polri.client() as api:
        ids = [api.submit(rfi())["id"] for _ in range(30)]
    target = polri if victim == "sender" else pdrm
    target.process.kill()  # SIGKILL while the batch is in flight or queued
    target.process.start()
    target.process.wait_ready()
    with polri.client() as api:
        for mid in ids:
            try:
                wait_status(api, mid, "delivered", timeout=60)
            except ExchangeError as exc:  # pragma: no cover - the assertion message is the point
                pytest.fail(str(exc))
    assert all(pdrm.count_messages(mid) == 1 for mid in ids)


def test_each_node_s_checkpoint_gets_cosigned_by_the_other(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    for run in (polri, pdrm):
        with run.client() as api:
            deadline = time.monotonic() + 30
            while True:
                health = api.health()
                if health["cosigned_size"] == health["ledger_size"] > 0:
                    break
                assert time.monotonic() < deadline, health
                time.sleep(0.2)


def _witness_protocol_answers(http: httpx.Client, pdrm: Running, polri: Running) -> None:
    """MY's C2SP tlog-witness endpoint, called as the ID node: the status codes the spec requires."""
    url = f"{pdrm.node.url}/v1/peer/witness/add-checkpoint"
    assert http.post(url, content=b"garbage").status_code == 400
    deadline = time.monotonic() + 30
    while True:  # ID's checkpointer signs one within a second of the ledger growing
        with polri.db().connect() as conn:
            note = conn.execute(sa.text("select note from checkpoints order by size desc limit 1")).scalar()
        if note is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stale = http.post(url, content=b"old 0\n\n" + note.encode())  # MY has witnessed ID's log already
    assert stale.status_code == 409
    assert stale.headers["content-type"].startswith("text/x.tlog.size")
    witnessed = int(stale.text)
    assert witnessed > 0
    assert stale.text == f"{witnessed}\n"
    other_log = note.replace("ID-node/ledger", "XX-node/ledger")
    assert http.post(url, content=b"old 0\n\n" + other_log.encode()).status_code == 404
