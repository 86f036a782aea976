"""The peer transport: how envelopes reach the partner node.

:class:`PeerTransport` is the narrow interface the delivery worker depends on. The real one,
:class:`HttpsPeerTransport`, posts batches over mutual TLS with one long-lived sync httpx client
(one ``ssl.SSLContext``: the partner's CA pinned, our node certificate loaded), because a client per
request costs 6-30 ms and the async client costs ~4 ms CPU per request on these machines.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from exchange import tls_policy
from exchange.checkpoints import WitnessRequest
from exchange.errors import PartnerRefused, TransportError
from exchange.ledger.checkpoint import CheckpointError
from exchange.ledger.witness_protocol import ADD_CHECKPOINT, encode_add_checkpoint, parse_size
from exchange.node import PeerResult

PEER_PATH = "/v1/peer/envelopes"
KEYS_PATH = "/v1/peer/key-sets"  # key-set announcements: POST ours, GET the partner's
WITNESS_PREFIX = "/v1/peer/witness"  # the partner's C2SP tlog-witness submission prefix
HISTORY_PATH = "/v1/peer/audit/messages"

#: Statuses by which the partner refuses the content of a batch (malformed, too large, wrong media
#: type, invalid): the worker splits the batch and fails a single envelope so refused. Any other
#: status (401, 403, 429, 5xx, ...) is about the link or the partner, and is retried.
CONTENT_REFUSALS = frozenset({400, 413, 415, 422})

#: the most bytes read of an answer of the partner's (or of a further witness): per envelope of a
#: batch (a receipt is under 1 KiB) and for the whole of each other answer. An answer beyond its
#: bound, or whose body takes longer than the client's read timeout to arrive, is a TransportError:
#: a partner cannot make this node hold gigabytes, or wait for ever on a trickle.
RESULT_BYTES_PER_ENVELOPE = 8 * 1024
ANSWER_BYTES = 64 * 1024
KEY_SETS_BYTES = 8 * 1024 * 1024
HISTORY_BYTES = 8 * 1024 * 1024


def fetch(client: httpx.Client, method: str, url: str, *, limit: int, **kwargs: Any) -> httpx.Response:
    """The answer to a request, its body read whole but never beyond ``limit`` bytes nor for longer
    than the client's read timeout.

    Raises:
        httpx.HTTPError: the request failed.
        TransportError: the body exceeds ``limit`` bytes or takes too long.
    """
    seconds = client.timeout.read or 30.0
    with client.stream(method, url, **kwargs) as response:
        deadline = time.monotonic() + seconds
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise TransportError(f"the answer to {method} {url} exceeds {limit} bytes")
            if time.monotonic() > deadline:
                raise TransportError(f"the answer to {method} {url} took over {seconds:g} s to arrive")
            chunks.append(chunk)
    headers = [
        (k, v) for k, v in response.headers.items() if k.lower() not in ("content-encoding", "content-length")
    ]
    # (iter_bytes decoded the body already: a kept Content-Encoding would decode it twice)
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=response.request
    )


@dataclass(frozen=True)
class WitnessAnswer:
    """A witness's answer to add-checkpoint: cosignature lines, or the size it holds instead."""

    cosignature: str | None  # one or more newline-separated cosignature lines
    witnessed_size: int | None = None
    incident: bool = False  # the witness refused the checkpoint as contradicting what it witnessed


def add_checkpoint(client: httpx.Client, url: str, request: WitnessRequest) -> WitnessAnswer:
    """POST a C2SP tlog-witness add-checkpoint request to ``url`` and read the answer: 200 with
    cosignature lines, 409 with the witness's size, or a refusal (400, 403, 404, 422: an incident).

    Raises:
        TransportError: unreachable, or an answer outside the protocol.
    """
    try:
        body = encode_add_checkpoint(request.from_size, request.proof, request.note)
        headers = {"content-type": "text/plain; charset=utf-8"}
        response = fetch(client, "POST", url, limit=ANSWER_BYTES, content=body, headers=headers)
    except (httpx.HTTPError, CheckpointError) as exc:
        raise TransportError(f"witness request failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 200:
        return WitnessAnswer(response.text)
    if response.status_code == 409:
        try:
            return WitnessAnswer(None, parse_size(response.content))
        except CheckpointError as exc:
            raise TransportError(f"the witness answered 409 without a size: {exc}") from exc
    if response.status_code in (400, 403, 404, 422):
        return WitnessAnswer(None, None, incident=True)
    raise TransportError(f"the witness answered HTTP {response.status_code}")


class WitnessClient(Protocol):
    """A further witness named in the agreement, reached through the C2SP tlog-witness protocol."""

    name: str

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        """Ask the witness to cosign. Raises TransportError if it could not answer."""
        ...

    def close(self) -> None: ...


class HttpWitness:
    """A further witness at ``url`` (its submission prefix), over HTTPS with the system's trust
    store (or plain HTTP where the agreement says so: the cosignature, not the channel, is the proof)."""

    def __init__(self, name: str, url: str, timeout: float) -> None:
        self.name = name
        self.url = url.rstrip("/") + ADD_CHECKPOINT
        self._client = httpx.Client(timeout=timeout)

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        return add_checkpoint(self._client, self.url, request)

    def close(self) -> None:
        self._client.close()


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

    def announce_keys(self, announcements: list[str]) -> str:
        """Give the partner our key-set announcements; returns its signed receipt. Raises
        PartnerRefused if it refused them, TransportError if it could not answer."""
        ...

    def fetch_key_sets(self, after: int) -> list[str]:
        """The partner's key-set announcements after ``after``. Raises TransportError."""
        ...

    def close(self) -> None: ...


def client_ssl_context(
    *, ca_file: Path, cert_file: Path, key_file: Path, key_password: str
) -> ssl.SSLContext:
    """A TLS 1.2+ (AEAD only) client context trusting only ``ca_file`` and presenting our certificate."""
    ctx = tls_policy.harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file)))
    ctx.load_cert_chain(str(cert_file), str(key_file), password=key_password)
    return ctx


def escape_segment(value: str) -> str:
    """``value`` as one URL path segment: every reserved character and every dot percent-encoded,
    so that ``/``, ``?``, ``#`` and ``..`` in an id can never change which path the partner sees."""
    return quote(value, safe="").replace(".", "%2E")


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
    except (ValueError, RecursionError):
        return ""
    return str(body.get("detail", ""))[:200] if isinstance(body, dict) else ""


class HttpsPeerTransport:
    """Batches of envelopes to the partner's ``/v1/peer/envelopes`` over mutual TLS."""

    def __init__(
        self, base_url: str, ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext], timeout: float
    ) -> None:
        """``ssl_context`` is a context, or a function returning the current one (a new context, after
        the node certificate is replaced, opens a new connection pool: ``exchange.tls_reload``)."""
        self._context_of = ssl_context if callable(ssl_context) else lambda: ssl_context
        self._new_client = partial(
            httpx.Client,
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
        )
        self._context = self._context_of()
        self._http = self._new_client(verify=self._context)
        self._retired: list[httpx.Client] = []  # closed with the transport: requests may be in flight
        self._swap = threading.Lock()

    @property
    def _client(self) -> httpx.Client:
        context = self._context_of()
        if context is not self._context:
            with self._swap:
                if context is not self._context:
                    self._retired.append(self._http)
                    self._http = self._new_client(verify=context)
                    self._context = context
        return self._http

    @_client.setter
    def _client(self, client: httpx.Client) -> None:  # a test's client, kept until the context changes
        self._retired.append(self._http)
        self._http = client

    def send(self, envelopes: Sequence[str]) -> list[PeerResult]:
        try:
            limit = ANSWER_BYTES + RESULT_BYTES_PER_ENVELOPE * len(envelopes)
            response = fetch(
                self._client, "POST", PEER_PATH, limit=limit, json={"envelopes": list(envelopes)}
            )
        except httpx.HTTPError as exc:
            raise TransportError(f"partner unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code in CONTENT_REFUSALS:
            raise PartnerRefused(response.status_code, _detail(response))
        if response.status_code != 200:
            raise TransportError(f"partner answered HTTP {response.status_code}")
        try:
            body = response.json()
        except (ValueError, RecursionError) as exc:
            raise TransportError("partner answered with a body that is not JSON") from exc
        return parse_results(body, len(envelopes))

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        return add_checkpoint(self._client, WITNESS_PREFIX + ADD_CHECKPOINT, request)

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        try:
            path = f"{HISTORY_PATH}/{escape_segment(message_id)}"
            response = fetch(self._client, "GET", path, limit=HISTORY_BYTES)
            body = response.json()
        except (httpx.HTTPError, ValueError, RecursionError) as exc:
            raise TransportError(f"history request failed: {type(exc).__name__}: {exc}") from exc
        if (
            response.status_code != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("entries"), list)
        ):
            raise TransportError(f"the partner refused the history request: HTTP {response.status_code}")
        return list(body["entries"])

    def announce_keys(self, announcements: list[str]) -> str:
        try:
            response = fetch(
                self._client, "POST", KEYS_PATH, limit=ANSWER_BYTES, json={"announcements": announcements}
            )
            body = response.json()
        except (httpx.HTTPError, ValueError, RecursionError) as exc:
            raise TransportError(f"key-set announcement failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 409:
            raise PartnerRefused(409, _detail(response))
        if (
            response.status_code != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("receipt"), str)
        ):
            raise TransportError(f"the partner did not take the key sets: HTTP {response.status_code}")
        return str(body["receipt"])

    def fetch_key_sets(self, after: int) -> list[str]:
        try:
            response = fetch(self._client, "GET", KEYS_PATH, limit=KEY_SETS_BYTES, params={"after": after})
            body = response.json()
        except (httpx.HTTPError, ValueError, RecursionError) as exc:
            raise TransportError(f"key-set fetch failed: {type(exc).__name__}: {exc}") from exc
        found = body.get("announcements") if isinstance(body, dict) else None
        if (
            response.status_code != 200
            or not isinstance(found, list)
            or not all(isinstance(a, str) for a in found)
        ):
            raise TransportError(f"the partner did not give its key sets: HTTP {response.status_code}")
        return list(found)

    def close(self) -> None:
        for client in (*self._retired, self._http):
            client.close()
