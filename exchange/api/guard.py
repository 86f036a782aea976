"""The request edge: every body is bounded, typed and well-formed JSON before a route sees it, and
every answer carries the security headers.

:class:`RequestGuard` reads the whole body (refusing more than ``max_bytes``, whether declared in
``Content-Length`` or streamed chunked) and then answers, as RFC 9457 problem JSON:

- 413 for a body over the limit;
- 415 for a non-empty body that is not ``application/json`` (or ``+json``), except on the
  ``raw_paths`` whose own format is not JSON (the C2SP witness protocol's text body), which are only
  bounded and left to their route's strict parser;
- 400 for malformed JSON, with the line and column, and for a key repeated in one object
  (which JSON parsers resolve differently: the last one wins here, the first one elsewhere);
- 422 for a string (key or value) holding a lone UTF-16 surrogate such as ``\\ud800``, which no
  database or JSON encoder accepts, naming the field.

Only then is the buffered body handed to the application. :class:`SecurityHeaders` adds HSTS,
``nosniff``, ``frame-ancestors 'none'`` and ``Cache-Control: no-store`` (answers hold decrypted
intelligence; no proxy or browser may keep them).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.api import problems

JSON_TYPES = (b"application/json",)

SECURITY_HEADERS: dict[str, str] = {
    "strict-transport-security": "max-age=31536000",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Duplicate(key)
        result[key] = value
    return result


def _surrogate_field(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """The path of the first string (key or value) that is not encodable as UTF-8, or None."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return "/".join(where) or "(body)"
        elif isinstance(item, dict):
            for key, child in item.items():
                if _surrogate_field(key) is not None:
                    return "/".join((*where, key.encode(errors="backslashreplace").decode()))
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, str(i))) for i, child in enumerate(item))
    return None


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith(b"application/") and media.endswith(b"+json"))


class RequestGuard:
    """Bound, type-check and parse-check request bodies (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        raw_paths: frozenset[str] = frozenset(),
        path_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.raw_paths = raw_paths
        self.path_limits = path_limits or {}  # exact paths with their own limit (peer envelope batches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        max_bytes = self.path_limits.get(scope["path"], self.max_bytes)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await self._too_large(scope, receive, send, max_bytes)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > max_bytes:
                await self._too_large(scope, receive, send, max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        raw = scope.get("path") in self.raw_paths
        refusal = None if raw else self._check(body, headers.get(b"content-type", b""))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check(self, body: bytes, content_type: bytes) -> Any:
        if not body:
            return None
        if not _is_json(content_type):
            shown = content_type.decode("latin-1") or "none"
            return problems.problem(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                f"the body must be application/json, not {shown}",
            )
        try:
            parsed = json.loads(body, object_pairs_hook=_no_duplicates)
        except _Duplicate as exc:
            return problems.problem(
                400,
                "malformed-json",
                "Malformed JSON",
                f"the key {exc.key!r} appears twice in one object",
                errors=[{"field": "(body)", "message": f"duplicate key {exc.key!r}"}],
            )
        except json.JSONDecodeError as exc:
            return problems.problem(
                400,
                "malformed-json",
                "Malformed JSON",
                f"the body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                errors=[{"field": "(body)", "message": f"{exc.msg} at line {exc.lineno} column {exc.colno}"}],
            )
        except (UnicodeDecodeError, RecursionError) as exc:
            return problems.problem(
                400, "malformed-json", "Malformed JSON", f"the body is not UTF-8 JSON: {type(exc).__name__}"
            )
        field = _surrogate_field(parsed)
        if field is not None:
            message = "holds a lone UTF-16 surrogate (not a Unicode character)"
            return problems.problem(
                422,
                "invalid-input",
                "The request is invalid",
                f"{field}: {message}",
                errors=[{"field": field, "message": message}],
            )
        return None

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        response = problems.problem(
            413, "too-large", "Request body too large", f"the body exceeds {max_bytes} bytes"
        )
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` to every answer; a page with its own content security policy
    keeps it, with ``frame-ancestors 'none'`` added if it lacks one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
                    elif name == "content-security-policy" and "frame-ancestors" not in headers[name]:
                        headers[name] = headers[name] + "; frame-ancestors 'none'"
            await send(message)

        await self.app(scope, receive, send_with_headers)
