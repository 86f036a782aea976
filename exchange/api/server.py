"""Run a node under uvicorn with mutual TLS mandatory on every connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import uvicorn

from exchange.api.app import create_app
from exchange.api.tls import TLSHttpToolsProtocol
from exchange.node import Node
from exchange.pki import TLSFiles
from exchange.transport.peer import HttpsPeerTransport, client_ssl_context


def write_trust_bundle(node: Node, tls: TLSFiles) -> Path:
    """The CAs whose client certificates the server accepts: ours and the partner's, both from
    the agreement (public certificates only)."""
    bundle = tls.trust_bundle
    parties = node.agreement.parties
    bundle.write_text(parties[node.party].ca_certificate + "\n" + parties[node.partner_party].ca_certificate)
    return bundle


def peer_transport(node: Node, tls: TLSFiles) -> HttpsPeerTransport:
    """The HTTPS transport to the partner, trusting only the partner CA pinned in the agreement."""
    partner_ca = tls.partner_ca
    partner_ca.write_text(node.agreement.parties[node.partner_party].ca_certificate)
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
    )
    try:
        uvicorn.Server(config).run()
    finally:
        node.close()
