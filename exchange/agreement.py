"""The bilateral agreement: the document both nodes load (think AS4 PMode).

It names the two parties and their node endpoints, CA certificates and initial public message
keys; the common classification levels and each national scheme mapped onto them; message types,
purposes and handling codes. It is validated once when loaded (parse, don't validate) and
identified by its ``version`` and a SHA-256 over its RFC 8785 canonical JSON, so the two nodes agree
on its identity whatever the TOML formatting. Changing a rule is an edit here, never to code.
"""

from __future__ import annotations

import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exchange.canonical import canonical_json, sha256_hex
from exchange.errors import ConfigurationError
from exchange.types import PARTIES, PartyId

Identifier = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_+ -]{0,63}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublicJWK(_Strict):
    """A public OKP key as published in the agreement."""

    kty: str = Field(pattern="^OKP$")
    crv: str = Field(pattern="^(Ed25519|X25519)$")
    x: str = Field(min_length=43, max_length=43)
    kid: str = Field(min_length=1, max_length=128)


class Party(_Strict):
    """One party: its node, its PKI anchor and its initial message keys."""

    name: str
    endpoint: str = Field(pattern=r"^https://", description="base URL of the node's mTLS API")
    node_name: str = Field(description="common name of the node's node-to-node certificate")
    ca_certificate: str = Field(description="PEM of the party's certificate authority")
    scheme: str = Field(description="id of the party's national classification scheme")
    signing_keys: tuple[PublicJWK, ...] = Field(min_length=1)
    encryption_keys: tuple[PublicJWK, ...] = Field(min_length=1)
    checkpoint_key: PublicJWK = Field(description="Ed25519 key of the party's ledger checkpoints")

    @property
    def ledger_origin(self) -> str:
        """The origin line of the party's checkpoints."""
        return f"{self.node_name}/ledger"

    @property
    def witness_name(self) -> str:
        """The key name of the party's cosignatures of the partner's checkpoints."""
        return f"{self.node_name}/witness"

    @field_validator("ca_certificate")
    @classmethod
    def _pem(cls, value: str) -> str:
        if "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("must be a PEM certificate")
        return value

    @model_validator(mode="after")
    def _curves(self) -> Party:
        if any(k.crv != "Ed25519" for k in self.signing_keys):
            raise ValueError("signing_keys must be Ed25519")
        if any(k.crv != "X25519" for k in self.encryption_keys):
            raise ValueError("encryption_keys must be X25519")
        if self.checkpoint_key.crv != "Ed25519":
            raise ValueError("checkpoint_key must be Ed25519")
        return self


class Scheme(_Strict):
    """A national classification scheme: its level names mapped onto common levels."""

    name: str
    levels: dict[str, str] = Field(min_length=1)


class MessageType(_Strict):
    """A message type: its payload schema, allowed purposes and what it may answer."""

    description: str = ""
    schema_file: str = Field(alias="schema", description="file under schemas/messages/")
    purposes: tuple[str, ...] = Field(min_length=1)
    replies_to: tuple[str, ...] = ()
    retention_days: int = Field(default=1825, gt=0)


class Agreement(_Strict):
    """The validated agreement. Use :func:`load_agreement` to read one from disk."""

    version: str = Field(min_length=1, max_length=32)
    title: str
    parties: dict[PartyId, Party]
    common_levels: tuple[str, ...] = Field(min_length=2, description="lowest to highest")
    schemes: dict[str, Scheme]
    purposes: dict[Identifier, str] = Field(min_length=1)
    handling_codes: dict[Identifier, str] = Field(min_length=1)
    tlp: tuple[str, ...] = ("CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED")
    message_types: dict[Identifier, MessageType] = Field(min_length=1)
    max_envelope_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=16 * 1024,
        le=256 * 1024 * 1024,
        description="the largest sealed envelope either node sends or opens; submission refuses more",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Agreement:
        problems: list[str] = []
        if set(self.parties) != set(PARTIES):
            problems.append(f"parties must be exactly {list(PARTIES)}")
        if len(set(self.common_levels)) != len(self.common_levels):
            problems.append("common_levels has duplicates")
        for sid, scheme in self.schemes.items():
            for name, common in scheme.levels.items():
                if common not in self.common_levels:
                    problems.append(f"schemes.{sid}.levels.{name}: unknown common level {common!r}")
        for pid, party in self.parties.items():
            if party.scheme not in self.schemes:
                problems.append(f"parties.{pid}.scheme: unknown scheme {party.scheme!r}")
        for tid, mtype in self.message_types.items():
            for purpose in mtype.purposes:
                if purpose not in self.purposes:
                    problems.append(f"message_types.{tid}.purposes: unknown purpose {purpose!r}")
            for target in mtype.replies_to:
                if target not in self.message_types:
                    problems.append(f"message_types.{tid}.replies_to: unknown type {target!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the agreement's canonical JSON: its identity beside ``version``."""
        return sha256_hex(canonical_json(self.model_dump(mode="json", by_alias=True)))

    def partner_of(self, party: PartyId) -> PartyId:
        """The other party."""
        return "MY" if party == "ID" else "ID"

    def level_rank(self, common_level: str) -> int:
        """Position of a common level (0 = lowest). Raises KeyError for an unknown level."""
        return self.common_levels.index(common_level)


def parse_agreement(data: dict[str, Any], source: str = "agreement") -> Agreement:
    """Validate a parsed agreement document.

    Raises:
        ConfigurationError: naming every invalid field.
    """
    try:
        return Agreement.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"{source} is invalid: {problems}") from exc


def load_agreement(path: Path) -> Agreement:
    """Read and validate an agreement TOML file.

    Raises:
        ConfigurationError: the file is missing, not TOML, or invalid (every field named).
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigurationError(f"agreement file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"agreement file {path} is not valid TOML: {exc}") from exc
    return parse_agreement(data, source=f"agreement file {path}")
