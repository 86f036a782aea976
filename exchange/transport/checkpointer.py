"""The checkpointer: signs the ledger's checkpoints and has the partner and any further witnesses
cosign them, all through the C2SP tlog-witness protocol.

Every ``checkpoint_interval_seconds`` while the ledger grows: sign a checkpoint, send it to each
witness with a consistency proof from the last size that witness cosigned, and keep the cosignature.
If a witness holds another size (a lost answer), the proof is rebuilt from that size once. A refusal
is ledgered as the security incident it is; the loop carries on.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence

from exchange.checkpoints import CheckpointService, WitnessRequest
from exchange.errors import DatabaseUnavailable, TransportError
from exchange.ledger.checkpoint import CheckpointError
from exchange.transport.peer import PeerTransport, WitnessAnswer, WitnessClient

log = logging.getLogger("exchange.checkpointer")


class Checkpointer:
    """One round at a time (:meth:`run_once`), or a loop until :meth:`stop`."""

    def __init__(
        self,
        service: CheckpointService,
        transport: PeerTransport,
        interval: float,
        witnesses: Sequence[WitnessClient] = (),
    ) -> None:
        self.service = service
        self.transport = transport
        self.interval = interval
        self.witnesses = list(witnesses)
        self._stop = threading.Event()

    def run_once(self) -> int | None:
        """Sign if the ledger grew, then get the latest checkpoint cosigned by the partner and by every
        further witness. Returns the size the partner cosigned in this round, if any."""
        now = dt.datetime.now(dt.UTC)
        self.service.sign_latest(now)
        try:
            cosigned = self._round(self.transport.witness, None, now)
        finally:  # a partner outage does not hold back the further witnesses, nor they each other
            for witness in self.witnesses:
                try:
                    self._round(witness.witness, witness, now)
                except (TransportError, CheckpointError) as exc:
                    log.warning("witness %s did not cosign: %s", witness.name, exc)
        return cosigned

    def _round(
        self, ask: Callable[[WitnessRequest], WitnessAnswer], witness: WitnessClient | None, now: dt.datetime
    ) -> int | None:
        name = witness.name if witness is not None else None
        verifier = None
        if witness is not None:
            verifier = next(w.verifier for w in self.service.node.agreement.witnesses if w.name == name)
        request = self.service.to_witness(witness=name)
        if request is None:
            return None
        answer = ask(request)
        if answer.cosignature is None and answer.witnessed_size is not None and not answer.incident:
            if answer.witnessed_size > request.size:
                log.error(
                    "SECURITY INCIDENT: %s witnessed size %d, beyond our ledger",
                    name or "the partner",
                    answer.witnessed_size,
                )
                return None
            request = self.service.to_witness(from_size=answer.witnessed_size, witness=name)
            if request is None:
                return None
            answer = ask(request)
        if answer.cosignature is None:
            self.service.refused_by_partner(request, now, name)
            return None
        self.service.record_cosignature(request, answer.cosignature, now, verifier)
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

    def close(self) -> None:
        for witness in self.witnesses:
            witness.close()
