"""The peer transport: an id in a URL is one escaped path segment, and an answer is read to a bound."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from functools import partial

import httpx
import pytest

from exchange.errors import TransportError
from exchange.transport.peer import (
    ANSWER_BYTES,
    RESULT_BYTES_PER_ENVELOPE,
    HttpsPeerTransport,
    escape_segment,
)


def test_the_auditors_message_id_is_escaped_in_the_peer_url() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(200, json={"entries": []})

    transport = HttpsPeerTransport("https://partner.example", ssl.create_default_context(), 5)
    transport._client = httpx.Client(
        base_url="https://partner.example", transport=httpx.MockTransport(handler)
    )
    for evil in ("..", "../../checkpoints", "x?y=1", "a#b", "%2e%2e"):
        assert transport.message_history(evil) == []
    transport.close()
    assert seen == [
        b"/v1/peer/audit/messages/%2E%2E",
        b"/v1/peer/audit/messages/%2E%2E%2F%2E%2E%2Fcheckpoints",
        b"/v1/peer/audit/messages/x%3Fy%3D1",
        b"/v1/peer/audit/messages/a%23b",
        b"/v1/peer/audit/messages/%252e%252e",
    ]
    assert escape_segment("plain-id") == "plain-id"


def _transport(handler: object) -> HttpsPeerTransport:
    transport = HttpsPeerTransport("https://partner.example", ssl.create_default_context(), 5)
    transport._client = httpx.Client(
        base_url="https://partner.example",
        transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
    )
    return transport


def test_an_answer_of_the_partner_is_read_to_a_bound_and_must_have_its_shape() -> None:
    """A partner answering gigabytes, a list where an object is due, or JSON nested past the
    parser's depth gets a TransportError (the round goes again later), never a node holding it
    all in memory nor an AttributeError or RecursionError out of the delivery loop."""
    huge = b'{"results": [' + b" " * (ANSWER_BYTES + 2 * RESULT_BYTES_PER_ENVELOPE) + b"]}"
    answers = {
        "huge": lambda _r: httpx.Response(200, content=huge),
        "list": lambda _r: httpx.Response(200, json=[]),
        "deep": lambda _r: httpx.Response(200, content=b"[" * 100_000),
    }
    for name, handler in answers.items():
        transport = _transport(handler)
        calls: dict[str, Callable[[], object]] = {
            "send": partial(transport.send, ["a.b.c.d.e"]),
            "announce_keys": partial(transport.announce_keys, ["x"]),
            "fetch_key_sets": partial(transport.fetch_key_sets, 0),
            "message_history": partial(transport.message_history, "m"),
        }
        for call, run in calls.items():
            if name == "huge" and call != "send":
                continue
            with pytest.raises(TransportError):
                run()
        transport.close()
    # the bound grows with the batch: a large batch's honest answer is read
    results = {"results": [{"status": "rejected"}] * 900}
    transport = _transport(lambda _r: httpx.Response(200, json=results))
    assert len(transport.send(["a.b.c.d.e"] * 900)) == 900
    transport.close()


def test_a_compressed_answer_is_decoded_once() -> None:
    """A further witness or a proxy that compresses its answers (httpx asks for gzip): the body
    read to its bound is decoded once, not twice."""
    import gzip
    import json

    body = gzip.compress(json.dumps({"entries": [{"seq": 1}]}).encode())
    transport = _transport(lambda _r: httpx.Response(200, content=body, headers={"content-encoding": "gzip"}))
    assert transport.message_history("m") == [{"seq": 1}]
    transport.close()
