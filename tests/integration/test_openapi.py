"""The OpenAPI description is generated from the code and names what integrators rely on."""

from __future__ import annotations

from pathlib import Path

from exchange.api.app import create_app
from exchange.api.openapi import PROBLEM_REF, SECURITY_SCHEME
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
        "/v1/cases/{case_ref}",
        "/v1/peer/envelopes",
        "/healthz",
        "/metrics",
    } <= set(paths)
    submit = paths["/v1/messages"]["post"]
    assert "202" in submit["responses"]
    assert "application/problem+json" in submit["responses"]["403"]["content"]
    assert "application/problem+json" in submit["responses"]["422"]["content"]
    body = spec["components"]["schemas"]["MessageSubmission"]
    assert {"type", "case_ref", "payload"} <= set(body["required"])  # the rest: R-COMPLETE names it
    assert {"purposes", "classification", "tlp", "legal_basis", "data_subjects", "recipients"} <= set(
        body["properties"]
    )
    accepted = spec["components"]["schemas"]["Accepted"]
    assert {"raised", "replaced", "classification", "tlp"} <= set(accepted["required"])


def test_the_openapi_documents_every_problem_answer_typed_bodies_and_mutual_tls(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    app = create_app(node, run_worker=False)
    spec = app.openapi()
    node.close()
    assert spec["components"]["securitySchemes"] == {"mutualTLS": SECURITY_SCHEME}
    assert SECURITY_SCHEME["type"] == "mutualTLS"
    assert spec["security"] == [{"mutualTLS": []}]
    problem = spec["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    submit = spec["paths"]["/v1/messages"]["post"]["responses"]
    for status in ("400", "403", "413", "415", "422", "503"):
        assert submit[status]["content"] == {"application/problem+json": {"schema": PROBLEM_REF}}, status
    assert "Retry-After" in submit["503"]["headers"]
    assert "404" in spec["paths"]["/v1/messages/{message_id}"]["get"]["responses"]
    assert "409" in spec["paths"]["/v1/peer/witness/add-checkpoint"]["post"]["responses"]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            ok = next(
                (operation["responses"][s] for s in ("200", "201", "202") if s in operation["responses"]),
                None,
            )
            assert ok is not None, (method, path)
            if path in ("/v1/peer/witness/add-checkpoint", "/metrics"):  # C2SP's, Prometheus's text formats
                assert set(ok["content"]) == {"text/plain"}
            elif path != "/audit":  # the auditor console is HTML
                assert ok["content"]["application/json"]["schema"] != {}, (method, path)
            for status, answer in operation["responses"].items():
                if int(status) >= 400 and (path, status) != ("/v1/peer/witness/add-checkpoint", "409"):
                    assert answer["content"]["application/problem+json"]["schema"] == PROBLEM_REF
    assert app.docs_url is None
    assert app.redoc_url is None


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
