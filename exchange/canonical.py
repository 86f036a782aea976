"""Canonical JSON (RFC 8785, JCS) and the digests taken over it.

Invariant: equal JSON values always encode to the same bytes, so a hash over them is stable across
processes, languages and both nodes.

:func:`canonical_json` is the ``rfc8785`` library's output, byte for byte. For the values this
project encodes (strings, integers within ±(2**53 - 1), booleans, nulls, lists and objects with
ASCII keys, no floats; a ``str`` subclass such as a ``StrEnum`` counts as its string) RFC 8785
coincides with the standard library's C JSON encoder with sorted keys, no whitespace and no ASCII
escaping: the same escapes (``\\b \\f \\n \\r \\t \\" \\\\`` and ``\\u00xx`` for other controls),
integers in decimal, and ASCII keys sorted by code point, which is their UTF-16 order. Any other
value (a float, a non-ASCII key, an integer outside that range, a lone surrogate, another type)
takes the ``rfc8785`` library's own path, so its bytes or its error are exactly the library's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

_INT_MAX = 2**53 - 1
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")).encode


class _Unusual(Exception):
    """A value outside the fast path's domain (see the module docstring)."""


def _check(value: Any) -> None:
    """Raise _Unusual unless ``value`` is in the domain where the C encoder is RFC 8785."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key.isascii():
                raise _Unusual
            if type(item) is not str:
                _check(item)
        return
    if kind is list or kind is tuple:
        for item in value:
            if type(item) is not str:
                _check(item)
        return
    if kind is int and -_INT_MAX <= value <= _INT_MAX:
        return
    if isinstance(value, str):  # a StrEnum: both encode the string itself, never its __str__
        return
    raise _Unusual  # floats, subclasses, out-of-range integers and anything else


def _library(value: Any) -> bytes:
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError) as exc:
        raise ValueError(f"value cannot be canonicalised: {exc}") from exc


def canonical_json(value: Any) -> bytes:
    """Encode a JSON value per RFC 8785. Raises ``ValueError`` for values JSON cannot hold."""
    try:
        _check(value)
        return _encode(value).encode("utf-8")  # a lone surrogate fails here: the library decides
    except (_Unusual, UnicodeEncodeError, RecursionError):
        return _library(value)


def sha256_hex(data: bytes | str) -> str:
    """Hex SHA-256 of bytes (a ``str`` is UTF-8 encoded first)."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()
