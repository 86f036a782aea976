"""Canonical JSON (RFC 8785, JCS) and the digests taken over it.

Invariant: equal JSON values always encode to the same bytes, so a hash over them is stable across
processes, languages and both nodes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785


def canonical_json(value: Any) -> bytes:
    """Encode a JSON value per RFC 8785. Raises ``ValueError`` for values JSON cannot hold."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError) as exc:
        raise ValueError(f"value cannot be canonicalised: {exc}") from exc


def sha256_hex(data: bytes | str) -> str:
    """Hex SHA-256 of bytes (a ``str`` is UTF-8 encoded first)."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()
