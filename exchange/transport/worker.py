"""The delivery worker: drains the transactional outbox to the partner node.

Guarantees: a message leaves the outbox only in the transaction that records its verified receipt
(delivered) or the partner's rejection (failed), together with their ledger entries. A crash at any
point leaves the row in the outbox; its lease expires and it is sent again, and the partner answers
a redelivery with the original receipt. Transport failures back off exponentially with jitter.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable

from exchange import envelope
from exchange.db import repo
from exchange.errors import EnvelopeError, TransportError
from exchange.ledger import EntryDraft
from exchange.node import Node, PeerResult, iso
from exchange.transport.peer import PeerTransport

log = logging.getLogger("exchange.delivery")


def backoff_delay(attempts: int, *, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random (``jitter`` in [0, 1))."""
    ceiling: float = min(cap, base * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + ceiling / 2 * jitter


class DeliveryWorker:
    """Claims due envelopes in batches, sends them, and records receipts or failures."""

    def __init__(
        self,
        node: Node,
        transport: PeerTransport,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.node = node
        self.transport = transport
        self.clock = clock
        self.jitter = jitter
        self._stop = threading.Event()
        self._wake = threading.Event()

    def run_once(self) -> int:
        """One delivery round; returns how many envelopes were settled (delivered or failed)."""
        settings = self.node.settings
        now = self.clock()
        with self.node.db.transaction() as conn:
            claimed = repo.claim_due(
                conn,
                now=now,
                lease_seconds=settings.delivery_lease_seconds,
                limit=settings.delivery_batch_size,
            )
            for item in claimed:
                repo.update_message(
                    conn,
                    item.message_id,
                    status="sent",
                    attempts=item.attempts,
                    updated_at=iso(dt.datetime.fromtimestamp(now, dt.UTC)),
                )
        if not claimed:
            return 0
        try:
            results = self.transport.send([c.envelope for c in claimed])
        except TransportError as exc:
            self._retry_later(claimed, str(exc))
            return 0
        return self._settle(claimed, results)

    def _retry_later(self, claimed: list[repo.Claimed], error: str) -> None:
        settings = self.node.settings
        now = self.clock()
        log.warning("delivery of %d envelope(s) deferred: %s", len(claimed), error)
        with self.node.db.transaction() as conn:
            for item in claimed:
                delay = backoff_delay(
                    item.attempts,
                    base=settings.delivery_backoff_base_seconds,
                    cap=settings.delivery_backoff_max_seconds,
                    jitter=self.jitter(),
                )
                repo.reschedule(conn, item.message_id, next_attempt_at=now + delay, error=error)
                repo.update_message(
                    conn,
                    item.message_id,
                    status="queued",
                    status_reason=f"attempt {item.attempts} failed: {error}; retrying in {delay:.1f}s",
                    updated_at=iso(dt.datetime.fromtimestamp(now, dt.UTC)),
                )

    def _settle(self, claimed: list[repo.Claimed], results: list[PeerResult]) -> int:
        now_dt = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        at = iso(now_dt)
        partner = self.node.partner
        drafts: list[EntryDraft] = []
        updates: list[tuple[str, dict[str, object]]] = []
        for item, result in zip(claimed, results, strict=True):
            if not result.accepted or result.receipt is None:
                updates.append(
                    (item.message_id, {"status": "failed", "status_reason": "rejected by the partner node"})
                )
                drafts.append(
                    EntryDraft(
                        event="message.delivery_failed",
                        message_id=item.message_id,
                        actor=self.node.partner_party,
                        decision="deny",
                        data={"envelope_sha256": item.envelope_sha256, "reason": "rejected"},
                    )
                )
                continue
            try:
                receipt = envelope.verify_receipt(
                    result.receipt,
                    verification_keys=partner.verification,
                    expected_message_id=item.message_id,
                    expected_envelope_sha256=item.envelope_sha256,
                    expected_receiver=self.node.partner_party,
                )
            except EnvelopeError as exc:
                log.error("invalid receipt for message %s: %s", item.message_id, exc)
                updates.append(
                    (item.message_id, {"status": "failed", "status_reason": f"invalid receipt: {exc.reason}"})
                )
                drafts.append(
                    EntryDraft(
                        event="receipt.invalid",
                        message_id=item.message_id,
                        actor=self.node.partner_party,
                        decision="deny",
                        data={"reason": exc.reason},
                    )
                )
                continue
            updates.append(
                (
                    item.message_id,
                    {
                        "status": "delivered",
                        "status_reason": None,
                        "envelope": None,  # the transport JWE is not kept: the content is at rest
                        "receipt": receipt.compact,
                        "receipt_at": receipt.received_at,
                    },
                )
            )
            drafts.append(
                EntryDraft(
                    event="message.sent",
                    message_id=item.message_id,
                    actor=self.node.party,
                    data={"envelope_sha256": item.envelope_sha256, "attempts": item.attempts},
                )
            )
            drafts.append(
                EntryDraft(
                    event="receipt.verified",
                    message_id=item.message_id,
                    actor=self.node.partner_party,
                    decision="allow",
                    data={
                        "receipt_sha256": envelope.envelope_digest(receipt.compact),
                        "signer_kid": receipt.signer_kid,
                    },
                )
            )
        with self.node.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            settled = [(mid, values) for mid, values in updates if repo.dequeue(conn, mid)]
            kept = {mid for mid, _ in settled}
            for mid, values in settled:
                repo.update_message(conn, mid, updated_at=at, **values)
            repo.append_ledger(conn, head, [d for d in drafts if d.message_id in kept], at)
        return len(settled)

    # --- background loop -------------------------------------------------------------------------

    def wake(self) -> None:
        """Ask the loop to look at the outbox now (after a submission)."""
        self._wake.set()

    def run_forever(self) -> None:
        """Deliver until :meth:`stop`; never dies on an error, only logs it and backs off."""
        poll = self.node.settings.delivery_poll_seconds
        while not self._stop.is_set():
            try:
                settled = self.run_once()
            except Exception:
                log.exception("delivery round failed; retrying")
                settled = 0
            if settled == 0:
                self._wake.wait(poll)
                self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
