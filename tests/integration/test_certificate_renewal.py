"""Replacing certificates from the CLI: `pki renew` keeps the node's key and pin, `clients renew`
keeps the registration and accepts the previous certificate for the overlap only; each is ledgered,
`keys list` shows local systems' certificates, and every refusal is one line."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from exchange import crypto
from exchange.api.server import check_node_identity
from exchange.config import load_settings
from exchange.db import repo
from exchange.ledger import LedgerEntry
from exchange.ledger.events import LedgerEvent
from exchange.node import Node
from exchange.pki import TLSFiles
from tests.integration.test_cli import one_line_error
from tests.integration.test_cli_input import run
from tests.support import PASSPHRASE, NodeDir, cli, make_pair, register_client


@pytest.fixture
def pair(tmp_path: Path) -> tuple[NodeDir, NodeDir]:
    return make_pair(tmp_path)


@pytest.fixture
def any_db_pair(tmp_path: Path, db_urls: tuple[str | None, str | None]) -> tuple[NodeDir, NodeDir]:
    """A pair on SQLite, then on PostgreSQL (migration 0012 and the overlap query on both)."""
    return make_pair(tmp_path, db_urls)


def _entries(node_dir: NodeDir, event: str) -> list[LedgerEntry]:
    node = Node(load_settings(node_dir.path))
    try:
        with node.db.read() as conn:
            return [e for e in repo.iter_ledger(conn) if e.event == event]
    finally:
        node.close()


def _server_certificate_for_key_of(tls: TLSFiles, cert: Path) -> bytes:
    """A certificate from the node's CA for the key of ``cert``, but with the server purpose only."""
    ca_cert = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=PASSPHRASE.encode())
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    now = dt.datetime.now(dt.UTC)
    built = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca_cert.subject)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return built.public_bytes(serialization.Encoding.PEM)


def test_pki_renew_recertifies_the_same_key_keeps_the_pin_and_is_ledgered(
    pair: tuple[NodeDir, NodeDir],
) -> None:
    id_dir, _ = pair
    tls = TLSFiles(id_dir.path / "tls")
    for option, cert, key in (
        ("--node", tls.node_cert, tls.node_key),
        ("--server", tls.server_cert, tls.server_key),
    ):
        before = crypto.certificate_info(cert.read_bytes())
        key_before = key.read_bytes()
        out = cli("pki", "renew", "--dir", str(id_dir.path), option, "--days", "400")
        after = crypto.certificate_info(cert.read_bytes())
        assert after.fingerprint != before.fingerprint
        assert after.public_key_sha256 == before.public_key_sha256  # the same key: the pin holds
        assert (after.common_name, after.purposes) == (before.common_name, before.purposes)
        assert key.read_bytes() == key_before
        assert crypto.is_issued_by(cert.read_bytes(), tls.ca_cert.read_bytes())
        left = after.not_after - dt.datetime.now(dt.UTC)
        assert dt.timedelta(days=399) < left <= dt.timedelta(days=400)
        assert "unchanged" in out
        assert cert.stat().st_mode & 0o777 == 0o600
    sans = x509.load_pem_x509_certificate(tls.server_cert.read_bytes()).extensions
    names = sans.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)  # the names survive renewal
    node = Node(load_settings(id_dir.path))
    try:
        check_node_identity(node, tls)  # the node still starts: the agreement's pin still matches
    finally:
        node.close()
    entries = _entries(id_dir, LedgerEvent.TLS_CERTIFICATE_RENEWED)
    assert [e.data["certificate"] for e in entries] == ["node", "server"]
    assert entries[0].data["key_sha256"] == crypto.public_key_sha256(tls.node_cert.read_bytes())
    assert "PRIVATE" not in json.dumps([dict(e.data) for e in entries])
    assert run("audit", "verify", "--dir", str(id_dir.path)).returncode == 0


def test_pki_renew_installs_a_certificate_of_the_operators_ca_for_the_same_key(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, _ = pair
    tls = TLSFiles(id_dir.path / "tls")
    ca = crypto.IssuedCertificate(tls.ca_cert.read_bytes(), tls.ca_key.read_bytes())
    renewed = tmp_path / "node-renewed.pem"
    renewed.write_bytes(crypto.recertify(ca, PASSPHRASE, tls.node_cert.read_bytes(), days=90))
    cli("pki", "renew", "--dir", str(id_dir.path), "--node", "--cert", str(renewed))
    assert tls.node_cert.read_bytes() == renewed.read_bytes()


def test_pki_renew_refuses_bad_input_in_one_line(pair: tuple[NodeDir, NodeDir], tmp_path: Path) -> None:
    id_dir, my_dir = pair
    d = str(id_dir.path)
    tls = TLSFiles(id_dir.path / "tls")
    before = tls.node_cert.read_bytes()
    one_line_error(run("pki", "renew", "--dir", d), 2, "--server or --node")
    one_line_error(run("pki", "renew", "--dir", d, "--server", "--node"), 2, "--server or --node")
    one_line_error(run("pki", "renew", "--dir", d, "--node", "--days", "0"), 2, "--days")
    one_line_error(
        run("pki", "renew", "--dir", d, "--node", "--days", "5", "--cert", str(tls.node_cert)), 2, "--days"
    )
    # the partner's node certificate, and our own server certificate: not this node's node key
    for other in (my_dir.path / "tls" / "node.pem", tls.server_cert):
        one_line_error(run("pki", "renew", "--dir", d, "--node", "--cert", str(other)), 2, "--cert", "key")
    # the right key, but a certificate with the server purpose only where the node certificate goes
    wrong_purpose = tmp_path / "wrong-purpose.pem"
    wrong_purpose.write_bytes(_server_certificate_for_key_of(tls, tls.node_cert))
    one_line_error(
        run("pki", "renew", "--dir", d, "--node", "--cert", str(wrong_purpose)), 2, "--cert", "node"
    )
    # the right key and purpose from another CA: the partner's CA re-certifying our key
    my_tls = TLSFiles(my_dir.path / "tls")
    other_ca = crypto.IssuedCertificate(my_tls.ca_cert.read_bytes(), my_tls.ca_key.read_bytes())
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(crypto.recertify(other_ca, PASSPHRASE, tls.node_cert.read_bytes()))
    one_line_error(
        run("pki", "renew", "--dir", d, "--node", "--cert", str(foreign)), 2, "--cert", "not issued"
    )
    one_line_error(
        run("pki", "renew", "--dir", d, "--node", "--cert", str(tmp_path / "none.pem")), 2, "--cert"
    )
    one_line_error(
        run("pki", "renew", "--dir", d, "--node", passphrase="another-passphrase-2026"), 2, "passphrase"
    )
    assert tls.node_cert.read_bytes() == before  # nothing was written
    assert _entries(id_dir, LedgerEvent.TLS_CERTIFICATE_RENEWED) == []


def _actor(node_dir: NodeDir, pem: bytes, at: dt.datetime) -> str | None:
    node = Node(load_settings(node_dir.path))
    try:
        with node.db.read() as conn:
            row = repo.client_by_fingerprint(conn, crypto.certificate_info(pem).fingerprint, at)
    finally:
        node.close()
    return None if row is None else str(row["id"])


def test_clients_renew_replaces_the_certificate_with_an_overlap_then_cuts_the_old_one_off(
    any_db_pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, _ = any_db_pair
    d = str(id_dir.path)
    first = register_client(id_dir, "cms-renew", "RAHASIA").cert.read_bytes()
    key_pem, csr_pem = crypto.make_csr("cms-renew", "the-client-keeps-this-key")
    (tmp_path / "cms.csr").write_bytes(csr_pem)
    out = tmp_path / "cms-2.pem"
    said = cli(
        "clients",
        "renew",
        "--dir",
        d,
        "--id",
        "cms-renew",
        "--csr",
        str(tmp_path / "cms.csr"),
        "--out",
        str(out),
    )
    assert "accepted until" in said
    second = out.read_bytes()
    crypto.check_private_key_matches(key_pem, "the-client-keeps-this-key", second)
    now = dt.datetime.now(dt.UTC)
    # the new certificate is the client's; the old one too, for the default overlap of 24 hours only
    assert _actor(id_dir, second, now) == "cms-renew"
    assert _actor(id_dir, first, now) == "cms-renew"
    assert _actor(id_dir, first, now + dt.timedelta(hours=23, minutes=59)) == "cms-renew"
    assert _actor(id_dir, first, now + dt.timedelta(hours=24, minutes=1)) is None
    # a compromised key: --overlap-hours 0 cuts the previous certificate off at once
    cli("pki", "issue-client", "--dir", d, "--name", "cms-renew", "--out", str(tmp_path / "third"))
    third = (tmp_path / "third" / "cms-renew.pem").read_bytes()
    said = cli(
        "clients",
        "renew",
        "--dir",
        d,
        "--id",
        "cms-renew",
        "--cert",
        str(tmp_path / "third" / "cms-renew.pem"),
        "--overlap-hours",
        "0",
    )
    assert "cut off now" in said
    later = dt.datetime.now(dt.UTC)
    assert _actor(id_dir, third, later) == "cms-renew"
    assert _actor(id_dir, second, later) is None
    assert _actor(id_dir, first, later) is None  # one previous certificate at most
    entries = _entries(id_dir, LedgerEvent.CLIENT_CERTIFICATE_RENEWED)
    assert [e.data["client"] for e in entries] == ["cms-renew", "cms-renew"]
    assert entries[0].data["previous_fingerprint"] == crypto.certificate_info(first).fingerprint
    listed = cli("keys", "list", "--dir", d)
    (line,) = [x for x in listed.splitlines() if "client certificate\tcms-renew\tcertificate" in x]
    assert crypto.certificate_info(third).not_after.date().isoformat() in line
    assert run("audit", "verify", "--dir", d).returncode == 0


def test_clients_renew_refuses_bad_input_in_one_line(pair: tuple[NodeDir, NodeDir], tmp_path: Path) -> None:
    id_dir, my_dir = pair
    d = str(id_dir.path)
    files = register_client(id_dir, "cms-r", "RAHASIA")
    one_line_error(run("clients", "renew", "--dir", d, "--id", "cms-r"), 2, "--cert FILE or --csr FILE")
    one_line_error(
        run("clients", "renew", "--dir", d, "--id", "nobody", "--cert", str(files.cert)), 2, "nobody"
    )
    # the certificate it already has; the polri-cms client's; the partner's client; the node's own
    one_line_error(
        run("clients", "renew", "--dir", d, "--id", "cms-r", "--cert", str(files.cert)), 2, "already"
    )
    other = id_dir.client("polri-cms").cert
    one_line_error(run("clients", "renew", "--dir", d, "--id", "cms-r", "--cert", str(other)), 2, "polri-cms")
    partner = my_dir.client("pdrm-d7").cert
    one_line_error(
        run("clients", "renew", "--dir", d, "--id", "cms-r", "--cert", str(partner)), 2, "not issued"
    )
    server = id_dir.path / "tls" / "server.pem"
    one_line_error(run("clients", "renew", "--dir", d, "--id", "cms-r", "--cert", str(server)), 2, "--cert")
    one_line_error(
        run(
            "clients",
            "renew",
            "--dir",
            d,
            "--id",
            "cms-r",
            "--cert",
            str(files.cert),
            "--overlap-hours",
            "-1",
        ),
        2,
        "--overlap-hours",
    )
    _, csr_pem = crypto.make_csr("someone-else", "the-client-keeps-this-key")
    (tmp_path / "else.csr").write_bytes(csr_pem)
    one_line_error(
        run(
            "clients",
            "renew",
            "--dir",
            d,
            "--id",
            "cms-r",
            "--csr",
            str(tmp_path / "else.csr"),
            "--out",
            str(tmp_path / "x.pem"),
        ),
        2,
        "--csr",
    )
    assert not (tmp_path / "x.pem").exists()
    assert _entries(id_dir, LedgerEvent.CLIENT_CERTIFICATE_RENEWED) == []


def test_keys_list_flags_a_client_certificate_about_to_expire(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, _ = pair
    tls = TLSFiles(id_dir.path / "tls")
    ca = crypto.IssuedCertificate(tls.ca_cert.read_bytes(), tls.ca_key.read_bytes())
    short = crypto.issue_certificate(
        ca,
        PASSPHRASE,
        kind="client",
        common_name="cms-short",
        organisation="Polri",
        passphrase="x" * 16,
        days=3,
    )
    (tmp_path / "short.pem").write_bytes(short.cert_pem)
    cli(
        "clients",
        "add",
        "--dir",
        str(id_dir.path),
        "--id",
        "cms-short",
        "--cert",
        str(tmp_path / "short.pem"),
        "--agency",
        "Polri",
        "--unit",
        "TPPO",
        "--clearance",
        "RAHASIA",
        "--type",
        "ALL",
        "--purpose",
        "ALL",
    )
    proc = run("keys", "list", "--dir", str(id_dir.path))
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if "\tcms-short\t" in x]
    assert line.endswith("EXPIRES SOON")
    assert "expire within 30 days" in proc.stderr
