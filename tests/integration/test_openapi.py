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
