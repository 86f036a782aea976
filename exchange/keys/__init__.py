"""The node's keys: private keys on disk, both parties' key sets, rotation and revocation."""

from exchange.keys.registry import KeyRegistry, PartnerKeys
from exchange.keys.store import KeyRing, NodeKeys, create_node_keys, load_node_keys

__all__ = ["KeyRegistry", "KeyRing", "NodeKeys", "PartnerKeys", "create_node_keys", "load_node_keys"]
