"""What an operator sees of a running node: Prometheus metrics (:mod:`.metrics`) and JSON-line logs
(:mod:`.logs`). Neither ever holds message content or the identity of a person."""

#: the role of a client registered with ``exchange clients add-monitoring``: it reads ``/metrics``
#: and nothing else (never a message, never the audit ledger)
MONITORING_ROLE = "MONITORING"
