"""TLS material of a node: where the files are, and the development PKI that creates them.

An operator can bring their own CA and certificates instead: put them at the paths of
:class:`TLSFiles` (keys encrypted with the node passphrase) and the CA certificate in the party
fragment of the agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def write(self, name: str, issued: crypto.IssuedCertificate) -> None:
        """Write a certificate and its (encrypted) key, both owner-only."""
        write_private(self.root / f"{name}.pem", issued.cert_pem)
        write_private(self.root / f"{name}-key.pem", issued.key_pem)


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
        ConfigurationError: the node has no development CA key.
    """
    issued = crypto.issue_certificate(
        _development_ca(tls),
        ca_passphrase,
        kind="client",
        common_name=name,
        organisation=AGENCIES[party],
        passphrase=client_passphrase,
    )
    private_dir(out_dir)
    TLSFiles(out_dir).write(name, issued)
    return out_dir / f"{name}.pem", out_dir / f"{name}-key.pem"


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
