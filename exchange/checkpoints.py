"""Checkpoints and witnessing: the node's use cases around its own and the partner's tree heads.

- :meth:`CheckpointService.sign_latest` signs a checkpoint of the ledger when it has grown.
- :meth:`CheckpointService.to_witness` is what the node asks the partner to cosign next: its latest
  checkpoint and a consistency proof from the last one the partner cosigned.
- :meth:`CheckpointService.witness` is the partner side, a C2SP tlog-witness: verify the signature
  (pinned key), require a proof from exactly the size it last witnessed, verify it, store, cosign. A
  checkpoint that forks, rolls back or fails its proof is refused and ledgered as a security incident.
- The agreement may name further witnesses; the node has them cosign its checkpoints through the same
  protocol (:meth:`CheckpointService.to_witness` and :meth:`CheckpointService.record_cosignature`
  with ``witness``) and keeps their cosignatures beside the partner's.
- Every message carries its sender's latest checkpoint; the receiving node judges it as it admits the
  message (``exchange.node.Node.receive``): a split view or a rollback is caught within one message.

Routine checkpoints and cosignatures are kept in their own tables, not ledgered: a ledger entry per
checkpoint would grow the ledger and call for another checkpoint, for ever. Incidents are ledgered.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

from exchange.canonical import sha256_hex
from exchange.crypto import constant_time_equal
from exchange.db import repo
from exchange.errors import CheckpointConflict
from exchange.ledger import EntryDraft
from exchange.ledger.checkpoint import (
    SIG_COSIGNATURE_V1,
    Checkpoint,
    CheckpointError,
    NoteVerifier,
    cosign,
    parse_signature_line,
    sign_checkpoint,
    verify_checkpoint_any,
    verify_cosignatures,
)
from exchange.ledger.merkle import ProofError, consistency_proof, verify_consistency
from exchange.node import Node, iso
from exchange.observability import logs

log = logging.getLogger("exchange.checkpoints")


@dataclass(frozen=True)
class WitnessRequest:
    """A checkpoint to have cosigned, with the proof from the partner's last cosigned size."""

    note: str
    size: int
    from_size: int
    proof: list[bytes]


class CheckpointService:
    """Checkpoint use cases for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        own = node.agreement.parties[node.party]
        self.origin = own.ledger_origin
        self.witness_name = own.witness_name

    # --- this node's checkpoints -----------------------------------------------------------------

    def sign_latest(self, now: dt.datetime) -> int | None:
        """Sign a checkpoint of the current ledger if it grew since the last one; returns its size.
        Signs under the ledger head's lock, so concurrent signers (any process) sign each size once."""
        with self.node.db.read() as conn:  # the common case, nothing new, takes no lock
            head = repo.read_ledger_head(conn)
            last = repo.latest_checkpoint(conn)
        if head.size == 0 or (last is not None and last["size"] >= head.size):
            return None
        with self.node.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            last = repo.latest_checkpoint(conn)
            if head.size == 0 or (last is not None and last["size"] >= head.size):
                return None
            note = sign_checkpoint(self.origin, head.size, head.root, self.node.keys.checkpoint)
            repo.insert_checkpoint(conn, size=head.size, root=head.root, note=note, at=iso(now))
        return head.size

    def to_witness(self, from_size: int | None = None, witness: str | None = None) -> WitnessRequest | None:
        """The latest checkpoint not yet cosigned by ``witness`` (default: the partner node), with a
        proof from ``from_size`` (default: the last size that witness cosigned; 0 when none)."""
        with self.node.db.read() as conn:
            last = repo.latest_checkpoint(conn)
            if last is None:
                return None
            size = int(last["size"])
            if witness is None:
                if last["cosignature"] is not None:
                    return None
                if from_size is None:
                    cosigned = repo.latest_checkpoint(conn, cosigned=True)
                    from_size = int(cosigned["size"]) if cosigned else 0
            else:
                done = repo.latest_cosigned_by(conn, witness)
                if done >= size:
                    return None
                from_size = done if from_size is None else from_size
            if not 0 <= from_size <= size:
                return None
            proof = [] if from_size == 0 else consistency_proof(repo.SqlSubtrees(conn), from_size, size)
        return WitnessRequest(str(last["note"]), size, from_size, proof)

    def is_latest(self, request: WitnessRequest) -> bool:
        """True if ``request`` is still of this node's latest signed checkpoint: a larger one may
        already have been sent, so a smaller one must not be."""
        with self.node.db.read() as conn:
            last = repo.latest_checkpoint(conn)
        return last is not None and int(last["size"]) == request.size

    def record_cosignature(
        self, request: WitnessRequest, lines: str, now: dt.datetime, witness: NoteVerifier | None = None
    ) -> int:
        """Verify and keep the cosignature of our checkpoint by ``witness`` (default: the partner
        node) found in a witness's answer (cosignature lines; lines by other keys are ignored).
        Returns its timestamp.

        Raises:
            CheckpointError: no valid cosignature by that witness key, or a bad one.
        """
        own = self.node.registry.history(self.node.party).checkpoint_keys()
        checkpoint = verify_checkpoint_any(request.note, origin=self.origin, keys=own)
        text = lines if lines.endswith("\n") else lines + "\n"
        if witness is not None:
            verifiers = [witness]
        else:  # the partner cosigns with its checkpoint key in force: any one of its history
            partner = self.node.partner
            verifiers = [
                NoteVerifier.of(partner.witness_name, key, SIG_COSIGNATURE_V1)
                for key in partner.checkpoint_keys(now)
            ]
        name = verifiers[0].name
        timestamp = verify_cosignatures(checkpoint, text, verifiers)[name]
        known = {v.key_id for v in verifiers}
        line = next(
            sig.line
            for sig in (parse_signature_line(x) for x in text[:-1].split("\n"))
            if sig.name == name and sig.key_id in known
        )
        with self.node.db.transaction() as conn:
            if witness is None:
                repo.record_cosignature(conn, request.size, line, iso(now))
            else:
                repo.record_witness_cosignature(conn, request.size, name, line, iso(now))
        return timestamp

    # --- the partner's checkpoints ---------------------------------------------------------------

    def _verify_partner(self, note: str, now: dt.datetime) -> Checkpoint:
        """The partner's new checkpoint, signed by a checkpoint key in force ``now`` (its newer key
        sets fetched once if none verifies).

        Raises:
            CheckpointError: malformed, or signed by no checkpoint key of the partner's key sets.
            PartnerKeysUnavailable: signed by no key held here, and the partner's key sets could
                not be fetched: neither refused nor cosigned yet (the partner asks again).
        """
        return self.node.verify_by_partner(  # a checkpoint key announced while we were away
            lambda partner: verify_checkpoint_any(
                note, origin=partner.ledger_origin, keys=partner.checkpoint_keys(now)
            ),
            lambda exc: isinstance(exc, CheckpointError),
            now,
        )

    def witness(self, note: str, from_size: int, proof: list[bytes], now: dt.datetime) -> str:
        """Cosign the partner's checkpoint if it is consistent with everything witnessed before, as a
        C2SP tlog-witness (https://c2sp.org/tlog-witness) answers ``add-checkpoint``.

        Raises:
            CheckpointError: the note is malformed or not signed by the partner's pinned key, or a
                line by that key does not verify.
            PartnerKeysUnavailable: as :meth:`_verify_partner` (answered 502).
            CheckpointConflict: with ``reason`` ``size-mismatch`` (``from_size`` is not the size last
                witnessed: ask again from ``witnessed_size``), ``bad-request`` (an old size beyond
                the checkpoint, or a proof from size 0), or, ledgered as incidents before raising,
                ``fork`` (another root for the witnessed size), ``rollback`` (a smaller size) and
                ``inconsistent`` (the proof fails).
        """
        checkpoint = self._verify_partner(note, now)
        incident: tuple[str, str] | None = None
        with self.node.db.transaction() as conn:
            repo.lock_ledger_head(conn)  # check and record atomically, across processes
            last = repo.latest_witnessed(conn)
            held = int(last["size"]) if last else 0
            if last is not None and checkpoint.size < held:
                incident = ("rollback", f"rollback: size {checkpoint.size} after size {held} was witnessed")
            elif from_size > checkpoint.size:
                raise CheckpointConflict(
                    f"old size {from_size} is beyond the checkpoint's {checkpoint.size}",
                    held,
                    reason="bad-request",
                )
            elif from_size != held:
                raise CheckpointConflict(f"witnessed size is {held}, not {from_size}", held)
            elif last is None:
                if proof:
                    raise CheckpointConflict("the proof must be empty from size 0", 0, reason="bad-request")
            elif checkpoint.size == held:
                if proof:
                    raise CheckpointConflict(
                        "the proof between equal sizes is empty", held, reason="bad-request"
                    )
                if constant_time_equal(bytes(last["root_hash"]), checkpoint.root):
                    return str(last["cosignature"])  # asked again: the same answer
                incident = ("fork", f"fork: a second root for size {held}")
            else:
                try:
                    verify_consistency(
                        held, checkpoint.size, proof, bytes(last["root_hash"]), checkpoint.root
                    )
                except ProofError as exc:
                    incident = (
                        "inconsistent",
                        f"inconsistent with the checkpoint witnessed at size {held}: {exc}",
                    )
            if incident is None:
                line = cosign(
                    checkpoint,
                    witness=self.witness_name,
                    key=self.node.keys.checkpoint,
                    timestamp=int(now.timestamp()),
                )
                repo.insert_witnessed(
                    conn,
                    {
                        "size": checkpoint.size,
                        "root_hash": checkpoint.root,
                        "note": note,
                        "previous_size": held,
                        "proof": json.dumps([p.hex() for p in proof]),
                        "cosignature": line,
                        "witnessed_at": iso(now),
                    },
                )
                return line
        reason, text = incident
        self._incident(checkpoint.origin, checkpoint.size, note, text, now)
        raise CheckpointConflict(
            f"security incident: the partner's checkpoint is refused ({text})",
            held,
            incident=True,
            reason=reason,
        )

    def refused_by_partner(
        self, request: WitnessRequest, now: dt.datetime, witness: str | None = None
    ) -> None:
        """Ledger the refusal of our checkpoint by the partner (or a further ``witness``): an
        incident on this side too."""
        who = "the partner" if witness is None else f"witness {witness}"
        self._incident(self.origin, request.size, request.note, f"refused by {who}", now)

    def _incident(self, origin: str, size: int, note: str, reason: str, now: dt.datetime) -> None:
        logs.security_incident(log, "checkpoint", "checkpoint %s at size %d: %s", origin, size, reason)
        draft = EntryDraft(
            event="checkpoint.incident",
            actor=self.node.partner_party,
            decision="deny",
            data={
                "origin": origin,
                "size": size,
                "reason": reason.split(":")[0],
                "note_sha256": sha256_hex(note),
            },
        )
        self.node.committer.run(
            lambda conn, head: repo.append_ledger(conn, head, [draft], iso(now)), appends_only=True
        )

    def status(self) -> dict[str, Any]:
        """Latest own checkpoint (and whether the partner cosigned it), latest witnessed one."""
        with self.node.db.read() as conn:
            own = repo.latest_checkpoint(conn)
            cosigned = repo.latest_checkpoint(conn, cosigned=True)
            seen = repo.latest_witnessed(conn)
        return {
            "latest": {"size": own["size"], "note": own["note"]} if own else None,
            "latest_cosigned": (
                {
                    "size": cosigned["size"],
                    "cosignature": cosigned["cosignature"],
                    "cosigned_at": cosigned["cosigned_at"],
                }
                if cosigned
                else None
            ),
            "partner_witnessed": {"size": seen["size"], "note": seen["note"]} if seen else None,
        }


__all__ = ["CheckpointError", "CheckpointService", "WitnessRequest"]
