"""The bilateral agreement: the document both nodes load (think AS4 PMode).

It names the two parties and their node endpoints, CA certificates and initial public message
keys; the common classification levels and each national scheme mapped onto them; message types,
purposes and handling codes. It is validated once when loaded (parse, don't validate) and
identified by its ``version`` and its digest: the SHA-256 of the RFC 8785 canonical JSON of the
document **as written** (the TOML file parsed to JSON; no defaults added), so anyone computes it from
the file with public tools (``schemas/agreement-digest.md``), and the two nodes agree on it whatever
the TOML formatting. Changing a rule is an edit here, never to code.
"""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from exchange import crypto
from exchange.canonical import canonical_json, sha256_hex
from exchange.catalogue import DATA_CATEGORIES, SUBJECT_ROLES
from exchange.envelope.size import LARGEST_ENVELOPE_BYTES
from exchange.errors import ConfigurationError, KeyManagementError
from exchange.ledger.checkpoint import SIG_COSIGNATURE_V1, SIG_ED25519, CheckpointError, NoteVerifier
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
    node_name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="common name of the node's node-to-node certificate",
    )
    node_key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="pin of the node-to-node certificate: hex SHA-256 of its SubjectPublicKeyInfo "
        "(`exchange pki pin`); the partner admits no other key on its peer endpoints",
    )
    ca_certificate: str = Field(description="PEM of the party's certificate authority")
    scheme: str = Field(description="id of the party's national classification scheme")
    signing_keys: tuple[PublicJWK, ...] = Field(min_length=1)
    encryption_keys: tuple[PublicJWK, ...] = Field(min_length=1)
    checkpoint_key: PublicJWK = Field(description="Ed25519 key of the party's ledger checkpoints")
    ledger_key: str | None = Field(
        default=None, description="note verifier key of the party's checkpoints (name+keyid+base64)"
    )
    witness_key: str | None = Field(
        default=None, description="note verifier key of the party's cosignatures (name+keyid+base64)"
    )

    @property
    def ledger_origin(self) -> str:
        """The origin line of the party's checkpoints."""
        return f"{self.node_name}/ledger"

    @property
    def witness_name(self) -> str:
        """The key name of the party's cosignatures of the partner's checkpoints."""
        return f"{self.node_name}/witness"

    @property
    def ledger_verifier(self) -> NoteVerifier:
        """Verifies the party's checkpoints (signed-note Ed25519, type 0x01, named by the origin)."""
        return NoteVerifier(self.ledger_origin, SIG_ED25519, jwk_raw(self.checkpoint_key))

    @property
    def witness_verifier(self) -> NoteVerifier:
        """Verifies the party's cosignatures of the partner's checkpoints (cosignature/v1, 0x04)."""
        return NoteVerifier(self.witness_name, SIG_COSIGNATURE_V1, jwk_raw(self.checkpoint_key))

    @model_validator(mode="after")
    def _note_keys(self) -> Party:
        for given, derived in (
            (self.ledger_key, self.ledger_verifier),
            (self.witness_key, self.witness_verifier),
        ):
            if given is not None and given != derived.vkey:
                raise ValueError(f"{given!r} is not the note key of checkpoint_key ({derived.vkey})")
        return self

    @field_validator("ca_certificate")
    @classmethod
    def _pem(cls, value: str) -> str:
        if "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("must be a PEM certificate")
        try:
            info = crypto.certificate_info(value.encode())
        except KeyManagementError as exc:
            raise ValueError(f"is not a readable certificate ({exc})") from exc
        if not info.is_ca:
            raise ValueError("is not a CA certificate")
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


def jwk_raw(jwk: PublicJWK) -> bytes:
    return base64.urlsafe_b64decode(jwk.x + "=")


class Witness(_Strict):
    """A further witness (a regional organisation, an oversight body) that cosigns both parties'
    checkpoints through the C2SP tlog-witness protocol."""

    name: str = Field(description="its key name, as its cosignature lines carry it")
    key: str = Field(description="its cosignature/v1 note verifier key: name+keyid+base64(0x04 || key)")
    url: str = Field(pattern=r"^https?://", description="its submission prefix (POST <url>/add-checkpoint)")

    @model_validator(mode="after")
    def _vkey(self) -> Witness:
        try:
            verifier = NoteVerifier.parse(self.key)
        except CheckpointError as exc:
            raise ValueError(f"key: {exc}") from exc
        if verifier.algorithm != SIG_COSIGNATURE_V1:
            raise ValueError("key: a witness key is a cosignature/v1 (0x04) verifier key")
        if verifier.name != self.name:
            raise ValueError(f"key: names {verifier.name!r}, not the witness {self.name!r}")
        return self

    @property
    def verifier(self) -> NoteVerifier:
        return NoteVerifier.parse(self.key)


class Scheme(_Strict):
    """A national classification scheme: its level names mapped onto common levels."""

    name: str
    levels: dict[str, str] = Field(min_length=1)


class MessageType(_Strict):
    """A message type: its payload schema, allowed purposes and what it may answer."""

    description: str = ""
    schema_file: str = Field(
        alias="schema",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.json$",
        description="file under schemas/messages/",
    )
    purposes: tuple[str, ...] = Field(min_length=1)
    replies_to: tuple[str, ...] = ()
    intelligence: bool = Field(default=False, description="carries intelligence: must be graded")
    kind: Literal["information", "control"] = Field(
        default="information",
        description="information goes to the inbox; control changes an earlier message (exchange.lifecycle)",
    )
    retention_days: int = Field(default=1825, gt=0)


class Organisation(_Strict):
    """A party's police organisation: which agencies count as police, and its addressable units."""

    police_agencies: tuple[str, ...] = Field(min_length=1)
    units: dict[Identifier, str] = Field(min_length=1)


class ThirdParty(_Strict):
    """A recipient outside the two police forces that onward releases may name."""

    name: str
    police: bool = False


Action = Literal["submit", "receive", "release", "onward"]
ACTIONS: tuple[Action, ...] = ("submit", "receive", "release", "onward")


class Replacement(_Strict):
    """Which personal data an obligation replaces: categories of subjects in these roles."""

    subject_roles: tuple[str, ...] = Field(min_length=1)
    categories: tuple[str, ...] = Field(min_length=1)


class Obligation(_Strict):
    """What an obligation rule changes when it applies."""

    raise_level: str | None = None
    raise_tlp: str | None = None
    add_handling: tuple[str, ...] = ()
    redact: Replacement | None = None
    replace_with_handler: Replacement | None = None


class Rule(_Strict):
    """One rule of the agreement: a check (``require``) or an obligation (``then``)."""

    id: str = Field(pattern=r"^R-[A-Z0-9-]{1,62}$")
    version: int = Field(ge=1)
    on: tuple[Action, ...] = Field(min_length=1)
    when: dict[str, Any] | None = None
    require: dict[str, Any] | None = None
    then: Obligation | None = None
    reason: str = Field(min_length=1)
    remedy: str = ""

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        from exchange.policy.conditions import compile_condition  # the condition language

        if (self.require is None) == (self.then is None):
            raise ValueError(f"rule {self.id}: give exactly one of require (a check) or then (an obligation)")
        for name in ("when", "require"):
            spec = getattr(self, name)
            if spec is not None:
                compile_condition(spec, f"rule {self.id}.{name}")
        return self

    @property
    def ref(self) -> str:
        """``id@version``, as decisions and the ledger name the rule."""
        return f"{self.id}@{self.version}"


class Agreement(_Strict):
    """The validated agreement. Use :func:`load_agreement` to read one from disk."""

    version: str = Field(min_length=1, max_length=32)
    title: str
    effective_from: AwareDatetime | None = Field(
        default=None,
        description="when this version takes effect, the same instant for both nodes (RFC 3339 with a "
        "zone, as a string); absent only in a node's first version, in force from the start. Every "
        "later version names it, so both nodes hold it before either sends under it",
    )
    parties: dict[PartyId, Party]
    common_levels: tuple[str, ...] = Field(min_length=2, description="lowest to highest")
    schemes: dict[str, Scheme]
    purposes: dict[Identifier, str] = Field(min_length=1)
    handling_codes: dict[Identifier, str] = Field(min_length=1)
    tlp: tuple[str, ...] = Field(min_length=1, description="TLP values, least to most restrictive")
    priorities: tuple[str, ...] = Field(min_length=1)
    party_schemes: dict[PartyId, str] = Field(description="each party's national scheme (for compose)")
    roles: dict[Identifier, str] = Field(min_length=1)
    organisations: dict[PartyId, Organisation]
    third_parties: dict[Identifier, ThirdParty] = Field(default_factory=dict)
    child_age: int = Field(default=18, ge=1, le=30, description="a victim younger than this is a child")
    consent_decider_roles: tuple[str, ...] = Field(
        default=("SUPERVISOR",), description="roles whose systems decide the partner's consent requests"
    )
    explicit_purposes: tuple[str, ...] = Field(
        default=("JUDICIAL_EVIDENCE",),
        description="purposes a release serves only when the client declares them",
    )
    control_tlp: str = Field(default="AMBER+STRICT", description="the TLP of control messages (node to node)")
    control_handling_codes: tuple[str, ...] = Field(
        default=("H2",), description="the handling codes of control messages"
    )
    control_legal_basis: tuple[str, ...] = Field(
        default=("the bilateral police cooperation agreement",),
        min_length=1,
        description="the legal basis control messages (consent, reclassification, destruction) name",
    )
    message_types: dict[Identifier, MessageType] = Field(min_length=1)
    rules: tuple[Rule, ...] = Field(min_length=1)
    witnesses: tuple[Witness, ...] = Field(default=(), description="further witnesses of both ledgers")
    max_envelope_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=16 * 1024,
        le=LARGEST_ENVELOPE_BYTES,
        description="the largest sealed envelope either node sends or opens; submission refuses more",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Agreement:
        problems = consistency_problems(self.model_dump(mode="json", by_alias=True))
        problems.extend(self._rule_problems())
        if self.control_tlp not in self.tlp:
            problems.append(f"control_tlp: {self.control_tlp!r} is not one of {list(self.tlp)}")
        for code in self.control_handling_codes:
            if code not in self.handling_codes:
                problems.append(f"control_handling_codes: unknown handling code {code!r}")
        if set(self.organisations) != set(PARTIES):
            problems.append(f"organisations must name exactly {list(PARTIES)}")
        names = [w.name for w in self.witnesses] + [p.witness_name for p in self.parties.values()]
        if len(set(names)) != len(names):
            problems.append("witnesses: every witness key name must be distinct (from the parties' too)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _rule_problems(self) -> list[str]:
        problems: list[str] = []
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                problems.append(f"rules: {rule.id} is defined twice")
            seen.add(rule.id)
            problems.extend(self._literal_problems(rule))
            then = rule.then
            if then is None:
                continue
            if then.raise_level is not None and then.raise_level not in self.common_levels:
                problems.append(f"rule {rule.id}: unknown level {then.raise_level!r}")
            if then.raise_tlp is not None and then.raise_tlp not in self.tlp:
                problems.append(f"rule {rule.id}: unknown TLP {then.raise_tlp!r}")
            for code in then.add_handling:
                if code not in self.handling_codes:
                    problems.append(f"rule {rule.id}: unknown handling code {code!r}")
            for replacement in (then.redact, then.replace_with_handler):
                if replacement is None:
                    continue
                for role in replacement.subject_roles:
                    if role not in SUBJECT_ROLES:
                        problems.append(f"rule {rule.id}: unknown subject role {role!r}")
                for category in replacement.categories:
                    if category not in DATA_CATEGORIES:
                        problems.append(f"rule {rule.id}: unknown data category {category!r}")
        for action in ACTIONS:  # an empty policy is an error, never "allow all"
            if not any(action in r.on and r.require is not None for r in self.rules):
                problems.append(f"rules: no check rule for the {action} action")
        return problems

    def vocabulary(self, name: str) -> frozenset[str]:
        """The values the agreement defines for one vocabulary of the condition language."""
        units = {u for org in self.organisations.values() for u in org.units}
        known: dict[str, Any] = {
            "types": self.message_types,
            "tlp": self.tlp,
            "handling_codes": self.handling_codes,
            "purposes": self.purposes,
            "subject_roles": SUBJECT_ROLES,
            "categories": DATA_CATEGORIES,
            "roles": self.roles,
            "units": units,
            "levels": self.common_levels,
            "third_parties": self.third_parties,
        }
        return frozenset(known[name])

    def _literal_problems(self, rule: Rule) -> list[str]:
        """Literals a rule compares with a fact that the fact can never take (a misspelt role or
        TLP would otherwise silently switch the rule off)."""
        from exchange.policy.conditions import FACT_VOCABULARY, literals

        problems = []
        for spec in (rule.when, rule.require):
            for fact, value in literals(spec):
                vocabulary = FACT_VOCABULARY.get(fact)
                if vocabulary is not None and value not in self.vocabulary(vocabulary):
                    problems.append(f"rule {rule.id}: {value!r} is not one of the agreement's {vocabulary}")
        return problems

    def tlp_rank(self, tlp: str) -> int:
        """Position of a TLP value (0 = least restrictive). Raises ValueError if unknown."""
        return self.tlp.index(tlp)

    def units_of(self, party: PartyId) -> frozenset[str]:
        return frozenset(self.organisations[party].units)

    _document_digest: str | None = PrivateAttr(default=None)
    _document: dict[str, Any] | None = PrivateAttr(default=None)

    @property
    def document(self) -> dict[str, Any]:
        """The document as written (parsed, no defaults added): what :attr:`digest` is the hash of.
        Raises ConfigurationError as :attr:`digest` does."""
        if self._document is None:
            raise ConfigurationError("the agreement's document is known only for a parsed document")
        return self._document

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the RFC 8785 form of the document as written: its identity beside
        ``version`` (:func:`document_digest`). Raises ConfigurationError for an agreement not read
        through :func:`parse_agreement`, whose document is unknown."""
        if self._document_digest is None:
            raise ConfigurationError("the agreement's digest is known only for a parsed document")
        return self._document_digest

    def partner_of(self, party: PartyId) -> PartyId:
        """The other party."""
        return "MY" if party == "ID" else "ID"

    def level_rank(self, common_level: str) -> int:
        """Position of a common level (0 = lowest). Raises KeyError for an unknown level."""
        return self.common_levels.index(common_level)


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def consistency_problems(data: Mapping[str, Any]) -> list[str]:
    """Every cross-reference error of an agreement document, each naming its field.

    Works on the raw document too (tolerating fields of the wrong shape, which field validation
    reports), so that one check reports every error at once rather than one round at a time.
    """
    problems: list[str] = []
    parties, schemes = _dict(data.get("parties")), _dict(data.get("schemes"))
    common_levels = _list(data.get("common_levels"))
    purposes, message_types = _dict(data.get("purposes")), _dict(data.get("message_types"))
    if set(parties) != set(PARTIES):
        problems.append(f"parties must be exactly {list(PARTIES)}")
    if len(set(map(str, common_levels))) != len(common_levels):
        problems.append("common_levels has duplicates")
    for sid, scheme in schemes.items():
        for name, common in _dict(_dict(scheme).get("levels")).items():
            if common not in common_levels:
                problems.append(f"schemes.{sid}.levels.{name}: unknown common level {common!r}")
    used_schemes: dict[str, str] = {}
    kids: dict[str, str] = {}
    for pid, party in parties.items():
        entry = _dict(party)
        scheme = entry.get("scheme")
        if isinstance(scheme, str):
            if scheme not in schemes:
                problems.append(f"parties.{pid}.scheme: unknown scheme {scheme!r}")
            elif scheme in used_schemes:
                problems.append(
                    f"parties.{pid}.scheme: {scheme!r} is already the scheme of {used_schemes[scheme]}"
                )
            used_schemes.setdefault(scheme, str(pid))
        keys = [*_list(entry.get("signing_keys")), *_list(entry.get("encryption_keys"))]
        keys.append(entry.get("checkpoint_key"))
        for key in keys:
            kid = _dict(key).get("kid")
            if isinstance(kid, str):
                if kid in kids:
                    problems.append(f"parties.{pid}: key id {kid!r} is used twice (also in {kids[kid]})")
                kids.setdefault(kid, f"parties.{pid}")
    for tid, mtype in message_types.items():
        spec = _dict(mtype)
        for purpose in _list(spec.get("purposes")):
            if purpose not in purposes:
                problems.append(f"message_types.{tid}.purposes: unknown purpose {purpose!r}")
        for target in _list(spec.get("replies_to")):
            if target not in message_types:
                problems.append(f"message_types.{tid}.replies_to: unknown type {target!r}")
        schema = spec.get("schema")
        if isinstance(schema, str) and "/" not in schema and not schema.startswith("."):
            problem = _schema_problem(schema)
            if problem:
                problems.append(f"message_types.{tid}.schema: {problem}")
    return problems


def _schema_problem(schema_file: str) -> str | None:
    """Why a payload schema named by the agreement is unusable (not one of the catalogue's), or None."""
    from exchange.catalogue import PAYLOAD_MODELS

    stem = schema_file.removesuffix(".schema.json")
    if stem not in PAYLOAD_MODELS:
        known = ", ".join(f"{s}.schema.json" for s in PAYLOAD_MODELS)
        return f"no such payload schema {schema_file!r} in the catalogue ({known})"
    return None


def document_digest(data: dict[str, Any]) -> str:
    """The agreement digest of a parsed document: hex SHA-256 of its RFC 8785 canonical JSON.

    The same as ``python3 -c 'import hashlib,sys,tomllib,rfc8785;
    print(hashlib.sha256(rfc8785.dumps(tomllib.load(open(sys.argv[1],"rb")))).hexdigest())' FILE``.

    Raises:
        ConfigurationError: the document holds a value JSON cannot (a TOML date or time).
    """
    try:
        return sha256_hex(canonical_json(data))
    except ValueError as exc:
        raise ConfigurationError(
            f"the agreement must hold only JSON values (no TOML dates or times): {exc}"
        ) from exc


def parse_agreement(data: dict[str, Any], source: str = "agreement") -> Agreement:
    """Validate a parsed agreement document; its digest is :func:`document_digest` of ``data``.

    Raises:
        ConfigurationError: naming every invalid field, or a value JSON cannot hold.
    """
    digest = document_digest(data)
    try:
        agreement = Agreement.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}" for err in errors]
        if any(err["loc"] for err in errors):  # the cross-checks did not run: run them on the raw data
            problems = [p for p, err in zip(problems, errors, strict=True) if err["loc"]]
            problems += consistency_problems(data)
        raise ConfigurationError(f"{source} is invalid: {'; '.join(problems)}") from exc
    agreement._document_digest = digest
    agreement._document = data
    return agreement


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
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"agreement file {path} is not UTF-8 text (byte {exc.start})") from exc
    return parse_agreement(data, source=f"agreement file {path}")
