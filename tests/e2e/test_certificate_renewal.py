"""Certificates replaced under two running nodes (``exchange serve``, mutual TLS), without a restart:
the server certificate, the node-to-node certificate with deliveries before and after, a local
system's certificate with its overlap, and ``/healthz`` warning of a certificate about to expire."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange import crypto
from exchange.client import ExchangeClient
from tests.e2e.harness import Running, start_nodes
from tests.support import CLIENT_PASSPHRASE, cli, register_client, response_to, rfi

pytestmark = pytest.mark.e2e

RELOAD_SECONDS = 0.3


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running]]:
    yield from start_nodes(tmp_path_factory, {"tls_reload_seconds": RELOAD_SECONDS})


def served_fingerprint(run: Running, server_hostname: str) -> str:
    """The SHA-256 of the certificate the node presents on a new mutual-TLS connection."""
    ctx = ssl.create_default_context(cafile=str(run.node.ca))
    files = run.client_files
    ctx.load_cert_chain(str(files.cert), str(files.key), password=CLIENT_PASSPHRASE)
    with (
        socket.create_connection(("127.0.0.1", run.node.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _request_without_a_client_certificate(run: Running) -> None:
    """Raises: the server refuses a connection that presents no client certificate."""
    bare = ssl.create_default_context(cafile=str(run.node.ca))
    with (
        socket.create_connection(("127.0.0.1", run.node.port), timeout=10) as raw,
        bare.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if not tls.recv(1024):
            raise ConnectionError("closed without an answer")


def eventually(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_renewed_server_certificate_is_served_on_new_connections_without_a_restart(
    nodes: tuple[Running, Running],
) -> None:
    polri, _ = nodes
    assert polri.process.process is not None
    pid = polri.process.process.pid
    server_pem = polri.node.path / "tls" / "server.pem"
    old = crypto.certificate_info(server_pem.read_bytes()).fingerprint
    with polri.client() as api:  # a keep-alive connection opened before the renewal
        assert api.health()["status"] == "ok"
        for hostname in ("localhost", "127.0.0.1"):  # with SNI, and without (an IP sends none)
            assert served_fingerprint(polri, hostname) == old
        cli("pki", "renew", "--dir", str(polri.node.path), "--server")
        new = crypto.certificate_info(server_pem.read_bytes()).fingerprint
        assert new != old
        eventually(lambda: served_fingerprint(polri, "localhost") == new)
        assert served_fingerprint(polri, "127.0.0.1") == new
        assert api.health()["status"] == "ok"  # the connection made before keeps working
        # the rebuilt context still demands a client certificate from the node's trusted CAs
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _request_without_a_client_certificate(polri)
    with polri.client() as api:  # and a new client trusts the renewed certificate through the CA
        assert api.health()["party"] == "ID"
    assert polri.process.process.pid == pid
    assert polri.process.process.poll() is None


def test_the_partner_link_keeps_working_across_node_certificate_renewals(
    nodes: tuple[Running, Running],
) -> None:
    polri, pdrm = nodes
    with polri.client() as id_api, pdrm.client() as my_api:
        before = id_api.submit(rfi(payload={"summary": "before renewal", "questions": ["?"]}))
        id_api.wait_for_status(before["id"], "delivered", 30)
        for run in (polri, pdrm):
            node_pem = run.node.path / "tls" / "node.pem"
            pin = crypto.public_key_sha256(node_pem.read_bytes())
            cli("pki", "renew", "--dir", str(run.node.path), "--node")
            assert crypto.public_key_sha256(node_pem.read_bytes()) == pin
        time.sleep(RELOAD_SECONDS * 2)
        after = id_api.submit(rfi(payload={"summary": "after renewal", "questions": ["?"]}))
        id_api.wait_for_status(after["id"], "delivered", 30)
        reply = my_api.submit(response_to(after["id"]))
        my_api.wait_for_status(reply["id"], "delivered", 30)
    for run in (polri, pdrm):  # each node opened its partner link anew with its renewed certificate
        log = (run.node.path / "node.log").read_text()
        assert "reloaded the node-to-node certificate" in log
        assert "do not load" not in log


def _client(run: Running, cert: Path, key: Path, password: str) -> ExchangeClient:
    return ExchangeClient(
        run.node.url, ca_file=run.node.ca, cert_file=cert, key_file=key, key_password=password
    )


def test_a_renewed_client_certificate_works_and_the_old_one_only_for_the_overlap(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    polri, _ = nodes
    d = str(polri.node.path)
    first = register_client(polri.node, "cms-rotating", "RAHASIA")
    key_pem, csr_pem = crypto.make_csr("cms-rotating", "the-client-keeps-this-key")
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cms.csr").write_bytes(csr_pem)
    cli(
        "clients",
        "renew",
        "--dir",
        d,
        "--id",
        "cms-rotating",
        "--csr",
        str(tmp_path / "cms.csr"),
        "--out",
        str(tmp_path / "cms.pem"),
    )
    old = _client(polri, first.cert, first.key, CLIENT_PASSPHRASE)
    new = _client(polri, tmp_path / "cms.pem", tmp_path / "key.pem", "the-client-keeps-this-key")
    with old, new:
        assert new.request("GET", "/v1/inbox").status_code == 200
        assert old.request("GET", "/v1/inbox").status_code == 200  # within the overlap
        # renewed again with no overlap (a compromised key): the previous certificate is refused at
        # once, even on a connection already open, with problem JSON
        cli("pki", "issue-client", "--dir", d, "--name", "cms-rotating", "--out", str(tmp_path / "third"))
        third = tmp_path / "third" / "cms-rotating.pem"
        cli(
            "clients",
            "renew",
            "--dir",
            d,
            "--id",
            "cms-rotating",
            "--cert",
            str(third),
            "--overlap-hours",
            "0",
        )
        refused = new.request("GET", "/v1/inbox")
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert old.request("GET", "/v1/inbox").status_code == 403
    with _client(polri, third, tmp_path / "third" / "cms-rotating-key.pem", CLIENT_PASSPHRASE) as api:
        assert api.request("GET", "/v1/inbox").status_code == 200


def test_healthz_warns_of_a_certificate_about_to_expire(nodes: tuple[Running, Running]) -> None:
    _, pdrm = nodes
    d = str(pdrm.node.path)
    with pdrm.client() as api:
        health = api.health()
        assert health["status"] == "ok"
        names = {c["name"]: c for c in health["certificates"]}
        assert set(names) == {"ca.pem", "server.pem", "node.pem", "partner-ca.pem"}
        assert names["partner-ca.pem"]["owner"] == "ID"
        assert names["server.pem"]["owner"] == "MY"
        assert not any(c["expiring"] for c in health["certificates"])
        cli("pki", "renew", "--dir", d, "--server", "--days", "5")
        health = api.health()
        assert health["status"] == "warning"
        (short,) = [c for c in health["certificates"] if c["expiring"]]
        assert short["name"] == "server.pem"
        assert short["days_left"] == 4
        assert short["not_after"].startswith(
            crypto.certificate_info((pdrm.node.path / "tls" / "server.pem").read_bytes())
            .not_after.date()
            .isoformat()
        )
        cli("pki", "renew", "--dir", d, "--server")
        assert api.health()["status"] == "ok"
