"""The project's exception tree.

Every error the project raises on purpose derives from :class:`ExchangeError`. Families say where
the fault lies; the API layer maps them to HTTP status codes in one table (``exchange.api.problems``)
and the CLI turns them into a one-line message and a non-zero exit. Domain errors carry no status.

::

    ExchangeError
    ├── ConfigurationError          settings or agreement file invalid, node not initialised
    │   └── DatabaseNotMigrated     the schema is behind; run `exchange db upgrade`
    ├── InvalidInput                bad data from a local client or an operator (field errors)
    │   ├── MessageTooLarge         the sealed envelope would exceed the agreement's limit
    │   └── IdempotencyKeyReused    an Idempotency-Key already used for another request body
    ├── NotFound                    no such message, client or entry
    │   └── ContentDestroyed        the message existed; its content was destroyed (when, why)
    ├── ContentUnavailable          stored content does not open (its key is gone or it was moved)
    ├── Unauthorised                caller identity missing or not registered
    ├── PolicyRefusal               the agreement's rules refused (names every rule id)
    ├── EnvelopeError               an envelope or receipt failed verification (opaque to the peer)
    │   └── ReplayRejected          outside the replay window, or same id with other content
    ├── TransportError              the partner node could not be reached or answered badly
    │   ├── PartnerRefused          the partner answered 4xx to a whole batch (split it)
    │   └── PartnerKeysUnavailable  the partner's key sets could not be fetched to check a signature
    ├── Unavailable                 a resource the node needs is down for now (retry later)
    │   ├── DatabaseUnavailable     the database cannot be reached, or its disk is full
    │   ├── TransactionConflict     a transaction lost a conflict (deadlock) and wrote nothing
    │   └── Busy                    a bounded resource is saturated (a ledger verification runs)
    ├── LedgerIntegrityError        the ledger does not verify (names the first bad entry)
    │   └── CheckpointConflict      a partner checkpoint is inconsistent with one already witnessed
    └── KeyManagementError          a key is missing, undecryptable or does not match the agreement
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ExchangeError(Exception):
    """Root of every deliberate error in the project."""


class ConfigurationError(ExchangeError):
    """A settings file, agreement file or node directory is missing or invalid."""


class DatabaseNotMigrated(ConfigurationError):
    """The database schema is not at the revision this code expects."""


@dataclass(frozen=True)
class FieldError:
    """One invalid field: a JSON-pointer-like location and what is wrong with it."""

    field: str
    message: str


class InvalidInput(ExchangeError):
    """Bad input from a client or operator; carries one entry per invalid field."""

    def __init__(self, message: str, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.errors = tuple(errors)


class MessageTooLarge(InvalidInput):
    """The sealed envelope of a submission would exceed the agreement's ``max_envelope_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the sealed message would be {size} bytes; the agreement's limit is {limit} bytes",
            [FieldError("payload", f"too large: the sealed envelope may be at most {limit} bytes")],
        )
        self.size = size
        self.limit = limit


class IdempotencyKeyReused(InvalidInput):
    """An ``Idempotency-Key`` this client already used, sent again with a different body."""


class NotFound(ExchangeError):
    """The requested object does not exist (or the caller may not know it exists)."""


class ContentDestroyed(NotFound):
    """The message existed but its content was destroyed (retention or the originator's request)."""

    def __init__(self, message_id: str, destroyed_at: str, reason: str) -> None:
        super().__init__(f"the content of message {message_id} was destroyed at {destroyed_at}: {reason}")
        self.message_id = message_id
        self.destroyed_at = destroyed_at
        self.reason = reason


class ContentUnavailable(ExchangeError):
    """Stored content does not open: its key-encryption key is gone, or it is not this message's."""


class Unauthorised(ExchangeError):
    """The caller presented no usable identity or is not registered."""


@dataclass(frozen=True)
class RuleViolation:
    """One rule of the agreement that refused: its stable id, a reason, its ``id@version`` and what
    would satisfy it."""

    rule_id: str
    reason: str
    rule_version: str = ""
    remedy: str = ""


class PolicyRefusal(ExchangeError):
    """The agreement's rules refused the action; names every rule that refused."""

    def __init__(self, violations: Sequence[RuleViolation]) -> None:
        if not violations:
            raise ValueError("a PolicyRefusal must name at least one rule")
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.rule_id}: {v.reason}" for v in self.violations))


class EnvelopeError(ExchangeError):
    """An envelope or receipt failed verification.

    ``reason`` is a short machine code for the log and the ledger; a peer only ever learns that
    the envelope was rejected.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ReplayRejected(EnvelopeError):
    """The envelope is outside the replay window or reuses a message id with other content."""


class TransportError(ExchangeError):
    """The partner node could not be reached or did not answer as the protocol requires."""


class PartnerRefused(TransportError):
    """The partner answered a batch with a 4xx status: something in the batch, not the link, is
    wrong. The delivery worker splits the batch and fails a single envelope so refused."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"the partner refused the batch: HTTP {status}{': ' + detail if detail else ''}")
        self.status = status


class PartnerKeysUnavailable(TransportError):
    """The partner signed with a key id we do not know, and its key sets could not be fetched to
    look it up: no evidence of forgery, a condition to retry (the link, not the batch)."""


class Unavailable(ExchangeError):
    """A resource the node needs is unavailable for now; the request may be retried later."""


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached or cannot write (server down, connection lost, disk full)."""


class TransactionConflict(Unavailable):
    """The database aborted a transaction in a conflict with another (a deadlock, a serialization
    failure). Nothing of it was written, and running it again is safe; the database itself is
    available."""


class Busy(Unavailable):
    """A bounded resource is saturated (for example, the ledger verifications the API runs at once);
    the request may be retried later."""


class LedgerIntegrityError(ExchangeError):
    """The ledger does not verify; ``seq`` names the first bad entry when known."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class CheckpointConflict(LedgerIntegrityError):
    """A partner checkpoint that cannot be witnessed. ``witnessed_size`` is the size this node holds;
    ``incident`` says the checkpoint contradicts one already witnessed (fork, rollback, failed proof):
    a security incident for both sides. Without it, the proof merely started at another size.
    ``reason`` is one of :data:`CONFLICT_REASONS` (the witness protocol answers by it)."""

    def __init__(
        self, message: str, witnessed_size: int, *, incident: bool = False, reason: str = "size-mismatch"
    ) -> None:
        super().__init__(message)
        if reason not in CONFLICT_REASONS:
            raise ValueError(f"unknown conflict reason {reason!r}")
        self.witnessed_size = witnessed_size
        self.incident = incident
        self.reason = reason


#: Why a checkpoint is not witnessed: the request's old size is not the witnessed size, a second
#: root for the witnessed size, a smaller size, a failed consistency proof, a malformed request.
CONFLICT_REASONS = ("size-mismatch", "fork", "rollback", "inconsistent", "bad-request")


class KeyManagementError(ExchangeError):
    """A key is missing, cannot be decrypted, or does not match the agreement."""
