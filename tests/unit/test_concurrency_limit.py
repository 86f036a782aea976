"""The bound on requests in progress (``exchange.api.guard.ConcurrencyLimit``), without a server:
per client certificate, for the local systems together, for the partner node apart, a certificate
nothing here serves refused at once, and every slot freed when its request ends however it ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from exchange.api.guard import ConcurrencyLimit

PARTNER = b"-----BEGIN CERTIFICATE----- partner node"
STRANGER = b"-----BEGIN CERTIFICATE----- a local system of the partner"
FORGED = b"-----BEGIN CERTIFICATE----- a node certificate of the partner's CA, its key not pinned"
ROTATED = b"-----BEGIN CERTIFICATE----- the partner node again, a second certificate"


def _limited(release: asyncio.Event) -> ConcurrencyLimit:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        if scope["path"] == "/boom":
            raise RuntimeError("the route failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return ConcurrencyLimit(
        app,
        total=3,
        per_caller=2,
        per_partner=2,
        retry_after=5,
        caller_of=lambda scope: scope["caller"],
        kind_of=lambda pem: {PARTNER: "partner", ROTATED: "partner", STRANGER: None, FORGED: "unpinned"}.get(
            pem or b"", "local"
        ),
    )


async def _call(limit: ConcurrencyLimit, caller: bytes | None, path: str = "/v1/inbox") -> dict[str, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": path, "headers": [], "caller": caller}
    await limit(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return {"status": start["status"], "headers": dict(start["headers"]), "body": body}


def test_requests_in_progress_are_bounded_per_caller_and_in_all_but_the_partner_stays_served() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        limit = _limited(release)
        first = [asyncio.create_task(_call(limit, b"a")) for _ in range(2)]
        await asyncio.sleep(0)
        own = await _call(limit, b"a")  # a third of one caller's, while two are in progress
        assert own["status"] == 503
        problem = json.loads(own["body"])
        assert (problem["type"].endswith("/overloaded"), problem["status"]) == (True, 503)
        assert "this caller has 2 requests in progress (at most 2)" in problem["detail"]
        assert (own["headers"][b"retry-after"], own["headers"][b"content-type"]) == (
            b"5",
            b"application/problem+json",
        )
        other = asyncio.create_task(_call(limit, b"b"))  # another caller: in, the third of all
        await asyncio.sleep(0)
        full = await _call(limit, b"c")
        assert full["status"] == 503
        assert "the node has 3 requests in progress (at most 3)" in json.loads(full["body"])["detail"]
        partners = [asyncio.create_task(_call(limit, PARTNER)) for _ in range(2)]  # not starved
        await asyncio.sleep(0)
        assert not any(p.done() for p in partners)  # (in progress, not refused)
        flood = await _call(limit, ROTATED)  # nor does it flood: one bound, whatever its certificates
        assert flood["status"] == 503
        assert "at most 2" in json.loads(flood["body"])["detail"]
        forged = [asyncio.create_task(_call(limit, FORGED)) for _ in range(2)]  # a bucket of its own
        await asyncio.sleep(0)
        assert (await _call(limit, FORGED))["status"] == 503
        stranger = await _call(limit, STRANGER)  # nothing here serves it: 403 at once, no slot
        assert stranger["status"] == 403
        release.set()
        answers = await asyncio.gather(*first, other, *partners, *forged)
        assert [a["status"] for a in answers] == [200] * 7
        assert (limit.in_progress, limit.by_caller) == (0, {})
        assert (await _call(limit, b"c"))["status"] == 200  # the slots are free again

    asyncio.run(scenario())


def test_a_request_that_fails_frees_its_slot() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        release.set()
        limit = _limited(release)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await _call(limit, b"a", "/boom")
        assert (limit.in_progress, limit.by_caller) == (0, {})

    asyncio.run(scenario())


def test_a_body_that_does_not_come_in_time_is_408_and_frees_its_slot() -> None:
    from exchange.api.guard import RequestGuard

    async def scenario() -> None:
        seen: list[bytes] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append((await receive())["body"])

        guard = RequestGuard(app, max_bytes=1024, body_timeout_seconds=0.05)
        limit = ConcurrencyLimit(
            guard,
            total=1,
            per_caller=1,
            per_partner=2,
            retry_after=5,
            caller_of=lambda scope: scope["caller"],
            kind_of=lambda pem: "local",
        )
        sent: list[MutableMapping[str, Any]] = []

        async def stalled() -> dict[str, Any]:
            await asyncio.sleep(3600)  # the body never comes
            raise AssertionError("not reached")

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "headers": [], "caller": b"a"}
        await asyncio.wait_for(limit(dict(scope), stalled, send), 5)
        assert sent[0]["status"] == 408
        assert json.loads(sent[1]["body"])["type"].endswith("/request-timeout")
        assert (seen, limit.in_progress, limit.by_caller) == ([], 0, {})

    asyncio.run(scenario())
