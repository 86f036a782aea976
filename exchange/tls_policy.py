"""What TLS a node speaks, on both sides of every connection: TLS 1.2 or 1.3 only, and on TLS 1.2
only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305): no CBC, no RSA key
transport, no SHA-1 MACs. TLS 1.3 suites are all AEAD and need no list."""

from __future__ import annotations

import ssl

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Restrict ``ctx`` to the versions and ciphers above; returns it."""
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    return ctx
