"""Repository functions: every query of the project. Each takes a Connection inside a unit of work
and never commits.

Ledger appends: :func:`lock_ledger_head` must be the first statement of a transaction that appends;
it locks the head row (PostgreSQL) or holds SQLite's write lock (``BEGIN IMMEDIATE``), so appends from
any number of processes get consecutive sequence numbers with no gap and no fork, and an inbox
sequence assigned under the same lock orders inbound messages by commit order. A transaction may
instead append after a head it already knows (:func:`assume_ledger_head`): it then takes the lock
only at commit, where the head is written first and only if it is still the one assumed, so it
commits as if it had held the lock all along, or not at all.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from exchange.db.coordination import (
    AGREEMENT_CHANNEL,
    CLIENTS_CHANNEL,
    LEDGER_CHANNEL,
    OUTBOX_CHANNEL,
    notify,
)
from exchange.db.engine import (
    Database,
    at_commit,
    before_commit,
    begin_now,
    begin_with,
    insert,
    pending,
    transaction_memo,
)
from exchange.db.schema import (
    agreements,
    checkpoints,
    clients,
    consent_requests,
    key_sets,
    ledger_entries,
    ledger_head,
    ledger_subtrees,
    messages,
    outbox,
    reclassifications,
    witness_cosignatures,
    witnessed,
)
from exchange.errors import InvalidInput, LedgerIntegrityError, NotFound
from exchange.ledger import EntryDraft, Frontier, LedgerEntry, decode_leaf, leaf_bytes, rules_column
from exchange.ledger.log import Row
from exchange.ledger.merkle import leaf_hash

# Statements on the path of every message are built once, here: building a SELECT of the wide
# messages table costs ~4x executing it. Values come as bound parameters at execute time.
_MID: sa.BindParameter[str] = sa.bindparam("mid_")
_MIDS: sa.BindParameter[list[str]] = sa.bindparam("mids_", expanding=True)
_GET_MESSAGE = sa.select(messages).where(messages.c.id == _MID)
_GET_MESSAGES = sa.select(messages).where(messages.c.id.in_(_MIDS))
_UPDATE_MESSAGE = messages.update().where(messages.c.id == _MID)  # SET: the parameters given
_INSERT_MESSAGE = messages.insert()
_MESSAGE_COLUMNS = frozenset(messages.c.keys())
_GET_CLIENT = sa.select(clients).where(clients.c.id == sa.bindparam("cid_"))
_ENQUEUE = outbox.insert()
#: claim_due's three statements: the due rows locked, with the count of our unacknowledged key-set
#: versions and the envelopes the round may carry (only those within its byte bound: the first
#: row's, and those whose running sum of sizes is within it, never ``limit`` of the largest); then,
#: at commit, their lease, and their messages marked sent with the outbox's attempt count
_DUE = (
    sa.select(outbox.c.message_id, outbox.c.attempts, outbox.c.enqueued_at)
    .where(outbox.c.next_attempt_at <= sa.bindparam("now_"), outbox.c.enqueued_at >= sa.bindparam("since_"))
    .order_by(outbox.c.enqueued_at, outbox.c.message_id)
    .limit(sa.bindparam("limit_"))
    .with_for_update(skip_locked=True)
    .subquery("due")
)
_DUE_ORDER = (_DUE.c.enqueued_at, _DUE.c.message_id)
_ENVELOPE_SIZE = sa.func.length(messages.c.envelope)
_CLAIM_CANDIDATES = (
    sa.select(
        _DUE.c.message_id,
        _DUE.c.attempts,
        _DUE.c.enqueued_at,
        _ENVELOPE_SIZE.label("size"),
        sa.case(
            (
                sa.or_(
                    sa.func.row_number().over(order_by=_DUE_ORDER) == 1,
                    sa.func.sum(_ENVELOPE_SIZE).over(order_by=_DUE_ORDER, rows=(None, 0))
                    <= sa.bindparam("max_bytes_"),
                ),
                messages.c.envelope,
            ),
        ).label("envelope"),
        messages.c.envelope_sha256,
        messages.c.created_at,
        sa.select(sa.func.count())
        .select_from(key_sets)
        .where(key_sets.c.party == sa.bindparam("party_"), key_sets.c.acknowledged_at.is_(None))
        .scalar_subquery()
        .label("unacknowledged"),
    )
    .join(messages, messages.c.id == _DUE.c.message_id)
    .order_by(*_DUE_ORDER)
)
_LEASE = (
    outbox.update()
    .where(outbox.c.message_id.in_(_MIDS))
    .values(
        next_attempt_at=sa.bindparam("until_"),
        attempts=outbox.c.attempts + 1,
        leased_by=sa.bindparam("worker_"),
    )
)
_MARK_SENT = (
    messages.update()
    .where(messages.c.id.in_(_MIDS))
    .values(
        status="sent",
        updated_at=sa.bindparam("at_"),
        attempts=sa.select(outbox.c.attempts).where(outbox.c.message_id == messages.c.id).scalar_subquery(),
    )
)
_QUEUED = sa.select(outbox.c.message_id).where(outbox.c.message_id.in_(_MIDS))
_DEQUEUE_MANY = outbox.delete().where(outbox.c.message_id.in_(_MIDS))
_DEQUEUE = outbox.delete().where(outbox.c.message_id == _MID)
#: the head's lock: constant SQL, so that on PostgreSQL it goes with its transaction's BEGIN in one
#: round trip (:func:`~exchange.db.engine.begin_with`); SQLite's BEGIN IMMEDIATE holds the lock there
_LOCK_HEAD = "SELECT size, root_hash, frontier FROM ledger_head WHERE id = 1"
_READ_HEAD = sa.select(ledger_head).where(ledger_head.c.id == 1)
#: the new head, written only over the head it was appended after (``after_``): on PostgreSQL
#: the guard function raises otherwise (migration 0014), on SQLite no row is written (and the
#: caller raises; there a writer holds the lock from its first statement anyway)
_WRITE_HEAD = {
    "postgresql": ledger_head.update().where(
        ledger_head.c.id == 1,
        sa.func.ledger_head_is(
            ledger_head.c.size,
            ledger_head.c.root_hash,
            sa.bindparam("after_size"),
            sa.bindparam("after_root"),
        ),
    ),
    "sqlite": ledger_head.update().where(
        ledger_head.c.id == 1,
        ledger_head.c.size == sa.bindparam("after_size"),
        ledger_head.c.root_hash == sa.bindparam("after_root"),
    ),
}
_INSERT_ENTRIES = ledger_entries.insert()
_INSERT_SUBTREES = ledger_subtrees.insert()
_LATEST_CHECKPOINT = sa.select(checkpoints).order_by(checkpoints.c.size.desc()).limit(1)
_LATEST_COSIGNED = _LATEST_CHECKPOINT.where(checkpoints.c.cosignature.is_not(None))
#: the root witnessed at size ``size_`` and when the first larger checkpoint was witnessed
_WITNESSED_AROUND = sa.select(
    sa.select(witnessed.c.root_hash).where(witnessed.c.size == sa.bindparam("size_")).scalar_subquery(),
    sa.select(sa.func.min(witnessed.c.witnessed_at))
    .where(witnessed.c.size > sa.bindparam("size_"))
    .scalar_subquery(),
)

# --- clients -------------------------------------------------------------------------------------

#: the clients whose current or previous certificate has the fingerprint ``fp_`` (every request)
_BY_FINGERPRINT = sa.select(clients).where(
    (clients.c.cert_fingerprint == sa.bindparam("fp_"))
    | (clients.c.previous_fingerprint == sa.bindparam("fp_"))
)


def _holder_of(conn: Connection, fingerprint: str) -> str | None:
    """The client whose current or previous certificate has this fingerprint."""
    row = conn.execute(_BY_FINGERPRINT, {"fp_": fingerprint}).first()
    return str(row.id) if row else None


def insert_client(conn: Connection, row: Mapping[str, Any]) -> None:
    """Register a client.

    Raises:
        InvalidInput: the id or certificate is already registered, or the id is a removed client's
            that acted under it (the ledger names it): a new system under that id would read the
            messages it sent, replay its answers and act on them.
    """
    holder = _holder_of(conn, row["cert_fingerprint"])
    if holder is None and get_client(conn, row["id"]) is not None:
        holder = row["id"]
    if holder is not None:
        raise InvalidInput(f"client {holder!r} already has this id or certificate")
    acted = sa.select(ledger_entries.c.seq).where(ledger_entries.c.actor == row["id"]).limit(1)
    if conn.execute(acted).first() is not None:
        raise InvalidInput(
            f"the id {row['id']!r} was a removed client's, which acted under it (the ledger names it);"
            " choose another id: this one would inherit that client's messages and answers"
        )
    conn.execute(clients.insert(), dict(row))
    notify(conn, CLIENTS_CHANNEL)


def insert_agreement(conn: Connection, row: Mapping[str, Any]) -> None:
    """Store an installed agreement version; every process of the node reads it again."""
    conn.execute(agreements.insert(), dict(row))
    notify(conn, AGREEMENT_CHANNEL)


def agreement_documents(conn: Connection, known: Collection[str] = ()) -> list[tuple[str, str]]:
    """(digest, document) of every installed agreement version whose digest is not in ``known``."""
    digests = [d for d in conn.execute(sa.select(agreements.c.digest)).scalars() if d not in known]
    if not digests:
        return []
    rows = conn.execute(
        sa.select(agreements.c.digest, agreements.c.document).where(agreements.c.digest.in_(digests))
    ).all()
    return [(r.digest, r.document) for r in rows]


def client_by_fingerprint(conn: Connection, fingerprint: str, now: dt.datetime) -> dict[str, Any] | None:
    """The client holding this certificate: its current one, or the one it replaced while that is
    still in its overlap (``previous_until`` after ``now``)."""
    return holder_at(clients_by_fingerprint(conn, fingerprint), fingerprint, now)


def clients_by_fingerprint(conn: Connection, fingerprint: str) -> list[dict[str, Any]]:
    """The clients whose current or previous certificate has this fingerprint (see holder_at)."""
    return [dict(row._mapping) for row in conn.execute(_BY_FINGERPRINT, {"fp_": fingerprint})]


def holder_at(rows: Sequence[Mapping[str, Any]], fingerprint: str, now: dt.datetime) -> dict[str, Any] | None:
    """Among ``rows`` (:func:`clients_by_fingerprint`), the client holding the certificate at ``now``:
    as its current one, or as the one it replaced while that is in its overlap."""
    for found in rows:
        if found["cert_fingerprint"] == fingerprint:
            return dict(found)
        until = found["previous_until"]
        if until is not None and dt.datetime.fromisoformat(until) > now:
            return dict(found)
    return None


def renew_client_certificate(
    conn: Connection, client_id: str, fingerprint: str, not_after: str, previous_until: str
) -> dict[str, Any]:
    """Give a client a new certificate; the one it replaces is accepted until ``previous_until`` (a
    time in the past cuts it off). Returns the client's row before the change.

    Raises:
        NotFound: no client with that id.
        InvalidInput: the certificate is already a client's (this one's included).
    """
    before = get_client(conn, client_id)
    if before is None:
        raise NotFound(f"no client {client_id!r}")
    holder = _holder_of(conn, fingerprint)
    if holder is not None:
        raise InvalidInput(f"client {holder!r} already has this certificate (now or before its renewal)")
    conn.execute(
        clients.update()
        .where(clients.c.id == client_id)
        .values(
            cert_fingerprint=fingerprint,
            cert_not_after=not_after,
            previous_fingerprint=before["cert_fingerprint"],
            previous_until=previous_until,
        )
    )
    notify(conn, CLIENTS_CHANNEL)  # every process forgets the registration it holds
    return before


def get_client(conn: Connection, client_id: str) -> dict[str, Any] | None:
    row = conn.execute(_GET_CLIENT, {"cid_": client_id}).first()
    return dict(row._mapping) if row else None


def list_clients(conn: Connection) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(sa.select(clients).order_by(clients.c.id))]


def delete_client(conn: Connection, client_id: str) -> None:
    """Remove a client. Raises NotFound if there is none with that id."""
    if conn.execute(clients.delete().where(clients.c.id == client_id)).rowcount == 0:
        raise NotFound(f"no client {client_id!r}")
    notify(conn, CLIENTS_CHANNEL)  # every process forgets the registration it holds


# --- messages ------------------------------------------------------------------------------------


def insert_message(conn: Connection, row: Mapping[str, Any]) -> None:
    """Store a message (deferred to the commit in a transaction that defers its inserts)."""
    insert(conn, _INSERT_MESSAGE, [row])


def get_message(conn: Connection, message_id: str) -> dict[str, Any] | None:
    row = conn.execute(_GET_MESSAGE, {"mid_": message_id}).first()
    return dict(row._mapping) if row else None


def get_messages(conn: Connection, message_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored messages among ``message_ids``, by id (one query)."""
    if not message_ids:
        return {}
    return {r.id: dict(r._mapping) for r in conn.execute(_GET_MESSAGES, {"mids_": list(message_ids)})}


def _columns(values: Mapping[str, Any]) -> tuple[str, ...]:
    """The columns ``values`` sets. Raises ValueError for a name that is not a column (the
    statement's SET clause comes from the parameters, which would skip it silently)."""
    unknown = values.keys() - _MESSAGE_COLUMNS
    if unknown:
        raise ValueError(f"not columns of messages: {sorted(unknown)}")
    return tuple(sorted(values))


def update_message(conn: Connection, message_id: str, **values: Any) -> None:
    """Set ``values`` (column name -> value) on one message; nothing to set is a no-op."""
    if _columns(values):
        conn.execute(_UPDATE_MESSAGE, {"mid_": message_id, **values})


def update_messages(conn: Connection, updates: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Set each message's values when the transaction commits (:func:`~exchange.db.engine.at_commit`):
    one executemany per set of columns, not a statement each."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for message_id, values in updates:
        columns = _columns(values)
        if columns:
            groups.setdefault(columns, []).append({"mid_": message_id, **values})
    for params in groups.values():
        at_commit(conn, _UPDATE_MESSAGE, params)


def inbound_after(conn: Connection, after: int, limit: int) -> list[dict[str, Any]]:
    """Inbound messages with an inbox sequence above ``after``, in order."""
    rows = conn.execute(
        sa.select(messages)
        .where(messages.c.direction == "in", messages.c.inbox_seq > after)
        .order_by(messages.c.inbox_seq)
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


def messages_in_case(conn: Connection, case_ref: str, limit: int) -> list[dict[str, Any]]:
    """The messages of a case (both directions), oldest first."""
    rows = conn.execute(
        sa.select(messages)
        .where(messages.c.case_ref == case_ref)
        .order_by(messages.c.created_at)
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


def messages_in_thread(conn: Connection, thread_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """The messages of a thread (both directions)."""
    rows = conn.execute(sa.select(messages).where(messages.c.thread_id == thread_id).limit(limit))
    return [dict(r._mapping) for r in rows]


def contents_under(conn: Connection, kids: Sequence[str]) -> list[dict[str, Any]]:
    """The messages whose content is wrapped by one of ``kids`` (id, bound metadata, content)."""
    if not kids:
        return []
    rows = conn.execute(
        sa.select(messages).where(messages.c.content_kid.in_(list(kids)), messages.c.content.is_not(None))
    )
    return [dict(r._mapping) for r in rows]


def lock_queued(conn: Connection, *, under: Sequence[str], message_ids: Sequence[str]) -> None:
    """Lock the outbox rows of the queued messages whose content one of the KEKs ``under`` wraps,
    or among ``message_ids``, before their messages' rows are written: the order in which the
    claim locks them (its outbox rows, then at commit their messages), so that a writer of many
    messages (a destruction re-wrapping a period) cannot deadlock with a claim. On SQLite the
    writer holds the whole database already."""
    if not under and not message_ids:
        return
    conn.execute(
        sa.select(outbox.c.message_id)
        .join(messages, messages.c.id == outbox.c.message_id)
        .where(sa.or_(messages.c.content_kid.in_(list(under)), outbox.c.message_id.in_(list(message_ids))))
        .order_by(outbox.c.message_id)
        .with_for_update(of=outbox)
    ).all()


def due_for_destruction(conn: Connection, now: str, limit: int) -> list[dict[str, Any]]:
    """Messages past their destroy date whose content still exists, oldest first."""
    rows = conn.execute(
        sa.select(messages)
        .where(messages.c.destroyed_at.is_(None), messages.c.destroy_after <= now)
        .order_by(messages.c.destroy_after)
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


def legacy_rows(conn: Connection, *, limit: int) -> list[dict[str, Any]]:
    """Messages stored before content at rest: no content, no destroy date, not destroyed."""
    rows = conn.execute(
        sa.select(messages)
        .where(
            messages.c.content.is_(None),
            messages.c.destroy_after.is_(None),
            messages.c.destroyed_at.is_(None),
        )
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


def referenced_kids(conn: Connection) -> set[str]:
    """Every KEK id some stored content still needs."""
    rows = conn.execute(
        sa.select(messages.c.content_kid).where(messages.c.content_kid.is_not(None)).distinct()
    )
    return {str(r.content_kid) for r in rows}


def mark_destroyed(conn: Connection, message_id: str, *, at: str, reason: str) -> None:
    """Forget a message's content and transport envelope; its metadata and digests stay. One still
    queued leaves the outbox (status ``destroyed``): it is never delivered."""
    undelivered = bool(conn.execute(outbox.delete().where(outbox.c.message_id == message_id)).rowcount)
    values: dict[str, Any] = {"status": "destroyed"} if undelivered else {}
    conn.execute(
        messages.update()
        .where(messages.c.id == message_id)
        .values(
            content=None,
            content_kid=None,
            envelope=None,
            destroyed_at=at,
            destroyed_reason=reason,
            updated_at=at,
            **values,
        )
    )


#: a message's columns but the large ones (sealed content, transport envelope, receipt)
_METADATA_COLUMNS = [c for c in messages.c if c.name not in ("content", "envelope", "receipt")]


def open_requests(conn: Connection, types: Sequence[str]) -> list[dict[str, Any]]:
    """Messages of these types with a response due and no answer yet (a message in reply to them)."""
    answered = sa.select(messages.c.in_reply_to).where(messages.c.in_reply_to.is_not(None))
    rows = conn.execute(
        sa.select(*_METADATA_COLUMNS)  # (not the sealed content, the envelope or the receipt)
        .where(
            messages.c.type.in_(list(types)),
            messages.c.response_due.is_not(None),
            messages.c.id.not_in(answered),
        )
        .order_by(messages.c.response_due)
    )
    return [dict(r._mapping) for r in rows]


# --- consent requests and reclassifications ---------------------------------------------------------


def insert_consent_request(conn: Connection, row: Mapping[str, Any]) -> None:
    conn.execute(consent_requests.insert(), dict(row))


def get_consent_request(conn: Connection, request_id: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(consent_requests).where(consent_requests.c.id == request_id)).first()
    return dict(row._mapping) if row else None


def update_consent_request(conn: Connection, request_id: str, **values: Any) -> None:
    conn.execute(consent_requests.update().where(consent_requests.c.id == request_id).values(**values))


def consent_requests_for(
    conn: Connection, *, direction: str, message_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Consent requests of one direction (optionally about these messages), oldest first."""
    query = sa.select(consent_requests).where(consent_requests.c.direction == direction)
    if message_ids is not None:
        query = query.where(consent_requests.c.message_id.in_(list(message_ids)))
    return [dict(r._mapping) for r in conn.execute(query.order_by(consent_requests.c.requested_at))]


def rows_before_0015(conn: Connection) -> bool:
    """Whether any row still has what migration 0015 moved: free text in clear in a consent
    request or a reclassification, or a sent message without its origin whose content is kept."""
    found = sa.union_all(
        sa.select(consent_requests.c.id).where(
            sa.or_(consent_requests.c.justification.is_not(None), consent_requests.c.conditions.is_not(None))
        ),
        sa.select(reclassifications.c.message_id).where(reclassifications.c.reason.is_not(None)),
        _SENT_WITHOUT_ORIGIN.with_only_columns(messages.c.id),
    )
    return conn.execute(sa.select(found.subquery()).limit(1)).first() is not None


def words_in_clear(conn: Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Consent requests and reclassifications that still hold their free text in clear (stored
    before migration 0015), in a stable order."""
    consents = conn.execute(
        sa.select(consent_requests)
        .where(
            sa.or_(consent_requests.c.justification.is_not(None), consent_requests.c.conditions.is_not(None))
        )
        .order_by(consent_requests.c.id)
    )
    reclassed = conn.execute(
        sa.select(reclassifications)
        .where(reclassifications.c.reason.is_not(None))
        .order_by(reclassifications.c.id)
    )
    return [dict(r._mapping) for r in consents], [dict(r._mapping) for r in reclassed]


_SENT_WITHOUT_ORIGIN = sa.select(messages).where(
    messages.c.direction == "out",
    messages.c.kind == "information",
    messages.c.origin_unit.is_(None),
    messages.c.content.is_not(None),
)


def sent_without_origin(conn: Connection) -> list[dict[str, Any]]:
    """Sent messages without their origin whose content is kept (their client removed before 0015)."""
    return [dict(r._mapping) for r in conn.execute(_SENT_WITHOUT_ORIGIN.order_by(messages.c.id))]


def threads_of(conn: Connection, message_ids: Sequence[str]) -> list[str]:
    """The threads of these messages."""
    if not message_ids:
        return []
    query = sa.select(messages.c.thread_id).where(messages.c.id.in_(sorted(set(message_ids)))).distinct()
    return [r.thread_id for r in conn.execute(query)]


def control_messages(conn: Connection, types: Sequence[str], threads: Sequence[str]) -> list[dict[str, Any]]:
    """The stored control messages of these types in these threads whose content is kept, in the
    order they were signed (the partner's by its clock)."""
    if not threads:
        return []
    query = (
        sa.select(messages)
        .where(
            messages.c.kind == "control",
            messages.c.type.in_(list(types)),
            messages.c.thread_id.in_(list(threads)),
            messages.c.content.is_not(None),
        )
        .order_by(messages.c.created_at, messages.c.id)
    )
    return [dict(r._mapping) for r in conn.execute(query)]


def update_reclassification(conn: Connection, row_id: int, **values: Any) -> None:
    conn.execute(reclassifications.update().where(reclassifications.c.id == row_id).values(**values))


def insert_reclassification(conn: Connection, row: Mapping[str, Any]) -> None:
    conn.execute(reclassifications.insert(), dict(row))


def reclassifications_of(conn: Connection, message_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(reclassifications)
        .where(reclassifications.c.message_id == message_id)
        .order_by(reclassifications.c.id)
    )
    return [{k: v for k, v in r._mapping.items() if k != "id"} for r in rows]


# --- outbox --------------------------------------------------------------------------------------


def enqueue(conn: Connection, message_id: str, now: float) -> None:
    """Queue a message's envelope; the delivery loop of every process is woken on commit."""
    insert(conn, _ENQUEUE, [{"message_id": message_id, "next_attempt_at": now, "enqueued_at": now}])
    notify(conn, OUTBOX_CHANNEL)


@dataclass(frozen=True)
class Claimed:
    message_id: str
    envelope: str
    envelope_sha256: str
    attempts: int
    created_at: str
    enqueued_at: float


@dataclass(frozen=True)
class Lease:
    """One claim's lease: its holder and when it ends (what the claim wrote on its rows). A later
    claim of the same rows, after it ended, writes another end, even by a holder of the same name."""

    worker: str
    until: float


@dataclass(frozen=True)
class Claim:
    """What :func:`claim_due` leased, whether ``key_sets_of``'s key set had versions the partner
    has not acknowledged when it did (read in the same statement as the due rows), and whether
    more rows were due than it leased (the count or the byte bound held them back). ``lease`` names
    this lease among every lease of the rows (see :func:`release`)."""

    envelopes: list[Claimed]
    key_sets_unacknowledged: bool
    lease: Lease
    more_due: bool = False


def claim_due(
    conn: Connection,
    *,
    now: float,
    queued_since: float,
    lease_seconds: float,
    limit: int,
    max_bytes: int,
    worker: str,
    frame: Callable[[list[int]], int],
    updated_at: str,
    key_sets_of: str,
) -> Claim:
    """Lease to ``worker`` the oldest due outbox rows queued at or after ``queued_since`` (an older
    one is past its deadline: it waits for the expiry sweep, never sent): at most ``limit`` rows
    whose request body, ``frame(sizes)``, stays within ``max_bytes`` (always at least one row);
    their messages become ``sent`` with the attempt counted. Three statements, whatever the
    batch's size; the last two, which read nothing back, go at commit
    (:func:`~exchange.db.engine.at_commit`): in the commit's round trip on PostgreSQL.

    Rows are locked with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL) and their next attempt pushed past
    the lease, so a second worker does not take them and a crashed worker's rows come back; the
    lease names its holder, so a restarted worker takes its own back at once
    (:func:`release_leases_of`). Whatever the claimed messages were signed with was stored before
    them, so the first statement also sees every version of our key set they may need announced.
    """
    candidates = conn.execute(  # one more than the limit: whether more are due than are taken
        _CLAIM_CANDIDATES,
        {
            "now_": now,
            "since_": queued_since,
            "limit_": limit + 1,
            "party_": key_sets_of,
            "max_bytes_": max_bytes,
        },
    ).all()
    taken: list[Any] = []
    sizes: list[int] = []
    for row in candidates[:limit]:  # (a row past the bound came without its envelope: frame >= sum)
        if taken and (row.envelope is None or frame([*sizes, int(row.size)]) > max_bytes):
            break
        taken.append(row)
        sizes.append(int(row.size))
    lease = Lease(worker, now + lease_seconds)
    if not taken:
        return Claim([], False, lease)
    ids = [row.message_id for row in taken]
    at_commit(conn, _LEASE, {"mids_": ids, "until_": lease.until, "worker_": lease.worker})
    at_commit(conn, _MARK_SENT, {"mids_": ids, "at_": updated_at})  # (after the lease: its attempts)
    envelopes = [
        Claimed(
            row.message_id,
            row.envelope,
            row.envelope_sha256,
            int(row.attempts) + 1,
            row.created_at,
            float(row.enqueued_at),
        )
        for row in taken
    ]
    return Claim(envelopes, bool(taken[0].unacknowledged), lease, more_due=len(candidates) > len(taken))


def release(
    conn: Connection, message_ids: Sequence[str], lease: Lease, *, now: float, error: str
) -> set[str]:
    """Give back the rows ``lease`` still holds, due at once: the worker's per-partner backoff
    decides when to send. Returns them. A row whose lease ran out meanwhile and which another
    worker settled, or claimed again (its lease in flight), is left as it is."""
    if not message_ids:
        return set()
    released = conn.execute(
        outbox.update()
        .where(
            outbox.c.message_id.in_(list(message_ids)),
            outbox.c.leased_by == lease.worker,
            outbox.c.next_attempt_at == lease.until,
        )
        .values(next_attempt_at=now, leased_by=None, last_error=error)
        .returning(outbox.c.message_id)
    )
    return {r.message_id for r in released}


def release_leases_of(conn: Connection, worker: str, *, now: float) -> list[str]:
    """Give back every lease ``worker`` holds (it restarted: those deliveries are no longer in
    flight). Returns the message ids."""
    ids = [
        r.message_id
        for r in conn.execute(
            sa.select(outbox.c.message_id).where(outbox.c.leased_by == worker).with_for_update()
        )
    ]
    if ids:
        conn.execute(
            outbox.update().where(outbox.c.message_id.in_(ids)).values(next_attempt_at=now, leased_by=None)
        )
    return ids


@dataclass(frozen=True)
class Waiting:
    message_id: str
    envelope_sha256: str
    enqueued_at: float
    attempts: int


def overdue(conn: Connection, *, enqueued_before: float, now: float, limit: int) -> list[Waiting]:
    """Outbox rows queued before ``enqueued_before`` and not leased now (none in flight)."""
    rows = conn.execute(
        sa.select(outbox.c.message_id, messages.c.envelope_sha256, outbox.c.enqueued_at, outbox.c.attempts)
        .join(messages, messages.c.id == outbox.c.message_id)
        .where(outbox.c.enqueued_at < enqueued_before, outbox.c.next_attempt_at <= now)
        .order_by(outbox.c.enqueued_at, outbox.c.message_id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=outbox)
    )
    return [Waiting(r.message_id, r.envelope_sha256, float(r.enqueued_at), int(r.attempts)) for r in rows]


def oldest_waiting(conn: Connection) -> float | None:
    """When the oldest message still in the outbox was queued, if there is one."""
    value = conn.execute(sa.select(sa.func.min(outbox.c.enqueued_at))).scalar()
    return float(value) if value is not None else None


def set_status(conn: Connection, message_ids: Sequence[str], **values: Any) -> None:
    """Update several messages at once (status, reason, updated_at)."""
    if message_ids:
        conn.execute(messages.update().where(messages.c.id.in_(list(message_ids))).values(**values))


def dequeue(conn: Connection, message_id: str) -> bool:
    """Remove a message from the outbox; False if it was no longer there."""
    return bool(conn.execute(_DEQUEUE, {"mid_": message_id}).rowcount)


#: the transaction memo's key for the message ids a transaction dequeues at commit
_DEQUEUED = "dequeued"


def dequeue_many(conn: Connection, message_ids: Sequence[str]) -> set[str]:
    """Remove messages from the outbox when the transaction commits
    (:func:`~exchange.db.engine.at_commit`); returns those still there, read now (a plain read).

    Every dequeuer appends to the ledger, holding its head or guarded by it at commit: a row read
    here cannot be removed by another before this transaction commits while it holds the head's
    lock, and if it assumed the head instead (``assume_ledger_head``), its commit fails."""
    if not message_ids:
        return set()
    kept = {row.message_id for row in conn.execute(_QUEUED, {"mids_": list(message_ids)})}
    memo = transaction_memo(conn)
    if memo is not None:  # what this transaction already dequeues is no longer queued for it
        dequeued: set[str] = memo.setdefault(_DEQUEUED, set())
        kept -= dequeued
        dequeued |= kept
    if kept:
        at_commit(conn, _DEQUEUE_MANY, {"mids_": sorted(kept)})
    return kept


def outbox_size(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one())


# --- ledger --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerHead:
    size: int
    root: bytes
    frontier: Frontier


def _head(row: Any) -> LedgerHead:
    if row is None:
        raise LedgerIntegrityError("the ledger head row is missing")
    return LedgerHead(int(row.size), bytes(row.root_hash), Frontier.from_json(int(row.size), row.frontier))


#: how the head's guard says the stored head is not the one assumed (the guard function of
#: migration 0014 raises with it too): :func:`head_moved` knows the refusal by it
HEAD_MOVED = "the ledger head moved"


class _HeadWrite:
    """The ledger head a transaction's appends reached, written once just before it commits, over
    the head ``after`` they were appended after. Once committed, it is the head its Database
    knows (:attr:`~exchange.db.engine.Database.known_ledger_head`)."""

    def __init__(self, head: LedgerHead, after: LedgerHead) -> None:
        self.head = head
        self.after = after

    def __call__(self, conn: Connection) -> None:
        """Raises:
        LedgerIntegrityError: (SQLite) the stored head is not ``after``; on PostgreSQL the
            database raises (the guard function), failing the transaction as well."""
        head, after = self.head, self.after
        values = {"size": head.size, "root_hash": head.root, "frontier": head.frontier.to_json()}
        written = conn.execute(
            _WRITE_HEAD[conn.dialect.name], {**values, "after_size": after.size, "after_root": after.root}
        )
        if conn.dialect.name != "postgresql" and written.rowcount != 1:  # (PostgreSQL: in a pipeline)
            raise LedgerIntegrityError(f"{HEAD_MOVED}: the head of {after.size} entries was expected")

    def committed(self, db: Database) -> None:
        db.known_ledger_head = self.head


def _appended(conn: Connection) -> LedgerHead | None:
    """The head this transaction's appends reached (or assumed), not yet written."""
    write = pending(conn, "ledger_head")
    return write.head if isinstance(write, _HeadWrite) else None


def lock_ledger_head(conn: Connection) -> LedgerHead:
    """Lock and read the ledger head (see the module docstring). First statement of an append."""
    return _appended(conn) or _head(
        begin_with(conn, _LOCK_HEAD + (" FOR UPDATE" if conn.dialect.name == "postgresql" else ""))
    )


def head_moved(exc: BaseException) -> bool:
    """Whether ``exc`` is the head's guard refusing a write after a head that is not the stored
    one (:func:`assume_ledger_head`)."""
    if isinstance(exc, LedgerIntegrityError):
        return str(exc).startswith(HEAD_MOVED)
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "P0001" and str(orig).startswith(HEAD_MOVED)


def assume_ledger_head(conn: Connection, head: LedgerHead) -> LedgerHead:
    """Append after ``head`` without locking it now: the head is locked and written first of what
    the transaction does before it commits (even if nothing is appended), and only if the stored
    head is still ``head``; otherwise the commit fails and nothing of the transaction is written
    (on PostgreSQL the guard function raises; on SQLite, LedgerIntegrityError). In place of
    :func:`lock_ledger_head`, in a transaction that locks no row before it commits
    (``Database.transaction(lock_free=True)``: every other writer locks the head first, so a row
    locked before it could deadlock).

    Raises:
        RuntimeError: outside a transaction of :meth:`~exchange.db.engine.Database.transaction`.
    """
    if not before_commit(conn, "ledger_head", _HeadWrite(head, head), first=True):
        raise RuntimeError("assume_ledger_head outside Database.transaction()")
    return head


def read_ledger_head(conn: Connection) -> LedgerHead:
    return _appended(conn) or _head(conn.execute(_READ_HEAD).first())


def append_ledger(conn: Connection, head: LedgerHead, drafts: Sequence[EntryDraft], at: str) -> LedgerHead:
    """Append drafts as leaves after the locked ``head``; stores every subtree they complete and
    returns the new head, written once just before the transaction commits, however many appends
    it holds (at once outside :meth:`Database.transaction`). The checkpointer of every process is
    woken on commit.

    Raises:
        RuntimeError: called inside a savepoint (its rollback would leave the head behind).
    """
    if not drafts:
        return head
    frontier = Frontier(head.size, list(head.frontier.nodes))
    rows: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    for offset, draft in enumerate(drafts):
        seq = head.size + offset
        leaf = leaf_bytes(seq, at, draft)
        digest = leaf_hash(leaf)
        nodes.extend({"level": lv, "idx": ix, "hash": h} for lv, ix, h in frontier.append(digest) if lv > 0)
        rows.append(
            {
                "seq": seq,
                "at": at,
                "event": draft.event,
                "message_id": draft.message_id,
                "case_ref": draft.case_ref,
                "actor": draft.actor,
                "decision": draft.decision,
                "rules": rules_column(draft.rules),
                "leaf": leaf.decode(),
                "leaf_hash": digest,
            }
        )
    insert(conn, _INSERT_ENTRIES, rows)
    insert(conn, _INSERT_SUBTREES, nodes)
    new_head = LedgerHead(frontier.size, frontier.root(), frontier)
    if conn.in_nested_transaction():  # a savepoint rolled back would leave a written head behind
        raise RuntimeError("a ledger append inside a savepoint: append after it, in the transaction")
    assumed = pending(conn, "ledger_head")
    write = _HeadWrite(new_head, assumed.after if isinstance(assumed, _HeadWrite) else head)
    if not before_commit(conn, "ledger_head", write):
        write(conn)
    notify(conn, LEDGER_CHANNEL)
    return new_head


class SqlSubtrees:
    """The stored complete subtrees, as a SubtreeSource for proofs: one primary-key read each,
    through the DB-API cursor (proofs read O(log n) of them). Level 0 is each entry's leaf hash."""

    def __init__(self, conn: Connection) -> None:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        self._cursor = dbapi.cursor()
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # the driver's placeholder, not data
        self._leaf_sql = f"SELECT leaf_hash FROM ledger_entries WHERE seq = {mark}"  # noqa: S608
        self._node_sql = f"SELECT hash FROM ledger_subtrees WHERE level = {mark} AND idx = {mark}"  # noqa: S608

    def subtree(self, level: int, index: int) -> bytes:
        if level == 0:
            self._cursor.execute(self._leaf_sql, (index,))
        else:
            self._cursor.execute(self._node_sql, (level, index))
        row = self._cursor.fetchone()
        if row is None:
            raise LedgerIntegrityError(f"the stored tree lacks the subtree at level {level}, index {index}")
        return bytes(row[0])


_LEDGER_SCAN = (
    "SELECT seq, at, event, message_id, case_ref, actor, decision, rules, leaf, leaf_hash"
    " FROM ledger_entries WHERE seq >= {mark} AND seq < {mark} ORDER BY seq"
)
_NO_END = 2**62


def ledger_rows(
    conn: Connection, *, start: int = 0, stop: int | None = None, batch: int = 20_000
) -> Generator[Row, None, None]:
    """Every entry as the verifier reads it (index columns, leaf, stored leaf hash), in order,
    through the raw DB-API cursor (server-side on PostgreSQL): a million rows without Row objects.
    A caller that may stop early closes it (``contextlib.closing``) while ``conn`` is open."""
    begin_now(conn)  # a server-side cursor lives in a transaction
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor(name="ledger_scan") if conn.dialect.name == "postgresql" else dbapi.cursor()
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    try:
        cursor.execute(_LEDGER_SCAN.format(mark=mark), (start, _NO_END if stop is None else stop))
        while part := cursor.fetchmany(batch):
            yield from part
    finally:
        cursor.close()


def iter_ledger(conn: Connection, *, batch: int = 5000) -> Iterator[LedgerEntry]:
    """Every ledger entry in sequence order, decoded from its leaf."""
    last = -1
    while True:
        leaves = conn.execute(
            sa.select(ledger_entries.c.seq, ledger_entries.c.leaf)
            .where(ledger_entries.c.seq > last)
            .order_by(ledger_entries.c.seq)
            .limit(batch)
        ).all()
        if not leaves:
            return
        for row in leaves:
            yield decode_leaf(row.leaf.encode())
        last = int(leaves[-1].seq)


def entries_of(conn: Connection, events: Sequence[str], *, below: int | None = None) -> list[LedgerEntry]:
    """The ledger entries of these ``events`` (before sequence number ``below``, if given), in
    sequence order (by the event index: for startup checks and audits, not for every request)."""
    query = sa.select(ledger_entries.c.leaf).where(ledger_entries.c.event.in_(list(events)))
    if below is not None:
        query = query.where(ledger_entries.c.seq < below)
    return [decode_leaf(row.leaf.encode()) for row in conn.execute(query.order_by(ledger_entries.c.seq))]


def latest_entries_of(
    conn: Connection, events: Sequence[str], actor: str, message_ids: Sequence[str]
) -> dict[str, LedgerEntry]:
    """The latest entry of one of ``events`` by ``actor`` about each of ``message_ids`` that has
    one (by the message id index)."""
    query = (
        sa.select(ledger_entries.c.leaf)
        .where(
            ledger_entries.c.message_id.in_(list(message_ids)),
            ledger_entries.c.event.in_(list(events)),
            ledger_entries.c.actor == actor,
        )
        .order_by(ledger_entries.c.seq)
    )
    found: dict[str, LedgerEntry] = {}
    for row in conn.execute(query):
        entry = decode_leaf(row.leaf.encode())
        found[str(entry.message_id)] = entry
    return found


# --- checkpoints ---------------------------------------------------------------------------------


def latest_checkpoint(conn: Connection, *, cosigned: bool = False) -> dict[str, Any] | None:
    """This node's latest checkpoint (optionally: the latest one the partner cosigned)."""
    row = conn.execute(_LATEST_COSIGNED if cosigned else _LATEST_CHECKPOINT).first()
    return dict(row._mapping) if row else None


def insert_checkpoint(conn: Connection, *, size: int, root: bytes, note: str, at: str) -> None:
    conn.execute(checkpoints.insert(), {"size": size, "root_hash": root, "note": note, "created_at": at})


def record_cosignature(conn: Connection, size: int, line: str, at: str) -> None:
    conn.execute(
        checkpoints.update().where(checkpoints.c.size == size).values(cosignature=line, cosigned_at=at)
    )


def all_checkpoints(conn: Connection) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(sa.select(checkpoints).order_by(checkpoints.c.size))]


def newest_below(conn: Connection, table: sa.Table, before: int | None, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` rows of a table keyed by ``size`` (checkpoints, witnessed) with the largest sizes
    below ``before`` (all sizes if None), in order of size."""
    query = sa.select(table).order_by(table.c.size.desc()).limit(limit)
    if before is not None:
        query = query.where(table.c.size < before)
    return [dict(r._mapping) for r in reversed(conn.execute(query).all())]


def record_witness_cosignature(conn: Connection, size: int, witness: str, line: str, at: str) -> None:
    """Keep a further witness's cosignature of our checkpoint of ``size`` (once per witness)."""
    exists = conn.execute(
        sa.select(witness_cosignatures.c.size).where(
            witness_cosignatures.c.size == size, witness_cosignatures.c.witness == witness
        )
    ).first()
    if exists is None:
        conn.execute(
            witness_cosignatures.insert(),
            {"size": size, "witness": witness, "cosignature": line, "cosigned_at": at},
        )


def latest_cosigned_by(conn: Connection, witness: str) -> int:
    """The largest of our checkpoint sizes ``witness`` cosigned (0 if none)."""
    value = conn.execute(
        sa.select(sa.func.max(witness_cosignatures.c.size)).where(witness_cosignatures.c.witness == witness)
    ).scalar()
    return int(value) if value is not None else 0


def witness_cosignatures_by_size(
    conn: Connection, sizes: Sequence[int] | None = None
) -> dict[int, dict[str, str]]:
    """Every further witness cosignature (of the checkpoints of these ``sizes``): size -> {witness
    name: line}."""
    found: dict[int, dict[str, str]] = {}
    query = sa.select(witness_cosignatures).order_by(witness_cosignatures.c.size)
    if sizes is not None:
        query = query.where(witness_cosignatures.c.size.in_(list(sizes)))
    for row in conn.execute(query):
        found.setdefault(int(row.size), {})[str(row.witness)] = str(row.cosignature)
    return found


def first_checkpoint_covering(conn: Connection, size: int) -> dict[str, Any] | None:
    """The smallest of our checkpoints of at least ``size``."""
    row = conn.execute(
        sa.select(checkpoints).where(checkpoints.c.size >= size).order_by(checkpoints.c.size).limit(1)
    ).first()
    return dict(row._mapping) if row else None


def latest_witnessed(conn: Connection) -> dict[str, Any] | None:
    row = conn.execute(sa.select(witnessed).order_by(witnessed.c.size.desc()).limit(1)).first()
    return dict(row._mapping) if row else None


def insert_witnessed(conn: Connection, row: Mapping[str, Any]) -> None:
    conn.execute(witnessed.insert(), dict(row))


def all_witnessed(conn: Connection) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(sa.select(witnessed).order_by(witnessed.c.size))]


def witnessed_around(conn: Connection, size: int) -> tuple[bytes | None, str | None]:
    """The root of the partner checkpoint of ``size`` we witnessed, if we did, and when the first
    larger one was witnessed, if one was: one statement."""
    root, above = conn.execute(_WITNESSED_AROUND, {"size_": size}).one()
    return (bytes(root) if root is not None else None), (str(above) if above is not None else None)
