"""Who is calling: the verified client certificate, mapped to a registered client or the partner node.

The TLS handshake already proved the certificate chains to a trusted CA (ours or the partner's).
Here we decide *which* trust applies: local endpoints accept only certificates issued by our own CA
and registered with ``exchange clients add``, never one carrying the node-to-node purpose; peer
endpoints accept only the partner's node certificate: issued by the partner CA in the agreement,
with the agreed node name, the node-to-node extended key usage, and the public key the agreement
pins (``node_key_sha256``). A name alone proves nothing: any client certificate of the partner's
CA could carry it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from exchange import crypto
from exchange.db.client_directory import UNREAD
from exchange.errors import Unauthorised
from exchange.node import Node
from exchange.observability import MONITORING_ROLE
from exchange.policy import Actor

T = TypeVar("T")


def certificate_of(scope: Scope) -> bytes | None:
    """The PEM of the verified certificate of a request's caller (the ASGI ``tls`` extension), if
    it has one."""
    tls = scope.get("extensions", {}).get("tls")
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    return str(chain[0]).encode() if chain else None


def client_certificate(request: Request) -> bytes:
    """The PEM of the caller's verified certificate. Raises Unauthorised if there is none."""
    pem = certificate_of(request.scope)
    if pem is None:
        raise Unauthorised("no verified client certificate on this connection")
    return pem


def node_of(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


AUDITOR_ROLE = "AUDITOR"


async def local_client(request: Request) -> Actor:
    """FastAPI dependency: the registered local system calling (not an auditor: auditors never see
    message content; not a monitoring client: it reads /metrics only). Raises Unauthorised (403)."""
    actor = await registered_client(request)
    if AUDITOR_ROLE in actor.roles:
        raise Unauthorised("auditors have no access to messages; use /v1/audit")
    if MONITORING_ROLE in actor.roles:
        raise Unauthorised("a monitoring client reads /metrics and /healthz only")
    return actor


async def auditor(request: Request) -> Actor:
    """FastAPI dependency: a registered client with the AUDITOR role. Raises Unauthorised (403)."""
    actor = await registered_client(request)
    if AUDITOR_ROLE not in actor.roles or MONITORING_ROLE in actor.roles:
        raise Unauthorised("this endpoint is for clients registered with the AUDITOR role")
    return actor


async def monitoring_client(request: Request) -> Actor:
    """FastAPI dependency: a client registered with ``exchange clients add-monitoring``. Raises
    Unauthorised (403) for any other caller, local systems and auditors included."""
    actor = await registered_client(request)
    if MONITORING_ROLE not in actor.roles:
        raise Unauthorised("only a monitoring client (`exchange clients add-monitoring`) reads /metrics")
    return actor


async def registered_client(request: Request) -> Actor:
    """The registered client calling, whatever its roles. Raises Unauthorised (403).

    Runs on the event loop (an API request pays no thread hop for it): the certificate checks are
    cached per certificate, and the registration is read in a worker thread only when the node
    does not hold it (:meth:`~exchange.node.Node.held_actor_for`)."""
    node = node_of(request)
    pem = client_certificate(request)
    if not crypto.is_issued_by(pem, node.parties[node.party].ca_certificate.encode()):
        raise Unauthorised("this certificate is not issued by this node's certificate authority")
    info = crypto.certificate_info(pem)
    if crypto.NODE_PURPOSE_OID in info.purposes:
        raise Unauthorised("a node-to-node certificate is not a local system")
    actor = node.held_actor_for(info.fingerprint)
    if actor is UNREAD:
        actor = await run_in_threadpool(node.actor_for, info.fingerprint)
    if actor is None:
        raise Unauthorised(
            "this client certificate is not registered; ask an administrator to run `exchange clients add`"
        )
    request.state.client_id = actor.client_id  # for the request's log line: the id, never the subject
    return actor


def claims_partner_node(node: Node, pem: bytes | None) -> bool:
    """Whether ``pem`` is a node certificate of the partner CA with the agreed node name (its key not
    checked: no database read, checks cached per certificate; see :func:`is_partner_node`)."""
    if pem is None:
        return False
    partner = node.parties[node.partner_party]
    if not crypto.is_issued_by(pem, partner.ca_certificate.encode()):
        return False
    info = crypto.certificate_info(pem)
    return info.common_name == partner.node_name and crypto.NODE_PURPOSE_OID in info.purposes


def is_partner_node(node: Node, pem: bytes | None, *, held: bool = False) -> bool:
    """Whether ``pem`` is the partner node's certificate: issued by the partner CA in the agreement,
    with the agreed node name, the node-to-node purpose and a pinned key (checks cached per
    certificate). ``held``: by the pins this process last read, without reading the database (for
    the event loop; a key announced since is taken once the pins are read again)."""
    if pem is None or not claims_partner_node(node, pem):
        return False
    pins = node.registry.held_tls_pins() if held else node.partner.tls_pins
    key = crypto.certificate_info(pem).public_key_sha256
    return any(crypto.constant_time_equal(key, pin) for pin in pins)


def caller_kind(node: Node, pem: bytes | None) -> str | None:
    """What a certificate may be, from cached checks only (for :class:`~exchange.api.guard.ConcurrencyLimit`):
    ``"partner"`` (the partner node, by the pins held), ``"unpinned"`` (a node certificate of the
    partner's CA with its name but a key not pinned, as held: a key just rotated, or a forgery),
    ``"local"`` (a client certificate of this node's CA: a system registered here, or one that is
    not), or None (nothing here serves it)."""
    if pem is None:
        return None
    if claims_partner_node(node, pem):
        return "partner" if is_partner_node(node, pem, held=True) else "unpinned"
    if crypto.is_issued_by(pem, node.parties[node.party].ca_certificate.encode()) and (
        crypto.NODE_PURPOSE_OID not in crypto.certificate_info(pem).purposes
    ):
        return "local"
    return None


async def known_caller(request: Request) -> None:
    """FastAPI dependency: the partner node or a registered client of any role (a monitoring
    system, an auditor, a local system). Raises Unauthorised (403) for any other certificate the
    TLS layer trusts (an unregistered or removed client, another certificate of the partner's CA)."""
    node = node_of(request)
    pem = certificate_of(request.scope)
    if claims_partner_node(node, pem) and (
        is_partner_node(node, pem, held=True) or await in_peer_thread(request, is_partner_node, node, pem)
    ):  # (by the pins held, else read in a worker thread: no database read on the event loop)
        request.state.client_id = node.parties[node.partner_party].node_name
        return
    await registered_client(request)


async def in_peer_thread(request: Request, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in a worker thread of the partner node's own pool
    (``max_partner_requests_in_progress`` threads, apart from anyio's 40 that the local systems'
    requests share): local requests by the hundred never keep the partner's deliveries waiting for
    a thread."""
    state = request.app.state
    limiter = getattr(state, "peer_threads", None)
    if limiter is None:  # (made on the event loop, once)
        limiter = state.peer_threads = anyio.CapacityLimiter(
            node_of(request).settings.max_partner_requests_in_progress
        )
    return await anyio.to_thread.run_sync(partial(work, *args), limiter=limiter)


async def partner_node(request: Request) -> None:
    """FastAPI dependency: admit only the partner node's certificate. Raises Unauthorised (403)."""
    node = node_of(request)
    if not await in_peer_thread(request, is_partner_node, node, client_certificate(request)):
        raise Unauthorised("only the partner node may call this endpoint")
    request.state.client_id = node.parties[node.partner_party].node_name
