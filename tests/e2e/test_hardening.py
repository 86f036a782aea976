"""What an attacker or a careless integrator can send to a running node over mutual TLS, and what
the node answers: problem JSON with the right status, never a 5xx or a traceback; only the pinned
partner node key on the peer endpoints; hardened TLS and headers (docs/security.md)."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exchange import crypto
from exchange.client import ExchangeClient
from exchange.config import load_settings
from tests.e2e.harness import Running
from tests.support import CLIENT_PASSPHRASE, PASSPHRASE, ClientFiles, cli, register_client, rfi

pytestmark = pytest.mark.e2e

MAX_INT64 = 2**63 - 1


@pytest.fixture(scope="module")
def auditor(nodes: tuple[Running, Running]) -> ClientFiles:
    return register_client(nodes[0].node, "hardening-auditor", "RAHASIA", "--role", "AUDITOR")


def _problem(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = r.json()
    assert body["status"] == status
    return body


def _no_traceback(run: Running) -> None:
    assert "Traceback" not in (run.node.path / "node.log").read_text()


def test_a_lone_surrogate_in_any_string_is_422_naming_the_field(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    headers = {"content-type": "application/json"}
    with polri.client() as api:
        for raw, field in (
            (b'{"case_ref": "\\ud800"}', "case_ref"),
            (b'{"payload": {"summary": "x\\udfff"}}', "payload/summary"),
            (b'{"payload": {"\\ud800": 1}}', "payload"),
        ):
            body = _problem(api.request("POST", "/v1/messages", content=raw, headers=headers), 422)
            assert str(body["detail"]).startswith(field), body
    _no_traceback(polri)


def test_what_json_cannot_carry_exactly_is_refused_naming_the_field(nodes: tuple[Running, Running]) -> None:
    """Numbers parsers read differently (beyond ±(2^53 - 1), beyond a double, NaN, thousands of
    digits) and NUL characters (which PostgreSQL's text cannot hold) are refused at the edge with
    the field, never signed into a message nor turned into a 500."""
    polri, _ = nodes
    headers = {"content-type": "application/json"}
    with polri.client() as api:
        for raw, status, field in (
            (b'{"payload": {"question": 9007199254740992}}', 422, "payload/question"),
            (b'{"payload": {"question": -9007199254740992}}', 422, "payload/question"),
            (b'{"payload": {"amount": 1e400}}', 422, "payload/amount"),
            (b'{"mla_reference": "MLA\\u0000/1"}', 422, "mla_reference"),
            (b'{"payload": {"a\\u0000b": 1}}', 422, "payload/a\\u0000b"),
            (b'{"payload": {"amount": NaN}}', 400, "(body)"),
            (b'{"payload": {"question": ' + b"1" * 4301 + b"}}", 400, "(body)"),
        ):
            body = _problem(api.request("POST", "/v1/messages", content=raw, headers=headers), status)
            assert body["errors"][0]["field"] == field, body  # type: ignore[index]
        # the largest integer JSON carries exactly is not refused at the edge (the payload is then
        # judged by its schema)
        body = _problem(api.request("POST", "/v1/messages", json=rfi(payload={"question": 2**53 - 1})), 422)
        assert "beyond" not in str(body)
        for path, params in (
            ("/v1/messages/%00", {}),
            ("/v1/cases/ID-MY%002026", {}),
            ("/v1/inbox", {"purpose": "TIP\x00INVESTIGATION"}),
        ):
            r = api.request("GET", path, params=params)
            assert str(_problem(r, 400)["type"]).endswith("/malformed-url"), r.text
    _no_traceback(polri)


def test_a_trailing_slash_is_not_found_not_redirected(nodes: tuple[Running, Running]) -> None:
    """No 307 to a Location built from the caller's Host header, and problem JSON like any 404."""
    polri, _ = nodes
    with polri.client() as api:
        for path in ("/v1/inbox/", "/v1/messages/", "/healthz/"):
            r = api.request("GET", path, headers={"host": "attacker.example"})
            _problem(r, 404)
            assert "location" not in r.headers


def test_a_cursor_beyond_64_bits_is_422_not_500(nodes: tuple[Running, Running], auditor: ClientFiles) -> None:
    polri, _ = nodes
    with polri.client() as api:
        _problem(api.request("GET", "/v1/inbox", params={"after": str(MAX_INT64 + 1)}), 422)
        assert api.request("GET", "/v1/inbox", params={"after": str(MAX_INT64)}).status_code == 200
    with polri.client(auditor) as audit:
        for params in ({"after": str(MAX_INT64 + 1)}, {"seq": str(2**64)}):
            path = "/v1/audit/entries" if "after" in params else "/v1/audit/proofs/inclusion"
            _problem(audit.request("GET", path, params=params), 422)
    _no_traceback(polri)


def test_a_wrong_content_type_is_415(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    with polri.client() as api:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
            r = api.request("POST", "/v1/messages", content=b'{"a": 1}', headers={"content-type": ctype})
            _problem(r, 415)
        r = api.request("POST", "/v1/messages", content=b"{}", headers={"content-type": "application/json"})
        _problem(r, 422)


def test_a_chunked_body_over_the_limit_is_413(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes

    def chunks() -> Iterator[bytes]:
        yield b'{"payload": {"summary": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}}'

    with polri.client() as api:
        r = api.request(
            "POST", "/v1/messages", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in r.request.headers  # really chunked
        _problem(r, 413)


def test_malformed_json_is_400_with_line_and_column_not_a_byte_offset_field(
    nodes: tuple[Running, Running],
) -> None:
    polri, _ = nodes
    with polri.client() as api:
        r = api.request(
            "POST", "/v1/messages", content=b'{\n  "type": }', headers={"content-type": "application/json"}
        )
        body = _problem(r, 400)
        assert "line 2 column" in str(body["detail"])
        assert body["errors"] == [{"field": "(body)", "message": "Expecting value at line 2 column 11"}]


def test_a_duplicate_json_key_is_400(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    raw = b'{"type": "RESPONSE", "type": "REQUEST_FOR_INFORMATION"}'
    with polri.client() as api:
        body = _problem(
            api.request("POST", "/v1/messages", content=raw, headers={"content-type": "application/json"}),
            400,
        )
        assert "'type' appears twice" in str(body["detail"])


def test_every_invalid_field_comes_in_one_answer(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    with polri.client() as api:
        # a field the request model refuses, and the payload: one answer
        bad = rfi(case_ref="no spaces allowed", payload={"questions": "not a list"})
        body = _problem(api.request("POST", "/v1/messages", json=bad), 422)
        fields = {e["field"] for e in body["errors"]}  # type: ignore[attr-defined]
        assert {"case_ref", "payload/summary", "payload/questions"} <= fields, fields
        # words the agreement does not define, and the payload: one answer
        bad = rfi(tlp="PURPLE", purposes=["FUN"], payload={"questions": "not a list"})
        body = _problem(api.request("POST", "/v1/messages", json=bad), 422)
        fields = {e["field"] for e in body["errors"]}  # type: ignore[attr-defined]
        assert {"tlp", "purposes", "payload/summary", "payload/questions"} <= fields, fields
        # a field the model refuses, a word the agreement does not define and the payload: one answer
        bad = rfi(case_ref="no spaces allowed", tlp="PURPLE", payload={"questions": "not a list"})
        body = _problem(api.request("POST", "/v1/messages", json=bad), 422)
        fields = {e["field"] for e in body["errors"]}  # type: ignore[attr-defined]
        assert {"case_ref", "tlp", "payload/summary"} <= fields, fields


def test_405_names_the_allowed_methods(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    with polri.client() as api:
        r = api.request("DELETE", "/v1/inbox")
        _problem(r, 405)
        assert r.headers["allow"] == "GET"


def test_since_must_be_an_rfc3339_time(nodes: tuple[Running, Running], auditor: ClientFiles) -> None:
    polri, _ = nodes
    with polri.client(auditor) as audit:
        for bad in ("yesterday", "2026-13-01T00:00:00Z", "2026-11-23T10:00:00"):
            _problem(audit.request("GET", "/v1/audit/entries", params={"since": bad}), 422)
        ok = audit.request("GET", "/v1/audit/entries", params={"since": "2026-01-01T00:00:00+07:00"})
        assert ok.status_code == 200


def test_response_due_in_the_past_or_without_time_zone_is_422(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    naive = (dt.datetime.now() + dt.timedelta(days=1)).replace(microsecond=0).isoformat()
    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    with polri.client() as api:
        for due, why in ((past, "future"), (naive, "time zone")):
            body = _problem(api.request("POST", "/v1/messages", json=rfi(response_due=due)), 422)
            errors = [e for e in body["errors"] if e["field"] == "response_due"]  # type: ignore[attr-defined]
            assert len(errors) == 1, body
            assert why in errors[0]["message"]
        assert api.request("POST", "/v1/messages", json=rfi(response_due=ahead)).status_code == 202


# --- identity ------------------------------------------------------------------------------------


def _tls(ca: Path, cert: Path, key: Path, password: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key), password=password)
    return ctx


def test_a_partner_ca_client_certificate_with_the_partner_node_name_is_not_the_partner_node(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    polri, pdrm = nodes
    tls = pdrm.node.path / "tls"
    ca = crypto.IssuedCertificate((tls / "ca.pem").read_bytes(), (tls / "ca-key.pem").read_bytes())
    forged = {
        "client": crypto.issue_certificate(
            ca, PASSPHRASE, kind="client", common_name="MY-node", organisation="x", passphrase=PASSPHRASE
        ),
        # even a node certificate of the partner's CA is refused unless it holds the pinned key
        "node": crypto.issue_certificate(
            ca, PASSPHRASE, kind="node", common_name="MY-node", organisation="x", passphrase=PASSPHRASE
        ),
    }
    for kind, issued in forged.items():
        (tmp_path / f"{kind}.pem").write_bytes(issued.cert_pem)
        (tmp_path / f"{kind}-key.pem").write_bytes(issued.key_pem)
        ctx = _tls(polri.node.ca, tmp_path / f"{kind}.pem", tmp_path / f"{kind}-key.pem", PASSPHRASE)
        with httpx.Client(verify=ctx) as http:
            assert http.get(f"{polri.node.url}/v1/peer/audit/messages/x").status_code == 403, kind
            r = http.post(f"{polri.node.url}/v1/peer/envelopes", json={"envelopes": ["a.b.c.d.e"]})
            assert r.status_code == 403, kind
    # the real partner node (pinned key) is still admitted
    real = _tls(polri.node.ca, tls / "node.pem", tls / "node-key.pem", PASSPHRASE)
    with httpx.Client(verify=real) as http:
        assert http.get(f"{polri.node.url}/v1/peer/audit/messages/x").status_code == 200


def _partner_ca_client(partner: Running, folder: Path) -> tuple[Path, Path]:
    """A client certificate (and its key, under PASSPHRASE) of the partner's CA naming the partner
    node: trusted at the TLS layer, but not the partner node (not its purpose, not its pinned key)."""
    tls = partner.node.path / "tls"
    ca = crypto.IssuedCertificate((tls / "ca.pem").read_bytes(), (tls / "ca-key.pem").read_bytes())
    forged = crypto.issue_certificate(
        ca, PASSPHRASE, kind="client", common_name="MY-node", organisation="x", passphrase=PASSPHRASE
    )
    cert, key = folder / "forged.pem", folder / "forged-key.pem"
    cert.write_bytes(forged.cert_pem)
    key.write_bytes(forged.key_pem)
    return cert, key


def test_only_the_partner_node_may_send_a_body_over_the_common_limit(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    """The peer path takes batches larger than any other request, from the pinned partner node
    only: a local system is held to the common limit before its body is read, so it cannot make the
    node buffer and parse 16 MiB per request before the 403; a certificate of the partner's CA that
    is not its node gets the 403 before any body is read (nothing here serves it)."""
    polri, pdrm = nodes
    limit = load_settings(polri.node.path).max_body_bytes
    body = b'{"envelopes": ["' + b"a" * (limit + 1024) + b'"]}'
    headers = {"content-type": "application/json"}
    tls = pdrm.node.path / "tls"
    forged = _partner_ca_client(pdrm, tmp_path)
    callers = {
        "a local system": polri.client(),
        "a client of the partner's CA": ExchangeClient(
            polri.node.url,
            ca_file=polri.node.ca,
            cert_file=forged[0],
            key_file=forged[1],
            key_password=PASSPHRASE,
        ),
    }
    for who, caller in callers.items():
        with caller as api:
            big = api.request("POST", "/v1/peer/envelopes", content=body, headers=headers)
            if who == "a local system":
                assert str(limit) in str(_problem(big, 413)["detail"]), who
            else:
                assert "neither of this node's certificate authority" in str(_problem(big, 403)["detail"])
            # under the common limit it is read, and refused for who it is
            small = api.request("POST", "/v1/peer/envelopes", json={"envelopes": ["a.b.c.d.e"]})
            _problem(small, 403)
    real = _tls(polri.node.ca, tls / "node.pem", tls / "node-key.pem", PASSPHRASE)
    with httpx.Client(verify=real) as http:  # the partner node's batch of that size is read
        r = http.post(f"{polri.node.url}/v1/peer/envelopes", content=body, headers=headers)
        assert r.status_code != 413, r.text
    _no_traceback(polri)


def test_healthz_answers_the_partner_node_and_registered_clients_only(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    """/healthz tells the outbox, the overdue requests and the key sets: a certificate the TLS
    layer trusts but that names no one (a client of the partner's CA, a removed client) gets 403."""
    polri, pdrm = nodes
    tls = pdrm.node.path / "tls"
    forged = _partner_ca_client(pdrm, tmp_path)
    removed = register_client(polri.node, "health-removed", "TERBATAS")
    cli("clients", "remove", "--dir", str(polri.node.path), "--id", "health-removed")
    refused = [
        _tls(polri.node.ca, *forged, PASSPHRASE),
        _tls(polri.node.ca, removed.cert, removed.key, CLIENT_PASSPHRASE),
    ]
    for ctx in refused:
        with httpx.Client(verify=ctx) as http:
            body = _problem(http.get(f"{polri.node.url}/healthz"), 403)
            assert "outbox" not in body
    admitted = [
        _tls(polri.node.ca, tls / "node.pem", tls / "node-key.pem", PASSPHRASE),  # the partner node
        _tls(polri.node.ca, polri.client_files.cert, polri.client_files.key, CLIENT_PASSPHRASE),
    ]
    for ctx in admitted:
        with httpx.Client(verify=ctx) as http:
            r = http.get(f"{polri.node.url}/healthz")
            assert r.status_code == 200, r.text
            assert "outbox" in r.json()


def test_a_node_certificate_is_never_a_local_system(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    tls = polri.node.path / "tls"
    ctx = _tls(polri.node.ca, tls / "node.pem", tls / "node-key.pem", PASSPHRASE)
    with httpx.Client(verify=ctx) as http:
        _problem(http.get(f"{polri.node.url}/v1/inbox"), 403)


def test_security_headers_no_store_and_no_cdn_docs(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    with polri.client() as api:
        for path in ("/v1/inbox", "/healthz", "/v1/messages/nope"):
            r = api.request("GET", path)
            assert r.headers["cache-control"] == "no-store"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["strict-transport-security"].startswith("max-age=")
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        for path in ("/docs", "/redoc"):
            assert api.request("GET", path).status_code == 404
        spec = api.request("GET", "/openapi.json")
        assert spec.status_code == 200
        assert "cdn" not in spec.text.lower()


def test_tls_1_2_offers_aead_ciphers_only(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    files = polri.client_files

    def handshake(ciphers: str) -> None:
        ctx = _tls(polri.node.ca, files.cert, files.key, CLIENT_PASSPHRASE)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
        with httpx.Client(verify=ctx) as http:
            http.get(f"{polri.node.url}/healthz")

    handshake("ECDHE-ECDSA-AES128-GCM-SHA256")
    handshake("ECDHE-ECDSA-CHACHA20-POLY1305")
    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA"):
        with pytest.raises(httpx.ConnectError):
            handshake(cbc)


def test_the_auditors_message_id_is_escaped_in_the_peer_url(
    nodes: tuple[Running, Running], auditor: ClientFiles
) -> None:
    polri, pdrm = nodes
    with polri.client(auditor) as audit:
        for raw in ("%2E%2E", "..%3Fx=1", "%2E%2E%23frag"):
            r = audit.request("GET", f"/v1/audit/messages/{raw}")
            assert r.status_code == 200
            body = r.json()
            assert body["partner_error"] is None, body  # the partner saw the same id, as one segment
            assert body["nodes"]["MY"] == []
    _no_traceback(pdrm)


def test_a_client_helper_still_works_with_its_own_key_passphrase(nodes: tuple[Running, Running]) -> None:
    polri, _ = nodes
    files = polri.client_files
    with ExchangeClient(
        polri.node.url,
        ca_file=polri.node.ca,
        cert_file=files.cert,
        key_file=files.key,
        key_password=CLIENT_PASSPHRASE,
    ) as api:
        assert api.health()["status"] == "ok"


def test_one_caller_holding_requests_open_gets_503_and_others_are_still_served(
    nodes: tuple[Running, Running], auditor: ClientFiles
) -> None:
    """A local system that opens requests and never sends their bodies holds at most
    ``max_requests_in_progress_per_caller`` of the process's slots: its next request is 503 problem
    JSON with Retry-After, before any body is read; another system is served meanwhile, and the
    slots are freed when the connections go."""
    import socket
    import time

    polri, _ = nodes
    per_caller = load_settings(polri.node.path).max_requests_in_progress_per_caller
    ctx = _tls(polri.node.ca, polri.client_files.cert, polri.client_files.key, CLIENT_PASSPHRASE)
    host, port = polri.node.url.removeprefix("https://").split(":")
    held = []
    try:
        for _ in range(per_caller):
            conn = ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
            conn.sendall(
                b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 100\r\n\r\n"  # and no body: the request stays in progress
            )
            held.append(conn)
        with polri.client() as api:
            deadline = time.monotonic() + 10
            while (r := api.request("GET", "/v1/inbox")).status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.05)  # (until the server has read every held request's head)
            problem = _problem(r, 503)
            assert f"(at most {per_caller})" in str(problem["detail"])
            assert r.headers["retry-after"] == str(
                load_settings(polri.node.path).unavailable_retry_after_seconds
            )
        with polri.client(auditor) as other:
            assert other.request("GET", "/v1/audit/entries").status_code == 200
    finally:
        for conn in held:
            conn.close()
    with polri.client() as api:
        deadline = time.monotonic() + 10
        while (r := api.request("GET", "/v1/inbox")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200
    _no_traceback(polri)


def test_a_request_a_browser_sends_for_another_site_s_page_is_refused(
    nodes: tuple[Running, Running], auditor: ClientFiles
) -> None:
    """The browser presents an auditor's client certificate to any page's request: a page of
    another site could make it start whole-ledger verifications, exports or a revocation. The node
    refuses what a browser marks cross-site or sends from another origin, before any work; its
    own console's requests, and a navigation to it, go through."""
    polri, _ = nodes
    host = polri.node.url.removeprefix("https://")
    with polri.client(auditor) as api:
        for headers in (
            {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"},
            {"sec-fetch-site": "same-site", "sec-fetch-mode": "cors"},
            {"origin": "https://evil.example"},
            {"origin": "null"},
        ):
            problem = _problem(api.request("POST", "/v1/audit/verify", headers=headers), 403)
            assert str(problem["type"]).endswith("/cross-site"), headers
        own = {"sec-fetch-site": "same-origin", "sec-fetch-mode": "cors", "origin": f"https://{host}"}
        assert api.request("POST", "/v1/audit/verify", headers=own).status_code == 200
        navigation = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
        assert api.request("GET", "/audit", headers=navigation).status_code == 200  # a link to the console
        # a link, a window or a frame another site opens on work or a ledgered read: refused
        _problem(api.request("GET", "/v1/audit/export", params={"from": 0}, headers=navigation), 403)
