"""The peer transport: how envelopes reach the partner node.

:class:`PeerTransport` is the narrow interface the delivery worker depends on. The real one,
:class:`HttpsPeerTransport`, posts batches over mutual TLS with one long-lived sync httpx client
(one ``ssl.SSLContext``: the partner's CA pinned, our node certificate loaded), because a client per
request costs 6-30 ms and the async client costs ~4 ms CPU per request on these machines.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from exchange.checkpoints import WitnessRequest
from exchange.errors import PartnerRefused, TransportError
from exchange.node import PeerResult

PEER_PATH = "/v1/peer/envelopes"
WITNESS_PATH = "/v1/peer/checkpoints"
HISTORY_PATH = "/v1/peer/audit/messages"

#: Statuses by which the partner refuses the content of a batch (malformed, too large, wrong media
#: type, invalid): the worker splits the batch and fails a single envelope so refused. Any other
#: status (401, 403, 429, 5xx, ...) is about the link or the partner, and is retried.
CONTENT_REFUSALS = frozenset({400, 413, 415, 422})


@dataclass(frozen=True)
class WitnessAnswer:
    """The partner's answer to a witness request: a cosignature, or the size it holds instead."""

    cosignature: str | None
    witnessed_size: int | None = None
    incident: bool = False  # the partner refused the checkpoint as contradicting what it witnessed


class PeerTransport(Protocol):
    """How the node reaches the partner: envelope batches and witness requests."""

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        """One result per envelope, in order. Raises PartnerRefused if the partner refused the
        batch's content (split it), TransportError if the batch may not have been processed
        (retry it)."""
        ...

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        """Ask the partner to cosign. Raises TransportError if it could not answer."""
        ...

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        """The partner's ledger entries about a message (no content). Raises TransportError."""
        ...

    def close(self) -> None: ...


def client_ssl_context(
    *, ca_file: Path, cert_file: Path, key_file: Path, key_password: str
) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only ``ca_file`` and presenting our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file), password=key_password)
    return ctx


def parse_results(body: object, expected: int) -> list[PeerResult]:
    """Parse the peer's batch answer. Raises TransportError if it is not the agreed shape."""
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise TransportError("the partner answered without a results list")
    results = body["results"]
    if len(results) != expected:
        raise TransportError(f"the partner answered {len(results)} results for {expected} envelopes")
    parsed = []
    for item in results:
        if not isinstance(item, dict):
            raise TransportError("the partner answered a result that is not an object")
        if item.get("status") == "accepted" and isinstance(item.get("receipt"), str):
            parsed.append(PeerResult(True, item["receipt"]))
        elif item.get("status") == "rejected":
            parsed.append(PeerResult(False))
        else:
            raise TransportError("the partner answered a result of unknown status")
    return parsed


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("detail", ""))[:200] if isinstance(body, dict) else ""


class HttpsPeerTransport:
    """Batches of envelopes to the partner's ``/v1/peer/envelopes`` over mutual TLS."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext, timeout: float) -> None:
        self._client = httpx.Client(
            base_url=base_url,
            verify=ssl_context,
            timeout=timeout,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
        )

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        try:
            response = self._client.post(PEER_PATH, json={"envelopes": list(envelopes)})
        except httpx.HTTPError as exc:
            raise TransportError(f"partner unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code in CONTENT_REFUSALS:
            raise PartnerRefused(response.status_code, _detail(response))
        if response.status_code != 200:
            raise TransportError(f"partner answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise TransportError("partner answered with a body that is not JSON") from exc
        return parse_results(body, len(envelopes))

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        body = {
            "checkpoint": request.note,
            "from_size": request.from_size,
            "proof": [p.hex() for p in request.proof],
        }
        try:
            response = self._client.post(WITNESS_PATH, json=body)
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise TransportError(f"witness request failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 200 and isinstance(answer.get("cosignature"), str):
            return WitnessAnswer(answer["cosignature"])
        if response.status_code == 409 and isinstance(answer.get("witnessed_size"), int):
            return WitnessAnswer(None, answer["witnessed_size"], bool(answer.get("incident")))
        raise TransportError(
            f"the partner refused to witness: HTTP {response.status_code}: {answer.get('detail')}"
        )

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        try:
            response = self._client.get(f"{HISTORY_PATH}/{message_id}")
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise TransportError(f"history request failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200 or not isinstance(body.get("entries"), list):
            raise TransportError(f"the partner refused the history request: HTTP {response.status_code}")
        return list(body["entries"])

    def close(self) -> None:
        self._client.close()
