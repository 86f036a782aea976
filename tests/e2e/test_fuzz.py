"""The API fuzzed: schemathesis generates requests (valid and invalid) from the node's own OpenAPI
description and sends them over real mutual TLS to a running node, as a local system, an auditor
and the partner node. Every answer must be no 5xx, match the documented status codes, media types,
headers and schemas, and the node's log must hold no traceback. The run is bounded
(``FUZZ_EXAMPLES`` cases per operation and generation mode) and derandomised, so it is repeatable."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.harness import Running
from tests.support import CLIENT_PASSPHRASE, PASSPHRASE, ClientFiles, register_client

pytestmark = pytest.mark.e2e

FUZZ_EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class _MutualTLS(HTTPAdapter):
    """A requests adapter that presents a client certificate from one SSLContext."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ctx
        super().init_poolmanager(*args, **kwargs)


def _session(ca: Path, cert: Path, key: Path, password: str) -> requests.Session:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key), password=password)
    session = requests.Session()
    session.verify = str(ca)
    session.mount("https://", _MutualTLS(ctx))
    return session


@pytest.fixture(scope="module")
def sessions(nodes: tuple[Running, Running]) -> Iterator[dict[str, requests.Session]]:
    polri, pdrm = nodes
    auditor: ClientFiles = register_client(polri.node, "fuzz-auditor", "RAHASIA", "--role", "AUDITOR")
    tls = pdrm.node.path / "tls"
    made = {
        "local": _session(polri.node.ca, polri.client_files.cert, polri.client_files.key, CLIENT_PASSPHRASE),
        "audit": _session(polri.node.ca, auditor.cert, auditor.key, CLIENT_PASSPHRASE),
        "peer": _session(polri.node.ca, tls / "node.pem", tls / "node-key.pem", PASSPHRASE),
    }
    yield made
    for session in made.values():
        session.close()


def _who(path: str) -> str:
    if path.startswith("/v1/peer/"):
        return "peer"
    if path.startswith("/v1/audit") or path == "/audit":
        return "audit"
    return "local"


def _fuzz(
    operation: schemathesis.APIOperation,  # type: ignore[type-arg]
    mode: GenerationMode,
    session: requests.Session,
    base_url: str,
    calls: dict[str, int],
) -> None:
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
        response = case.call(base_url=base_url, session=session, timeout=30)
        case.validate_response(response, checks=CHECKS)
        calls[operation.label] = calls.get(operation.label, 0) + 1

    fuzz()


def test_the_api_fuzzed_over_mutual_tls_answers_as_documented(
    nodes: tuple[Running, Running], sessions: dict[str, requests.Session]
) -> None:
    polri, _ = nodes
    spec = sessions["local"].get(f"{polri.node.url}/openapi.json", timeout=10).json()
    loaded = schemathesis.openapi.from_dict(spec).get_all_operations()
    operations = [result.ok() for result in loaded]  # type: ignore[union-attr]
    assert len(operations) >= 10
    calls: dict[str, int] = {}
    no_invalid_input: list[str] = []
    for operation in operations:
        session = sessions[_who(operation.path)]
        _fuzz(operation, GenerationMode.POSITIVE, session, polri.node.url, calls)
        try:
            _fuzz(operation, GenerationMode.NEGATIVE, session, polri.node.url, calls)
        except Unsatisfiable:
            no_invalid_input.append(operation.label)  # e.g. only a free string in the path
    constrained = {
        f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        for method, described in item.items()
        if "requestBody" in described or any(p["in"] == "query" for p in described.get("parameters", []))
    }
    assert not constrained & set(no_invalid_input), no_invalid_input  # those got invalid input too
    assert len(calls) == len(operations), calls
    for run in nodes:
        log = (run.node.path / "node.log").read_text()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
