"""Response models of the audit API: they give every answer a schema in the OpenAPI description.

Hashes in these answers are lowercase hex (``leaf_hash``, ``root``, ``proof``); notes and
cosignature lines are the C2SP texts (base64 inside); the export bundle is
``schemas/audit-bundle.schema.json`` (base64 throughout).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HEX32 = r"^[0-9a-f]{64}$"


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuditEntry(_Answer):
    """One ledger entry: the fields of its leaf, the leaf itself and its RFC 9162 leaf hash."""

    seq: int = Field(ge=0, description="sequence number = leaf index")
    at: str
    event: str
    message_id: str | None
    case_ref: str | None
    actor: str | None
    decision: str | None
    rules: list[str]
    data: dict[str, Any]
    leaf: str = Field(
        description="the raw leaf (schemas/ledger-leaf.schema.json): its UTF-8 bytes are what the tree hashes"
    )
    leaf_hash: str = Field(pattern=HEX32, description="SHA-256(0x00 || leaf), hex")


class EntriesPage(_Answer):
    items: list[AuditEntry]
    next_cursor: int = Field(description="pass as `after` for the next page")


class MessageHistory(_Answer):
    message_id: str
    nodes: dict[str, list[AuditEntry]] = Field(
        description="each node's entries about the message, by party; the partner's each rebuilt from"
        " its leaf, their inclusion in its witnessed log not proven here (its audit bundle proves it)"
    )
    partner_error: str | None = Field(description="why the partner's part is missing, if it is")


class VerifierKey(_Answer):
    holder: str
    signs: str
    key: str = Field(description="signed-note verifier key: name+keyid+base64(type || public key)")
    kid: str | None = Field(default=None, description="the checkpoint key's id in its party's key set")
    state: str | None = Field(default=None, description="next, active, retiring, retired or revoked")
    valid_from: str | None = None
    valid_until: str | None = None
    revoked_at: str | None = Field(default=None, description="trusted only for what it signed before")


class OwnCheckpoint(_Answer):
    size: int
    root: str = Field(pattern=HEX32)
    note: str = Field(description="the C2SP checkpoint as signed by this node")
    signed_at: str
    cosignature: str | None = Field(description="the partner node's cosignature line")
    cosigned_at: str | None
    witness_cosignatures: dict[str, str] = Field(
        description="further witnesses' cosignature lines, by key name"
    )


class WitnessedCheckpoint(_Answer):
    size: int
    root: str = Field(pattern=HEX32)
    note: str
    previous_size: int = Field(description="the size the consistency proof was verified from")
    witnessed_at: str


class Checkpoints(_Answer):
    origin: str = Field(description="this node's log origin (= the key name of its checkpoint key)")
    cosigner: str = Field(description="the partner node's witness key name")
    verifier_keys: list[VerifierKey] = Field(
        description="every note verifier key: each checkpoint key of both parties' key histories, and"
        " the further witnesses' keys the agreement pins"
    )
    checkpoints: list[OwnCheckpoint] = Field(description="the newest `limit` below `before`, oldest first")
    witnessed: list[WitnessedCheckpoint] = Field(
        description="the partner's checkpoints this node cosigned: the newest `limit` below"
        " `witnessed_before`, oldest first"
    )
    next_before: int | None = Field(description="pass as `before` for older checkpoints (null: none older)")
    next_witnessed_before: int | None = Field(
        description="pass as `witnessed_before` for older witnessed ones (null: none older)"
    )


class InclusionProof(_Answer):
    seq: int
    size: int
    leaf: str
    leaf_hash: str = Field(pattern=HEX32)
    root: str = Field(pattern=HEX32)
    proof: list[str] = Field(description="RFC 9162 inclusion proof, hex, bottom-up")


class ConsistencyProof(_Answer):
    old_size: int
    new_size: int
    old_root: str = Field(pattern=HEX32)
    new_root: str = Field(pattern=HEX32)
    proof: list[str] = Field(description="RFC 9162 consistency proof, hex")


class FlaggedSignature(_Answer):
    seq: int
    event: str
    party: str = Field(description="whose key signed")
    kid: str
    signed_at: str
    revoked_at: str | None
    reason: str


class Verification(_Answer):
    ok: bool
    summary: str | None = None
    entries: int | None = None
    checkpoints: int | None = None
    cosignatures: int | None = None
    witness_cosignatures: dict[str, int] | None = None
    witnessed: int | None = None
    key_versions: dict[str, int] | None = Field(
        default=None, description="each party's key-set version the history was walked to"
    )
    flagged: list[FlaggedSignature] = Field(
        default_factory=list, description="entries signed by a key not in force when it signed"
    )
    error: str | None = None
    first_bad_entry: int | None = None


class BundleEntry(_Answer):
    index: int
    leaf: str
    inclusion: list[str] = Field(description="RFC 9162 inclusion proof, base64")


class BundleConsistency(_Answer):
    checkpoint: str
    signed_at: str
    proof: list[str] = Field(description="RFC 9162 consistency proof, base64")


class AuditBundle(_Answer):
    """An export bundle: schemas/audit-bundle.schema.json."""

    format: str = Field(pattern="^exchange-audit-bundle/3$")
    party: str
    agreement: dict[str, str]
    origin: str
    checkpoint: str = Field(description="the signed checkpoint followed by its cosignature lines")
    signed_at: str = Field(description="when the log signed the checkpoint (its key is judged then)")
    key_sets: dict[str, list[str]] = Field(
        description="each party's key-set announcements after the agreement's version 1, in order"
    )
    entries: list[BundleEntry]
    consistency: BundleConsistency | None
