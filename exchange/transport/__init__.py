"""Delivery to the partner node: the peer transport and the outbox worker."""
