"""The node's HTTP API: client, peer, health; mutual TLS is mandatory on every connection."""
