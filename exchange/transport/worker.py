"""The delivery worker: drains the transactional outbox to the partner node.

Guarantees:

- a message leaves the outbox only in the transaction that records its verified receipt
  (``delivered``), the partner's rejection or refusal, or its expiry (``failed``, with a reason),
  together with their ledger entries. A crash at any point leaves the row in the outbox; the lease
  names its holder, and a restarted worker takes its own leases back at once (another worker waits
  for the lease to run out). The partner answers a redelivery with the original receipt.
- the oldest messages go first, in batches bounded by count and by bytes (the agreement's
  ``max_envelope_bytes`` and the partner's matching body limit). A partner's 4xx about a batch's
  content splits the batch, and fails alone the one envelope it refuses: it never holds the others.
- backoff is per partner, not per message: while the partner is unreachable, one probe (one batch,
  one connection) goes out on the backoff schedule; once a delivery succeeds, everything waiting
  goes at once, oldest first. A probe is never scheduled past the oldest waiting message's deadline
  when an earlier one can still save it.
- a message not delivered within ``min(delivery_max_wait_seconds, replay_window_seconds -
  delivery_expiry_margin_seconds)`` of its submission ends ``failed`` with the reason ``expired``,
  ledgered: it is never lost silently to the partner's replay window (docs/adr/0010).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from exchange import envelope
from exchange.db import repo
from exchange.db.engine import is_conflict, is_unavailable
from exchange.envelope.size import batch_bytes, peer_body_limit
from exchange.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    EnvelopeError,
    PartnerKeysUnavailable,
    PartnerRefused,
    TransactionConflict,
    TransportError,
)
from exchange.keys.announcement import AnnouncementRejected
from exchange.ledger import EntryDraft
from exchange.node import Node, PeerResult, iso
from exchange.observability import metrics
from exchange.transport.peer import PeerTransport

log = logging.getLogger("exchange.delivery")


def backoff_ceiling(attempts: int, *, base: float, cap: float) -> float:
    """``base`` doubled for each attempt after the first, never above ``cap`` (and never an
    overflow, however many attempts)."""
    return float(min(cap, base * 2.0 ** min(max(0, attempts - 1), 64)))


def backoff_delay(attempts: int, *, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random (``jitter`` in [0, 1))."""
    ceiling = backoff_ceiling(attempts, base=base, cap=cap)
    return ceiling / 2 + ceiling / 2 * jitter


def probe_delay(
    failures: int, *, base: float, cap: float, jitter: float, until_deadline: float | None
) -> float:
    """When to probe the partner again after ``failures`` failed rounds in a row.

    The backoff delay, but never beyond half the time left before the oldest waiting message
    expires (and never below ``base``): probes close in on a deadline instead of jumping past it.
    """
    delay = backoff_delay(failures, base=base, cap=cap, jitter=jitter)
    if until_deadline is not None:
        delay = min(delay, max(base, until_deadline / 2))
    return delay


@dataclass
class PartnerBackoff:
    """The partner's state as the worker sees it: how many rounds failed in a row, and when to
    probe next. In memory: a restarted worker probes at once."""

    failures: int = 0
    retry_at: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, now: float, delay: float) -> None:
        self.failures += 1
        self.retry_at = now + delay

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


@dataclass(frozen=True)
class Refused:
    """The partner refused one envelope by HTTP status (for example 413: larger than it accepts)."""

    status: int
    detail: str


Outcome = PeerResult | Refused


def delivery_expiry_seconds(max_wait: float, replay_window: float, margin: float) -> float:
    """How long a message may wait before it ends ``failed`` with the reason ``expired``.

    Raises:
        ConfigurationError: the margin leaves no time inside the replay window.
    """
    if replay_window - margin <= 0:
        raise ConfigurationError("delivery_expiry_margin_seconds must be smaller than replay_window_seconds")
    return min(max_wait, replay_window - margin)


def default_worker_id(node: Node) -> str:
    """Host name and node directory: the same after a restart, different for another node."""
    return f"{socket.gethostname()}:{node.settings.node_dir.resolve()}"[:200]


class DeliveryWorker:
    """Claims due envelopes in batches, sends them, and records receipts, refusals or expiry."""

    def __init__(
        self,
        node: Node,
        transport: PeerTransport,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        settings = node.settings
        self.node = node
        self.transport = transport
        self.clock = clock
        self.jitter = jitter
        self.worker_id = settings.delivery_worker_id or default_worker_id(node)
        self.expiry_seconds = delivery_expiry_seconds(
            settings.delivery_max_wait_seconds,
            settings.replay_window_seconds,
            settings.delivery_expiry_margin_seconds,
        )
        self.max_request_bytes = peer_body_limit(node.agreement.max_envelope_bytes)
        self.partner = PartnerBackoff()
        self._announce_after = 0.0
        self._waiting_with = 0  # our newest version when the wait until _announce_after began
        #: our key-set version the partner is known to hold: a round reads the table of
        #: unacknowledged versions only when this process's own version is newer
        self._acknowledged_through = 0
        #: receipts of our key set refused in a row: each doubles the wait before announcing again
        self._receipts_refused = 0
        #: the expiry sweep runs at most this often (see expire_overdue)
        self.sweep_seconds = min(settings.delivery_expiry_sweep_seconds, self.expiry_seconds / 10)
        self._swept_at = -math.inf
        self._recovered = False
        self.interval = settings.delivery_poll_seconds  # the fallback poll: wake-ups come first
        #: the loop settles a round's answers in this thread while it sends the next round
        self._settler: ThreadPoolExecutor | None = None
        self._settling: Future[int] | None = None
        #: the last round's claim left due messages behind (the count or the byte bound)
        self._claim_left_some = False

    # --- one round -------------------------------------------------------------------------------

    def run_once(self, *, settle_later: bool = False) -> int:
        """One delivery round; returns how many envelopes were settled (delivered or failed).

        ``settle_later``: the answers are settled in the settling thread while the caller goes on
        (the next round is sent meanwhile); they count as settled. At most one round is being
        settled, and rounds are settled in order: a round with answers first waits for the last
        one, whose error is logged, never raised here (this round's answers are still recorded;
        the failed round's messages are sent again when their leases end, and the partner answers
        with its original receipts). :meth:`finish_settling` raises it instead."""
        if not self._recovered:
            self.recover_leases()
        settings = self.node.settings
        now = self.clock()
        self._claim_left_some = False
        settled = self.expire_overdue(now)
        if not self.partner.ready(now):
            return settled
        with self.node.db.transaction() as conn:
            claim = repo.claim_due(
                conn,
                now=now,
                queued_since=now - self.expiry_seconds,
                lease_seconds=settings.delivery_lease_seconds,
                limit=settings.delivery_batch_size,
                max_bytes=self.max_request_bytes,
                worker=self.worker_id,
                frame=batch_bytes,
                updated_at=self._at(now),
                key_sets_of=self.node.party,
            )
        claimed = claim.envelopes
        self._claim_left_some = claim.more_due
        try:  # the partner learns a key before it sees it used: our new key sets go first
            self._announce_keys(now, pending=claim.key_sets_unacknowledged)
        except TransportError as exc:
            self._partner_down(claimed, claim.lease, exc)
            return settled
        if not claimed:
            return settled
        started = time.monotonic()
        done, rest, error = self._deliver(claimed)
        refused = sum(isinstance(outcome, Refused) for _, outcome in done)
        metrics.delivery_round(
            answered=len(done) - refused,
            refused=refused,
            unreachable=len(rest),
            seconds=time.monotonic() - started,
        )
        if done:
            settled += self._last_round_settled()
            if settle_later:
                if self._settler is None:
                    self._settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle")
                self._settling = self._settler.submit(self._settle, done)
                settled += len(done)
            else:
                settled += self._settle(done)
        if error is not None:
            self._partner_down(rest, claim.lease, error)
        else:
            self.partner.succeeded()
        return settled

    def _announce_keys(self, now: float, *, pending: bool) -> None:
        """Send the partner our key-set versions it has not acknowledged. An unreachable partner
        raises TransportError; otherwise the round goes on whatever happens here:

        - the partner's refusal is logged and retried after the longest probe interval;
        - a refused receipt (an incident, ledgered) is retried after that interval doubled for
          each refusal in a row, up to ``key_receipt_retry_max_seconds``, so a hostile partner gets a
          few dozen ledger entries a day, not one per probe;
        - a receipt under a key we could not look up (the partner's key sets could not be
          fetched) is retried after the key-fetch interval, no incident.

        The table is read when the claim saw an unacknowledged version (``pending``: whatever
        the claimed messages were signed with was stored before them) or when this process's
        registry holds a version newer than the last acknowledged (an idle node announces a
        rotation within ``key_refresh_seconds``). A version newer than the one a wait began with
        (an emergency revocation) does not wait."""
        own = self.node.registry.history(self.node.party).version
        if not pending and own <= self._acknowledged_through:
            return
        if now < self._announce_after and own <= self._waiting_with:
            return
        settings = self.node.settings
        try:
            acknowledged = self.node.announce_keys(
                self.transport.announce_keys, dt.datetime.fromtimestamp(now, dt.UTC)
            )
        except PartnerRefused as exc:
            log.error("the partner refused our key set: %s", exc)
            self._wait(now, settings.delivery_backoff_max_seconds, own)
        except PartnerKeysUnavailable as exc:
            log.warning("the receipt of our key set cannot be checked yet: %s", exc)
            self._wait(
                now, max(settings.delivery_backoff_base_seconds, settings.key_fetch_interval_seconds), own
            )
        except AnnouncementRejected:  # a security incident, logged and ledgered by the node
            self._receipts_refused += 1
            self._wait(
                now,
                backoff_ceiling(
                    self._receipts_refused,
                    base=settings.delivery_backoff_max_seconds,
                    cap=settings.key_receipt_retry_max_seconds,
                ),
                own,
            )
        else:
            self._receipts_refused = 0
            self._acknowledged_through = own if acknowledged is None else acknowledged

    def _wait(self, now: float, seconds: float, own: int) -> None:
        """Announce no sooner than ``seconds`` from ``now`` unless a version newer than ``own``."""
        self._announce_after, self._waiting_with = now + seconds, own

    def _deliver(
        self, claimed: list[repo.Claimed]
    ) -> tuple[list[tuple[repo.Claimed, Outcome]], list[repo.Claimed], TransportError | None]:
        """Send ``claimed`` oldest first, splitting a batch whose content the partner refuses.

        Returns what got an answer, what did not, and the transport error that stopped it."""
        done: list[tuple[repo.Claimed, Outcome]] = []
        pending = [claimed]
        while pending:
            part = pending.pop(0)
            try:
                results = self.transport.send([c.envelope for c in part])
            except PartnerRefused as exc:
                if len(part) == 1:
                    log.warning("the partner refused message %s: %s", part[0].message_id, exc)
                    done.append((part[0], Refused(exc.status, str(exc))))
                else:
                    half = len(part) // 2
                    pending[0:0] = [part[:half], part[half:]]
                continue
            except TransportError as exc:
                return done, [c for p in (part, *pending) for c in p], exc
            done.extend(zip(part, results, strict=True))
        return done, [], None

    def finish_settling(self) -> int:
        """Wait for the round being settled in the settling thread, if any; returns how many it
        settled, or raises its error."""
        settling, self._settling = self._settling, None
        return settling.result() if settling is not None else 0

    def _last_round_settled(self) -> int:
        """:meth:`finish_settling`, its error logged instead of raised (see :meth:`run_once`)."""
        try:
            return self.finish_settling()
        except DatabaseUnavailable:
            return 0  # a condition, logged once by the Database
        except TransactionConflict as exc:
            log.warning("settling a delivery round: %s; its messages go again when their leases end", exc)
            return 0
        except Exception:
            log.exception("settling a delivery round failed; its messages go again when their leases end")
            return 0

    def close(self) -> None:
        """Settle what is in flight (its error logged) and stop the settling thread; a later round
        starts another."""
        self._last_round_settled()
        settler, self._settler = self._settler, None
        if settler is not None:
            settler.shutdown(wait=True)

    def _partner_down(self, rest: list[repo.Claimed], lease: repo.Lease, error: TransportError) -> None:
        """Back off from the partner and give back what ``lease`` still holds of ``rest``."""
        settings = self.node.settings
        now = self.clock()
        with self.node.db.read() as conn:
            oldest = repo.oldest_waiting(conn)
        until_deadline = oldest + self.expiry_seconds - now if oldest is not None else None
        delay = probe_delay(
            self.partner.failures + 1,
            base=settings.delivery_backoff_base_seconds,
            cap=settings.delivery_backoff_max_seconds,
            jitter=self.jitter(),
            until_deadline=until_deadline,
        )
        self.partner.failed(now, delay)
        log.warning(
            "partner %s unavailable (%s); %d envelope(s) back in the queue; next probe in %.1fs",
            self.node.partner_party,
            error,
            len(rest),
            delay,
        )
        with self.node.db.transaction() as conn:
            released = repo.release(conn, [c.message_id for c in rest], lease, now=now, error=str(error))
            repo.update_messages(  # (one settled or claimed again after the lease ran out stays so)
                conn,
                [
                    (
                        item.message_id,
                        {
                            "status": "queued",
                            "status_reason": f"attempt {item.attempts} failed: {error}; the partner is"
                            f" probed again in {delay:.1f}s",
                            "updated_at": self._at(now),
                        },
                    )
                    for item in rest
                    if item.message_id in released
                ],
            )

    def _settle(self, done: list[tuple[repo.Claimed, Outcome]]) -> int:
        at = self._at(self.clock())
        drafts: list[EntryDraft] = []
        updates: list[tuple[str, dict[str, object]]] = []
        unchecked: list[str] = []
        for item, outcome in done:
            try:
                values, entries = self._judge(item, outcome)
            except PartnerKeysUnavailable:
                unchecked.append(item.message_id)
                continue
            except (DatabaseUnavailable, TransactionConflict):
                raise  # (a key fetch writes: trouble here is this node's, not the receipt's)
            except Exception as exc:  # a receipt no check foresaw fails its message, never the round
                if is_unavailable(exc) or is_conflict(exc):
                    raise
                log.error("invalid receipt for message %s: %s", item.message_id, type(exc).__name__)
                values, entries = self._invalid_receipt(item, "malformed")
            updates.append((item.message_id, values))
            drafts.extend(entries)
        if unchecked:
            log.warning(
                "the receipts of %d message(s) are signed by a partner key not known here, and the"
                " partner's key sets could not be fetched: they stay sent and leased, and go again"
                " when their leases end (the partner answers with the same receipts)",
                len(unchecked),
            )
        settled: list[tuple[str, dict[str, object]]] = []

        def write(conn: Connection, head: repo.LedgerHead) -> repo.LedgerHead:
            kept = repo.dequeue_many(conn, [mid for mid, _ in updates])
            settled[:] = [(mid, values) for mid, values in updates if mid in kept]  # (a unit may run twice)
            repo.update_messages(conn, [(mid, {**values, "updated_at": at}) for mid, values in settled])
            return repo.append_ledger(conn, head, [d for d in drafts if d.message_id in kept], at)

        # in a batch of the committer with the submissions; it reads, appends, and updates and
        # deletes only at commit, so the batch may go without locking the head first (ADR 4)
        self.node.committer.run(write, appends_only=True)
        queued_at = {item.message_id: item.enqueued_at for item, _ in done}
        metrics.settled(
            delivered_enqueued_at=[queued_at[mid] for mid, v in settled if v["status"] == "delivered"],
            failed=sum(v["status"] == "failed" for _, v in settled),
            now=self.clock(),
        )
        return len(settled)

    def _judge(self, item: repo.Claimed, outcome: Outcome) -> tuple[dict[str, object], list[EntryDraft]]:
        """The row update and ledger entries for one answered envelope.

        Raises:
            PartnerKeysUnavailable: the receipt is signed by a key not known here and the
                partner's key sets could not be fetched: it can be judged neither way yet.
        """
        if isinstance(outcome, Refused):
            reason = f"refused by the partner node: HTTP {outcome.status}"
            if outcome.status == 413:
                reason += f" (an envelope of {len(item.envelope)} bytes is larger than it accepts)"
            return {"status": "failed", "status_reason": reason}, [
                self._failure(item, f"http-{outcome.status}")
            ]
        if not outcome.accepted or outcome.receipt is None:
            return {"status": "failed", "status_reason": "rejected by the partner node"}, [
                self._failure(item, "rejected")
            ]
        try:
            receipt = self._verify_receipt(item, outcome.receipt)
        except EnvelopeError as exc:
            log.error("invalid receipt for message %s: %s", item.message_id, exc)
            return self._invalid_receipt(item, exc.reason)
        values: dict[str, object] = {
            "status": "delivered",
            "status_reason": None,
            "envelope": None,  # the transport JWE is not kept: the content is at rest
            "receipt": receipt.compact,
            "receipt_at": receipt.received_at,
        }
        return values, [
            EntryDraft(
                event="message.sent",
                message_id=item.message_id,
                actor=self.node.party,
                data={"envelope_sha256": item.envelope_sha256, "attempts": item.attempts},
            ),
            EntryDraft(
                event="receipt.verified",
                message_id=item.message_id,
                actor=self.node.partner_party,
                decision="allow",
                data={
                    "receipt_sha256": envelope.envelope_digest(receipt.compact),
                    "signer_kid": receipt.signer_kid,
                    "signed_at": receipt.received_at,
                },
            ),
        ]

    def _invalid_receipt(self, item: repo.Claimed, reason: str) -> tuple[dict[str, object], list[EntryDraft]]:
        """The row update and ledger entry of a message whose receipt does not verify: failed."""
        return {"status": "failed", "status_reason": f"invalid receipt: {reason}"}, [
            EntryDraft(
                event="receipt.invalid",
                message_id=item.message_id,
                actor=self.node.partner_party,
                decision="deny",
                data={"reason": reason},
            )
        ]

    def _verify_receipt(self, item: repo.Claimed, compact: str) -> envelope.Receipt:
        """The partner's receipt for ``item``, signed by a key in force when it was made (the
        partner's newer key sets are fetched once on an unknown key). Raises EnvelopeError, or
        PartnerKeysUnavailable if that fetch failed."""
        now = dt.datetime.now(dt.UTC)
        receipt = self.node.verify_by_partner(
            lambda partner: envelope.verify_receipt(
                compact,
                verification_keys=partner.verification,
                expected_message_id=item.message_id,
                expected_envelope_sha256=item.envelope_sha256,
                expected_receiver=self.node.partner_party,
            ),
            lambda exc: isinstance(exc, EnvelopeError) and exc.reason == "unknown-signing-key",
            now,
        )
        signed_at = dt.datetime.fromisoformat(receipt.received_at)
        skew = self.node.settings.clock_skew
        if not dt.datetime.fromisoformat(item.created_at) - skew <= signed_at <= now + skew:
            # a receipt is judged at its own time: that time must lie between sealing and now
            raise EnvelopeError("receipt-mismatch", f"received_at {receipt.received_at} is out of range")
        self.node.check_partner_signature(receipt.signer_kid, signed_at, now)
        return receipt

    def _failure(self, item: repo.Claimed | repo.Waiting, reason: str) -> EntryDraft:
        return EntryDraft(
            event="message.delivery_failed",
            message_id=item.message_id,
            actor=self.node.partner_party,
            decision="deny",
            data={"envelope_sha256": item.envelope_sha256, "reason": reason, "attempts": item.attempts},
        )

    # --- leases and expiry -----------------------------------------------------------------------

    def recover_leases(self) -> list[str]:
        """Take back the leases this worker held before a restart: none of them is in flight any
        more, so they are due at once instead of when the lease runs out."""
        now = self.clock()
        with self.node.db.transaction() as conn:
            ids = repo.release_leases_of(conn, self.worker_id, now=now)
            repo.set_status(
                conn,
                ids,
                status="queued",
                status_reason="in flight when the node stopped; sending again",
                updated_at=self._at(now),
            )
        self._recovered = True
        if ids:
            log.warning("took back %d lease(s) held before a restart", len(ids))
        return ids

    def expire_overdue(self, now: float) -> int:
        """End ``failed`` (reason ``expired``, ledgered) every waiting message past its deadline.

        Nothing is read if the last sweep is less than ``sweep_seconds`` old
        (``delivery_expiry_sweep_seconds``, or a tenth of the expiry if that is shorter), unless it
        found a full batch: a message expires that much
        late at most, and is never sent meanwhile (the claim leaves it)."""
        if 0 <= now - self._swept_at < self.sweep_seconds:
            return 0  # (a clock that went back sweeps at once)
        self._swept_at = now
        cutoff = now - self.expiry_seconds
        with self.node.db.read() as conn:
            oldest = repo.oldest_waiting(conn)
        if oldest is None or oldest >= cutoff:
            return 0
        reason = (
            f"expired: not delivered within {self.expiry_seconds:g}s of submission (the partner's"
            " replay window less the margin, or delivery_max_wait_seconds); resubmit it if still needed"
        )
        at = self._at(now)
        with self.node.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            waiting = repo.overdue(
                conn, enqueued_before=cutoff, now=now, limit=self.node.settings.delivery_batch_size
            )
            gone = [w for w in waiting if repo.dequeue(conn, w.message_id)]
            repo.set_status(
                conn, [w.message_id for w in gone], status="failed", status_reason=reason, updated_at=at
            )
            repo.append_ledger(conn, head, [self._failure(w, "expired") for w in gone], at)
        if len(waiting) == self.node.settings.delivery_batch_size:
            self._swept_at = -math.inf  # more may be overdue: the next round sweeps again
        if gone:
            log.warning("%d message(s) expired undelivered", len(gone))
            metrics.settled(delivered_enqueued_at=(), failed=len(gone), now=now)
        return len(gone)

    @staticmethod
    def _at(now: float) -> str:
        return iso(dt.datetime.fromtimestamp(now, dt.UTC))

    # --- background loop (exchange.loops.LoopRunner) --------------------------------------------

    def lead(self) -> None:
        """Leader from now on: take back at the first round every lease held under this worker id
        (a predecessor's, dead or deposed; the partner answers a redelivery with the original
        receipt), and probe the partner at once."""
        self._recovered = False
        self.partner = PartnerBackoff()

    def step(self) -> float:
        """One round, its answers settled while the next round is sent; at once again if it
        settled any and left due work behind (a full batch), else (once they are settled) at the
        partner's next probe or the fallback poll, whichever is sooner. A submission meanwhile
        wakes the loop (:class:`exchange.loops.LoopRunner`): a round that took every due message
        is not followed by one that finds none."""
        settled = self.run_once(settle_later=True)
        if settled and (self._claim_left_some or self._swept_at == -math.inf):  # (a full expiry sweep)
            return 0.0
        self.finish_settling()
        until_probe = self.partner.retry_at - self.clock()
        return min(self.interval, until_probe) if until_probe > 0 else self.interval
