"""Run a node under uvicorn with mutual TLS mandatory on every connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import uvicorn

from exchange import crypto, tls_policy
from exchange.api.app import create_app
from exchange.api.tls import TLSHttpToolsProtocol
from exchange.errors import ConfigurationError
from exchange.files import write_private
from exchange.node import Node
from exchange.pki import TLSFiles
from exchange.transport.peer import HttpsPeerTransport, client_ssl_context


def write_trust_bundle(node: Node, tls: TLSFiles) -> Path:
    """The CAs whose client certificates the server accepts: ours and the partner's, both from
    the agreement (public certificates only)."""
    bundle = tls.trust_bundle
    parties = node.agreement.parties
    write_private(
        bundle, parties[node.party].ca_certificate + "\n" + parties[node.partner_party].ca_certificate
    )
    return bundle


def check_node_identity(node: Node, tls: TLSFiles) -> None:
    """Refuse to start as a party this node directory is not: the message keys must be the
    party's, and the node-to-node certificate must be issued by the party's CA in the agreement,
    carry the agreed node name and node purpose, and hold the pinned public key.

    Raises:
        ConfigurationError: naming what does not match.
    """
    party = node.agreement.parties[node.party]
    if node.keys.party != node.party:
        raise ConfigurationError(
            f"this node directory holds the keys of {node.keys.party}, but its settings say party ="
            f" {node.party!r}"
        )
    pem = tls.node_cert.read_bytes()
    info = crypto.certificate_info(pem)
    problems = []
    if not crypto.is_issued_by(pem, party.ca_certificate.encode()):
        problems.append(f"is not issued by the CA of {node.party} in the agreement")
    if info.common_name != party.node_name:
        problems.append(f"names {info.common_name!r}, not the agreed node name {party.node_name!r}")
    if crypto.NODE_PURPOSE_OID not in info.purposes:
        problems.append("lacks the node-to-node extended key usage")
    if not crypto.constant_time_equal(info.public_key_sha256, party.node_key_sha256):
        problems.append(f"holds a key other than the pinned parties.{node.party}.node_key_sha256")
    if problems:
        raise ConfigurationError(f"the node certificate {tls.node_cert} {'; '.join(problems)}")


def peer_transport(node: Node, tls: TLSFiles) -> HttpsPeerTransport:
    """The HTTPS transport to the partner, trusting only the partner CA pinned in the agreement."""
    partner_ca = tls.partner_ca
    write_private(partner_ca, node.agreement.parties[node.partner_party].ca_certificate)
    ctx = client_ssl_context(
        ca_file=partner_ca,
        cert_file=tls.node_cert,
        key_file=tls.node_key,
        key_password=node.settings.passphrase(),
    )
    endpoint = node.settings.partner_endpoint or node.agreement.parties[node.partner_party].endpoint
    return HttpsPeerTransport(endpoint, ctx, node.settings.peer_timeout_seconds)


def serve(node: Node) -> None:
    """Serve until SIGINT/SIGTERM; the delivery worker stops with the server."""
    settings = node.settings
    tls = TLSFiles(settings.tls_dir)
    tls.check(settings.passphrase())
    check_node_identity(node, tls)
    app = create_app(node, peer_transport(node, tls))
    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        ssl_certfile=str(tls.server_cert),
        ssl_keyfile=str(tls.server_key),
        ssl_keyfile_password=settings.passphrase(),
        ssl_ca_certs=str(write_trust_bundle(node, tls)),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        http=TLSHttpToolsProtocol,
        loop="uvloop",
        log_level=settings.log_level,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=20,
        server_header=False,
        ssl_ciphers=tls_policy.TLS12_CIPHERS,
    )
    config.load()
    assert config.ssl is not None
    tls_policy.harden(config.ssl)
    try:
        uvicorn.Server(config).run()
    finally:
        node.close()
