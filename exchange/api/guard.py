"""The request edge: every body is bounded, typed and well-formed JSON before a route sees it, and
every answer carries the security headers.

:class:`RequestGuard` reads the whole body (refusing more than ``max_bytes``, whether declared in
``Content-Length`` or streamed chunked) and then answers, as RFC 9457 problem JSON:

- 413 for a body over the limit;
- 415 for a non-empty body that is not ``application/json`` (or ``+json``), except on the
  ``raw_paths`` whose own format is not JSON (the C2SP witness protocol's text body), which are only
  bounded and left to their route's strict parser;
- 400 for malformed JSON, with the line and column, for a key repeated in one object
  (which JSON parsers resolve differently: the last one wins here, the first one elsewhere), for
  ``NaN`` or ``Infinity`` (not JSON) and for a number of more digits than Python converts;
- 422, naming the field, for a string (key or value) holding a lone UTF-16 surrogate such as
  ``\\ud800`` (no database or JSON encoder accepts it) or a NUL character (PostgreSQL's text does
  not hold it), and for an integer beyond ±(2^53 - 1), which JSON parsers read differently and the
  canonical form of a signed message cannot carry (I-JSON, RFC 7493; JCS, RFC 8785), and for a
  number beyond a double's range (``1e400``);
- 400 for a URL holding a NUL character;
- 408 for a body of which nothing arrives for ``body_timeout_seconds`` (a stalled sender holding a
  slot of :class:`ConcurrencyLimit`);
- 403 for a request a browser sent for a page of another origin (``Sec-Fetch-Site``, ``Origin``):
  the browser presents the user's client certificate to any page's request.

A path may have a larger limit than the others for some callers only (the partner node's envelope
batches): anyone else is held to the common limit before the body is read.

Only then is the buffered body handed to the application. :class:`ConcurrencyLimit` bounds the
requests in progress before that (503 past it). :class:`SecurityHeaders` adds HSTS,
``nosniff``, ``frame-ancestors 'none'`` and ``Cache-Control: no-store`` (answers hold decrypted
intelligence; no proxy or browser may keep them).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.api import problems

JSON_TYPES = (b"application/json",)
#: requests in progress for every node certificate of the partner's CA whose key is not pinned as
#: held (a key rotated this second, or a forgery): a floor, not a policy, so not a setting
UNPINNED_IN_PROGRESS = 2

SECURITY_HEADERS: dict[str, str] = {
    "strict-transport-security": "max-age=31536000",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


#: the largest integer every JSON parser reads exactly (I-JSON, RFC 7493 §2.2)
MAX_SAFE_INTEGER = 2**53 - 1


class _NotJson(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's parser accepts them, JSON does not."""


def _no_constants(name: str) -> Any:
    raise _NotJson(name)


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


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (U+0000), which no text field may hold"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "holds a lone UTF-16 surrogate (not a Unicode character)"
    return None


def _refused_value(value: Any) -> tuple[str, str] | None:
    """The path and the reason of the first key or value no route may receive (a lone surrogate, a
    NUL character, an integer beyond :data:`MAX_SAFE_INTEGER`), or None."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            problem = _string_problem(item)
            if problem is not None:
                return "/".join(where) or "(body)", problem
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                return "/".join(
                    where
                ) or "(body)", "is an integer beyond ±(2^53 - 1), which JSON cannot carry exactly"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "/".join(where) or "(body)", "is a number beyond the range of a double"
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = _string_problem(key)
                if problem is not None:
                    shown = key.encode(errors="backslashreplace").decode().replace("\x00", "\\u0000")
                    return "/".join((*where, shown)), "the key " + problem
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, str(i))) for i, child in enumerate(item))
    return None


def _malformed(detail: str, message: str | None = None) -> Any:
    """A 400 problem for a body that is not JSON (``message``: the error naming the body)."""
    errors: dict[str, Any] = {} if message is None else {"errors": [{"field": "(body)", "message": message}]}
    return problems.problem(400, "malformed-json", "Malformed JSON", detail, **errors)


def _cross_site(scope: Scope, headers: dict[bytes, bytes], navigable: frozenset[str]) -> bool:
    """Whether a browser sent this request for a page of another origin (cross-site request
    forgery: the browser presents the user's client certificate to any page's request). By the
    Fetch Metadata a browser sends (``Sec-Fetch-Site``; a top-level navigation by GET is let
    through to the console's page only: any other, an export or a message's content, would do work
    or ledger a read in the user's name) and by ``Origin`` (which must be this node's own). Other
    clients send neither."""
    site = headers.get(b"sec-fetch-site")
    navigation = (
        scope["method"] in ("GET", "HEAD")
        and headers.get(b"sec-fetch-mode") == b"navigate"
        and scope["path"] in navigable
    )
    if site in (b"cross-site", b"same-site") and not navigation:  # (same-origin, none: the user's own)
        return True
    origin = headers.get(b"origin")
    if origin is None:
        return False
    host = headers.get(b"host", b"")
    return origin != b"https://" + host


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
        path_limits: dict[str, tuple[int, Callable[[Scope], bool]]] | None = None,
        body_timeout_seconds: float = 30.0,
        navigable: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_seconds = body_timeout_seconds
        #: the pages a link on another site may open (a navigation): the auditor console's
        self.navigable = navigable
        self.raw_paths = raw_paths
        #: exact paths with their own limit and who may use it (the partner's envelope batches)
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await problems.problem(
                400, "malformed-url", "Malformed URL", "the URL holds a NUL character (%00)"
            )(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if _cross_site(scope, headers, self.navigable):
            await problems.problem(
                403,
                "cross-site",
                "A request from another site's page",
                "a browser sent this request for a page of another origin: the node answers its own"
                " console's requests only",
            )(scope, receive, send)
            return
        own = self.path_limits.get(scope["path"])
        max_bytes = own[0] if own is not None and own[1](scope) else self.max_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await self._too_large(scope, receive, send, max_bytes)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            try:  # a body that stalls (however slowly a large one comes, as long as it comes)
                message = await asyncio.wait_for(receive(), self.body_timeout_seconds)
            except TimeoutError:
                response = problems.problem(
                    408,
                    "request-timeout",
                    "The request body stalled",
                    f"no part of the body was received for {self.body_timeout_seconds:g} seconds",
                )
                response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
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
            parsed = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        except _Duplicate as exc:
            return _malformed(
                f"the key {exc.key!r} appears twice in one object", f"duplicate key {exc.key!r}"
            )
        except json.JSONDecodeError as exc:
            where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            return _malformed(f"the body is not JSON: {where}", where)
        except _NotJson as exc:
            return _malformed(
                f"the body is not JSON: {exc} is not a JSON number", f"{exc} is not a JSON number"
            )
        except (UnicodeDecodeError, RecursionError) as exc:
            return _malformed(f"the body is not UTF-8 JSON: {type(exc).__name__}")
        except ValueError:  # (json's own errors are ValueErrors too, caught above)
            return _malformed(
                "the body holds a number of more than 4300 digits", "a number of more than 4300 digits"
            )
        refused = _refused_value(parsed)
        if refused is not None:
            field, message = refused
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


class ConcurrencyLimit:
    """Bound the requests a process has in progress, before a body is read, by the kind of caller
    ``kind_of`` tells from its certificate (cached checks, no database):

    - ``"local"`` (a certificate of this node's CA): at most ``per_caller`` each, and ``total`` for
      all of them together (so the bodies buffered stay within ``total`` times the body limit);
    - ``"partner"`` (the partner node, by its pinned key): at most ``per_partner`` in all, outside
      the total, so local systems cannot starve the partner's deliveries, nor a partner flood them;
    - ``"unpinned"`` (a node certificate of the partner's CA with its name, a key not pinned as
      held: just rotated, or a forgery): at most :data:`UNPINNED_IN_PROGRESS` in all, outside both;
    - None (any other certificate the TLS layer trusts, such as the partner's local systems): 403
      at once; nothing here serves it.

    Past a bound: 503 problem JSON ``overloaded`` with ``Retry-After``, the connection closed.
    Counted per process (asyncio: one event loop, no lock); a body that does not come holds its
    slot at most ``body_timeout_seconds`` (:class:`RequestGuard`)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        total: int,
        per_caller: int,
        per_partner: int,
        retry_after: int,
        caller_of: Callable[[Scope], bytes | None],
        kind_of: Callable[[bytes | None], str | None],
    ) -> None:
        self.app = app
        self.total = total
        self.bound = {"local": per_caller, "partner": per_partner, "unpinned": UNPINNED_IN_PROGRESS}
        self.retry_after = str(retry_after)
        self.caller_of = caller_of  # the caller's certificate
        self.kind_of = kind_of
        self.in_progress = 0  # the local callers'
        self.by_caller: dict[bytes | None, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = self.caller_of(scope)
        kind = self.kind_of(caller)
        if kind is None:
            await problems.problem(
                403,
                "forbidden",
                "The client certificate is not registered for this API",
                "this certificate is neither of this node's certificate authority nor the partner node's",
            )(scope, receive, send)
            return
        if kind != "local":  # one bucket for each kind of node certificate, whatever the certificate
            caller = kind.encode()
        mine, local = self.by_caller.get(caller, 0), kind == "local"
        if mine >= self.bound[kind] or (local and self.in_progress >= self.total):
            which = (
                f"this caller has {mine} requests in progress (at most {self.bound[kind]})"
                if mine >= self.bound[kind]
                else f"the node has {self.in_progress} requests in progress (at most {self.total})"
            )
            response = problems.problem(
                503,
                "overloaded",
                "Too many requests in progress",
                f"{which}: send again after the Retry-After delay",
                headers={"retry-after": self.retry_after, "connection": "close"},
            )
            await response(scope, receive, send)
            return
        self.by_caller[caller] = mine + 1
        self.in_progress += local
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= local
            left = self.by_caller[caller] - 1
            if left:
                self.by_caller[caller] = left
            else:
                del self.by_caller[caller]


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
