"""The only module that touches cryptographic primitives directly.

Everything else calls these recipes: key generation, passphrase-encrypted PEM files, JWK export,
certificate authorities and certificates for the development PKI, certificate inspection. JOSE
composition (sign, encrypt) is left to joserfc in ``exchange.envelope``.

Invariants: private keys leave this module only as joserfc keys or as PEM encrypted with
BestAvailableEncryption; TLS keys are ECDSA P-256 (every TLS stack and browser accepts them);
message keys are Ed25519 (signing) and X25519 (key agreement).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from joserfc.jwk import OKPKey

from exchange.errors import KeyManagementError

CertificatePublicKey = CertificatePublicKeyTypes
MessageKeyUse = Literal["sig", "enc", "ckpt"]  # ckpt: the ledger checkpoint key (Ed25519)
CertificateKind = Literal["ca", "server", "node", "client"]

#: Extended key usage of a node-to-node certificate (a UUID OID, ITU-T X.667). Only a certificate
#: carrying it, from the partner's CA, with the pinned public key, may call the peer endpoints; a
#: certificate carrying it is never accepted as a local system.
NODE_PURPOSE_OID = "2.25.92780284677140434684010823525272571159"
#: Extended key usage of a local-system certificate issued by a node's CA.
CLIENT_PURPOSE_OID = "2.25.92780284677140434684010823525272571160"
SERVER_AUTH_OID = ExtendedKeyUsageOID.SERVER_AUTH.dotted_string
CLIENT_AUTH_OID = ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string


def new_message_key(use: MessageKeyUse) -> bytes:
    """A fresh private key as unencrypted PKCS#8 PEM (X25519 for enc, Ed25519 otherwise)."""
    key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey = (
        x25519.X25519PrivateKey.generate() if use == "enc" else ed25519.Ed25519PrivateKey.generate()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def encrypt_private_pem(pem: bytes, passphrase: str) -> bytes:
    """Re-encode a private key PEM encrypted under ``passphrase``."""
    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )


def decrypt_private_pem(pem: bytes, passphrase: str) -> bytes:
    """Decrypt a passphrase-protected private key PEM to unencrypted PKCS#8 PEM (in memory only).

    Raises:
        KeyManagementError: wrong passphrase or not a private key.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase.encode())
    except (ValueError, TypeError) as exc:
        raise KeyManagementError("cannot decrypt private key: wrong passphrase or damaged file") from exc
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_jwk(pem: bytes, kid: str) -> OKPKey:
    """An OKP JWK (private) with ``kid`` from an unencrypted PKCS#8 PEM."""
    return OKPKey.import_key(pem, parameters={"kid": kid})


def message_key_id(party: str, use: MessageKeyUse, pem: bytes) -> str:
    """A key id ``<party>-<use>-<thumbprint prefix>``: stable, unique, says whose key it is."""
    return f"{party}-{use}-{OKPKey.import_key(pem).thumbprint()[:16]}"


def public_jwk_dict(key: OKPKey) -> dict[str, str]:
    """The public half of an OKP key as a JWK dict, with its ``kid``."""
    data = key.as_dict(private=False)
    return {k: str(v) for k, v in data.items()}


def public_only(key: OKPKey) -> OKPKey:
    """The public half of an OKP key, keeping its ``kid``."""
    return OKPKey.import_key(key.as_dict(private=False))


def ed25519_raw_public(key: OKPKey) -> bytes:
    """The 32-byte raw public key of an Ed25519 OKP key."""
    public = key.public_key
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise KeyManagementError("not an Ed25519 key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_public_key(raw: bytes) -> OKPKey:
    """An Ed25519 OKP public key from its 32 raw bytes. Raises KeyManagementError otherwise."""
    if len(raw) != 32:
        raise KeyManagementError("an Ed25519 public key is 32 bytes")
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": x})


def ed25519_sign(key: OKPKey, message: bytes) -> bytes:
    """A raw Ed25519 signature (64 bytes) by a private OKP key."""
    private = key.private_key
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise KeyManagementError("not a private Ed25519 key")
    return private.sign(message)


def ed25519_verify(key: OKPKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``key``."""
    public = key.public_key
    if not isinstance(public, ed25519.Ed25519PublicKey):
        return False
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two digests without leaking where they differ."""
    a_b = a.encode() if isinstance(a, str) else a
    b_b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_b, b_b)


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key (PEM, the key encrypted under the given passphrase)."""

    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _encrypted(key: ec.EllipticCurvePrivateKey, passphrase: str) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )


def make_ca(common_name: str, organisation: str, passphrase: str, *, days: int = 3650) -> IssuedCertificate:
    """A self-signed certificate authority (ECDSA P-256) for a development PKI."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name, organisation)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _encrypted(key, passphrase))


def issue_certificate(
    ca: IssuedCertificate,
    ca_passphrase: str,
    *,
    kind: Literal["server", "node", "client"],
    common_name: str,
    organisation: str,
    passphrase: str,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    days: int = 825,
) -> IssuedCertificate:
    """Issue a leaf certificate from ``ca``.

    ``server`` certificates carry serverAuth and the given SANs; ``node`` certificates (node to node)
    carry both serverAuth and clientAuth; ``client`` certificates carry clientAuth.

    Raises:
        KeyManagementError: the CA key cannot be decrypted.
    """
    ca_cert, ca_key = _load_ca(ca, ca_passphrase)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = _sign_leaf(
        ca_cert,
        ca_key,
        key.public_key(),
        kind=kind,
        common_name=common_name,
        organisation=organisation,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        days=days,
    )
    return IssuedCertificate(issued, _encrypted(key, passphrase))


def _load_ca(
    ca: IssuedCertificate, ca_passphrase: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    try:
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=ca_passphrase.encode())
    except (ValueError, TypeError) as exc:
        raise KeyManagementError("cannot decrypt the CA key: wrong passphrase") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyManagementError("the CA key is not an ECDSA key")
    return ca_cert, ca_key


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: CertificatePublicKey,
    *,
    kind: Literal["server", "node", "client"],
    common_name: str,
    organisation: str,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    days: int = 825,
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    usages = {
        "server": [ExtendedKeyUsageOID.SERVER_AUTH],
        "node": [
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            ObjectIdentifier(NODE_PURPOSE_OID),
        ],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH, ObjectIdentifier(CLIENT_PURPOSE_OID)],
    }[kind]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organisation))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def certificate_kind(cert_pem: bytes) -> Literal["server", "node", "client"]:
    """Which leaf kind a certificate is, by its extended key usage (the node purpose first).

    Raises:
        KeyManagementError: not a certificate, or a CA or a certificate of no known purpose.
    """
    info = certificate_info(cert_pem)
    if info.is_ca:
        raise KeyManagementError("a CA certificate is not a leaf")
    if NODE_PURPOSE_OID in info.purposes:
        return "node"
    if SERVER_AUTH_OID in info.purposes:
        return "server"
    if CLIENT_AUTH_OID in info.purposes:
        return "client"
    raise KeyManagementError("the certificate has no server, client or node purpose")


def _leaf_profile(cert_pem: bytes) -> dict[str, Any]:
    """What a leaf certificate is issued for, as the keyword arguments of :func:`_sign_leaf` and
    :func:`issue_certificate`: its kind, common name, organisation, DNS names and IP addresses.

    Raises:
        KeyManagementError: ``cert_pem`` is not a leaf certificate.
    """
    kind = certificate_kind(cert_pem)
    cert = _load_cert(cert_pem)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(sans.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    return {
        "kind": kind,
        "common_name": certificate_info(cert_pem).common_name,
        "organisation": str(orgs[0].value) if orgs else "",
        "dns_names": dns_names,
        "ip_addresses": ips,
    }


def recertify(ca: IssuedCertificate, ca_passphrase: str, cert_pem: bytes, *, days: int = 825) -> bytes:
    """A new certificate from ``ca`` for the public key, names and purpose of ``cert_pem``.

    The public key (so the pin, :func:`public_key_sha256`), the common name, the organisation, the
    DNS and IP subject alternative names and the kind are kept; the serial and the validity are new.

    Raises:
        KeyManagementError: ``cert_pem`` is not a leaf certificate, or the CA key cannot be decrypted.
    """
    profile = _leaf_profile(cert_pem)
    ca_cert, ca_key = _load_ca(ca, ca_passphrase)
    return _sign_leaf(ca_cert, ca_key, _load_cert(cert_pem).public_key(), **profile, days=days)


def reissue_with_new_key(
    ca: IssuedCertificate, ca_passphrase: str, cert_pem: bytes, *, passphrase: str, days: int = 825
) -> IssuedCertificate:
    """A new key (encrypted under ``passphrase``) and a certificate from ``ca`` for it, with the
    names and purpose of ``cert_pem``: what replaces a node certificate's key.

    Raises:
        KeyManagementError: ``cert_pem`` is not a leaf certificate, or the CA key cannot be decrypted.
    """
    return issue_certificate(ca, ca_passphrase, **_leaf_profile(cert_pem), passphrase=passphrase, days=days)


def sign_client_csr(
    ca: IssuedCertificate, ca_passphrase: str, csr_pem: bytes, *, organisation: str, days: int = 825
) -> tuple[str, bytes]:
    """Issue a local-system certificate for the key in a certificate signing request.

    The client keeps its private key; only the CSR's public key and common name are used (every
    other requested attribute or extension is ignored). Returns (common name, certificate PEM).

    Raises:
        KeyManagementError: the CSR is unparsable, not self-signed by its key, has no common name,
            or holds a key that is not ECDSA P-256/P-384, Ed25519 or RSA of at least 2048 bits.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise KeyManagementError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise KeyManagementError("the certificate signing request is not signed by its own key")
    public = csr.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise KeyManagementError("the CSR's RSA key is shorter than 2048 bits")
    elif isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in ("secp256r1", "secp384r1"):
            raise KeyManagementError(f"the CSR's curve {public.curve.name} is not P-256 or P-384")
    elif not isinstance(public, ed25519.Ed25519PublicKey):
        raise KeyManagementError("the CSR's key must be ECDSA P-256/P-384, Ed25519 or RSA")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise KeyManagementError("the certificate signing request has no common name")
    common_name = str(cns[0].value)
    ca_cert, ca_key = _load_ca(ca, ca_passphrase)
    cert = _sign_leaf(
        ca_cert, ca_key, public, kind="client", common_name=common_name, organisation=organisation, days=days
    )
    return common_name, cert


def make_csr(common_name: str, passphrase: str) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key (encrypted PEM under ``passphrase``) and a CSR for it, as a national
    system would make them with its own tools. Returns (key PEM, CSR PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return _encrypted(key, passphrase), csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertificateInfo:
    """What the node needs to know of a verified peer certificate."""

    fingerprint: str  # hex SHA-256 of the DER encoding
    common_name: str
    issuer_common_name: str
    not_after: dt.datetime
    public_key_sha256: str  # hex SHA-256 of the DER SubjectPublicKeyInfo: the pin of a node
    purposes: frozenset[str]  # extended key usages, dotted OIDs (empty: no EKU extension)
    is_ca: bool


def _load_cert(data: bytes) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise KeyManagementError(f"not a certificate: {exc}") from exc


@functools.lru_cache(maxsize=1024)
def certificate_info(data: bytes) -> CertificateInfo:
    """Fingerprint and names of a PEM or DER certificate. Raises KeyManagementError if unparsable."""
    cert = _load_cert(data)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer_cns = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        purposes = frozenset(oid.dotted_string for oid in eku)
    except x509.ExtensionNotFound:
        purposes = frozenset()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        common_name=str(cns[0].value) if cns else "",
        issuer_common_name=str(issuer_cns[0].value) if issuer_cns else "",
        not_after=cert.not_valid_after_utc,
        public_key_sha256=public_key_sha256(cert),
        purposes=purposes,
        is_ca=is_ca,
    )


def public_key_sha256(cert: x509.Certificate | bytes) -> str:
    """Hex SHA-256 of a certificate's DER SubjectPublicKeyInfo (RFC 7469's pin, in hex).

    Raises:
        KeyManagementError: ``cert`` is bytes that are not a certificate.
    """
    loaded = _load_cert(cert) if isinstance(cert, bytes) else cert
    spki = loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize().hex()


@functools.lru_cache(maxsize=1024)
def is_issued_by(cert_data: bytes, ca_pem: bytes) -> bool:
    """True when ``cert_data`` (PEM or DER) carries a valid signature of the CA in ``ca_pem``."""
    cert = _load_cert(cert_data)
    ca = _load_cert(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def der_to_pem(der: bytes) -> str:
    """PEM text of a DER certificate."""
    return _load_cert(der).public_bytes(serialization.Encoding.PEM).decode()


def check_private_key_matches(pem: bytes, passphrase: str, cert_pem: bytes) -> None:
    """Raise KeyManagementError unless the encrypted private key ``pem`` belongs to ``cert_pem``."""
    key = serialization.load_pem_private_key(decrypt_private_pem(pem, passphrase), password=None)
    cert = _load_cert(cert_pem)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise KeyManagementError("the private key does not match the certificate")
