"""Whole-ledger audit: the tree, every checkpoint, every cosignature, every witnessed checkpoint,
across both parties' checkpoint-key rotations, and every ledgered signature judged by the key set in
force when it was made.

Pure: it takes the stored rows, checkpoint records and both parties' key histories (walked from the
agreement's anchor by :func:`~exchange.ledger.key_history.walk_history`), and returns what it checked
or raises :class:`~exchange.errors.LedgerIntegrityError` naming the first bad entry or checkpoint.
The same function serves ``exchange audit verify`` on a node and on an export bundle, offline.

Times: a checkpoint's log signature is judged at the time its record says it was made, a cosignature
at its own signed timestamp, a witnessed partner checkpoint at the time this node witnessed it (with
the clock skew allowed, as it is read on this node's clock). A checkpoint or cosignature by a key not
in force then fails verification.

A ledgered signature (an entry whose data names ``signer_kid``: :data:`SIGNED_EVENTS`) by a key not
in force when it was made (``data["signed_at"]``, else the entry's time) does not make the ledger
false, which records faithfully what the node saw: it is **flagged** (:class:`FlaggedSignature`, in
the report), and ``exchange audit verify`` exits non-zero when anything is flagged.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from exchange.errors import LedgerIntegrityError
from exchange.ledger.checkpoint import CheckpointError, NoteVerifier, verify_cosignatures
from exchange.ledger.entries import LedgerEntry
from exchange.ledger.events import LedgerEvent, key_set_mismatch
from exchange.ledger.key_history import (
    PartyKeys,
    in_force,
    moment,
    open_logged,
    revoked_at,
    verify_cosigned,
)
from exchange.ledger.merkle import ProofError, verify_consistency

#: The events whose data names the key that signed what they record, and whose key it is.
SIGNED_EVENTS: Mapping[str, Literal["own", "partner"]] = {
    LedgerEvent.SUBMITTED: "own",  # the message this node signed
    LedgerEvent.RECEIVED: "partner",  # the envelope the partner signed
    LedgerEvent.RECEIPT_VERIFIED: "partner",  # the receipt the partner signed
}


@dataclass(frozen=True)
class AuditKeys:
    """Who signs what: this node's and the partner's checkpoint identity and key history, the
    further witnesses the agreement names, and the clock skew allowed when a partner's signature is
    judged at a time read on this node's clock."""

    own: PartyKeys
    partner: PartyKeys
    witnesses: tuple[NoteVerifier, ...] = ()  # further witnesses named in the agreement
    skew: dt.timedelta = dt.timedelta(0)


@dataclass(frozen=True)
class FlaggedSignature:
    """A ledgered signature by a key not in force when it was made."""

    seq: int
    event: str
    party: str
    kid: str
    signed_at: str
    revoked_at: str | None
    reason: str

    def line(self) -> str:
        revoked = f", revoked at {self.revoked_at}" if self.revoked_at else ""
        return (
            f"entry {self.seq} ({self.event}): signed at {self.signed_at} by {self.party}'s key"
            f" {self.kid}{revoked}: {self.reason}"
        )


@dataclass(frozen=True)
class AuditReport:
    entries: int
    checkpoints: int
    cosignatures: int
    witnessed: int
    witness_cosignatures: Mapping[str, int] = field(default_factory=dict)
    key_versions: Mapping[str, int] = field(default_factory=dict)
    flagged: tuple[FlaggedSignature, ...] = ()

    def summary(self) -> str:
        further = "".join(
            f", {count} cosignatures by witness {name}"
            for name, count in sorted(self.witness_cosignatures.items())
        )
        versions = ", ".join(f"{party} at version {v}" for party, v in sorted(self.key_versions.items()))
        keys = f"; key-set histories verified ({versions})" if versions else ""
        flagged = f"; {len(self.flagged)} signatures FLAGGED" if self.flagged else ""
        return (
            f"{self.entries} entries, {self.checkpoints} signed checkpoints"
            f" consistent with them, {self.cosignatures} partner cosignatures{further},"
            f" {self.witnessed} partner checkpoints witnessed and consistent{keys}{flagged}"
        )


def flag_signatures(entries: Iterable[LedgerEntry], keys: AuditKeys) -> tuple[FlaggedSignature, ...]:
    """Every entry of :data:`SIGNED_EVENTS` whose signer's key was not in force when it signed:
    revoked at or before that time, unknown to the history, ``next``, or outside its validity.
    The time is ``data["signed_at"]`` (the signer's clock) when present, else the entry's own time
    (this node's clock, so a partner's key is given the clock skew). Entries naming no key are
    skipped (ledgered before keys were named)."""
    flagged = []
    for entry in entries:
        whose = SIGNED_EVENTS.get(entry.event)
        kid = entry.data.get("signer_kid")
        if whose is None or not isinstance(kid, str):
            continue
        party = keys.own if whose == "own" else keys.partner
        claimed = entry.data.get("signed_at")
        skew = dt.timedelta(0) if claimed is not None or whose == "own" else keys.skew
        stated = str(claimed if claimed is not None else entry.at)
        revoked = revoked_at(party.history, kid)
        try:
            at = moment(stated)
        except ValueError:
            reason = "its signing time is unreadable"
        else:
            if in_force(party.history, kid, at, skew) is not None:
                continue
            reason = party.why_not(kid, at)
        flagged.append(
            FlaggedSignature(
                seq=entry.seq,
                event=entry.event,
                party=party.party,
                kid=kid,
                signed_at=stated,
                revoked_at=revoked.isoformat() if revoked else None,
                reason=reason,
            )
        )
    return tuple(flagged)


def _time(record: Mapping[str, Any], column: str, where: str) -> dt.datetime:
    try:
        return moment(record[column])
    except (ValueError, KeyError) as exc:
        raise LedgerIntegrityError(f"{where} has no readable {column}") from exc


def verify_audit(
    verify_entries: Callable[[Mapping[int, bytes]], int],
    *,
    checkpoints: Sequence[Mapping[str, Any]],
    witnessed: Sequence[Mapping[str, Any]],
    keys: AuditKeys,
    witness_cosignatures: Mapping[int, Mapping[str, str]] | None = None,
    signed: Iterable[LedgerEntry] = (),
    key_set_entries: Iterable[LedgerEntry] = (),
) -> AuditReport:
    """Verify everything an auditor can from the records (see the module docstring).

    ``signed`` are the entries whose signatures are judged (:func:`flag_signatures`; the entries of
    :data:`SIGNED_EVENTS` suffice): what is flagged is in the report, not raised.

    ``key_set_entries`` are the entries of :data:`KEY_SET_RECORDED`: a version they record as
    published or accepted must be in the key histories given, with the digest recorded
    (:func:`key_set_mismatch`).

    ``witness_cosignatures`` maps a checkpoint size to the further witnesses' cosignature lines.
    ``verify_entries(roots_by_size)`` checks every entry and that the ledger reproduces each given
    checkpoint root (one pass: ``verify_rows``; chunked: ``verify_range`` and ``combine_ranges``)
    and returns the number of entries.

    Raises:
        LedgerIntegrityError: naming the first bad entry, checkpoint, cosignature or witnessed checkpoint.
    """
    recorded = list(key_set_entries)
    for party_keys in (keys.own, keys.partner):
        mismatch = key_set_mismatch(recorded, party_keys.party, party_keys.digests)
        if mismatch is not None:
            raise LedgerIntegrityError(f"entry {mismatch[0]} {mismatch[1]}", mismatch[0])
    roots: dict[int, bytes] = {}
    cosigned = 0
    known = {w.name: w for w in keys.witnesses}
    by_witness: dict[str, int] = {}
    for record in checkpoints:
        where = f"checkpoint at size {record['size']}"
        try:
            cp, _ = open_logged(str(record["note"]), keys.own, _time(record, "created_at", where))
        except CheckpointError as exc:
            raise LedgerIntegrityError(f"{where} is forged or damaged: {exc}") from exc
        if cp.size != record["size"] or cp.root != bytes(record["root_hash"]):
            raise LedgerIntegrityError(f"{where} does not match its signed note")
        roots[cp.size] = cp.root
        if record.get("cosignature"):
            try:
                verify_cosigned(cp, str(record["cosignature"]), keys.partner)
            except CheckpointError as exc:
                raise LedgerIntegrityError(
                    f"the partner's cosignature of {where} does not verify: {exc}"
                ) from exc
            cosigned += 1
        for name, line in (witness_cosignatures or {}).get(cp.size, {}).items():
            verifier = known.get(name)
            if verifier is None:
                raise LedgerIntegrityError(
                    f"{where} carries a cosignature by {name}, a witness the agreement does not name"
                )
            try:
                verify_cosignatures(cp, line + "\n", [verifier])
            except CheckpointError as exc:
                raise LedgerIntegrityError(
                    f"the cosignature of {where} by witness {name} does not verify: {exc}"
                ) from exc
            by_witness[name] = by_witness.get(name, 0) + 1
    if set(witness_cosignatures or {}) - set(roots):
        raise LedgerIntegrityError("a further witness's cosignature names a checkpoint that does not exist")
    entries = verify_entries(roots)

    previous: tuple[int, bytes] | None = None
    for record in witnessed:
        where = f"witnessed partner checkpoint at size {record['size']}"
        try:
            at = _time(record, "witnessed_at", where)
            cp, _ = open_logged(str(record["note"]), keys.partner, at, keys.skew)
            verify_cosigned(cp, str(record["cosignature"]), keys.own)
        except CheckpointError as exc:
            raise LedgerIntegrityError(f"{where} is forged or damaged: {exc}") from exc
        if cp.size != record["size"] or cp.root != bytes(record["root_hash"]):
            raise LedgerIntegrityError(f"{where} does not match its signed note")
        expected_previous = previous[0] if previous else 0
        if record["previous_size"] != expected_previous:
            raise LedgerIntegrityError(f"{where} was not proven from the checkpoint witnessed before it")
        if previous is not None:
            proof = [bytes.fromhex(h) for h in json.loads(str(record["proof"]))]
            try:
                verify_consistency(previous[0], cp.size, proof, previous[1], cp.root)
            except ProofError as exc:
                raise LedgerIntegrityError(
                    f"{where} is not consistent with size {previous[0]}: {exc}"
                ) from exc
        previous = (cp.size, cp.root)
    return AuditReport(
        entries,
        len(roots),
        cosigned,
        len(witnessed),
        by_witness,
        {keys.own.party: keys.own.version, keys.partner.party: keys.partner.version},
        flag_signatures(signed, keys),
    )
