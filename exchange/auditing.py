"""What an auditor can see and check: entries (never content), checkpoints, proofs, verification,
export bundles. Used by the audit API and the CLI; needs the database and the agreement, no private
key. Both parties' checkpoint keys come from the agreement's version 1 and the key-set announcements
stored in ``key_sets``, walked anew by every verification and export (never the node's cache).

A whole-ledger verification is the one expensive request: an :class:`AuditService` runs at most
``concurrent`` of them at once (more raise :class:`~exchange.errors.Busy`, answered 503), over one
pool of ``workers`` processes it keeps for its lifetime (:meth:`AuditService.close` ends it)."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from exchange.agreement import Agreement
from exchange.config import NodeSettings
from exchange.db import repo
from exchange.db.engine import Database
from exchange.db.schema import checkpoints, ledger_entries, witnessed
from exchange.errors import Busy, InvalidInput, LedgerIntegrityError, NotFound
from exchange.keys.registry import KeyRegistry, anchor
from exchange.ledger import decode_leaf
from exchange.ledger.audit import SIGNED_EVENTS, AuditKeys, AuditReport, verify_audit
from exchange.ledger.bundle import build_bundle
from exchange.ledger.checkpoint import SIG_COSIGNATURE_V1, SIG_ED25519, checkpoint_with
from exchange.ledger.entries import LedgerEntry, decode_canonical_leaf
from exchange.ledger.events import KEY_SET_RECORDED
from exchange.ledger.key_history import PartyAnchor, PartyKeys
from exchange.ledger.log import combine_ranges, verify_range
from exchange.ledger.merkle import ProofError, consistency_proof, inclusion_proof, leaf_hash, root_hash
from exchange.types import PartyId

MAX_EXPORT = 10_000  # entries per bundle: each carries its own inclusion proof


#: The clock skew allowed when a partner's signature is judged on this node's clock.
DEFAULT_SKEW = dt.timedelta(seconds=NodeSettings.model_fields["clock_skew_seconds"].default)


def party_anchor(agreement: Agreement, party: PartyId) -> PartyAnchor:
    """``party``'s checkpoint names and version 1 of its key set, from the agreement alone."""
    entry = agreement.parties[party]
    return PartyAnchor(party, entry.ledger_origin, entry.witness_name, anchor(agreement, party))


def verifier_keys(agreement: Agreement, histories: Sequence[PartyKeys] = ()) -> list[dict[str, str | None]]:
    """Every note verifier key of both parties' checkpoint keys (of ``histories``, else of the
    agreement's version 1) and of the further witnesses: whose, what it signs, the key, and the
    checkpoint key's id, state and validity as the newest version listing it has them."""
    by_party = {h.party: h for h in histories}
    rows: list[dict[str, str | None]] = []
    for pid in agreement.parties:
        keys = by_party.get(pid) or party_anchor(agreement, pid).walk([])
        partner = agreement.partner_of(pid)
        for algorithm, signs in (
            (SIG_ED25519, f"{pid}'s ledger checkpoints"),
            (SIG_COSIGNATURE_V1, f"cosignatures of {partner}'s checkpoints"),
        ):
            for entry, verifier in keys.verifiers(algorithm):
                rows.append(
                    {
                        "holder": pid,
                        "signs": signs,
                        "key": verifier.vkey,
                        "kid": entry.kid,
                        "state": entry.state,
                        "valid_from": entry.valid_from.isoformat(),
                        "valid_until": entry.valid_until.isoformat() if entry.valid_until else None,
                        "revoked_at": entry.revoked_at.isoformat() if entry.revoked_at else None,
                    }
                )
    for witness in agreement.witnesses:
        rows.append(
            {
                "holder": f"witness at {witness.url}",
                "signs": "cosignatures of both ledgers",
                "key": witness.key,
                "kid": None,
                "state": None,
                "valid_from": None,
                "valid_until": None,
                "revoked_at": None,
            }
        )
    return rows


@dataclass(frozen=True)
class EntryFilter:
    case_ref: str | None = None
    message_id: str | None = None
    event: str | None = None
    rule: str | None = None
    since: str | None = None
    until: str | None = None


def _entry_view(leaf: str, entry: LedgerEntry | None = None) -> dict[str, Any]:
    """An entry as the audit API shows it: the fields of its leaf (``entry``, if decoded already),
    the leaf and its hash."""
    entry = entry or decode_leaf(leaf.encode())
    return {
        "seq": entry.seq,
        "at": entry.at,
        "event": entry.event,
        "message_id": entry.message_id,
        "case_ref": entry.case_ref,
        "actor": entry.actor,
        "decision": entry.decision,
        "rules": list(entry.rules),
        "data": dict(entry.data),
        "leaf": leaf,
        "leaf_hash": leaf_hash(entry.leaf).hex(),
    }


def partner_history(items: Any, message_id: str) -> list[dict[str, Any]]:
    """The partner node's entries about ``message_id`` as they are shown: each rebuilt from its
    leaf (every field, and its hash, from the canonical leaf the partner's tree holds, never from
    what the answer says beside it). Their inclusion in the partner's witnessed log is not proven
    here: the partner's audit bundle proves it.

    Raises:
        LedgerIntegrityError: an item is not a canonical ledger leaf, or is about another message.
    """
    if not isinstance(items, list):
        raise LedgerIntegrityError("the partner's answer is not a list of entries")
    shown = []
    for n, item in enumerate(items):
        leaf = item.get("leaf") if isinstance(item, dict) else None
        try:
            entry = decode_canonical_leaf(leaf.encode()) if isinstance(leaf, str) else None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise LedgerIntegrityError(f"the partner's entry {n} is not a ledger leaf") from exc
        if entry is None or entry.message_id != message_id:
            raise LedgerIntegrityError(f"the partner's entry {n} is not a ledger leaf about {message_id}")
        shown.append(_entry_view(str(leaf), entry))
    return shown


class AuditService:
    """Audit use cases over one node's database and agreement."""

    def __init__(
        self,
        db: Database,
        agreement: Agreement,
        party: PartyId,
        skew: dt.timedelta = DEFAULT_SKEW,
        *,
        concurrent: int | None = None,
        workers: int | None = None,
    ) -> None:
        """``concurrent``: verifications at once, and exports at once (default: unbounded, one pool
        per verification, as the CLI wants); with it, one shared pool of ``workers`` processes
        (default: one per core)."""
        self.db = db
        self.agreement = agreement
        self.party = party
        self.partner = agreement.partner_of(party)
        self.skew = skew
        self.own = party_anchor(agreement, party)
        self.partner_anchor = party_anchor(agreement, self.partner)
        self._slots = threading.BoundedSemaphore(concurrent) if concurrent else None
        self._export_slots = threading.BoundedSemaphore(concurrent) if concurrent else None
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _shared_pool(self) -> ProcessPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._workers or os.cpu_count() or 1,
                    mp_context=multiprocessing.get_context("spawn"),
                )
            return self._pool

    def close(self) -> None:
        """End the shared verification pool, if one was started."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def announcements(self) -> dict[str, list[str]]:
        """Both parties' stored key-set announcements after version 1, in order."""
        registry = KeyRegistry(self.db, self.agreement, self.party, self.partner)
        return {p: registry.announcements_after(p, 1) for p in (self.party, self.partner)}

    def keys(self) -> AuditKeys:
        """Both parties' checkpoint keys, walked from the agreement over the stored announcements.

        Raises:
            LedgerIntegrityError: a key-set history does not walk from the agreement.
        """
        stored = self.announcements()
        return AuditKeys(
            own=self.own.walk(stored[self.party]),
            partner=self.partner_anchor.walk(stored[self.partner]),
            witnesses=tuple(w.verifier for w in self.agreement.witnesses),
            skew=self.skew,
        )

    def entries(self, where: EntryFilter, after: int = -1, limit: int = 100) -> dict[str, Any]:
        """Entries matching every given filter, in order, from the cursor on."""
        c = ledger_entries.c
        query = sa.select(c.seq, c.leaf).where(c.seq > after).order_by(c.seq).limit(limit)
        for column, value in (
            (c.case_ref, where.case_ref),
            (c.message_id, where.message_id),
            (c.event, where.event),
        ):
            if value:
                query = query.where(column == value)
        if where.rule:
            # a rule ref (R-X@1) exactly, or a rule id at any version
            wanted = f" {where.rule} " if "@" in where.rule else f" {where.rule}@"
            query = query.where(c.rules.contains(wanted, autoescape=True))  # (% and _ are no wildcards)
        if where.since:
            query = query.where(c.at >= where.since)
        if where.until:
            query = query.where(c.at < where.until)
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        items = [_entry_view(r.leaf) for r in rows]
        return {"items": items, "next_cursor": items[-1]["seq"] if items else after}

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        """This node's entries about one message (metadata only)."""
        items: list[dict[str, Any]] = self.entries(EntryFilter(message_id=message_id), limit=1000)["items"]
        return items

    def checkpoints(
        self, *, before: int | None = None, witnessed_before: int | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """The newest ``limit`` signed checkpoints below size ``before`` (any size if None) with
        their cosignatures, and the newest ``limit`` partner checkpoints witnessed below
        ``witnessed_before``, each oldest first, with the cursors to page back (None once the
        oldest is shown)."""
        with self.db.read() as conn:
            own = repo.newest_below(conn, checkpoints, before, limit)
            seen = repo.newest_below(conn, witnessed, witnessed_before, limit)
            further = repo.witness_cosignatures_by_size(conn, [int(r["size"]) for r in own])
        keys = self.keys()
        return {
            "origin": keys.own.origin,
            "cosigner": keys.partner.witness_name,
            "verifier_keys": verifier_keys(self.agreement, (keys.own, keys.partner)),
            "checkpoints": [
                {
                    "size": r["size"],
                    "root": bytes(r["root_hash"]).hex(),
                    "note": r["note"],
                    "signed_at": r["created_at"],
                    "cosignature": r["cosignature"],
                    "cosigned_at": r["cosigned_at"],
                    "witness_cosignatures": further.get(int(r["size"]), {}),
                }
                for r in own
            ],
            "witnessed": [
                {
                    "size": r["size"],
                    "root": bytes(r["root_hash"]).hex(),
                    "note": r["note"],
                    "previous_size": r["previous_size"],
                    "witnessed_at": r["witnessed_at"],
                }
                for r in seen
            ],
            "next_before": int(own[0]["size"]) if len(own) == limit else None,
            "next_witnessed_before": int(seen[0]["size"]) if len(seen) == limit else None,
        }

    def _size(self, conn: sa.Connection, size: int | None) -> int:
        head = repo.read_ledger_head(conn)
        size = head.size if size is None else size
        if not 0 < size <= head.size:
            raise InvalidInput(f"the ledger has {head.size} entries; a tree size must be 1..{head.size}")
        return size

    def inclusion(self, seq: int, size: int | None = None) -> dict[str, Any]:
        """An inclusion proof of entry ``seq`` in the tree of ``size`` (default: the whole ledger)."""
        with self.db.read() as conn:
            size = self._size(conn, size)
            if not 0 <= seq < size:
                raise InvalidInput(f"entry {seq} is not in a tree of size {size}")
            source = repo.SqlSubtrees(conn)
            proof = inclusion_proof(source, seq, size)
            leaf = conn.execute(
                sa.select(ledger_entries.c.leaf).where(ledger_entries.c.seq == seq)
            ).scalar_one()
            root = root_hash(source, size)
        return {
            "seq": seq,
            "size": size,
            "leaf": leaf,
            "leaf_hash": leaf_hash(leaf.encode()).hex(),
            "root": root.hex(),
            "proof": [p.hex() for p in proof],
        }

    def consistency(self, old: int, new: int | None = None) -> dict[str, Any]:
        """A consistency proof from tree size ``old`` to ``new`` (default: the whole ledger)."""
        with self.db.read() as conn:
            new = self._size(conn, new)
            source = repo.SqlSubtrees(conn)
            try:
                proof = consistency_proof(source, old, new)
            except ProofError as exc:
                raise InvalidInput(str(exc)) from exc
            return {
                "old_size": old,
                "new_size": new,
                "old_root": root_hash(source, old).hex(),
                "new_root": root_hash(source, new).hex(),
                "proof": [p.hex() for p in proof],
            }

    def verify(self, *, workers: int | None = None, chunk: int | None = None) -> AuditReport:
        """Verify the whole ledger, both key-set histories, checkpoints, cosignatures and witnessed
        checkpoints, and judge every ledgered signature (what is flagged is in the report). The
        entries are checked in aligned chunks by ``workers`` processes (default: one per core) when
        the ledger is large, then recombined exactly as the tree is built.

        Raises:
            LedgerIntegrityError: naming the first bad entry, checkpoint or key-set version.
            Busy: ``concurrent`` verifications are already running.
        """
        if self._slots is None:
            return self._verify(workers=workers, chunk=chunk, pool=None)
        if not self._slots.acquire(blocking=False):
            raise Busy("a verification of the whole ledger is already running; retry when it ends")
        try:
            return self._verify(workers=workers or self._workers, chunk=chunk, pool=self._shared_pool())
        finally:
            self._slots.release()

    def _verify(self, *, workers: int | None, chunk: int | None, pool: Executor | None) -> AuditReport:
        with self.db.read() as conn:
            head = repo.read_ledger_head(conn)
            checkpoints = repo.all_checkpoints(conn)
            witnessed = repo.all_witnessed(conn)
            further = repo.witness_cosignatures_by_size(conn)
            judged = repo.entries_of(conn, [*SIGNED_EVENTS, *KEY_SET_RECORDED], below=head.size)
            beyond = conn.execute(
                sa.select(sa.func.count())
                .select_from(ledger_entries)
                .where(ledger_entries.c.seq >= head.size)
            ).scalar_one()
        if beyond:
            raise LedgerIntegrityError(f"{beyond} entries lie beyond the ledger's recorded end", head.size)
        keys = self.keys()  # read after the records: it holds every key they can name

        def verify_entries(marks: Mapping[int, bytes]) -> int:
            return verify_ledger_entries(
                self.db.url,
                size=head.size,
                root=head.root,
                marks=marks,
                workers=workers,
                chunk=chunk,
                pool=pool,
            )

        return verify_audit(
            verify_entries,
            checkpoints=checkpoints,
            witnessed=witnessed,
            keys=keys,
            witness_cosignatures=further,
            signed=[e for e in judged if e.event in SIGNED_EVENTS],
            key_set_entries=[e for e in judged if e.event in KEY_SET_RECORDED],
        )

    def export(self, start: int, end: int | None = None) -> dict[str, Any]:
        """A bundle of entries ``[start, end)`` (``schemas/audit-bundle.schema.json``) proven against
        the latest checkpoint the partner cosigned (or the latest checkpoint, if none is cosigned yet),
        with the consistency proof from the first checkpoint that covered them.

        Raises:
            InvalidInput: a bad range. NotFound: no signed checkpoint covers the range yet.
            Busy: ``concurrent`` exports are already running (each costs a CPU-second and a bundle
                of up to MAX_EXPORT entries in memory).
        """
        if self._export_slots is None:
            return self._export(start, end)
        if not self._export_slots.acquire(blocking=False):
            raise Busy("an export is already running; retry when it ends")
        try:
            return self._export(start, end)
        finally:
            self._export_slots.release()

    def _export(self, start: int, end: int | None) -> dict[str, Any]:
        with self.db.read() as conn:
            checkpoint = repo.latest_checkpoint(conn, cosigned=True) or repo.latest_checkpoint(conn)
            if checkpoint is None:
                raise NotFound("no signed checkpoint yet: wait for the next one")
            size = int(checkpoint["size"])
            end = min(size, start + MAX_EXPORT) if end is None else end
            if not 0 <= start < end or end - start > MAX_EXPORT:
                raise InvalidInput(f"export a range of 1..{MAX_EXPORT} entries, start < end")
            if end > size:
                raise NotFound(
                    f"the latest signed checkpoint covers entries below {size}; wait for the next one"
                )
            rows = conn.execute(
                sa.select(ledger_entries.c.seq, ledger_entries.c.leaf)
                .where(ledger_entries.c.seq >= start, ledger_entries.c.seq < end)
                .order_by(ledger_entries.c.seq)
            ).all()
            if [r.seq for r in rows] != list(range(start, end)):
                raise LedgerIntegrityError(f"entries {start}..{end - 1} are not all in the ledger")
            source = repo.SqlSubtrees(conn)
            further = repo.witness_cosignatures_by_size(conn)
            first = repo.first_checkpoint_covering(conn, end)
            earliest = None
            if first is not None and int(first["size"]) < size:
                proof = consistency_proof(source, int(first["size"]), size)
                earliest = (_cosigned_note(first, further), str(first["created_at"]), proof)
            return build_bundle(
                party=self.party,
                agreement={"version": self.agreement.version, "digest": self.agreement.digest},
                origin=self.own.origin,
                entries=[(int(r.seq), str(r.leaf)) for r in rows],
                source=source,
                checkpoint=_cosigned_note(checkpoint, further),
                signed_at=str(checkpoint["created_at"]),
                size=size,
                key_sets=self.announcements(),  # read after the checkpoints: every key they name
                earliest=earliest,
            )


def _cosigned_note(record: Mapping[str, Any], further: Mapping[int, Mapping[str, str]]) -> str:
    """A checkpoint note with every cosignature line kept for it (the partner's first)."""
    lines = [str(record["cosignature"])] if record["cosignature"] else []
    return checkpoint_with(str(record["note"]), lines + list(further.get(int(record["size"]), {}).values()))


def _chunk_size(size: int, workers: int) -> int:
    """A power of two giving each worker a few chunks of at least 2**14 entries."""
    target = max(1 << 14, size // (workers * 4))
    return 1 << (target.bit_length() - 1)


def _verify_chunk(
    url: str, start: int, stop: int, marks: tuple[int, ...]
) -> tuple[int, int, bytes, dict[int, bytes]]:
    """Verify entries ``[start, stop)`` with a connection of its own (in a worker process)."""
    with (
        Database(url) as db,
        db.read() as conn,
        closing(repo.ledger_rows(conn, start=start, stop=stop)) as rows,
    ):
        digest, partial = verify_range(rows, start=start, stop=stop, marks=marks)
    return start, stop, digest, partial


def verify_ledger_entries(
    url: str,
    *,
    size: int,
    root: bytes,
    marks: Mapping[int, bytes],
    workers: int | None = None,
    chunk: int | None = None,
    pool: Executor | None = None,
) -> int:
    """Verify every entry of the ledger at ``url`` against its head ``(size, root)`` and the
    checkpoint roots ``marks``, in aligned chunks over ``workers`` processes (default: one per core):
    those of ``pool`` if given, else of a pool started for this call.

    Raises:
        LedgerIntegrityError: naming the first bad entry or checkpoint.
    """
    workers = workers or os.cpu_count() or 1
    chunk = chunk or _chunk_size(size, workers)
    ranges = [(a, min(a + chunk, size)) for a in range(0, size, chunk)]
    if workers == 1 or len(ranges) <= 1:
        parts = [_verify_chunk(url, a, b, tuple(marks)) for a, b in ranges]
    else:
        if pool is not None:
            futures = [pool.submit(_verify_chunk, url, a, b, tuple(marks)) for a, b in ranges]
            wait(futures)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as own:
                futures = [own.submit(_verify_chunk, url, a, b, tuple(marks)) for a, b in ranges]
                wait(futures)
        failures = [exc for f in futures if (exc := f.exception()) is not None]
        if failures:  # the first bad entry of the ledger is the lowest one found
            raise min(failures, key=lambda e: getattr(e, "seq", None) or 0)
        parts = [f.result() for f in futures]
    combine_ranges(parts, size=size, root=root, checkpoints=marks)
    return size
