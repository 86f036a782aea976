"""The ASGI TLS extension for uvicorn.

uvicorn (up to at least 0.54) terminates TLS but does not hand the verified peer certificate to the
application. Every authorisation decision here rests on that certificate, so this module adds the
ASGI ``tls`` extension (https://asgi.readthedocs.io/en/latest/specs/tls.html) to each HTTP scope:
:class:`TLSHttpToolsProtocol` reads the certificate the ``ssl`` module verified during the handshake
(``getpeercert(binary_form=True)``) once per connection and attaches it to every request on it.

The application fails closed: a request whose scope has no ``tls`` extension or no client
certificate is treated as unauthenticated.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from exchange.crypto import der_to_pem

TLS_VERSIONS = {
    "TLSv1.2": 0x0303,
    "TLSv1.3": 0x0304,
}


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI ``tls`` extension for a connection, or None if it is not TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": [der_to_pem(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": TLS_VERSIONS.get(version or ""),
        "cipher_suite": None,
        "cipher_name": cipher[0] if cipher else None,
    }


class TLSHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI ``tls`` extension on every request scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls_extension(transport)

    def shutdown(self) -> None:
        """Graceful shutdown: an idle TLS connection is aborted rather than closed, because closing
        waits for the peer's close_notify, which an idle keep-alive client never sends (the server
        would then sit out its whole graceful-shutdown timeout). In-flight requests still finish."""
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle and self._tls is not None:
            self.transport.abort()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]
