"""Run a node under uvicorn with mutual TLS mandatory on every connection, as one process or as
several (``workers``) sharing one listening socket and one PostgreSQL database; each process runs
the background loops, each loop led by one process at a time (exchange.loops, docs/adr/0011)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from exchange import crypto, tls_policy
from exchange.api.app import create_app
from exchange.api.tls import MAX_HEAD_BYTES, TLSHttpToolsProtocol
from exchange.config import load_settings
from exchange.errors import ConfigurationError
from exchange.files import write_private
from exchange.node import Node
from exchange.observability import logs
from exchange.pki import TLSFiles
from exchange.tls_reload import ReloadingContext, ServerContextFactory
from exchange.transport.peer import HttpsPeerTransport, client_ssl_context


def write_trust_bundle(node: Node, tls: TLSFiles) -> Path:
    """The CAs whose client certificates the server accepts: ours and the partner's, both from
    the agreement (public certificates only)."""
    bundle = tls.trust_bundle
    parties = node.parties
    write_private(
        bundle, parties[node.party].ca_certificate + "\n" + parties[node.partner_party].ca_certificate
    )
    return bundle


def check_node_identity(node: Node, tls: TLSFiles) -> None:
    """Refuse to start as a party this node directory is not: the message keys must be the
    party's, and the node-to-node certificate must be issued by the party's CA in the agreement,
    carry the agreed node name and node purpose, and hold a public key its key set pins (version 1:
    the agreement's ``node_key_sha256``).

    Raises:
        ConfigurationError: naming what does not match.
    """
    party = node.parties[node.party]
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
    pins = node.registry.history(node.party).current.tls_pins
    if not any(crypto.constant_time_equal(info.public_key_sha256, pin) for pin in pins):
        problems.append("holds a key other than those pinned in this node's key set (tls_pins)")
    if problems:
        raise ConfigurationError(f"the node certificate {tls.node_cert} {'; '.join(problems)}")


def peer_transport(node: Node, tls: TLSFiles) -> HttpsPeerTransport:
    """The HTTPS transport to the partner, trusting only the partner CA pinned in the agreement; a
    replaced node certificate is used from the next connection (``exchange.tls_reload``)."""
    partner_ca = tls.partner_ca
    write_private(partner_ca, node.parties[node.partner_party].ca_certificate)
    ctx = ReloadingContext(
        partial(
            client_ssl_context,
            ca_file=partner_ca,
            cert_file=tls.node_cert,
            key_file=tls.node_key,
            key_password=node.settings.passphrase(),
        ),
        (tls.node_cert, tls.node_key, partner_ca),
        node.settings.tls_reload_seconds,
        name="node-to-node",
    )
    endpoint = node.settings.partner_endpoint or node.parties[node.partner_party].endpoint
    return HttpsPeerTransport(endpoint, ctx.current, node.settings.peer_timeout_seconds)


#: the node directory, for the worker processes of ``serve(node, workers=N)``
NODE_DIR_VARIABLE = "EXCHANGE_NODE_DIR"
#: the supervisor's process id, which each worker checks it is still the child of
SUPERVISOR_VARIABLE = "EXCHANGE_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
#: how long a worker may take to answer the supervisor's health check (a new interpreter imports
#: the whole package first) before it is taken for hung and replaced
WORKER_START_SECONDS = 30


class HardenedConfig(uvicorn.Config):
    """uvicorn's configuration with this project's TLS policy applied wherever it is loaded (in
    each worker process too), and the bound on a request's head (``max_head_bytes``)."""

    max_head_bytes: int = MAX_HEAD_BYTES

    def load(self) -> None:
        super().load()
        assert self.ssl is not None
        tls_policy.harden(self.ssl)


def server_config(node: Node, tls: TLSFiles, app: Any, **extra: Any) -> HardenedConfig:
    settings = node.settings
    config = HardenedConfig(
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
        log_config=logs.log_config(settings.log_format, settings.log_level),
        timeout_keep_alive=75,
        timeout_graceful_shutdown=20,
        server_header=False,
        # no reverse proxy stands before a node (mutual TLS ends here): no X-Forwarded-* header is
        # believed, from 127.0.0.1 either, and no middleware layer reads them on every request
        proxy_headers=False,
        ssl_ciphers=tls_policy.TLS12_CIPHERS,
        ssl_context_factory=ServerContextFactory(settings.tls_reload_seconds),  # replaced files reload
        **extra,
    )
    config.max_head_bytes = settings.max_head_bytes  # read by TLSHttpToolsProtocol (exchange.api.tls)
    return config


def stop_with_supervisor() -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when its supervisor dies, even
    by SIGKILL, so no worker outlives it holding the port, its leaderships and its connections
    (Linux's ``PR_SET_PDEATHSIG``; elsewhere nothing is done).

    Raises:
        ConfigurationError: the supervisor is already gone (this worker must not start).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(os.environ[SUPERVISOR_VARIABLE]):  # it died before the call above
        raise ConfigurationError("the supervisor of this worker is gone: not starting")


def worker_app() -> Any:
    """The app of one worker process of ``serve(node, workers=N)`` (a uvicorn factory): a Node of
    its own, closed when the app shuts down, and stopped when the supervisor dies. A new
    interpreter: its logging is set up as ``exchange serve`` sets up its own."""
    stop_with_supervisor()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = Node(load_settings(Path(os.environ[NODE_DIR_VARIABLE])))
    app = create_app(node, peer_transport(node, TLSFiles(node.settings.tls_dir)))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(started: Any) -> AsyncIterator[None]:
        try:
            async with inner(started):
                yield
        finally:
            node.close()

    app.router.lifespan_context = lifespan
    return app


def serve(node: Node, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM; the background loops stop with the server. With ``workers`` > 1,
    that many processes share the listening socket; a worker that dies is replaced.

    Raises:
        ConfigurationError: the TLS files or the node's identity are wrong, or ``workers`` > 1 on a
            database other than PostgreSQL.
    """
    settings = node.settings
    tls = TLSFiles(settings.tls_dir)
    tls.check(settings.passphrase())
    check_node_identity(node, tls)
    if workers > 1:
        if node.db.dialect != "postgresql":
            node.close()
            raise ConfigurationError(
                f'--workers {workers} needs PostgreSQL (database_url = "postgresql://..."): on SQLite a'
                " node is one process"
            )
        peer_transport(node, tls).close()  # writes the partner CA file the workers read
        config = server_config(
            node,
            tls,
            f"{__name__}:worker_app",
            factory=True,
            workers=workers,
            timeout_worker_healthcheck=WORKER_START_SECONDS,
        )
        node.close()
        os.environ[NODE_DIR_VARIABLE] = str(settings.node_dir.resolve())
        os.environ[SUPERVISOR_VARIABLE] = str(os.getpid())
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    config = server_config(node, tls, create_app(node, peer_transport(node, tls)))
    config.load()
    try:
        uvicorn.Server(config).run()
    finally:
        node.close()
