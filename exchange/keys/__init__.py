"""Message keys: the node's own (encrypted at rest) and the partner's (learnt from the agreement)."""

from exchange.keys.store import KeyRing, NodeKeys, PartnerKeys, create_node_keys, load_node_keys

__all__ = ["KeyRing", "NodeKeys", "PartnerKeys", "create_node_keys", "load_node_keys"]
