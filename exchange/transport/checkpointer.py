"""The checkpointer: signs the ledger's checkpoints and has the partner witness them.

Every ``checkpoint_interval_seconds`` while the ledger grows: sign a checkpoint, send it with a
consistency proof from the last size the partner cosigned, and keep the cosignature. If the partner
holds another size (a lost answer), the proof is rebuilt from that size once. A refusal is logged as
the security incident it is; the loop carries on.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from exchange.checkpoints import CheckpointService
from exchange.errors import DatabaseUnavailable, TransportError
from exchange.ledger.checkpoint import CheckpointError
from exchange.transport.peer import PeerTransport

log = logging.getLogger("exchange.checkpointer")


class Checkpointer:
    """One round at a time (:meth:`run_once`), or a loop until :meth:`stop`."""

    def __init__(self, service: CheckpointService, transport: PeerTransport, interval: float) -> None:
        self.service = service
        self.transport = transport
        self.interval = interval
        self._stop = threading.Event()

    def run_once(self) -> int | None:
        """Sign if the ledger grew, then get the latest checkpoint cosigned. Returns the size the
        partner cosigned in this round, if any."""
        now = dt.datetime.now(dt.UTC)
        self.service.sign_latest(now)
        request = self.service.to_witness()
        if request is None:
            return None
        answer = self.transport.witness(request)
        if answer.cosignature is None and answer.witnessed_size is not None and not answer.incident:
            if answer.witnessed_size > request.size:
                log.error(
                    "SECURITY INCIDENT: the partner witnessed size %d, beyond our ledger",
                    answer.witnessed_size,
                )
                return None
            request = self.service.to_witness(from_size=answer.witnessed_size)
            if request is None:
                return None
            answer = self.transport.witness(request)
        if answer.cosignature is None:
            self.service.refused_by_partner(request, now)
            return None
        self.service.record_cosignature(request, answer.cosignature, now)
        return request.size

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except (TransportError, CheckpointError) as exc:
                log.warning("checkpoint round failed: %s", exc)
            except DatabaseUnavailable:
                pass  # a condition the Database logs once, not a traceback per round
            except Exception:
                log.exception("checkpoint round failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
