"""Tables (SQLAlchemy Core). The schema is created and changed only by Alembic (``migrations/``)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("cert_fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("agency", sa.String(128), nullable=False),
    sa.Column("unit", sa.String(128), nullable=False),
    sa.Column("roles", sa.JSON, nullable=False),
    sa.Column("clearance", sa.String(64), nullable=False),
    sa.Column("message_types", sa.JSON, nullable=False),
    sa.Column("purposes", sa.JSON, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("cases", sa.JSON, nullable=False),  # ["ALL"] or the case references it may handle
    sa.Column("cert_not_after", sa.String(40)),  # known for certificates registered since 0012
    sa.Column("previous_fingerprint", sa.String(64)),  # the certificate `clients renew` replaced,
    sa.Column("previous_until", sa.String(40)),  # accepted until then
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("direction", sa.String(3), nullable=False),  # out | in
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("case_ref", sa.String(64), nullable=False),
    sa.Column("thread_id", sa.String(64), nullable=False),
    sa.Column("in_reply_to", sa.String(64)),
    sa.Column("sender", sa.String(2), nullable=False),
    sa.Column("recipient", sa.String(2), nullable=False),
    sa.Column("scheme", sa.String(32), nullable=False),
    sa.Column("level", sa.String(64), nullable=False),
    sa.Column("common_level", sa.String(8), nullable=False),
    sa.Column("local_level", sa.String(64), nullable=False),
    sa.Column("tlp", sa.String(16), nullable=False),
    sa.Column("handling_codes", sa.JSON, nullable=False),
    sa.Column("purposes", sa.JSON, nullable=False),
    sa.Column("agreement_version", sa.String(32), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("submitted_by", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_reason", sa.Text),
    sa.Column("envelope", sa.Text),  # the transport JWE, kept only until delivered
    sa.Column("envelope_sha256", sa.String(64), nullable=False),
    sa.Column("receipt", sa.Text),
    sa.Column("receipt_at", sa.String(40)),
    sa.Column("inbox_seq", sa.BigInteger, unique=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.String(40), nullable=False),
    # what release decisions read without decrypting: never a value, only roles, categories, names
    sa.Column("addressed_to", sa.JSON, nullable=False),
    sa.Column("recipients", sa.JSON, nullable=False),
    sa.Column("subject_roles", sa.JSON, nullable=False),
    sa.Column("categories", sa.JSON, nullable=False),
    sa.Column("mla_reference", sa.String(128)),
    sa.Column("kind", sa.String(16), nullable=False, server_default="information"),  # or control
    sa.Column("content", sa.Text),  # the signed JWS, encrypted at rest (exchange.envelope.at_rest)
    sa.Column("content_kid", sa.String(32)),  # the KEK that wraps it
    sa.Column("content_sha256", sa.String(64)),  # of the signed JWS: evidence after destruction
    sa.Column("signer_kid", sa.String(128)),
    sa.Column("destroy_after", sa.String(40)),
    sa.Column("destroyed_at", sa.String(40)),
    sa.Column("destroyed_reason", sa.Text),
    sa.Column("response_due", sa.String(40)),
    sa.Column("overdue_at", sa.String(40)),  # when the overdue request was ledgered
    sa.Column("origin_agency", sa.String(128)),  # as signed (NULL: stored before 0015, in the content)
    sa.Column("origin_unit", sa.String(128)),
)
sa.Index("ix_messages_destroy_after", messages.c.destroy_after)
sa.Index("ix_messages_content_kid", messages.c.content_kid)
sa.Index("ix_messages_in_reply_to", messages.c.in_reply_to)
sa.Index("ix_messages_case_ref", messages.c.case_ref)
sa.Index("ix_messages_thread_id", messages.c.thread_id)
sa.Index("ix_messages_direction_inbox_seq", messages.c.direction, messages.c.inbox_seq)
sa.Index(  # the few rows whose origin is not known yet (stored before 0015): a start finds them at once
    "ix_messages_origin_unknown",
    messages.c.id,
    postgresql_where=messages.c.origin_unit.is_(None),
    sqlite_where=messages.c.origin_unit.is_(None),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("message_id", sa.String(64), sa.ForeignKey("messages.id"), primary_key=True),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("enqueued_at", sa.Float, nullable=False),
    sa.Column("leased_by", sa.String(200)),  # the worker holding the lease, while one does
)
sa.Index("ix_outbox_next_attempt_at", outbox.c.next_attempt_at)
sa.Index("ix_outbox_enqueued_at", outbox.c.enqueued_at)

idempotency_keys = sa.Table(  # a submission's Idempotency-Key, stored with the message it made
    "idempotency_keys",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("request_sha256", sa.String(64), nullable=False),
    sa.Column("message_id", sa.String(64), sa.ForeignKey("messages.id"), nullable=False),
    sa.Column("response", sa.Text, nullable=False),  # the original 202 answer, JSON
    sa.Column("created_at", sa.String(40), nullable=False),
)

ledger_head = sa.Table(
    "ledger_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("frontier", sa.Text, nullable=False),  # JSON [[level, hex], ...]
)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),  # = leaf index
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("event", sa.String(48), nullable=False),
    sa.Column("message_id", sa.String(64)),
    sa.Column("case_ref", sa.String(64)),
    sa.Column("actor", sa.String(64)),
    sa.Column("decision", sa.String(16)),
    sa.Column("rules", sa.Text, nullable=False),  # " R-A R-B " for searching
    sa.Column("leaf", sa.Text, nullable=False),  # the canonical leaf the tree hashes
    sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),  # level 0 of the tree
)
sa.Index("ix_ledger_entries_message_id", ledger_entries.c.message_id)
sa.Index("ix_ledger_entries_case_ref", ledger_entries.c.case_ref)
sa.Index("ix_ledger_entries_event", ledger_entries.c.event)

ledger_subtrees = sa.Table(  # complete subtrees of level >= 1 (level 0: ledger_entries.leaf_hash)
    "ledger_subtrees",
    metadata,
    sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("cosignature", sa.Text),  # the partner's cosignature line, once witnessed
    sa.Column("cosigned_at", sa.String(40)),
)

witnessed = sa.Table(
    "witnessed",
    metadata,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("previous_size", sa.BigInteger, nullable=False),
    sa.Column("proof", sa.Text, nullable=False),  # JSON list of hex hashes, from previous_size
    sa.Column("cosignature", sa.Text, nullable=False),
    sa.Column("witnessed_at", sa.String(40), nullable=False),
)

consent_requests = sa.Table(
    "consent_requests",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("message_id", sa.String(64), nullable=False, index=True),
    sa.Column("direction", sa.String(3), nullable=False),  # out: we asked; in: asked of us
    sa.Column("requested_by", sa.String(64)),
    sa.Column("recipient", sa.String(64)),
    sa.Column("purposes", sa.JSON, nullable=False),
    sa.Column("justification", sa.Text),  # NULL: the words are sealed in the request's control message
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("requested_at", sa.String(40), nullable=False),
    sa.Column("decided_by", sa.String(64)),
    sa.Column("decided_at", sa.String(40)),
    sa.Column("conditions", sa.Text),
    sa.Column("expires_at", sa.String(40)),
    sa.Column("revoked_at", sa.String(40)),
    # the control messages that carried the justification and the decision's conditions (sealed)
    sa.Column("request_control_id", sa.String(64)),
    sa.Column("decision_control_id", sa.String(64)),
)

reclassifications = sa.Table(
    "reclassifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(64), nullable=False, index=True),
    sa.Column("scheme", sa.String(32), nullable=False),
    sa.Column("from_level", sa.String(64), nullable=False),
    sa.Column("to_level", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text),  # NULL: the words are sealed in the notice's control message
    sa.Column("notice_id", sa.String(64), nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("control_id", sa.String(64)),  # the RECLASSIFICATION_NOTICE that carried the reason
)
witness_cosignatures = sa.Table(  # cosignatures of our checkpoints by the agreement's further witnesses
    "witness_cosignatures",
    metadata,
    sa.Column("size", sa.BigInteger, sa.ForeignKey("checkpoints.size"), primary_key=True),
    sa.Column("witness", sa.String(255), primary_key=True),
    sa.Column("cosignature", sa.Text, nullable=False),
    sa.Column("cosigned_at", sa.String(40), nullable=False),
)
sa.Index("ix_witness_cosignatures_witness_size", witness_cosignatures.c.witness, witness_cosignatures.c.size)

key_sets = sa.Table(  # key-set announcements after the agreement's version 1, of both parties
    "key_sets",
    metadata,
    sa.Column("party", sa.String(2), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("announcement", sa.Text, nullable=False),  # the signed JWS, public
    sa.Column("issued_at", sa.String(40), nullable=False),
    sa.Column("recorded_at", sa.String(40), nullable=False),
    sa.Column("acknowledged_at", sa.String(40)),  # our own: when the partner's signed receipt came
    sa.Column("receipt", sa.Text),  # our own: the partner's signed receipt
)

agreements = sa.Table(  # agreement versions installed after the agreement file (exchange.agreement_history)
    "agreements",
    metadata,
    sa.Column("version", sa.String(32), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("document", sa.Text, nullable=False),  # the RFC 8785 JSON of the document as written
    sa.Column("installed_at", sa.String(40), nullable=False),
)

key_usage = sa.Table(  # when the partner was first seen encrypting to each of our encryption keys
    "key_usage",
    metadata,
    sa.Column("kid", sa.String(128), primary_key=True),
    sa.Column("first_seen_at", sa.String(40), nullable=False),
)
