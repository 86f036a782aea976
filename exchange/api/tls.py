"""The ASGI TLS extension for uvicorn.

uvicorn (up to at least 0.54) terminates TLS but does not hand the verified peer certificate to the
application. Every authorisation decision here rests on that certificate, so this module adds the
ASGI ``tls`` extension (https://asgi.readthedocs.io/en/latest/specs/tls.html) to each HTTP scope:
:class:`TLSHttpToolsProtocol` reads the certificate the ``ssl`` module verified during the handshake
(``getpeercert(binary_form=True)``) once per connection and attaches it to every request on it.

The application fails closed: a request whose scope has no ``tls`` extension or no client
certificate is treated as unauthenticated.

The protocol also bounds what uvicorn's httptools parser keeps of a request's head: the URL and
headers of one request past the node's ``max_head_bytes`` (:data:`MAX_HEAD_BYTES` unless the
configuration says otherwise) are answered 431 (problem JSON) and the
connection closed, before any route or authorisation runs (uvicorn keeps appending otherwise).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from exchange.api.guard import SECURITY_HEADERS
from exchange.api.problems import PROBLEM_TYPE_BASE
from exchange.crypto import der_to_pem

#: the most bytes of URL and headers one request may carry, unless the uvicorn configuration says
#: otherwise (``max_head_bytes``, from the node's settings: exchange.api.server); each header is
#: counted with a :data:`HEADER_OVERHEAD` too, so that many empty headers are bounded as well
MAX_HEAD_BYTES = 64 * 1024
HEADER_OVERHEAD = 32

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
        self._head_bytes = self._head_data = 0
        self._in_head = True
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]

    @property
    def max_head_bytes(self) -> int:
        """The bound on a request's URL and headers: the configuration's, or :data:`MAX_HEAD_BYTES`."""
        return int(getattr(self.config, "max_head_bytes", MAX_HEAD_BYTES))

    _head_bytes = 0  # of the URL and the complete headers of the request being read
    _head_data = 0  # received while its head is not complete (a header still arriving)
    _in_head = False
    _refused = False

    def data_received(self, data: bytes) -> None:
        """As uvicorn's, but a head still incomplete past :attr:`max_head_bytes` of data is
        refused: the parser buffers a header until it is complete, so counting complete headers
        alone would let one endless header through."""
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self._refused:
            self._head_data += len(data)
            if self._head_data > self.max_head_bytes:
                self._refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            # the parser stops on the error; uvicorn then calls send_400_response, answered 431 below
            raise ValueError("request head too large")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + HEADER_OVERHEAD)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes <= self.max_head_bytes:
            super().send_400_response(msg)
            return
        self._refuse_head()

    def _refuse_head(self) -> None:
        """Answer 431 (problem JSON) and close the connection."""
        self._refused = True
        body = json.dumps(
            {
                "type": PROBLEM_TYPE_BASE + "headers-too-large",
                "title": "Request header fields too large",
                "status": 431,
                "detail": f"the URL and headers of a request exceed {self.max_head_bytes} bytes",
            }
        ).encode()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        headers = {
            **SECURITY_HEADERS,
            "content-type": "application/problem+json",
            "content-length": str(len(body)),
            "connection": "close",
        }
        head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()
