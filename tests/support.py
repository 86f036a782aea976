"""Builders shared by the tests: real node directories made through the real CLI."""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from joserfc import jwe, jws
from joserfc.registry import HeaderParameter
from typer.testing import CliRunner

from exchange import envelope
from exchange.canonical import canonical_json
from exchange.cli import app
from exchange.demo import free_port
from exchange.messages import MessageSubmission, Origin, draft_from_submission
from exchange.node import Node

PASSPHRASE = "tests-" + secrets.token_urlsafe(18)  # generated per run, never stored
CLIENT_PASSPHRASE = "client-" + secrets.token_urlsafe(18)  # local systems' keys have their own
RUNNER = CliRunner()


def cli(*args: str) -> str:
    """Run a CLI command in-process; fail the test with its output if it does not succeed."""
    result = RUNNER.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@dataclass(frozen=True)
class ClientFiles:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeDir:
    party: str
    path: Path
    port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.path / "tls" / "ca.pem"

    def client(self, name: str) -> ClientFiles:
        return ClientFiles(
            name, self.path / "clients" / f"{name}.pem", self.path / "clients" / f"{name}-key.pem"
        )


def set_node_options(node: Path, **values: object) -> None:
    data = tomllib.loads((node / "node.toml").read_text())
    data.update(values)
    (node / "node.toml").write_text(tomli_w.dumps(data))


def make_pair(
    root: Path,
    db_urls: Sequence[str | None] = (None, None),
    clients: Sequence[tuple[str, str, str]] = (("ID", "polri-cms", "RAHASIA"), ("MY", "pdrm-d7", "RAHSIA")),
) -> tuple[NodeDir, NodeDir]:
    """Two initialised, migrated nodes sharing one agreement, each with registered clients.

    ``clients`` lists (party, name, clearance); requires EXCHANGE_KEY_PASSPHRASE to be set.
    """
    nodes = []
    for party, url in zip(("ID", "MY"), db_urls, strict=True):
        port = free_port()
        path = root / party.lower()
        cli("init", "--party", party, "--dir", str(path), "--port", str(port))
        if url:
            set_node_options(path, database_url=url)
        nodes.append(NodeDir(party, path, port))
    cli(
        "agreement",
        "compose",
        "--party",
        str(nodes[0].path / "party.toml"),
        "--party",
        str(nodes[1].path / "party.toml"),
        "--out",
        str(root / "agreement.toml"),
    )
    for node in nodes:
        shutil.copy(root / "agreement.toml", node.path / "agreement.toml")
        cli("db", "upgrade", "--dir", str(node.path))
    for party, name, clearance in clients:
        node = nodes[0] if party == "ID" else nodes[1]
        register_client(node, name, clearance)
    return nodes[0], nodes[1]


UNITS = {"ID": "TPPO", "MY": "ATIPSOM"}  # each party's anti-trafficking unit in the default terms


def register_client(node: NodeDir, name: str, clearance: str, *extra: str) -> ClientFiles:
    """Issue and register a client; entitled to every type and purpose, in the party's trafficking
    unit, unless ``extra`` options say otherwise."""
    cli("pki", "issue-client", "--dir", str(node.path), "--name", name, "--out", str(node.path / "clients"))
    files = node.client(name)
    defaults = [
        *([] if "--type" in extra else ["--type", "ALL"]),
        *([] if "--purpose" in extra else ["--purpose", "ALL"]),
        *([] if "--unit" in extra else ["--unit", UNITS[node.party]]),
    ]
    cli(
        "clients",
        "add",
        "--dir",
        str(node.path),
        "--id",
        name,
        "--cert",
        str(files.cert),
        "--agency",
        "Polri" if node.party == "ID" else "PDRM",
        "--clearance",
        clearance,
        *defaults,
        *extra,
    )
    return files


def rfi(**overrides: object) -> dict[str, object]:
    """A valid REQUEST_FOR_INFORMATION submission from Indonesia."""
    body: dict[str, object] = {
        "type": "REQUEST_FOR_INFORMATION",
        "case_ref": "ID-MY/2026/0001",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "AMBER",
        "handling_codes": ["H0"],
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "payload": {"summary": "Recruiters moving workers via Batam", "questions": ["Known to PDRM?"]},
    }
    body.update(overrides)
    return body


def response_to(message_id: str, **overrides: object) -> dict[str, object]:
    """A valid RESPONSE from Malaysia to ``message_id``."""
    body: dict[str, object] = {
        "type": "RESPONSE",
        "case_ref": "ID-MY/2026/0001",
        "in_reply_to": message_id,
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "ARAHAN", "level": "SULIT"},
        "tlp": "AMBER",
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "payload": {"outcome": "ANSWERED", "answers": [{"question": 0, "answer": "Yes, since March."}]},
    }
    body.update(overrides)
    return body


def signed_json(
    node: Node, created: dt.datetime, checkpoint: str | None = None, **overrides: object
) -> dict[str, Any]:
    """The signed form of ``rfi(**overrides)`` from ``node``, built from the draft exactly as submit
    builds it, without the rules (so a test can play a partner that does not apply them)."""
    submission = MessageSubmission.model_validate(rfi(**overrides))
    terms = node.terms
    draft = draft_from_submission(
        submission,
        agreement=terms.agreement,
        catalogue=terms.catalogue,
        sender=node.party,
        origin=Origin(agency="Polri" if node.party == "ID" else "PDRM", unit=UNITS[node.party]),
        now=created,
        checkpoint=checkpoint,
    )
    return draft.signed_json()


def signed_message(
    node: Node,
    created: dt.datetime,
    checkpoint: str | None = None,
    signing_key: Any = None,
    **overrides: object,
) -> str:
    """A genuinely sealed envelope from ``node`` to its partner of :func:`signed_json`, signed by
    ``signing_key`` (default: the node's active signing key)."""
    return envelope.seal(
        signed_json(node, created, checkpoint, **overrides),
        signing_key=signing_key or node.keys.signing,
        recipient_key=node.partner.encryption,
    )


def forge_envelope(node: Node, signed: dict[str, Any], header_source: dict[str, Any]) -> str:
    """An envelope genuinely signed and encrypted by ``node`` whose signed payload is ``signed``
    as given (for example missing a field), its JWE header taken from ``header_source``: what a
    partner node at another software version, or a buggy one, could send."""
    signer = jws.serialize_compact(
        {"alg": "EdDSA", "kid": node.keys.signing.kid, "typ": "exchange-message+jws"},
        canonical_json(signed),
        node.keys.signing,
        registry=jws.JWSRegistry(algorithms=["EdDSA"]),
    )
    fields = {param: header_source[field] for param, field in envelope.HEADER_FIELDS.items()}
    protected = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "kid": node.partner.encryption.kid,
        "typ": "exchange-envelope+jwe",
        "cty": "JOSE",
        **fields,
    }
    registry = jwe.JWERegistry(
        header_registry={name: HeaderParameter(name, lambda _value: None) for name in fields},
        algorithms=["ECDH-ES+A256KW", "A256GCM"],
    )
    return jwe.encrypt_compact(protected, signer, node.partner.encryption, registry=registry)


def tables_quoting(node: Node, *texts: str) -> list[str]:
    """The tables of ``node``'s database where any of ``texts`` is written in clear, in any column
    of any row (sealed content is ciphertext and never matches)."""
    import sqlalchemy as sa

    from exchange.db import schema

    found = []
    with node.db.read() as conn:
        for table in schema.metadata.sorted_tables:
            rows = conn.execute(sa.select(table)).all()
            written = " ".join(
                v.decode("latin-1") if isinstance(v, bytes) else str(v) for row in rows for v in row
            )
            if any(text in written for text in texts):
                found.append(table.name)
    return found
