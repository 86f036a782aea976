"""The checkpointer: signs the ledger's checkpoints and has the partner and any further witnesses
cosign them, all through the C2SP tlog-witness protocol.

Every ``checkpoint_interval_seconds`` while the ledger grows: sign a checkpoint, send it to each
witness with a consistency proof from the last size that witness cosigned, and keep the cosignature.
If a witness holds another size (a lost answer), the proof is rebuilt from that size once. A refusal
is ledgered as the security incident it is; the loop carries on.

One process of a node leads the checkpointer (:mod:`exchange.loops`); as a second line of defence,
a checkpoint is sent only while it is still the node's latest (:meth:`CheckpointService.is_latest`),
so a process that lost the leadership mid-round never shows a witness a smaller checkpoint after a
larger one (which the witness would rightly take for a rollback). Rounds run at most every
``interval``; the ledger's growth (a NOTIFY) starts a due round at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence

from exchange.checkpoints import CheckpointService, WitnessRequest
from exchange.errors import TransportError
from exchange.ledger.checkpoint import CheckpointError
from exchange.observability import logs
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
        self._last_round = -float("inf")

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
        if request is None or not self._still_latest(request):
            return None
        answer = ask(request)
        if answer.cosignature is None and answer.witnessed_size is not None and not answer.incident:
            if answer.witnessed_size > request.size:
                logs.security_incident(
                    log,
                    "checkpoint",
                    "%s witnessed size %d, beyond our ledger",
                    name or "the partner",
                    answer.witnessed_size,
                )
                return None
            request = self.service.to_witness(from_size=answer.witnessed_size, witness=name)
            if request is None or not self._still_latest(request):
                return None
            answer = ask(request)
        if answer.cosignature is None:
            self.service.refused_by_partner(request, now, name)
            return None
        self.service.record_cosignature(request, answer.cosignature, now, verifier)
        return request.size

    def _still_latest(self, request: WitnessRequest) -> bool:
        if self.service.is_latest(request):
            return True
        log.info("checkpoint at size %d superseded before it was sent; not sent", request.size)
        return False

    # --- background loop (exchange.loops.LoopRunner) --------------------------------------------

    def lead(self) -> None:
        """Nothing to recover: every round starts from what the database holds."""

    def step(self) -> float:
        """One round if ``interval`` has passed since the last one; returns when the next is due."""
        now = time.monotonic()
        if now < self._last_round + self.interval:
            return self._last_round + self.interval - now
        self._last_round = now
        try:
            self.run_once()
        except (TransportError, CheckpointError) as exc:
            log.warning("checkpoint round failed: %s", exc)
        return self.interval

    def close(self) -> None:
        for witness in self.witnesses:
            witness.close()
