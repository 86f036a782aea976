"""TLS material of a node: where the files are, and the development PKI that creates them.

An operator can bring their own CA and certificates instead: put them at the paths of
:class:`TLSFiles` (keys encrypted with the node passphrase) and the CA certificate in the party
fragment of the agreement.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exchange import crypto
from exchange.errors import ConfigurationError, InvalidInput, KeyManagementError
from exchange.files import private_dir, write_private
from exchange.types import PartyId

AGENCIES: dict[str, str] = {"ID": "Kepolisian Negara Republik Indonesia", "MY": "Polis Diraja Malaysia"}


def node_name(party: PartyId) -> str:
    """The common name of a party's node-to-node certificate."""
    return f"{party}-node"


@dataclass(frozen=True)
class TLSFiles:
    """The TLS files of a node directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def node_cert(self) -> Path:
        return self.root / "node.pem"

    @property
    def node_key(self) -> Path:
        return self.root / "node-key.pem"

    @property
    def trust_bundle(self) -> Path:
        return self.root / "trust-bundle.pem"

    @property
    def partner_ca(self) -> Path:
        return self.root / "partner-ca.pem"

    def check(self, passphrase: str) -> None:
        """Raise ConfigurationError naming any missing TLS file or a key that does not match."""
        missing = [
            p.name
            for p in (self.ca_cert, self.server_cert, self.server_key, self.node_cert, self.node_key)
            if not p.is_file()
        ]
        if missing:
            raise ConfigurationError(f"missing TLS files in {self.root}: {', '.join(missing)}")
        crypto.check_private_key_matches(
            self.server_key.read_bytes(), passphrase, self.server_cert.read_bytes()
        )
        crypto.check_private_key_matches(self.node_key.read_bytes(), passphrase, self.node_cert.read_bytes())

    def write(self, name: str, issued: crypto.IssuedCertificate, *, exclusive: bool = False) -> None:
        """Write a certificate and its (encrypted) key, both owner-only; ``exclusive``: never over an
        existing file (FileExistsError, nothing written over)."""
        write_private(self.root / f"{name}.pem", issued.cert_pem, exclusive=exclusive)
        write_private(self.root / f"{name}-key.pem", issued.key_pem, exclusive=exclusive)


def create_dev_pki(
    tls: TLSFiles, party: PartyId, passphrase: str, *, hostnames: tuple[str, ...], ips: tuple[str, ...]
) -> None:
    """A development CA for ``party`` with the node's server and node-to-node certificates."""
    private_dir(tls.root)
    org = AGENCIES[party]
    ca = crypto.make_ca(f"{party} exchange development CA", org, passphrase)
    tls.write("ca", ca)
    tls.write(
        "server",
        crypto.issue_certificate(
            ca,
            passphrase,
            kind="server",
            common_name=f"{party}-server",
            organisation=org,
            passphrase=passphrase,
            dns_names=hostnames,
            ip_addresses=ips,
        ),
    )
    tls.write(
        "node",
        crypto.issue_certificate(
            ca,
            passphrase,
            kind="node",
            common_name=node_name(party),
            organisation=org,
            passphrase=passphrase,
            dns_names=hostnames,
            ip_addresses=ips,
        ),
    )


def _development_ca(tls: TLSFiles) -> crypto.IssuedCertificate:
    if not tls.ca_key.is_file():
        raise ConfigurationError(
            f"no development CA key at {tls.ca_key}: issue client certificates with your CA"
        )
    return crypto.IssuedCertificate(tls.ca_cert.read_bytes(), tls.ca_key.read_bytes())


def issue_client(
    tls: TLSFiles, ca_passphrase: str, client_passphrase: str, name: str, out_dir: Path, party: PartyId
) -> tuple[Path, Path]:
    """Issue a local-client certificate and key from the node's development CA into ``out_dir``.

    The client's key is encrypted with the client's own passphrase, never the node's; a real
    national system makes its own key and sends a CSR (:func:`sign_client_request`).

    Raises:
        ConfigurationError: the node has no development CA key, or a file of that name is in
            ``out_dir`` already (never overwritten: it could be the CA's own key).
    """
    paths = (out_dir / f"{name}.pem", out_dir / f"{name}-key.pem")
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigurationError(f"{path} exists: not overwriting it (choose another --name or --out)")
    issued = crypto.issue_certificate(
        _development_ca(tls),
        ca_passphrase,
        kind="client",
        common_name=name,
        organisation=AGENCIES[party],
        passphrase=client_passphrase,
    )
    private_dir(out_dir)
    try:
        TLSFiles(out_dir).write(name, issued, exclusive=True)
    except FileExistsError as exc:  # (made meanwhile by another process)
        raise ConfigurationError(f"{exc.filename} exists: not overwriting it") from exc
    return paths


def sign_client_request(
    tls: TLSFiles, ca_passphrase: str, csr_pem: bytes, party: PartyId, expected_name: str
) -> bytes:
    """Sign a local system's certificate signing request with the node's development CA.

    Raises:
        ConfigurationError: the node has no development CA key.
        InvalidInput: the CSR is unusable or its common name is not ``expected_name``.
    """
    ca = _development_ca(tls)
    try:
        common_name, cert = crypto.sign_client_csr(ca, ca_passphrase, csr_pem, organisation=AGENCIES[party])
    except KeyManagementError as exc:
        if "CA key" in str(exc):
            raise
        raise InvalidInput(f"--csr: {exc}") from exc
    if common_name != expected_name:
        raise InvalidInput(f"--csr names {common_name!r} but --id is {expected_name!r}: they must agree")
    return cert


@dataclass(frozen=True)
class Renewal:
    """A certificate replaced on disk: the one before and the one after (public data only)."""

    which: str  # "server" or "node"
    previous: crypto.CertificateInfo
    current: crypto.CertificateInfo


def renew_certificate(
    tls: TLSFiles,
    which: Literal["server", "node"],
    passphrase: str,
    *,
    days: int | None = None,
    cert_pem: bytes | None = None,
    now: dt.datetime,
) -> Renewal:
    """Replace the node's server or node-to-node certificate for the key it already holds.

    With ``days``, the node's development CA re-certifies the key (same names, same purpose); with
    ``cert_pem``, a certificate issued elsewhere is installed after the checks below. Either way the
    public key, so the node's pin (``node_key_sha256``), does not change: a new node key is announced
    to the partner through key sets, never here. The certificate file is written atomically, so the
    running node picks it up whole (``exchange.tls_reload``).

    Raises:
        ConfigurationError: a file is missing, or (with ``days``) the node has no development CA key.
        InvalidInput: the certificate is not for this node's key, not issued by this node's CA, of
            another purpose or name than the one it replaces, or not valid at ``now``.
        KeyManagementError: the key does not decrypt or does not match the current certificate.
    """
    cert_path, key_path = (
        (tls.server_cert, tls.server_key) if which == "server" else (tls.node_cert, tls.node_key)
    )
    for path in (cert_path, key_path, tls.ca_cert):
        if not path.is_file():
            raise ConfigurationError(f"missing TLS file {path}: nothing to renew")
    old_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    crypto.check_private_key_matches(key_pem, passphrase, old_pem)
    previous = crypto.certificate_info(old_pem)
    if cert_pem is None:
        new_pem = crypto.recertify(_development_ca(tls), passphrase, old_pem, days=days or 825)
    else:
        new_pem = cert_pem
        try:
            crypto.check_private_key_matches(key_pem, passphrase, new_pem)
        except KeyManagementError as exc:
            raise InvalidInput(f"--cert is not for this node's {which} key: {exc}") from exc
    current = crypto.certificate_info(new_pem)
    problems = []
    if not crypto.is_issued_by(new_pem, tls.ca_cert.read_bytes()):
        problems.append(f"is not issued by this node's CA ({tls.ca_cert})")
    if crypto.certificate_kind(new_pem) != which:
        problems.append(f"is not a {which} certificate (extended key usage)")
    if current.common_name != previous.common_name:
        problems.append(f"names {current.common_name!r}, not {previous.common_name!r}")
    if current.not_after <= now:
        problems.append(f"expired at {current.not_after.isoformat()}")
    if problems:
        raise InvalidInput(f"--cert {'; '.join(problems)}")
    write_private(cert_path, new_pem)
    return Renewal(which, previous, current)


NODE_NEXT = "node-next"  # a staged node key and certificate: tls/node-next.pem, tls/node-next-key.pem


def stage_node_key(tls: TLSFiles, passphrase: str, *, days: int = 825) -> str:
    """Make a new key for the node-to-node certificate and a certificate for it from the node's
    development CA (same names and purpose), kept beside the current pair until
    :func:`promote_node_key`. Returns the new key's pin.

    Raises:
        ConfigurationError: no node certificate, or no development CA key.
    """
    if not tls.node_cert.is_file():
        raise ConfigurationError(f"missing TLS file {tls.node_cert}")
    issued = crypto.reissue_with_new_key(
        _development_ca(tls), passphrase, tls.node_cert.read_bytes(), passphrase=passphrase, days=days
    )
    tls.write(NODE_NEXT, issued)
    return crypto.public_key_sha256(issued.cert_pem)


def promote_node_key(tls: TLSFiles, pin: str) -> None:
    """Put the staged node key and certificate with ``pin`` in place (the key first: a running node
    keeps its current pair until both load together).

    Raises:
        ConfigurationError: no staged pair with that pin.
    """
    cert, key = tls.root / f"{NODE_NEXT}.pem", tls.root / f"{NODE_NEXT}-key.pem"
    if not (cert.is_file() and key.is_file()) or crypto.public_key_sha256(cert.read_bytes()) != pin:
        raise ConfigurationError(f"no staged node key with pin {pin[:16]}… in {tls.root}")
    os.replace(key, tls.node_key)
    os.replace(cert, tls.node_cert)
