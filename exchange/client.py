"""A reference client for national systems: submit, follow and pull messages over mutual TLS.

Integrators may use it as is or as a worked example of the API (``docs/integrator.md``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from exchange.errors import TransportError
from exchange.transport.peer import client_ssl_context


class ExchangeClient:
    """One keep-alive mTLS connection pool to a node's local-system API."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        key_password: str,
        timeout: float = 10,
    ) -> None:
        ctx = client_ssl_context(
            ca_file=ca_file, cert_file=cert_file, key_file=key_file, key_password=key_password
        )
        self._http = httpx.Client(base_url=base_url, verify=ctx, timeout=timeout)

    def __enter__(self) -> ExchangeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A raw request (for callers that inspect problem JSON themselves)."""
        return self._http.request(method, path, **kwargs)

    def _json(self, response: httpx.Response, expected: int) -> dict[str, Any]:
        if response.status_code != expected:
            raise TransportError(f"HTTP {response.status_code}: {response.text}")
        body: dict[str, Any] = response.json()
        return body

    def submit(self, message: dict[str, Any]) -> dict[str, Any]:
        """POST a message; returns the 202 body. Raises TransportError with the problem otherwise."""
        return self._json(self._http.post("/v1/messages", json=message), 202)

    def status(self, message_id: str) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/messages/{message_id}"), 200)

    def inbox(self, after: int = 0, limit: int = 50) -> dict[str, Any]:
        return self._json(self._http.get("/v1/inbox", params={"after": after, "limit": limit}), 200)

    def health(self) -> dict[str, Any]:
        return self._json(self._http.get("/healthz"), 200)

    def wait_for_status(self, message_id: str, wanted: str, timeout: float = 30) -> dict[str, Any]:
        """Poll until the message reaches ``wanted``. Raises TransportError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(message_id)
            if status["status"] == wanted:
                return status
            if time.monotonic() > deadline:
                raise TransportError(
                    f"message {message_id} is {status['status']}, not {wanted}, after {timeout}s"
                )
            time.sleep(0.05)
