"""Both parties' key sets as this node trusts them: the agreement's version 1, then every accepted
announcement, kept in the ``key_sets`` table (I/O shell around :mod:`exchange.keys.announcement`).

Guarantees:
- version 1 of each party is derived from the agreement alone, identically on both nodes, and its
  digest is what the party's version 2 must name;
- a partner's announcement is stored only once :func:`~exchange.keys.announcement.accept` took it on
  top of the last trusted version, and each acceptance or refusal is ledgered;
- every process of a node sees a new version within ``refresh_seconds`` (the table is read again
  when its newest version changed), without a restart.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from joserfc.jwk import OKPKey
from sqlalchemy.engine import Connection

from exchange.agreement import Agreement, PublicJWK
from exchange.canonical import canonical_json, sha256_hex
from exchange.db import repo
from exchange.db.engine import Database
from exchange.db.schema import key_sets, key_usage
from exchange.errors import KeyManagementError
from exchange.keys.announcement import (
    AnnouncementRejected,
    KeyEntry,
    KeySet,
    Purpose,
    State,
    Trusted,
    accept,
    claimed_version,
    key_ended,
    key_in_force,
    key_in_force_from,
)
from exchange.ledger import EntryDraft, LedgerEntry
from exchange.ledger.events import KEY_SET_RECORDED, LedgerEvent, key_set_mismatch
from exchange.observability import logs
from exchange.types import KeyId, PartyId

log = logging.getLogger("exchange.keys")

#: Version 1 comes from the agreement: in force from the beginning, never expiring.
ANCHOR_ISSUED_AT = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ANCHOR_EXPIRES_AT = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)


def _entry(jwk: PublicJWK, purpose: Purpose, state: State) -> KeyEntry:
    return KeyEntry.public(jwk.kid, purpose, state, jwk.model_dump(), ANCHOR_ISSUED_AT)


def initial_key_set(agreement: Agreement, party: PartyId) -> KeySet:
    """Version 1 of ``party``'s key set, from the keys the agreement pins: the last signing and
    encryption keys listed are active, earlier ones retired (their old signatures still verify)."""
    entry = agreement.parties[party]
    keys: list[KeyEntry] = []
    pinned: tuple[tuple[Purpose, Sequence[PublicJWK]], ...] = (
        ("signing", entry.signing_keys),
        ("encryption", entry.encryption_keys),
    )
    for purpose, listed in pinned:
        keys += [_entry(k, purpose, "retired") for k in listed[:-1]]
        keys.append(_entry(listed[-1], purpose, "active"))
    keys.append(_entry(entry.checkpoint_key, "checkpoint", "active"))
    return KeySet(
        party=party,
        version=1,
        issued_at=ANCHOR_ISSUED_AT,
        expires_at=ANCHOR_EXPIRES_AT,
        tls_pins=(entry.node_key_sha256,),
        keys=tuple(keys),
    )


def anchor(agreement: Agreement, party: PartyId) -> Trusted:
    """Version 1 as trusted: its digest is SHA-256 of the key set's RFC 8785 JSON."""
    key_set = initial_key_set(agreement, party)
    return Trusted(key_set, sha256_hex(canonical_json(key_set.model_dump(mode="json", exclude_none=True))))


@dataclass(frozen=True)
class KeyHistory:
    """Every trusted version of one party's key set, oldest first (version 1 from the agreement)."""

    versions: tuple[Trusted, ...]

    @property
    def current(self) -> KeySet:
        return self.versions[-1].key_set

    @property
    def version(self) -> int:
        return self.current.version

    @property
    def digest(self) -> str:
        return self.versions[-1].digest

    @functools.cached_property
    def sets(self) -> tuple[KeySet, ...]:
        """The key sets, oldest first (computed once: a history never changes)."""
        return tuple(t.key_set for t in self.versions)

    def entry(self, kid: str) -> KeyEntry | None:
        """The key as the newest version that lists it has it."""
        for trusted in reversed(self.versions):
            found = trusted.key_set.key(kid)
            if found is not None:
                return found
        return None

    def keys_of(self, purpose: Purpose) -> dict[KeyId, OKPKey]:
        """Every key of ``purpose`` any version listed, by kid: candidates only; whether one was in
        force for a given signature is :meth:`in_force`'s answer."""
        found: dict[KeyId, OKPKey] = {}
        for key_set in self.sets:
            for k in key_set.keys:
                if k.purpose == purpose and KeyId(k.kid) not in found:
                    found[KeyId(k.kid)] = k.okp
        return found

    def in_force(self, kid: str, signed_at: dt.datetime) -> KeyEntry | None:
        """The key if it was trusted for a signature made at ``signed_at`` (see ``key_in_force``)."""
        return key_in_force(self.sets, kid, signed_at)

    def in_force_from(self, kid: str) -> dt.datetime | None:
        """When the key was first trusted for new signatures (see ``key_in_force_from``)."""
        return key_in_force_from(self.sets, kid)

    def ended(self, kid: str) -> dt.datetime | None:
        """When the key stopped being trusted for new signatures (see ``key_ended``)."""
        return key_ended(self.sets, kid)

    def active(self, purpose: Purpose) -> KeyEntry:
        return self.current.active(purpose)

    def known(self) -> dict[str, KeyEntry]:
        """Every key any version listed, by kid, as last listed: what a next version must continue."""
        return {k.kid: k for s in self.sets for k in s.keys}

    def checkpoint_keys(self, at: dt.datetime | None = None) -> list[OKPKey]:
        """The checkpoint keys, newest first, that may have made a checkpoint or cosignature: at
        ``at`` (a new one: keys in force then), or at any time (an old one: every key ever active
        and never revoked). A note names its key, so trying each is cheap."""
        revoked = {e.kid for s in self.sets for e in s.keys if e.state == "revoked"}
        found: dict[str, OKPKey] = {}
        for key_set in reversed(self.sets):
            for entry in key_set.keys:
                if entry.purpose != "checkpoint" or entry.kid in found:
                    continue
                usable = (
                    self.in_force(entry.kid, at) is not None
                    if at is not None
                    else (entry.state != "next" and entry.kid not in revoked)
                )
                if usable:
                    found[entry.kid] = entry.okp
        return list(found.values())


@dataclass(frozen=True)
class PartnerKeys:
    """The partner's public keys as its key set in force has them."""

    party: PartyId
    history: KeyHistory
    ledger_origin: str
    witness_name: str

    @functools.cached_property
    def verification(self) -> dict[KeyId, OKPKey]:
        """Every signing key the partner ever announced: the candidates a signature is checked
        against; :meth:`KeyHistory.in_force` then says whether it was trusted at signing time."""
        return self.history.keys_of("signing")

    @functools.cached_property
    def encryption(self) -> OKPKey:
        return self.history.active("encryption").okp

    @functools.cached_property
    def checkpoint(self) -> OKPKey:
        return self.history.active("checkpoint").okp

    def checkpoint_keys(self, at: dt.datetime) -> list[OKPKey]:
        """The partner's checkpoint keys in force at ``at`` (see KeyHistory.checkpoint_keys)."""
        return self.history.checkpoint_keys(at)

    @property
    def tls_pins(self) -> tuple[str, ...]:
        return self.history.current.tls_pins


class KeyRegistry:
    """The key histories of this node and its partner, read from the database and cached."""

    def __init__(
        self,
        db: Database,
        agreement: Agreement,
        party: PartyId,
        partner: PartyId,
        refresh_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.agreement = agreement
        self.party = party
        self.partner = partner
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._cache: dict[PartyId, KeyHistory] = {}
        self._checked = 0.0
        self._fetched_at = 0.0
        self._last_fetched_at = 0.0
        self._fetch_interval = 0.0
        self._refunded_at = -math.inf  # when a failed fetch last gave its allowance back
        self._looked_up = True  # the last fetch allowed succeeded (False: failed or in flight)
        self._partner_keys: PartnerKeys | None = None
        self._seen_kids: set[str] = set()
        self._regressions: set[tuple[PartyId, int]] = set()  # (party, stored version) reported

    # --- reading --------------------------------------------------------------------------------

    def history(self, party: PartyId) -> KeyHistory:
        """``party``'s trusted versions, at most ``refresh_seconds`` old."""
        with self._lock:
            if time.monotonic() - self._checked >= self.refresh_seconds or party not in self._cache:
                self._reload()
            return self._cache[party]

    def held_tls_pins(self) -> tuple[str, ...]:
        """The partner node's TLS key pins as this process last read them, without reading the
        database (for the event loop; empty before the first read)."""
        held = self._cache.get(self.partner)
        return held.current.tls_pins if held is not None else ()

    def refresh(self) -> None:
        """Read the table again now (after this process stored a version)."""
        with self._lock:
            self._reload()

    def _reload(self) -> None:
        with self.db.read() as conn:
            first = not self._cache  # this process's first read: the table against the ledger
            # the ledger before the table: a version is stored and ledgered in one transaction, so
            # what a ledger read finds, a later table read finds too (read committed: two snapshots)
            recorded = repo.entries_of(conn, [e.value for e in KEY_SET_RECORDED]) if first else []
            newest = dict(
                conn.execute(
                    sa.select(key_sets.c.party, sa.func.max(key_sets.c.version)).group_by(key_sets.c.party)
                ).all()
            )
            for party in (self.party, self.partner):
                cached = self._cache.get(party)
                stored = max(1, int(newest.get(party) or 1))
                if cached is None:
                    self._cache[party] = self._load(conn, party, None)
                elif cached.version < stored:
                    self._cache[party] = self._load(conn, party, cached)
                elif cached.version > stored and (party, stored) not in self._regressions:
                    self._regressions.add((party, stored))  # versions never go away: rows deleted
                    logs.security_incident(
                        log,
                        "key-sets",
                        "%s's key set is at version %d in the database, below the version %d this"
                        " process trusts; the trusted history is kept",
                        party,
                        stored,
                        cached.version,
                    )
            if first:
                self._check_against_ledger(recorded)
        self._checked = time.monotonic()

    def _check_against_ledger(self, recorded: Sequence[LedgerEntry]) -> None:
        """Refuse the histories just loaded if they lack a version the ledger's ``recorded`` entries
        say was published or accepted, or hold it with another digest: rows deleted or replaced
        (to bring back a key a later version revoked), or restored apart from the ledger. (A
        running process keeps what it trusts: see :meth:`_reload`.) The cache is emptied.

        Raises:
            KeyManagementError: naming the entry, the party and the version.
        """
        for party in (self.party, self.partner):
            digests = tuple(t.digest for t in self._cache[party].versions[1:])
            mismatch = key_set_mismatch(recorded, party, digests)
            if mismatch is not None:
                self._cache.clear()
                seq, what = mismatch
                logs.security_incident(log, "key-sets", "ledger entry %d %s", seq, what)
                raise KeyManagementError(
                    f"ledger entry {seq} {what}; restore the key_sets table from a backup of this"
                    " database before starting the node"
                )

    @staticmethod
    def newest_version(conn: Connection, party: PartyId) -> int:
        """The newest stored version of ``party``'s key set (1: only the agreement's)."""
        newest = conn.execute(
            sa.select(sa.func.max(key_sets.c.version)).where(key_sets.c.party == party)
        ).scalar()
        return int(newest or 1)

    def _load(self, conn: Connection, party: PartyId, base: KeyHistory | None) -> KeyHistory:
        """``party``'s history: ``base`` and the versions stored after it (all, without a base), each
        checked again with the acceptance rules, so a row edited in the database is not trusted.

        Raises:
            AnnouncementRejected: a stored version that does not follow from the one before.
        """
        versions = list(base.versions) if base is not None else [anchor(self.agreement, party)]
        known = base.known() if base is not None else {k.kid: k for k in versions[0].key_set.keys}
        now = dt.datetime.now(dt.UTC)
        rows = conn.execute(
            sa.select(key_sets.c.announcement, key_sets.c.digest)
            .where(key_sets.c.party == party, key_sets.c.version > versions[-1].key_set.version)
            .order_by(key_sets.c.version)
        ).all()
        for row in rows:
            trusted = accept(versions[-1], row.announcement, now, final=False, known=known)
            if trusted.digest != row.digest:
                raise KeyManagementError(
                    f"key set of {party} version {trusted.key_set.version}: digest differs"
                )
            versions.append(trusted)
            known.update({k.kid: k for k in trusted.key_set.keys})
        return KeyHistory(tuple(versions))

    def partner_keys(self) -> PartnerKeys:
        """The partner's keys in force (rebuilt when its key set changed)."""
        history = self.history(self.partner)
        cached = self._partner_keys
        if cached is None or cached.history is not history:
            entry = self.agreement.parties[self.partner]
            cached = PartnerKeys(self.partner, history, entry.ledger_origin, entry.witness_name)
            self._partner_keys = cached
        return cached

    def note_encryption_key_used(self, kid: str, now: dt.datetime) -> None:
        """Record the first time the partner encrypted to our key ``kid`` (once per process)."""
        if kid in self._seen_kids:
            return
        with self.db.transaction() as conn:
            if conn.execute(sa.select(key_usage.c.kid).where(key_usage.c.kid == kid)).first() is None:
                conn.execute(key_usage.insert(), {"kid": kid, "first_seen_at": now.isoformat()})
        self._seen_kids.add(kid)

    def first_seen(self, kid: str) -> dt.datetime | None:
        """When the partner was first seen encrypting to our key ``kid``, if it was."""
        with self.db.read() as conn:
            row = conn.execute(sa.select(key_usage.c.first_seen_at).where(key_usage.c.kid == kid)).first()
        return dt.datetime.fromisoformat(row.first_seen_at) if row else None

    def announcements_after(self, party: PartyId, version: int) -> list[str]:
        """The stored announcements of ``party`` after ``version``, in order."""
        with self.db.read() as conn:
            rows = conn.execute(
                sa.select(key_sets.c.announcement)
                .where(key_sets.c.party == party, key_sets.c.version > version)
                .order_by(key_sets.c.version)
            ).all()
        return [r.announcement for r in rows]

    def unacknowledged(self) -> list[tuple[int, str]]:
        """This node's announcements the partner has not acknowledged yet, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(
                sa.select(key_sets.c.version, key_sets.c.announcement)
                .where(key_sets.c.party == self.party, key_sets.c.acknowledged_at.is_(None))
                .order_by(key_sets.c.version)
            ).all()
        return [(r.version, r.announcement) for r in rows]

    def recorded_at(self, party: PartyId, version: int) -> dt.datetime:
        """When version ``version`` of ``party``'s key set was stored here. Raises
        KeyManagementError if it was not."""
        with self.db.read() as conn:
            found = conn.execute(
                sa.select(key_sets.c.recorded_at).where(
                    key_sets.c.party == party, key_sets.c.version == version
                )
            ).scalar()
        if found is None:
            raise KeyManagementError(f"no version {version} of {party}'s key set is stored")
        return dt.datetime.fromisoformat(found)

    def own_rows(self) -> list[dict[str, Any]]:
        """This node's stored versions with their acknowledgement (never a private key)."""
        with self.db.read() as conn:
            rows = conn.execute(
                sa.select(
                    key_sets.c.version,
                    key_sets.c.digest,
                    key_sets.c.issued_at,
                    key_sets.c.recorded_at,
                    key_sets.c.acknowledged_at,
                )
                .where(key_sets.c.party == self.party)
                .order_by(key_sets.c.version)
            ).all()
        return [dict(r._mapping) for r in rows]

    # --- writing --------------------------------------------------------------------------------

    def record(self, conn: Connection, trusted: Trusted, announcement: str, now: dt.datetime) -> None:
        """Store an accepted version (inside the caller's transaction)."""
        conn.execute(
            key_sets.insert(),
            {
                "party": trusted.key_set.party,
                "version": trusted.key_set.version,
                "digest": trusted.digest,
                "announcement": announcement,
                "issued_at": trusted.key_set.issued_at.isoformat(),
                "recorded_at": now.isoformat(),
            },
        )

    def accept_partner(
        self, announcements: Sequence[str], now: dt.datetime, *, max_per_day: int = 24
    ) -> KeyHistory:
        """Walk the partner's announcements on top of what is trusted, in memory, then store and
        ledger every new version in one transaction: all of them or none. Versions already trusted
        (same digest) are skipped; the last new version must be unexpired; at most ``max_per_day``
        versions are taken in any 24 hours.

        Raises:
            AnnouncementRejected: a version refused (ledgered as ``keys.rejected``, nothing stored);
                ``fork`` when a version already trusted comes with another digest;
                ``too-many-versions`` beyond the daily allowance.
        """
        for _ in range(3):  # another process may store the same versions meanwhile: walk again
            with self._lock:
                self._reload()
                history = self._cache[self.partner]
            walked, rejected = self._walk_partner(history, announcements, now)
            with self.db.transaction() as conn:
                head = repo.lock_ledger_head(conn)  # one acceptance at a time, in ledger order
                if self.newest_version(conn, self.partner) != history.version:
                    continue
                if rejected is None and walked:
                    since = (now - dt.timedelta(days=1)).isoformat()
                    recent = conn.execute(
                        sa.select(sa.func.count())
                        .select_from(key_sets)
                        .where(key_sets.c.party == self.partner, key_sets.c.recorded_at > since)
                    ).scalar_one()
                    if recent + len(walked) > max_per_day:
                        rejected = (
                            AnnouncementRejected(
                                "too-many-versions",
                                f"{recent} versions in 24 hours already, {len(walked)} more",
                            ),
                            walked[0][0].key_set.version,
                            walked[0][1],
                        )
                drafts: list[EntryDraft] = []
                if rejected is not None:
                    exc, version, announcement = rejected
                    digest = sha256_hex(announcement)
                    drafts.append(
                        _key_event(LedgerEvent.KEYS_REJECTED, self.partner, version, digest, exc.reason)
                    )
                else:
                    for trusted, announcement in walked:
                        self.record(conn, trusted, announcement, now)
                        drafts.append(
                            _key_event(
                                LedgerEvent.KEYS_ACCEPTED,
                                self.partner,
                                trusted.key_set.version,
                                trusted.digest,
                                None,
                            )
                        )
                if drafts:
                    repo.append_ledger(conn, head, drafts, now.isoformat())
            if rejected is not None:
                log.warning("refused a key-set announcement of %s: %s", self.partner, rejected[0])
                raise rejected[0]
            self.refresh()
            return self.history(self.partner)
        raise KeyManagementError("the partner's key sets kept changing under this acceptance; retry")

    @staticmethod
    def _walk_partner(
        history: KeyHistory, announcements: Sequence[str], now: dt.datetime
    ) -> tuple[list[tuple[Trusted, str]], tuple[AnnouncementRejected, int | None, str] | None]:
        """The new versions among ``announcements`` accepted in order on top of ``history``, or
        the refusal (reason, claimed version, announcement) that stops the walk."""
        stored = {t.key_set.version: t.digest for t in history.versions}
        chain = list(history.versions)
        known = history.known()
        walked: list[tuple[Trusted, str]] = []
        for announcement in announcements:
            digest = sha256_hex(announcement)
            version = claimed_version(announcement)
            if version is not None and stored.get(version) == digest:
                continue  # already trusted: a repeat, not a rollback
            try:
                candidate = accept(chain[-1], announcement, now, final=False, known=known)
            except AnnouncementRejected as exc:
                if exc.reason in ("replay", "rollback") and version in stored:
                    exc = AnnouncementRejected("fork", f"version {version} with another digest")
                return [], (exc, version, announcement)
            walked.append((candidate, announcement))
            chain.append(candidate)
            known.update({k.kid: k for k in candidate.key_set.keys})
        if walked and walked[-1][0].key_set.expires_at <= now:
            last = walked[-1]
            expired = AnnouncementRejected("expired", f"expired at {last[0].key_set.expires_at.isoformat()}")
            return [], (expired, last[0].key_set.version, last[1])
        return walked, None

    def acknowledge(self, versions: Sequence[int], receipt: str, now: dt.datetime) -> None:
        """Record the partner's signed receipt of our ``versions`` and ledger it."""
        with self.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            conn.execute(
                key_sets.update()
                .where(
                    key_sets.c.party == self.party,
                    key_sets.c.version.in_(list(versions)),
                    key_sets.c.acknowledged_at.is_(None),
                )
                .values(acknowledged_at=now.isoformat(), receipt=receipt)
            )
            repo.append_ledger(
                conn,
                head,
                [
                    _key_event(
                        LedgerEvent.KEYS_ACKNOWLEDGED, self.party, max(versions), sha256_hex(receipt), None
                    )
                ],
                now.isoformat(),
            )

    def refused_receipt(self, versions: Sequence[int], receipt: str, reason: str) -> EntryDraft:
        """The ledger entry of a receipt of our ``versions`` that we refused (``keys.rejected`` of
        our own party, with the refused receipt's digest and why)."""
        return _key_event(LedgerEvent.KEYS_REJECTED, self.party, max(versions), sha256_hex(receipt), reason)

    def may_fetch(self, min_interval: float) -> bool:
        """True at most once per ``min_interval`` seconds: the rate limit of fetching the partner's
        key sets on meeting an unknown key id (a fetch that failed may be tried again at once,
        once per interval: see :meth:`fetch_failed`)."""
        with self._lock:
            if time.monotonic() - self._fetched_at < min_interval:
                return False
            self._fetch_interval = min_interval
            self._last_fetched_at, self._fetched_at = self._fetched_at, time.monotonic()
            self._looked_up = False
            return True

    def fetch_succeeded(self) -> None:
        """The fetch :meth:`may_fetch` allowed answered: a key it did not bring is not the partner's."""
        with self._lock:
            self._looked_up = True

    @property
    def looked_up_lately(self) -> bool:
        """False while the last fetch allowed is in flight or failed: a key unknown now may be one
        that could not be looked up."""
        with self._lock:
            return self._looked_up

    def fetch_failed(self) -> None:
        """The fetch :meth:`may_fetch` allowed did not happen: the next one may go at once, unless
        a failed fetch already gave its allowance back within the interval. So a blip costs no
        interval, and a partner whose key-set endpoint fails or hangs still gets at most two
        fetches per interval (each may hold a thread for the peer timeout), not one per batch."""
        with self._lock:
            self._looked_up = False
            now = time.monotonic()
            if now - self._refunded_at < self._fetch_interval:
                return
            self._refunded_at = now
            self._fetched_at = self._last_fetched_at


def _key_event(
    event: LedgerEvent, party: PartyId, version: int | None, digest: str, reason: str | None
) -> EntryDraft:
    data: dict[str, Any] = {"party": party, "version": version, "sha256": digest}
    if reason is not None:
        data["reason"] = reason
    return EntryDraft(
        event=event,
        message_id=None,
        actor=party,
        decision="deny" if reason is not None else "allow",
        data=data,
    )
