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
    assert "409" in spec["paths"]["/v1/peer/checkpoints"]["post"]["responses"]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            ok = operation["responses"].get("200") or operation["responses"].get("202")
            assert ok is not None, (method, path)
            if path != "/audit":  # the auditor console is HTML
                assert ok["content"]["application/json"]["schema"] != {}, (method, path)
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    assert answer["content"]["application/problem+json"]["schema"] == PROBLEM_REF
    assert app.docs_url is None
    assert app.redoc_url is None
