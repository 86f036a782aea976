"""Rotation and revocation of the node's own keys, in the manner of X-Road's two-stage rollover.

Each step makes the next version of the node's key set, signs it (by the active signing key of the
last version, and by every signing key it introduces), checks it with the very rules the partner
applies (:func:`~exchange.keys.announcement.accept`), and stores it with a ledger entry in one
transaction. The delivery loop announces every version the partner has not acknowledged before it
sends anything (so the partner knows a key before it sees it used), and keeps the signed receipt.

The steps, each refused with a :class:`~exchange.errors.KeyManagementError` when out of order:

- ``rotate``: a new key of one purpose in state ``next``;
- ``activate``: the next key becomes active once the partner acknowledged it (or ``force`` after
  ``key_activation_wait_seconds``, ledgered as forced); the old one is ``retiring``: a signing or
  checkpoint key until ``valid_until`` (the longest delivery wait plus clock skew, so nothing in
  flight is refused), an encryption key until the partner has been seen using its successor for
  ``key_destroy_grace_seconds``;
- ``retire`` (the key maintenance loop): retiring keys whose time has come become ``retired`` and
  their private keys are destroyed;
- ``renew_if_expiring`` (the same loop): the same keys again with a fresh expiry;
- ``revoke``: a key is revoked from an effective time; an active one is replaced at once by a new
  active key (an emergency rotation, no acknowledgement awaited).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable
from typing import Any

from joserfc.jwk import OKPKey

from exchange import crypto
from exchange.config import NodeSettings
from exchange.db import repo
from exchange.errors import KeyManagementError
from exchange.keys.announcement import MAX_KEYS, KeyEntry, KeySet, Purpose, Trusted, accept, announce
from exchange.keys.registry import KeyHistory, KeyRegistry
from exchange.keys.store import add_key, destroy_key, held, load_private_key
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent
from exchange.pki import TLSFiles, promote_node_key, stage_node_key

log = logging.getLogger("exchange.keys")

PURPOSES: tuple[Purpose, ...] = ("signing", "encryption", "checkpoint")


class KeyAdmin:
    """The node's own key set: rotate, activate, revoke, retire. Every step is ledgered."""

    def __init__(
        self,
        settings: NodeSettings,
        registry: KeyRegistry,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock

    @property
    def own(self) -> KeyHistory:
        return self.registry.history(self.registry.party)

    # --- the steps -------------------------------------------------------------------------------

    def rotate(self, purpose: Purpose) -> KeyEntry:
        """Make a ``next`` key for ``purpose`` and publish the version that lists it.

        Raises:
            KeyManagementError: a next key of that purpose is already waiting to be activated.
        """
        base = self._base()
        current = base.current
        waiting = [k for k in current.keys if k.purpose == purpose and k.state == "next"]
        if waiting:
            raise KeyManagementError(
                f"the {purpose} key {waiting[0].kid} is already next: activate it with"
                f" `exchange keys activate --purpose {purpose}` before rotating again"
            )
        self._room(current, spare=True)
        now = self.clock()
        signers = [self._private(current.active("signing").kid, "signing")]  # (the passphrase checked)
        record = add_key(self.settings.key_dir, purpose, self.settings.passphrase())
        try:
            new = KeyEntry.public(record.kid, purpose, "next", record.public_jwk, now)
            if purpose == "signing":
                signers.append(self._private(new.kid, "signing"))
            self._publish(
                base,
                [*current.keys, new],
                signers,
                LedgerEvent.KEYS_ROTATED,
                {"kid": new.kid, "purpose": purpose},
            )
        except BaseException:  # unless published, no key set lists it and nothing would remove it
            if not self._listed(record.kid):
                destroy_key(self.settings.key_dir, record.kid)
            raise
        return new

    def _listed(self, kid: str) -> bool:
        """Whether a stored version of the node's key set lists ``kid`` (True if that cannot be
        read: a key file is never destroyed on a doubt)."""
        try:
            return self._base().entry(kid) is not None
        except Exception:
            return True

    def activate(self, purpose: Purpose, *, force: bool = False) -> KeyEntry:
        """Make the next key of ``purpose`` active and the active one retiring.

        Raises:
            KeyManagementError: no next key; the partner has not acknowledged the version that
                introduced it (and no ``force``, or ``force`` before the configured wait).
        """
        base = history = self._base()
        current = history.current
        nxt = next((k for k in current.keys if k.purpose == purpose and k.state == "next"), None)
        if nxt is None:
            raise KeyManagementError(
                f"there is no next {purpose} key: run `exchange keys rotate --purpose {purpose}` first"
            )
        now = self.clock()
        introduced = min(t.key_set.version for t in history.versions if t.key_set.key(nxt.kid) is not None)
        acknowledged = self._check_acknowledged(introduced, nxt.kid, force)
        old = current.active(purpose)
        until = None
        if purpose != "encryption":
            until = now + dt.timedelta(seconds=self.retiring_seconds)
        keys = []
        for k in current.keys:
            if k.kid == nxt.kid:
                keys.append(k.model_copy(update={"state": "active", "valid_from": now}))
            elif k.kid == old.kid:
                keys.append(k.model_copy(update={"state": "retiring", "valid_until": until}))
            else:
                keys.append(k)
        signers = [self._private(current.active("signing").kid, "signing")]
        if purpose == "signing":
            signers.append(self._private(nxt.kid, "signing"))
        self._publish(
            base,
            keys,
            signers,
            LedgerEvent.KEYS_ACTIVATED,
            {"kid": nxt.kid, "purpose": purpose, "retiring": old.kid, "forced": not acknowledged},
        )
        return next(k for k in self.own.current.keys if k.kid == nxt.kid)

    def revoke(self, kid: str, *, reason: str, effective_at: dt.datetime) -> KeyEntry | None:
        """Revoke our key ``kid`` from ``effective_at``; an active key is replaced at once by a new
        active key, returned. Its private key is destroyed.

        Raises:
            KeyManagementError: not a key of this node, already revoked, no reason, or an
                effective time in the future beyond the clock skew (revocation is never postdated).
        """
        base = self._base()
        current = base.current
        entry = current.key(kid)
        if entry is None:
            raise KeyManagementError(f"{kid} is not a key of this node's key set")
        if entry.state == "revoked":
            raise KeyManagementError(f"{kid} is already revoked (at {entry.revoked_at})")
        if not reason.strip():
            raise KeyManagementError("a revocation needs a --reason")
        now = self.clock()
        if effective_at > now + self.settings.clock_skew:
            raise KeyManagementError(
                "--effective-at is in the future: revoke from now or from when it was lost"
            )
        replacement: KeyEntry | None = None
        keys = [k for k in current.keys if k.kid != kid]
        keys.append(entry.model_copy(update={"state": "revoked", "revoked_at": effective_at}))
        signers = [self._private(current.active("signing").kid, "signing")]
        if entry.state == "active":
            self._room(current, spare=False)
            record = add_key(self.settings.key_dir, entry.purpose, self.settings.passphrase())
            replacement = KeyEntry.public(record.kid, entry.purpose, "active", record.public_jwk, now)
            # a next key of the same purpose would be a second successor: it stays next
            keys.append(replacement)
            if entry.purpose == "signing":
                signers.append(self._private(replacement.kid, "signing"))
        self._publish(
            base,
            keys,
            signers,
            LedgerEvent.KEYS_REVOKED,
            {
                "kid": kid,
                "purpose": entry.purpose,
                "reason": reason,
                "effective_at": effective_at.isoformat(),
                "replaced_by": replacement.kid if replacement else None,
            },
        )
        destroy_key(self.settings.key_dir, kid)
        return replacement

    def retire_due(self) -> list[str]:
        """Retire every retiring key whose time has come and destroy its private key: a signing or
        checkpoint key after ``valid_until``; an encryption key once the partner has used its
        successor for ``key_destroy_grace_seconds``. Returns the kids retired."""
        base = self._base()
        current = base.current
        now = self.clock()
        due: list[str] = []
        for k in current.keys:
            if k.state != "retiring":
                continue
            if k.purpose == "encryption":
                seen = self.registry.first_seen(current.active("encryption").kid)
                grace = dt.timedelta(seconds=self.settings.key_destroy_grace_seconds)
                if seen is not None and now >= seen + grace:
                    due.append(k.kid)
            elif k.valid_until is not None and now >= k.valid_until:
                due.append(k.kid)
        if not due:
            return []
        keys = [
            k.model_copy(update={"state": "retired", "valid_until": k.valid_until or now})
            if k.kid in due
            else k
            for k in current.keys
        ]
        signers = [self._private(current.active("signing").kid, "signing")]
        self._publish(base, keys, signers, LedgerEvent.KEYS_RETIRED, {"kids": due})
        for kid in due:
            destroy_key(self.settings.key_dir, kid)
        return due

    # --- the node-to-node TLS key: announced by its pin ------------------------------------------

    def rotate_tls(self) -> str:
        """Stage a new node-to-node key and certificate (``tls/node-next*.pem``) and publish the
        version whose ``tls_pins`` admit both the current key and the new one. Returns the new pin.

        Raises:
            KeyManagementError: a new node key is already staged or announced.
            ConfigurationError: no development CA key to certify it with.
        """
        base = self._base()
        current = base.current
        if len(current.tls_pins) > 1:
            raise KeyManagementError(
                "a node key change is already under way: `exchange keys activate --purpose tls`, then"
                " wait for the old pin to be dropped"
            )
        pin = stage_node_key(TLSFiles(self.settings.tls_dir), self.settings.passphrase())
        signers = [self._private(current.active("signing").kid, "signing")]
        self._publish(
            base,
            list(current.keys),
            signers,
            LedgerEvent.KEYS_ROTATED,
            {"purpose": "tls", "pin": pin},
            tls_pins=(*current.tls_pins, pin),
        )
        return pin

    def activate_tls(self, *, force: bool = False) -> str:
        """Put the staged node key in place once the partner acknowledged its pin (or ``force``
        after the configured wait); the old pin stays admitted for ``key_destroy_grace_seconds``.
        Returns the pin now in use.

        Raises:
            KeyManagementError: no new pin announced, or not acknowledged (see :meth:`activate`).
        """
        base = self._base()
        current = base.current
        if len(current.tls_pins) < 2 or current.tls_pins[0] != self._pin_in_use():
            raise KeyManagementError(
                "no new node key is announced: run `exchange keys rotate --purpose tls` first"
            )
        new_pin = current.tls_pins[-1]
        introduced = min(t.key_set.version for t in base.versions if new_pin in t.key_set.tls_pins)
        acknowledged = self._check_acknowledged(introduced, f"node key {new_pin[:16]}…", force)
        promote_node_key(TLSFiles(self.settings.tls_dir), new_pin)
        signers = [self._private(current.active("signing").kid, "signing")]
        old = [p for p in current.tls_pins if p != new_pin]
        self._publish(
            base,
            list(current.keys),
            signers,
            LedgerEvent.KEYS_ACTIVATED,
            {"purpose": "tls", "pin": new_pin, "forced": not acknowledged},
            tls_pins=(new_pin, *old),
        )
        return new_pin

    def _check_acknowledged(self, introduced: int, what: str, force: bool) -> bool:
        """True if the partner acknowledged version ``introduced`` (which announced ``what``);
        False if not but ``force`` is given and the configured wait has passed.

        Raises:
            KeyManagementError: not acknowledged, and no ``force`` or ``force`` too early.
        """
        now = self.clock()
        row = {r["version"]: r for r in self.registry.own_rows()}.get(introduced)
        if row is not None and row["acknowledged_at"] is not None:
            return True
        wait = self.settings.key_activation_wait_seconds
        if not force:
            raise KeyManagementError(
                f"the partner has not acknowledged key set version {introduced}, which announced"
                f" {what}; wait for it (`exchange keys list`), or use --force after {wait:.0f}s"
            )
        allowed = (dt.datetime.fromisoformat(row["recorded_at"]) if row else now) + dt.timedelta(seconds=wait)
        if now < allowed:
            raise KeyManagementError(
                f"--force is allowed only from {allowed.isoformat(timespec='seconds')}"
                f" ({wait:.0f}s after version {introduced})"
            )
        return False

    def _pin_in_use(self) -> str:
        """The pin of the node-to-node certificate on disk (the one in use)."""
        return crypto.public_key_sha256(TLSFiles(self.settings.tls_dir).node_cert.read_bytes())

    def drop_old_tls_pins(self) -> bool:
        """Publish the key set without the old node pins once the new key has been in place for
        ``key_destroy_grace_seconds``. True if it did."""
        base = self._base()
        pins = base.current.tls_pins
        if len(pins) < 2:
            return False
        sets = base.sets
        became_first = [  # the versions where the pin in use took the lead: activations
            s for before, s in itertools.pairwise(sets) if s.tls_pins[:1] != before.tls_pins[:1]
        ]
        if not became_first or became_first[-1].tls_pins[:1] != pins[:1]:
            return False  # the other pins are staged, not replaced: nothing to drop yet
        grace = dt.timedelta(seconds=self.settings.key_destroy_grace_seconds)
        if self._pin_in_use() != pins[0] or self.clock() < became_first[-1].issued_at + grace:
            return False
        signers = [self._private(base.current.active("signing").kid, "signing")]
        self._publish(
            base,
            list(base.current.keys),
            signers,
            LedgerEvent.KEYS_RETIRED,
            {"pins": list(pins[1:])},
            tls_pins=pins[:1],
        )
        return True

    def renew_if_expiring(self) -> bool:
        """Publish the same keys again with a fresh expiry when the key set in force expires within
        ``expiry_warning_days`` (the agreement's version 1 never expires). True if it did."""
        base = self._base()
        current = base.current
        soon = self.clock() + dt.timedelta(days=self.settings.expiry_warning_days)
        if current.version == 1 or current.expires_at > soon:
            return False
        signers = [self._private(current.active("signing").kid, "signing")]
        self._publish(
            base,
            list(current.keys),
            signers,
            LedgerEvent.KEYS_RENEWED,
            {"expired_at": current.expires_at.isoformat()},
        )
        return True

    def destroy_leftovers(self) -> list[str]:
        """Destroy every private key still on disk whose key is retired or revoked (a step stopped
        between publishing and destroying). Returns the kids destroyed."""
        done = []
        for kid, entry in self.own.known().items():
            if entry.state in ("retired", "revoked") and held(self.settings.key_dir, kid):
                destroy_key(self.settings.key_dir, kid)
                done.append(kid)
        if done:
            log.warning("destroyed private keys left behind by an interrupted step: %s", ", ".join(done))
        return done

    def maintain(self, _now: dt.datetime | None = None) -> int:
        """The key maintenance loop's round: retire what is due, renew an expiring key set, destroy
        what an interrupted step left. Returns how many versions it published."""
        published = (
            int(bool(self.retire_due())) + int(self.drop_old_tls_pins()) + int(self.renew_if_expiring())
        )
        self.destroy_leftovers()
        return published

    # --- helpers ---------------------------------------------------------------------------------

    @property
    def retiring_seconds(self) -> float:
        """How long a replaced signing or checkpoint key stays trusted: the longest a message may
        wait for delivery plus the clock skew allowed."""
        return self.settings.longest_wait.total_seconds()

    def _private(self, kid: str, purpose: Purpose) -> OKPKey:
        return load_private_key(self.settings.key_dir, kid, purpose, self.settings.passphrase())

    def _base(self) -> KeyHistory:
        """The node's own history as a step starts: the version its new one is computed from."""
        self.registry.refresh()
        return self.own

    def _room(self, current: KeySet, *, spare: bool) -> None:
        """Raise KeyManagementError unless one more key fits in the key set (at most 64 keys; retired
        and revoked ones leave it once nothing they signed can still arrive), keeping a ``spare``
        slot for an emergency revocation unless this is one."""
        kept = len(self._pruned(list(current.keys), current))
        if kept + 1 > MAX_KEYS - (1 if spare else 0):
            raise KeyManagementError(
                f"the key set holds {kept} keys: retire or revoke old ones before adding another"
            )

    def _pruned(self, keys: list[KeyEntry], base: KeySet) -> list[KeyEntry]:
        """``keys`` without those already retired or revoked in ``base`` that nothing they signed can
        still arrive from: past their end plus the replay window. Earlier versions keep them, for
        verification at signing time and for the audit."""
        horizon = self.clock() - self.settings.replay_window

        def gone(key: KeyEntry) -> bool:
            before = base.key(key.kid)
            if before is None or before.state != key.state:
                return False
            end = (
                key.revoked_at
                if key.state == "revoked"
                else key.valid_until
                if key.state == "retired"
                else None
            )
            return end is not None and end < horizon

        return [k for k in keys if not gone(k)]

    def _publish(
        self,
        base: KeyHistory,
        keys: list[KeyEntry],
        signers: list[OKPKey],
        event: LedgerEvent,
        data: dict[str, Any],
        *,
        tls_pins: tuple[str, ...] | None = None,
    ) -> Trusted:
        """Sign, self-check, store and ledger the version after ``base`` with ``keys``.

        Raises:
            KeyManagementError: another version was published since ``base`` was read (the step
                must be run again on top of it, not undo it).
        """
        history = base
        now = self.clock()
        key_set = KeySet(
            party=history.current.party,
            version=history.version + 1,
            issued_at=max(now, history.current.issued_at),  # never before the last (a clock stepped back)
            expires_at=now + dt.timedelta(days=self.settings.key_set_validity_days),
            previous=history.digest,
            tls_pins=history.current.tls_pins if tls_pins is None else tls_pins,
            keys=tuple(self._pruned(keys, history.current)),
        )
        announcement = announce(key_set, signers)
        trusted = accept(
            history.versions[-1], announcement, now, known=history.known()
        )  # the partner's rules
        with self.registry.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)  # also serialises publishers: one version at a time
            newest = self.registry.newest_version(conn, self.registry.party)
            if newest != history.version:
                raise KeyManagementError(
                    f"key set version {newest} was published meanwhile: run the command again on top of it"
                )
            self.registry.record(conn, trusted, announcement, now)
            repo.append_ledger(
                conn,
                head,
                [
                    EntryDraft(
                        event=event,
                        actor=key_set.party,
                        decision="allow",
                        data={**data, "version": key_set.version, "sha256": trusted.digest},
                    )
                ],
                now.isoformat(),
            )
        self.registry.refresh()
        log.info("key set version %d published (%s)", key_set.version, event.value)
        return trusted
