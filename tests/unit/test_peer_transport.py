"""The peer transport puts an id into a URL as one escaped path segment."""

from __future__ import annotations

import ssl

import httpx

from exchange.transport.peer import HttpsPeerTransport, escape_segment


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
