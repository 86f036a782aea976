"""Checkpoint keys over time: verifying notes and cosignatures against a party's key history. Pure.

A party's checkpoint key changes by key-set announcements (:mod:`exchange.keys.announcement`); every
checkpoint key of one party signs under the same note key name (its log origin, and its witness name
for cosignatures), so the 4-byte signed-note key id says which key of the history a line claims.

Guarantees:
- :func:`walk_history` trusts a version only on top of the agreement's anchor and every version before
  it, each accepted as :func:`~exchange.keys.announcement.accept` decides, evaluated at the version's
  own issue time, with issue times that never go back;
- :func:`open_logged` and :func:`verify_cosigned` accept a signature only by a checkpoint key of the
  history that was in force when it was made (listed, not ``next``, within its validity, not revoked
  at or before that time: :func:`~exchange.keys.announcement.key_in_force`); a line by a key of the
  history that does not verify refuses the note, as the signed-note rules require.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from exchange.errors import LedgerIntegrityError
from exchange.keys.announcement import (
    AnnouncementRejected,
    KeyEntry,
    KeySet,
    Trusted,
    accept,
    announcement_digest,
    key_in_force,
)
from exchange.ledger.checkpoint import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Checkpoint,
    CheckpointError,
    NoteVerifier,
    open_checkpoint,
    parse_signature_line,
    split_note,
    verify_cosignatures,
)


def walk_history(anchor: Trusted, announcements: Sequence[str]) -> tuple[KeySet, ...]:
    """Every version of a party's key set: the anchor (version 1, from the agreement), then each
    announcement accepted on top of the one before it.

    Raises:
        LedgerIntegrityError: naming the party and the first version that does not follow (a
            removed, altered, reordered or foreign announcement, or an issue time going back).
    """
    versions = [anchor]
    known = {k.kid: k for k in anchor.key_set.keys}  # every key listed so far, as last listed
    for announcement in announcements:
        last = versions[-1].key_set
        where = f"the key-set history of {last.party} breaks after version {last.version}"
        try:
            # accept() judges expiry at one time: the previous issue time here; that the new version
            # was unexpired at its own issue time, which is later, is checked below
            trusted = accept(versions[-1], announcement, last.issued_at, known=known)
        except AnnouncementRejected as exc:
            raise LedgerIntegrityError(f"{where}: {exc}") from exc
        key_set = trusted.key_set  # (accept() refused an issue time going back, or expired at issue)
        versions.append(trusted)
        known.update({k.kid: k for k in key_set.keys})
    return tuple(t.key_set for t in versions)


def in_force(
    history: Sequence[KeySet], kid: str, at: dt.datetime, skew: dt.timedelta = dt.timedelta(0)
) -> KeyEntry | None:
    """The key if it was in force at ``at``, or at ``at + skew`` when ``at`` is read on another
    clock than the signer's (a key activated moments before; a revocation is never excused)."""
    found = key_in_force(history, kid, at)
    if found is None and skew:
        revoked = revoked_at(history, kid)
        if revoked is None or at < revoked:
            found = key_in_force(history, kid, at + skew)
    return found


def moment(text: object) -> dt.datetime:
    """An RFC 3339 / ISO 8601 time with its offset. Raises ValueError otherwise."""
    at = dt.datetime.fromisoformat(str(text))
    if at.tzinfo is None:
        raise ValueError(f"{text!r} has no offset")
    return at


def revoked_at(history: Sequence[KeySet], kid: str) -> dt.datetime | None:
    """When any version of the history says ``kid`` was revoked (the earliest), if one does."""
    times = [k.revoked_at for s in history if (k := s.key(kid)) is not None and k.revoked_at is not None]
    return min(times) if times else None


@dataclass(frozen=True)
class PartyKeys:
    """One party's checkpoint identity: its log origin, its witness name, its key history."""

    party: str
    origin: str
    witness_name: str
    history: tuple[KeySet, ...]
    digests: tuple[str, ...] = ()  # the SHA-256 of the announcements of versions 2, 3, ...

    @property
    def version(self) -> int:
        return self.history[-1].version

    def checkpoint_keys(self) -> list[KeyEntry]:
        """Every checkpoint key any version lists, as the newest version listing it has it."""
        found: dict[str, KeyEntry] = {}
        for key_set in self.history:
            for key in key_set.keys:
                if key.purpose == "checkpoint":
                    found[key.kid] = key
        return list(found.values())

    def verifiers(self, algorithm: int) -> list[tuple[KeyEntry, NoteVerifier]]:
        """Every checkpoint key with its note verifier: of log signatures (``SIG_ED25519``, named by
        the origin) or of cosignatures (``SIG_COSIGNATURE_V1``, named by the witness name)."""
        name = self.origin if algorithm == SIG_ED25519 else self.witness_name
        return [(k, NoteVerifier.of(name, k.okp, algorithm)) for k in self.checkpoint_keys()]

    def why_not(self, kid: str, at: dt.datetime) -> str:
        """Why ``kid`` was not in force at ``at``, in words."""
        revoked = revoked_at(self.history, kid)
        if revoked is not None and revoked <= at:
            return f"{self.party}'s key {kid} was revoked at {revoked.isoformat()}"
        return f"{self.party}'s key {kid} was not in force at {at.isoformat()}"


def _claimed(
    verifiers: Sequence[tuple[KeyEntry, NoteVerifier]], note_key_ids: set[bytes]
) -> list[tuple[str, NoteVerifier]]:
    return [(k.kid, v) for k, v in verifiers if v.key_id in note_key_ids]


def open_logged(
    note: str, keys: PartyKeys, at: dt.datetime, skew: dt.timedelta = dt.timedelta(0)
) -> tuple[Checkpoint, str]:
    """The checkpoint and the kid of the key of ``keys``' history that signed it, made at ``at``.

    Raises:
        CheckpointError: malformed, another origin, no signature by a checkpoint key of the history,
            a bad one, or none by a key in force at ``at`` (naming the revocation, if any).
    """
    _, signatures = split_note(note)
    candidates = _claimed(
        keys.verifiers(SIG_ED25519), {s.key_id for s in signatures if s.name == keys.origin}
    )
    if not candidates:
        raise CheckpointError(f"the note carries no signature by a checkpoint key of {keys.party}")
    opened = [(open_checkpoint(note, verifier), kid) for kid, verifier in candidates]
    for checkpoint, kid in opened:
        if in_force(keys.history, kid, at, skew) is not None:
            return checkpoint, kid
    raise CheckpointError(
        f"signed at {at.isoformat()} by a key not in force: {keys.why_not(opened[0][1], at)}"
    )


def verify_cosigned(checkpoint: Checkpoint, line: str, keys: PartyKeys) -> tuple[int, str]:
    """The timestamp and the kid of one cosignature line by ``keys``' party (as witness) over
    ``checkpoint``, judged by the key history at the cosignature's own time (whole seconds: any
    instant of that second).

    Raises:
        CheckpointError: malformed, another witness, not a checkpoint key of the history, a bad
            signature, or a key not in force at the cosignature's time.
    """
    if "\n" in line.rstrip("\n"):
        raise CheckpointError("one cosignature line expected")
    signature = parse_signature_line(line.rstrip("\n"))
    candidates = (
        _claimed(keys.verifiers(SIG_COSIGNATURE_V1), {signature.key_id})
        if signature.name == keys.witness_name
        else []
    )
    if not candidates:
        raise CheckpointError(f"the cosignature is not by a checkpoint key of {keys.party}")
    kid, verifier = candidates[0]  # distinct keys of one party share a 4-byte key id with odds 2**-32
    timestamp = verify_cosignatures(checkpoint, line.rstrip("\n") + "\n", [verifier])[verifier.name]
    at = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    # the timestamp is whole seconds, cut down: the cosignature was made within the second after it
    last = at + dt.timedelta(seconds=1) - dt.timedelta(microseconds=1)
    if in_force(keys.history, kid, at) is None and in_force(keys.history, kid, last) is None:
        raise CheckpointError(f"cosigned at {at.isoformat()} by a key not in force: {keys.why_not(kid, at)}")
    return timestamp, kid


@dataclass(frozen=True)
class PartyAnchor:
    """What the agreement alone says of one party's checkpoints: its names and version 1 of its key
    set, from which every later version must be walked."""

    party: str
    origin: str
    witness_name: str
    anchor: Trusted

    def walk(self, announcements: Sequence[str]) -> PartyKeys:
        """The party's keys after its ``announcements`` (versions 2, 3, ... in order).

        Raises:
            LedgerIntegrityError: the chain breaks (see :func:`walk_history`).
        """
        return PartyKeys(
            self.party,
            self.origin,
            self.witness_name,
            walk_history(self.anchor, announcements),
            tuple(announcement_digest(a) for a in announcements),
        )
