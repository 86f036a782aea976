"""The OpenAPI description is generated from the code and names what integrators rely on."""

from __future__ import annotations

from pathlib import Path

from exchange.api.app import create_app
from exchange.config import load_settings
from exchange.node import Node
from tests.support import make_pair


def test_openapi_describes_the_client_and_peer_api(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    spec = create_app(node, run_worker=False).openapi()
    node.close()
    paths = spec["paths"]
    assert {
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/inbox",
        "/v1/peer/envelopes",
        "/healthz",
    } <= set(paths)
    submit = paths["/v1/messages"]["post"]
    assert "202" in submit["responses"]
    assert "application/problem+json" in submit["responses"]["403"]["content"]
    assert "application/problem+json" in submit["responses"]["422"]["content"]
    body = spec["components"]["schemas"]["MessageSubmission"]
    assert {"type", "case_ref", "purposes", "classification", "tlp", "payload"} <= set(body["required"])


def test_every_audit_answer_has_a_schema_and_the_witness_protocol_is_described(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    spec = create_app(node, run_worker=False).openapi()
    node.close()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    expected = {
        ("/v1/audit/entries", "get"): "EntriesPage",
        ("/v1/audit/messages/{message_id}", "get"): "MessageHistory",
        ("/v1/audit/checkpoints", "get"): "Checkpoints",
        ("/v1/audit/proofs/inclusion", "get"): "InclusionProof",
        ("/v1/audit/proofs/consistency", "get"): "ConsistencyProof",
        ("/v1/audit/verify", "post"): "Verification",
        ("/v1/audit/export", "get"): "AuditBundle",
    }
    for (path, method), model in expected.items():
        answer = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer == {"$ref": f"#/components/schemas/{model}"}, path
        assert model in schemas
    assert "leaf" in schemas["AuditEntry"]["required"]
    assert "verifier_keys" in schemas["Checkpoints"]["required"]
    witness = paths["/v1/peer/witness/add-checkpoint"]["post"]
    assert {"200", "400", "403", "404", "409", "422"} <= set(witness["responses"])
    assert "text/x.tlog.size" in witness["responses"]["409"]["content"]
    assert "/v1/peer/checkpoints" not in paths  # the JSON witnessing API is gone
