"""The node's C2SP tlog-witness endpoint (POST /v1/peer/witness/add-checkpoint) answers every case
with the status the spec requires; its cosignature verifies with the independent implementation.
(Mutual TLS and the partner-only rule are tested end to end in tests/e2e/test_two_nodes.py.)"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from exchange import crypto
from exchange.api.app import create_app
from exchange.api.auth import partner_node
from exchange.checkpoints import CheckpointService
from exchange.config import load_settings
from exchange.db import repo
from exchange.ledger import EntryDraft
from exchange.ledger.checkpoint import checkpoint_with, sign_checkpoint
from exchange.ledger.witness_protocol import encode_add_checkpoint
from exchange.node import Node
from tests.independent import tlog
from tests.support import make_pair

URL = "/v1/peer/witness/add-checkpoint"
NOW = dt.datetime.now(dt.UTC)


class Client:
    """Requests straight into the ASGI app (no server, no lifespan: no loops run without a transport)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def post(self, url: str, content: bytes) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://my-node") as client:
                return await client.post(url, content=content)

        return asyncio.run(call())


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Node, Node, Client]]:
    id_dir, my_dir = make_pair(tmp_path)
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    app = create_app(my_node, run_worker=False)
    # the TLS identity is not what is tested here: the caller (no certificate) is taken for the partner
    app.dependency_overrides[partner_node] = lambda: None
    monkeypatch.setattr("exchange.api.auth.caller_kind", lambda node, pem: "partner")
    yield id_node, my_node, Client(app)
    id_node.close()
    my_node.close()


def grow_and_sign(node: Node, n: int) -> None:
    node.committer.run(lambda conn, head: repo.append_ledger(conn, head, [EntryDraft(event="x")] * n, "t"))
    CheckpointService(node).sign_latest(NOW)


def post(client: Client, old: int, proof: list[bytes], note: str) -> tuple[int, str, str]:
    r = client.post(URL, content=encode_add_checkpoint(old, proof, note) if old or not proof else b"")
    return r.status_code, r.headers.get("content-type", ""), r.text


def incidents(node: Node) -> list[str]:
    with node.db.read() as conn:
        return [e.data["reason"] for e in repo.iter_ledger(conn) if e.event == "checkpoint.incident"]


def test_the_witness_endpoint_follows_the_tlog_witness_spec(pair: tuple[Node, Node, Client]) -> None:
    id_node, my_node, client = pair
    ids = CheckpointService(id_node)
    grow_and_sign(id_node, 5)
    first = ids.to_witness()
    assert first is not None
    status, kind, body = post(client, 0, [], first.note)
    assert (status, kind.split(";")[0]) == (200, "text/plain")
    assert body.endswith("\n")
    witness_vkey = my_node.agreement.parties["MY"].witness_verifier.vkey
    _, signers = tlog.open_note(checkpoint_with(first.note, [body]), [tlog.parse_vkey(witness_vkey)])
    assert set(signers) == {"MY-node/witness"}  # checked by code that shares nothing with exchange

    assert post(client, 0, [], first.note)[:3] == (409, "text/x.tlog.size", "5\n")  # old size is not 0
    assert post(client, 5, [], first.note)[0] == 200  # asked again from the right size: same answer

    grow_and_sign(id_node, 4)
    nxt = ids.to_witness(from_size=5)
    assert nxt is not None
    assert nxt.proof
    assert post(client, 3, nxt.proof, nxt.note)[:3] == (409, "text/x.tlog.size", "5\n")
    assert post(client, 10, [], nxt.note)[0] == 400  # old size beyond the checkpoint
    assert (
        client.post(
            URL, content=b"old 0\n" + base64.b64encode(b"\0" * 32) + b"\n\n" + nxt.note.encode()
        ).status_code
        == 400
    )
    assert client.post(URL, content=b"no old line\n\n" + nxt.note.encode()).status_code == 400
    wrong = [hashlib.sha256(b"x").digest(), *nxt.proof[1:]]
    status, _, _ = post(client, 5, wrong, nxt.note)
    assert status == 422  # the consistency proof fails: an incident
    assert incidents(my_node) == ["inconsistent with the checkpoint witnessed at size 5"]
    assert post(client, 5, nxt.proof, nxt.note)[0] == 200

    origin = id_node.agreement.parties["ID"].ledger_origin
    fork = sign_checkpoint(origin, 9, hashlib.sha256(b"another history").digest(), id_node.keys.checkpoint)
    assert post(client, 9, [], fork)[:3] == (409, "text/x.tlog.size", "9\n")  # a second root for size 9
    rollback = sign_checkpoint(origin, 4, hashlib.sha256(b"older").digest(), id_node.keys.checkpoint)
    assert post(client, 9, [], rollback)[0] == 400  # old size 9 > size 4
    assert incidents(my_node)[1:] == ["fork", "rollback"]

    stranger = crypto.private_jwk(crypto.new_message_key("ckpt"), "x")
    assert post(client, 9, [], sign_checkpoint(origin, 9, b"\0" * 32, stranger))[0] == 403
    other = sign_checkpoint("XX-node/ledger", 9, b"\0" * 32, id_node.keys.checkpoint)
    assert post(client, 9, [], other)[0] == 404
    bad_line = nxt.note.split("\n")[-2].rsplit(" ", 1)  # the log's signature line
    flipped = bytearray(base64.b64decode(bad_line[1]))
    flipped[-1] ^= 1
    doubled = nxt.note + f"{bad_line[0]} {base64.b64encode(bytes(flipped)).decode()}\n"
    assert post(client, 9, [], doubled)[0] == 403  # a bad line by the log key beside a good one
