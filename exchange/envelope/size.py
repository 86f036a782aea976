"""The one size limit of the exchange: the agreement's ``max_envelope_bytes``. Pure.

A message is accepted only if its sealed envelope fits the limit; the receiver opens envelopes up
to the same limit (its JOSE registries are built from it) and accepts a peer request that carries
one envelope of that size (:func:`peer_body_limit`). So whatever a node accepts from a local system
the partner can take.
"""

from __future__ import annotations

from exchange.errors import MessageTooLarge

#: JSON framing of a batch request beyond the envelopes themselves: ``{"envelopes": [...]}`` and
#: per envelope two quotes and a comma. A fixed part for the wrapper and whitespace.
BATCH_FRAME_BYTES = 64

#: The ceiling of the agreement's ``max_envelope_bytes``: what this node's own stored copies (content
#: at rest, authenticated under its key) may reach, whatever the agreement in force.
LARGEST_ENVELOPE_BYTES = 256 * 1024 * 1024
ENVELOPE_FRAME_BYTES = 3


def check_envelope_size(compact: str, max_envelope_bytes: int) -> None:
    """Return if the sealed envelope fits the agreement's limit.

    Raises:
        MessageTooLarge: naming the envelope's size and the limit.
    """
    if len(compact) > max_envelope_bytes:
        raise MessageTooLarge(len(compact), max_envelope_bytes)


def batch_bytes(envelope_sizes: list[int]) -> int:
    """The body size of a peer request carrying envelopes of these sizes."""
    return BATCH_FRAME_BYTES + sum(size + ENVELOPE_FRAME_BYTES for size in envelope_sizes)


def peer_body_limit(max_envelope_bytes: int) -> int:
    """The largest peer request body: one envelope at the limit, or several smaller ones."""
    return batch_bytes([max_envelope_bytes])
