"""The agreement versions a node holds, and which one is in force when.

Both nodes install a new version of the agreement before it takes effect (its ``effective_from``,
the same instant in both documents), so neither sends under a version the other does not hold yet
(design §6). A message is judged by the version in force when it was signed (its signed
``created_at``), as a signature is judged by the key set in force then (ADR 0012): a message
sealed just before a switch and delivered after it is still accepted under its own version, and a
version superseded for longer than the clock skew is refused for new messages.

A later version may change the rules, retention, deadlines, purposes, message types, third
parties, roles, handling codes, units and the control messages' markings; what stored data and
the node's trust rest on may not change (:func:`successor_problems`), so every row stored under an
earlier version still reads under the one in force. Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from exchange.agreement import Agreement
from exchange.errors import ConfigurationError
from exchange.messages import Catalogue

#: fields no later version may change, with why: a change to one is a new deployment
FIXED: Mapping[str, str] = {
    "parties": "a party's node, CA and first keys: its keys change through `exchange keys`",
    "common_levels": "stored markings are ranked on them",
    "schemes": "stored markings are read through them",
    "party_schemes": "stored markings are read through them",
    "tlp": "stored markings are ranked on them",
    "max_envelope_bytes": "both nodes' servers enforce it before any envelope is opened",
    "witnesses": "the audit verifies their cosignatures of both ledgers with the keys it names",
    "child_age": "who is a child in a stored message, and so how it is protected, rests on it",
}

#: vocabularies a later version may only extend: stored messages and registrations use their values
GROWING = ("purposes", "handling_codes", "roles", "third_parties", "message_types", "priorities")


def successor_problems(previous: Agreement, new: Agreement) -> list[str]:
    """Every reason ``new`` cannot follow ``previous`` on a running node (empty: it can).

    A later version names its ``effective_from``, after ``previous``'s; keeps every field of
    :data:`FIXED`; keeps every value of the :data:`GROWING` vocabularies, every message type's
    schema, kind, purposes and the types it answers, and every unit of each organisation.
    """
    problems: list[str] = []
    if new.version == previous.version:
        problems.append(f"version: {new.version!r} is the version it would follow; give it a new one")
    if new.effective_from is None:
        problems.append(
            "effective_from: a later version names when it takes effect (RFC 3339 with a zone), the same"
            " for both nodes, so that both hold it before either sends under it"
        )
    elif previous.effective_from is not None and new.effective_from <= previous.effective_from:
        problems.append(
            f"effective_from: {new.effective_from.isoformat()} is not after the effective_from of"
            f" {previous.version!r} ({previous.effective_from.isoformat()})"
        )
    before, after = (
        previous.model_dump(mode="json", by_alias=True),
        new.model_dump(mode="json", by_alias=True),
    )
    for name, why in FIXED.items():
        if before[name] != after[name]:
            problems.append(f"{name}: differs from version {previous.version!r}; it cannot change ({why})")
    for name in GROWING:
        gone = [v for v in before[name] if v not in after[name]]
        if gone:
            problems.append(
                f"{name}: {gone} of version {previous.version!r} are missing; a vocabulary only grows"
            )
    for tid, spec in previous.message_types.items():
        kept = new.message_types.get(tid)
        if kept is None:
            continue
        if (kept.schema_file, kept.kind) != (spec.schema_file, spec.kind):
            problems.append(f"message_types.{tid}: its schema and kind cannot change")
        for name in ("purposes", "replies_to"):
            gone = sorted(set(getattr(spec, name)) - set(getattr(kept, name)))
            if gone:
                problems.append(f"message_types.{tid}.{name}: {gone} are missing; they are only added to")
    for pid, organisation in previous.organisations.items():
        gone = sorted(set(organisation.units) - set(new.organisations[pid].units))
        if gone:
            problems.append(f"organisations.{pid}.units: {gone} are missing; units are only added")
    return problems


@dataclass(frozen=True)
class Terms:
    """One agreement version with what is derived from it once."""

    agreement: Agreement

    @cached_property
    def catalogue(self) -> Catalogue:
        return Catalogue.for_agreement(self.agreement)

    @property
    def version(self) -> str:
        return self.agreement.version


@dataclass(frozen=True)
class AgreementHistory:
    """The versions a node holds, oldest first: each follows the one before (see the module)."""

    versions: tuple[Terms, ...]

    @classmethod
    def of(cls, agreements: Iterable[Agreement]) -> AgreementHistory:
        """The history of ``agreements`` in ``effective_from`` order (the first version may have
        none); one version held twice with one digest counts once.

        Raises:
            ConfigurationError: one version with two digests, a version that does not follow the
                one before it, or none at all.
        """
        by_version: dict[str, Agreement] = {}
        for agreement in agreements:
            held = by_version.setdefault(agreement.version, agreement)
            if held.digest != agreement.digest:
                raise ConfigurationError(
                    f"agreement version {agreement.version!r} is held with two digests"
                    f" ({held.digest[:16]}…, {agreement.digest[:16]}…): one version, one document"
                )
        ordered = sorted(
            by_version.values(),
            key=lambda a: (
                a.effective_from is not None,
                a.effective_from or dt.datetime.min.replace(tzinfo=dt.UTC),
            ),
        )
        if not ordered:
            raise ConfigurationError("no agreement version is held")
        history = cls((Terms(ordered[0]),))
        for agreement in ordered[1:]:
            history = history.followed_by(agreement)
        return history

    def followed_by(self, agreement: Agreement) -> AgreementHistory:
        """This history with ``agreement`` as its newest version.

        Raises:
            ConfigurationError: naming every reason it cannot follow the newest version held.
        """
        problems = successor_problems(self.newest.agreement, agreement)
        if problems:
            raise ConfigurationError(
                f"agreement version {agreement.version!r} cannot follow {self.newest.version!r}: "
                + "; ".join(problems)
            )
        return AgreementHistory((*self.versions, Terms(agreement)))

    @property
    def newest(self) -> Terms:
        return self.versions[-1]

    @property
    def accepted(self) -> dict[str, str]:
        """Each version held, with its digest: what an envelope may name."""
        return {t.version: t.agreement.digest for t in self.versions}

    def in_force(self, at: dt.datetime) -> Terms:
        """The version in force at ``at``: the last one whose ``effective_from`` is not after it
        (the first version is in force from the start)."""
        found = self.versions[0]
        for terms in self.versions[1:]:
            start = terms.agreement.effective_from
            if start is not None and start <= at:
                found = terms
        return found

    def switches_after(self, at: dt.datetime) -> dt.datetime | None:
        """When the next version takes effect after ``at`` (None: no later version is held)."""
        starts = [t.agreement.effective_from for t in self.versions[1:]]
        return min((s for s in starts if s is not None and s > at), default=None)

    def held(self, version: str) -> Terms | None:
        """The version held under this name, if any."""
        return next((t for t in self.versions if t.version == version), None)

    def was_in_force(self, version: str, signed_at: dt.datetime, skew: dt.timedelta) -> bool:
        """Whether ``version`` is held and was in force at ``signed_at``, give or take ``skew``
        either side of its start and of its end (the next version's start)."""
        for i, terms in enumerate(self.versions):
            if terms.version != version:
                continue
            start = terms.agreement.effective_from if i else None
            end = self.versions[i + 1].agreement.effective_from if i + 1 < len(self.versions) else None
            return (start is None or signed_at >= start - skew) and (end is None or signed_at < end + skew)
        return False

    def superseded_at(self, version: str) -> dt.datetime | None:
        """When the version after ``version`` took or takes effect (None: it is the newest held,
        or not held)."""
        for i, terms in enumerate(self.versions[:-1]):
            if terms.version == version:
                return self.versions[i + 1].agreement.effective_from
        return None
